"""A sweep's outcome, read back from MLflow once Tune returned: every trial's status and metrics
(`collect`), the best trial, the results table, and the parent run's end (`finish_parent`: its
tags, the best trial's metrics, its registered model).

The sweep's result has a name: when it ends, the MLflow model of its best trial (each trained
trial's adapter is one, logged by fit_run) becomes a new version of the registered model named
after the sweep, tagged with the parent run and the metric (`register_best_model`; ENS and LAP
trials have no single-adapter model, so the best trial that has one is registered).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from melora.keys import final_key
from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.report.cells import mean_std
from orchestrator.sweep.names import format_value
from orchestrator.sweep.plan import SweepPlan, Trial
from orchestrator.sweep.trial import selected_validation, trainable_data, trial_run
from orchestrator.tracking import model as mlflow_model
from orchestrator.tracking.conventions import (
    BEST_MODEL_TAG,
    BEST_RUN_ID_TAG,
    BEST_TRIAL_TAG,
    BEST_VALUE_PREFIX,
    ENS_MEMBER,
    FAILURE_REASON_TAG,
    REGISTRY_ERROR_TAG,
    SWEEP_METRIC_TAG,
    SWEEP_RUN_TAG,
    SWEEP_TRIAL_TAG,
    SWEEP_VALUE_TAG,
    TRAINED,
    TRIALS_FAILED_TAG,
    TRIALS_FINISHED_TAG,
    TRIALS_STOPPED_TAG,
    TRIALS_TOTAL_TAG,
)

TABLE_METRICS = ("acc", "ece", "nll")
TABLE_SAMPLES = (0, 10)


@dataclass
class TrialOutcome:
    """A trial as MLflow has it after the sweep: FINISHED, FAILED, KILLED (stopped early), RUNNING or MISSING."""

    name: str
    row: str
    status: str
    run_id: str | None
    metrics: dict[str, float]
    reason: str | None = None
    run: RunConfig | None = None
    values: dict[str, Any] = field(default_factory=dict)
    role: str = TRAINED


@dataclass
class SweepOutcome:
    """The sweep after Tune returned: its parent run, every trial, the best one."""

    plan: SweepPlan
    parent_run_id: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == "FAILED"]

    @property
    def unfinished(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status in ("RUNNING", "MISSING")]


# ----- collecting -------------------------------------------------------------------------------
def collect(
    plan: SweepPlan, parent_run_id: str, ensemble_errors: Mapping[str, str] | None = None
) -> SweepOutcome:
    """Every trial as MLflow has it, reconciled with Tune's view, and the best trial.

    An ENS trial without a run is FAILED with its reason in `ensemble_errors` (`ensemble_step`),
    else MISSING (the sweep stopped before it).

    Tune's saved experiment says how each trial ended. A trial that Tune ended without an error but
    whose MLflow run is not FINISHED was stopped by the scheduler: KILLED (its process may have
    written FAILED while it was being killed). One that Tune saw fail while its MLflow run still
    says RUNNING lost its process: FAILED.
    """
    uri = plan.tracking_uri
    records = {r.name: r for r in tracking.child_runs(uri, parent_run_id)}
    trials, errors = list(plan.trials), dict(ensemble_errors or {})
    trials += _reconcile_with_tune(plan, parent_run_id, records, errors)
    outcomes = [_outcome(uri, t, records.get(t.name), errors) for t in trials]
    metric = plan.sweep.metric
    done = [
        o
        for o in outcomes
        if o.status == "FINISHED"
        and o.role != ENS_MEMBER
        and math.isfinite(o.metrics.get(metric, math.nan))
    ]
    pick = max if plan.mode == "max" else min
    best = pick(done, key=lambda o: o.metrics[metric]) if done else None
    return SweepOutcome(plan, parent_run_id, outcomes, best)


def _reconcile_with_tune(
    plan: SweepPlan,
    parent_run_id: str,
    records: Mapping[str, tracking.RunRecord],
    errors: dict[str, str],
) -> list[Trial]:
    """Settle each MLflow run with how Tune ended its trial (`errors` gets Tune's failures);
    returns Optuna's trials (drawn while the sweep ran, so not in the plan)."""
    uri, data, drawn = plan.tracking_uri, trainable_data(plan, parent_run_id), []
    for trial in tune_trials(plan):
        run = trial_run(trial.config, data)
        if plan.sweep.search == "optuna":
            values = {k: trial.config[k] for k in plan.sweep.space}
            drawn.append(
                Trial(run.run_name, values, {}, run.run_name.removeprefix(f"{plan.name}-"), run)
            )
        record = records.get(run.run_name)
        if trial.status == "ERROR":
            errors[run.run_name] = f"the trial failed; see {trial.path}/error.txt"
            if record is not None and record.status == "RUNNING":
                _close(uri, record, "FAILED", errors[run.run_name])
        elif trial.status == "TERMINATED" and record is not None and record.status != "FINISHED":
            step = (trial.last_result or {}).get("step")
            reason = f"stopped early by the {plan.sweep.scheduler} scheduler at step {step}"
            _close(uri, record, "KILLED", reason)
    return drawn


def _outcome(
    uri: str, t: Trial, record: tracking.RunRecord | None, errors: Mapping[str, str]
) -> TrialOutcome:
    """One trial's outcome from its MLflow run (FAILED or MISSING without one)."""
    if record is None:
        status = "FAILED" if t.name in errors else "MISSING"
        return TrialOutcome(
            t.name, t.row, status, None, {}, errors.get(t.name), t.run, t.values, t.role
        )
    metrics = dict(record.metrics)
    if record.status == "FINISHED":
        metrics.update(selected_validation(uri, record.run_id, record.metrics))
    reason = record.tags.get(FAILURE_REASON_TAG)
    return TrialOutcome(
        t.name, t.row, record.status, record.run_id, metrics, reason, t.run, t.values, t.role
    )


def tune_trials(plan: SweepPlan) -> list[Any]:
    """Tune's trials of the sweep as its saved experiment has them (status, config, last result)."""
    if not tune.Tuner.can_restore(str(plan.sweep_dir)):
        return []
    return tune.ExperimentAnalysis(str(plan.sweep_dir)).trials


def _close(uri: str, record: tracking.RunRecord, status: str, reason: str) -> None:
    tracking.set_terminated(uri, record.run_id, status, reason)
    record.status = status
    record.tags[FAILURE_REASON_TAG] = reason


# ----- the results table ------------------------------------------------------------------------
def results_table(outcome: SweepOutcome) -> str:
    """Mean ± std over seeds of acc, ece (in %) and nll at N = 0 and 10, per row and evaluated set."""
    groups: dict[str, list[TrialOutcome]] = {}
    for t in outcome.trials:
        if t.role != ENS_MEMBER:  # LoRA runs trained only as ENS members: not a row
            groups.setdefault(t.row or "all", []).append(t)
    samples = sorted(
        {n for t in outcome.trials if t.run for n in t.run.eval.n_samples} & set(TABLE_SAMPLES)
    ) or [0]
    columns = [(m, n) for n in samples for m in TABLE_METRICS]
    header = ["row", "set", "seeds"] + [f"{m} n{n}" for m, n in columns]
    rows = []
    for row, trials in groups.items():
        finished = [t for t in trials if t.status == "FINISHED"]
        run = trials[0].run
        sets = [("test", run.task.name)] + [("ood", o) for o in run.task.ood_tasks] if run else []
        for split, task in sets:
            cells = []
            for metric, n in columns:
                key = final_key(split, task, metric, n)
                vals = [t.metrics[key] for t in finished if key in t.metrics]
                cells.append(mean_std(vals, scale=1.0 if metric == "nll" else 100.0)[0])
            label = task if split == "test" else f"{task} (ood)"
            rows.append([row, label, f"{len(finished)}/{len(trials)}", *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [
        f"results of sweep {outcome.plan.name}: mean ± std over seeds (acc and ece in %; "
        "seeds: finished/trials)",
        fmt.format(*header),
        fmt.format(*["-" * w for w in widths]),
    ]
    lines += [fmt.format(*r) for r in rows]
    for t in outcome.trials:
        if t.status != "FINISHED":
            lines.append(f"  {t.name}: {t.status}" + (f" ({t.reason})" if t.reason else ""))
    best, metric = outcome.best, outcome.plan.sweep.metric
    if best is not None and metric in best.metrics:
        lines.append(f"best trial by {metric}: {best.name} ({best.metrics[metric]:.4f})")
    return "\n".join(lines)


def mlflow_ui_hint(uri: str) -> str:
    """The command (or the place) that shows the runs in the MLflow UI."""
    if uri.startswith("sqlite:///"):
        return f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1"
    return f"open {tracking.redact_uri(uri)} in a browser (through the SSH tunnel on a cluster)"


# ----- the parent run's end and the best model ------------------------------------------------------
def finish_parent(outcome: SweepOutcome) -> None:
    """Log the best trial on the parent run, register its model once the sweep ended
    (`register_best_model`), and end the run (left RUNNING while trials are unfinished)."""
    uri, parent = outcome.plan.tracking_uri, outcome.parent_run_id
    tags: dict[str, Any] = {
        TRIALS_TOTAL_TAG: len(outcome.trials),
        TRIALS_FINISHED_TAG: outcome.count("FINISHED"),
        TRIALS_FAILED_TAG: outcome.count("FAILED"),
        TRIALS_STOPPED_TAG: outcome.count("KILLED"),
    }
    best = outcome.best
    if not outcome.unfinished:  # the sweep ended: its best model gets a registry version
        tags.update(register_best_model(outcome))
    if best is not None:
        tags.update({BEST_TRIAL_TAG: best.name, BEST_RUN_ID_TAG: best.run_id})
        tags.update({f"{BEST_VALUE_PREFIX}{k}": format_value(v) for k, v in best.values.items()})
        keep = {
            f"best/{k}": v
            for k, v in best.metrics.items()
            if k.startswith(("test/", "ood/", "val/")) and math.isfinite(v)
        }
        tracking.log_metrics(uri, parent, keep, step=0)
        if best.run is not None:
            tracking.log_text(uri, parent, best.run.to_yaml(), "sweep/best_trial.yaml")
    tracking.set_tags(uri, parent, tags)
    tracking.log_text(uri, parent, results_table(outcome) + "\n", "sweep/results.txt")
    if outcome.unfinished:
        return
    if outcome.failed:
        names = ", ".join(t.name for t in outcome.failed)
        tracking.set_terminated(
            uri,
            parent,
            "FAILED",
            f"{len(outcome.failed)} of {len(outcome.trials)} trials failed: {names}",
        )
    else:
        tracking.set_terminated(uri, parent, "FINISHED")


def best_model_trial(outcome: SweepOutcome) -> TrialOutcome | None:
    """The best trial (by the sweep's metric and mode) among those with an MLflow model of their
    own: FINISHED trained trials whose method is one adapter's predictive. It is `outcome.best`
    unless that is an ENS or LAP trial (their predictive is not one adapter's)."""
    metric = outcome.plan.sweep.metric
    candidates = [
        o
        for o in outcome.trials
        if o.status == "FINISHED"
        and o.role == TRAINED
        and o.run_id is not None
        and o.run is not None
        and mlflow_model.unloggable_reason(o.run) is None
        and math.isfinite(o.metrics.get(metric, math.nan))
    ]
    pick = max if outcome.plan.mode == "max" else min
    return pick(candidates, key=lambda o: o.metrics[metric]) if candidates else None


def register_best_model(outcome: SweepOutcome) -> dict[str, str]:
    """Register the model of `best_model_trial` as a new version of the registered model named
    after the sweep (one version per sweep run: a resumed sweep that ends again adds none), with
    the version tags melora.sweep_run_id (the parent run), melora.sweep_metric and
    melora.sweep_metric_value, melora.sweep_trial. A trial whose model was not logged (its
    logging failed) gets it logged now. Returns the parent run's tags: best_model
    ('models:/<sweep>/<version>'), or registry_error with the reason: a model that cannot be
    registered is a warning, not a failed sweep (every trial's results are in MLflow)."""
    plan, uri = outcome.plan, outcome.plan.tracking_uri
    trial = best_model_trial(outcome)
    if trial is None:
        return {}
    metric = plan.sweep.metric
    tags = {
        SWEEP_RUN_TAG: outcome.parent_run_id,
        SWEEP_METRIC_TAG: metric,
        SWEEP_VALUE_TAG: repr(trial.metrics[metric]),
        SWEEP_TRIAL_TAG: trial.name,
    }
    try:
        model_id = mlflow_model.run_model_id(uri, trial.run_id) or mlflow_model.log_run_model(
            uri, trial.run_id, trial.run
        )
        version, created = mlflow_model.register_best(uri, plan.name, model_id, trial.run_id, tags)
    except Exception as err:
        reason = tracking.redact_text(f"{type(err).__name__}: {err}")
        print(
            f"[sweep] warning: the model of the best trial {trial.name} could not be registered "
            f"as {plan.name!r} in the MLflow Model Registry ({reason})",
            file=sys.stderr,
            flush=True,
        )
        return {REGISTRY_ERROR_TAG: reason}
    best = outcome.best
    note = "" if best is None or best.name == trial.name else f" ({best.name}, the best, has none)"
    print(
        f"[sweep] {plan.name}: the model of {trial.name}{note} is "
        f"{'registered as' if created else 'already'} models:/{plan.name}/{version}",
        flush=True,
    )
    return {BEST_MODEL_TAG: f"models:/{plan.name}/{version}"}
