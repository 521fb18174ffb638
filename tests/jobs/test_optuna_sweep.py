"""`search: optuna` through the real run_sweep: Ray Tune's OptunaSearch (Optuna's TPE) draws the
sweep's space, each draw becomes a named trial config, and its reported metric reaches the
searcher. The trial body is a stand-in that scores the draw (run_sweep's `trainable=` seam), so
no model trains; Ray, Tune, Optuna and MLflow are real (about 30 s)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.config import load_experiment
from orchestrator.sweep_config import plan_sweep

REPO = Path(__file__).resolve().parents[2]
SPACE = {
    "adapter.sigma_p": {"loguniform": [0.05, 1.0]},
    "adapter.r": {"choice": [4, 8, 16]},
}


def test_optuna_draws_named_trials_from_the_space(tmp_path: Path, monkeypatch) -> None:
    import ray
    from ray import tune

    from orchestrator.sweep import _trial_run, run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base, _ = load_experiment(
        REPO / "jobs/configs/demo.yaml",
        [
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.storage_path={tmp_path / 'ray_results'}",
            "tracking.experiment=optuna-tests",
        ],
    )
    section = {
        "search": "optuna",
        "space": SPACE,
        "num_samples": 6,
        "search_seed": 3,
        "metric": "val/nll",
        "driver_cpus": 0.5,
        "max_concurrent_trials": 1,  # one at a time: each draw sees every earlier result
    }
    plan = plan_sweep(base, section, name="opt")

    def scored_trial(config, plan):  # a closure: Ray ships it by value to the trial's process
        import math

        from ray import tune

        nll = (math.log(config["adapter.sigma_p"]) - math.log(0.2)) ** 2 + config["adapter.r"] / 100
        tune.report({"val/nll": nll, "step": 1})

    try:
        run_sweep(plan, trainable=scored_trial, evaluate_ensembles=False)
        trials = tune.ExperimentAnalysis(str(plan.sweep_dir)).trials
    finally:
        ray.shutdown()
    assert len(trials) == 6 and all(t.status == "TERMINATED" for t in trials)
    data = {"sweep": "opt", "base": plan.base.to_dict()}
    names = set()
    for t in trials:
        sigma, r = t.config["adapter.sigma_p"], t.config["adapter.r"]
        assert 0.05 <= sigma <= 1.0 and r in (4, 8, 16)
        run = _trial_run(t.config, data)  # the trial's RunConfig: the base with the draw
        assert (run.adapter.sigma_p, run.adapter.r) == (sigma, r)
        assert run.run_name.startswith("opt-optuna-") and f"r{r}" in run.run_name
        want = (math.log(sigma) - math.log(0.2)) ** 2 + r / 100
        assert t.last_result["val/nll"] == pytest.approx(want)
        names.add(run.run_name)
    assert len(names) == 6  # six distinct draws, six distinct run names
