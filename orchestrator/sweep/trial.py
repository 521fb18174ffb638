"""One trial in its own process: the Ray Tune function trainable `train_trial(config, sweep_data)`.

Tune calls it with its own `config` ({"trial": run name} for a planned trial, or Optuna's draw)
and `sweep_data`, the plain data of the sweep (`trainable_data`: it travels through Ray's object
store, so no SweepPlan). The trial builds its RunConfig (`trial_run`), calls `fit_run` (which
fits a TorchTrainer and logs the run to MLflow under the sweep's parent run) and reports its
final metrics, with the validation metrics of its selected checkpoint, to Tune. Validation
reports reach Tune while it trains through `ForwardValidation` (for ASHA and Optuna).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.sweep.names import trial_run_name, value_word
from orchestrator.sweep.plan import SweepPlan
from orchestrator.train import trainer
from orchestrator.train.run_marker import recorded_run_id


def trainable_data(plan: SweepPlan, parent_run_id: str) -> dict[str, Any]:
    """The plain data a trainable needs (travels through Ray's object store), with the driver's
    MLflow source tags: a trial's process runs Ray's script, not jobs/sweep.py."""
    return {
        "sweep": plan.name,
        "parent_run_id": parent_run_id,
        "source": tracking.source_tags(),
        "tracking_uri": plan.tracking_uri,
        "metric": plan.sweep.metric,
        "search": plan.sweep.search,
        "base": plan.base.to_dict(),
        "trials": {t.name: t.run.to_dict() for t in plan.trials if t.tuned},
    }


def trial_run(config: Mapping[str, Any], sweep_data: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a Tune trial: the planned one, or (Optuna) the base with the drawn values."""
    if "trial" in config:
        return RunConfig.from_dict(sweep_data["trials"][config["trial"]])
    values = {k: v for k, v in config.items()}
    label = "-".join(value_word(k, v) for k, v in values.items())
    name = trial_run_name(sweep_data["sweep"], ("optuna", label))
    return RunConfig.from_dict(sweep_data["base"]).with_overrides({**values, "name": name})


def train_trial(config: dict[str, Any], sweep_data: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial is one `fit_run`, its final metrics reported to Tune.

    `config` is Tune's ({"trial": run name}, or Optuna's draw); `sweep_data` the sweep's plain
    data (`trainable_data`). A trial whose MLflow run is FINISHED already (a resumed sweep)
    reports it and does not train.
    """
    run = trial_run(config, sweep_data)
    uri = sweep_data["tracking_uri"]
    previous = recorded_run_id(run)
    if previous is not None and tracking.read_run(uri, previous)[0] == "FINISHED":
        print(f"[sweep] {run.run_name} finished before (MLflow run {previous}): not run again")
        run_id, metrics = previous, tracking.read_run(uri, previous)[2]
    else:
        result = trainer.fit_run(
            run,
            parent_run_id=sweep_data["parent_run_id"],
            sweep=sweep_data["sweep"],
            callbacks=[ForwardValidation(sweep_data["metric"], run.optim.max_steps)],
            source=sweep_data.get("source"),
        )
        run_id, metrics = result.mlflow_run_id, result.metrics
    final = {k: v for k, v in metrics.items() if k.startswith(("test/", "ood/"))}
    final.update(selected_validation(uri, run_id, metrics))
    final[sweep_data["metric"]] = final.get(sweep_data["metric"], math.nan)
    tune.report({**final, "step": run.optim.max_steps, "mlflow_run_id": run_id})


class ForwardValidation(TuneReportCallback):
    """Forward the Ray Train reports that carry the sweep's metric (the validations) to Ray Tune.

    Left out: the workers' last report (test metrics, no validation: Tune refuses a result without
    its scheduler's metric) and the validation at the last step (ASHA stops a trial that reaches
    its max_t, which would kill it before its final evaluation). `train_trial` reports the final
    metrics, with the validation of the selected checkpoint, itself.
    """

    def __init__(self, metric: str, last_step: int) -> None:
        super().__init__()
        self.metric, self.last_step = metric, last_step

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = metrics[0] if metrics else {}
        if self.metric in first and first.get("step", 0) < self.last_step:
            super().after_report(run_context, metrics, checkpoint)


def selected_validation(uri: str, run_id: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The run's val/* metrics at its selected (best) checkpoint, `best_step` (latest values without it)."""
    vals = {k: v for k, v in metrics.items() if k.startswith("val/")}
    if "best_step" not in metrics:
        return vals
    step = int(metrics["best_step"])
    for key in vals:
        at_step = [v for s, v in tracking.metric_history(uri, run_id, key) if s == step]
        if at_step:
            vals[key] = at_step[-1]
    return vals
