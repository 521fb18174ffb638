"""A sweep that cannot run leaves nothing; one that fails goes on with `--resume`, and
`--resume --retry-failed` runs its failed trials again in their own MLflow runs.

Real Ray Tune (the module's local Ray of 2 CPUs) and MLflow (SQLite). The trial body is a stand-in
(run_sweep's `trainable=` seam) that opens the trial's MLflow run through the real
`trainer.prepare_tracking`, as fit_run does, and fails until the test flips a switch: a real
training run would add about a minute per attempt for nothing checked here (fit_run resuming from
its checkpoint is tests/orchestrator/train/test_training_run.py's). About 20 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_experiment
from orchestrator.errors import SweepError
from orchestrator.sweep.plan import plan_sweep


def plan_of(tiny_sweep, name: str, grid: dict, overrides: list[str] | None = None):
    config = tiny_sweep(name, grid)
    base, section = load_experiment(config, overrides or [])
    return plan_sweep(base, section, source=str(config))


def test_retry_failed_needs_resume(sweep_job, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        sweep_job.main(["--retry-failed"])
    assert exit_.value.code == 2
    assert "--retry-failed needs --resume" in capsys.readouterr().err


def test_a_sweep_too_big_for_the_cluster_writes_nothing(
    tmp_path: Path, tiny_sweep, ray_local
) -> None:
    """One trial needs 0.5 + 8 x 0.25 = 2.5 CPUs, the cluster has 2: refused before the sweep's
    state folder or its MLflow parent run exist."""
    from orchestrator.sweep.tune import run_sweep

    plan = plan_of(tiny_sweep, "big", {"seed": [1]}, ["scaling.num_workers=8"])
    with pytest.raises(
        SweepError, match=r"one trial needs \{CPU: 2\.5\} .* the cluster has \{CPU: 2\}"
    ):
        run_sweep(plan)
    assert not plan.sweep_dir.exists()
    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name("sweep-tests")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_resume_retry_failed_finishes_the_failed_trial_in_its_own_run(
    tmp_path: Path, tiny_sweep, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 2 fails until the switch is on. 1: the driver fails after the state exists: the
    parent run ends FAILED with the reason. 2: --resume goes on, but does not retry seed 2: the
    parent ends FAILED naming it. 3: --resume --retry-failed, switch on: seed 2 runs again in its
    own MLflow run (FAILED, then FINISHED), seed 1 is not run again, the parent ends FINISHED."""
    from orchestrator.sweep import tune as sweep
    from orchestrator.sweep.state import read_state

    switch, attempts = tmp_path / "fixed", tmp_path / "attempts.txt"
    plan = plan_of(tiny_sweep, "retry", {"seed": [1, 2]})

    def flaky_trial(config, sweep_data):  # a closure: Ray ships it by value to the trial's process
        from ray import tune

        from orchestrator import tracking
        from orchestrator.sweep.trial import trial_run
        from orchestrator.train.trainer import prepare_tracking

        run = trial_run(config, sweep_data)
        uri, run_id = prepare_tracking(run, sweep_data["parent_run_id"], sweep_data["sweep"])
        with open(attempts, "a") as f:
            f.write(f"{run.run_name} {run_id}\n")
        if run.seed == 2 and not switch.exists():
            tracking.set_terminated(uri, run_id, "FAILED", "RuntimeError: injected")  # as fit_run
            raise RuntimeError("injected: fails until the test flips the switch")
        step = run.optim.max_steps
        tracking.log_metrics(uri, run_id, {"val/nll": 1.0 / run.seed}, step=step)
        tracking.set_terminated(uri, run_id, "FINISHED")
        tune.report({"val/nll": 1.0 / run.seed, "step": step, "mlflow_run_id": run_id})

    def lost(*args, **kwargs):
        raise RuntimeError("MLflow went away while the results were read")

    client = MlflowClient(plan.tracking_uri)
    monkeypatch.setattr(sweep, "collect", lost)
    with pytest.raises(RuntimeError, match="MLflow went away"):
        sweep.run_sweep(plan, trainable=flaky_trial, evaluate_ensembles=False)
    monkeypatch.undo()
    parent = read_state(plan)["parent_run_id"]
    first = client.get_run(parent)
    assert first.info.status == "FAILED"
    assert "RuntimeError: MLflow went away" in first.data.tags["failure_reason"]
    assert "--name retry --resume" in first.data.tags["failure_reason"]

    outcome = sweep.run_sweep(plan, resume=True, trainable=flaky_trial, evaluate_ensembles=False)
    assert outcome.parent_run_id == parent
    assert {t.name: t.status for t in outcome.trials} == {
        "retry-seed1": "FINISHED",
        "retry-seed2": "FAILED",
    }
    assert client.get_run(parent).data.tags["failure_reason"] == "1 of 2 trials failed: retry-seed2"
    assert client.get_run(parent).info.status == "FAILED"
    assert len(attempts.read_text().splitlines()) == 2  # nothing ran again

    switch.touch()  # the cause is fixed
    outcome = sweep.run_sweep(
        plan, resume=True, retry_failed=True, trainable=flaky_trial, evaluate_ensembles=False
    )
    assert outcome.parent_run_id == parent and client.get_run(parent).info.status == "FINISHED"
    assert [t.status for t in outcome.trials] == ["FINISHED", "FINISHED"]
    lines = attempts.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == [
        "retry-seed1",
        "retry-seed2",
        "retry-seed2",
    ]
    seed2 = {line.split()[1] for line in lines if line.startswith("retry-seed2")}
    children = client.search_runs(
        [first.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    (run_seed2,) = [r for r in children if r.info.run_name == "retry-seed2"]
    assert seed2 == {run_seed2.info.run_id}  # the same MLflow run, not a new one
    # the reasons of the earlier failures went with them
    assert "failure_reason" not in run_seed2.data.tags
    assert "failure_reason" not in client.get_run(parent).data.tags
    assert outcome.best is not None and outcome.best.name == "retry-seed2"  # val/nll 0.5 < 1.0
