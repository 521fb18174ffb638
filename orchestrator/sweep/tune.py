"""Run a planned sweep on Ray Tune, tracked in MLflow: `run_sweep(plan)`, then `results_table`.

    base, section = load_experiment("jobs/configs/demo.yaml", overrides)
    plan = plan_sweep(base, section, name="demo")   # orchestrator/sweep_config.py: the schema
    outcome = run_sweep(plan, resume=False)          # Ray Tune over fit_run; one MLflow parent run
    print(results_table(outcome))

How it runs (Ray 2.60, Train V2): each trial is a Tune function trainable (`train_trial`) that
builds the trial's `RunConfig` and calls `fit_run`, which fits a `TorchTrainer`; the deprecated
`Tuner(trainer)` is not used. Tune reserves only a trial's driver; its workers are requested by
the trainer inside it, so the trials running at once are capped at what the cluster holds for
whole trials (driver + workers): otherwise drivers could take every CPU and wait forever for
their workers. Validation reports are forwarded from Ray Train to Tune (for ASHA and Optuna).
ENS trials are not Tune trials: once Tune returns, `ensemble_step` evaluates each from its
members' runs (trained trials of the same sweep; sweep_config.py says how they are planned).

State lives in `<storage>/<sweep>/`: Tune's experiment, `sweep.json` (the MLflow parent run id,
the config hash) and `runs/<run name>/` (each trial's Ray Train run with its MLflow run id).
`--resume` restores Tune's experiment: finished trials are not run again (a trial whose MLflow run
is FINISHED reports it instead of training), unfinished ones call fit_run again, which resumes
from the last checkpoint in the same MLflow run.

One driver per sweep, all or nothing: `run_sweep` holds a lock on `<storage>/<sweep>/sweep.lock`
(a POSIX lock, state_files.exclusive: it works on EFS/NFS and dies with its process) from its
first step to its last, so a second start of the same sweep, `--resume` included, is refused at
once naming the holder. Everything that can be checked is checked before the state is written or
the parent run is made (the state, the scheduler, MLflow reachable, the cluster holding one
trial); a refused sweep leaves neither. A failure after that ends the parent run FAILED with the
reason, and `--resume` goes on once the cause is fixed. The parent run is made once, like a
training run's (trainer.create_run_once): a start id in sweep.json first, then the run id.
`tracking.storage_path` is always a folder here (plan_sweep refuses URIs).

A failed trial: fit_run marks its MLflow run FAILED with the reason and raises; the error reaches
Tune, which records the trial as ERROR and goes on (`fail_fast=False`). The parent run ends FAILED
naming the failed trials; `--resume` does not retry them (a NaN loss would fail again), but
`--resume --retry-failed` does: Tune resumes its errored trials, each trial's fit_run resumes the
same (FAILED) MLflow run from its last checkpoint, and the parent run ends FINISHED when they all
finish. A trial that ASHA stops is marked KILLED in MLflow, with the step it reached.

The sweep's result has a name: when it ends, the MLflow model of its best trial (each trained
trial's adapter is one, logged by fit_run) becomes a new version of the registered model named
after the sweep, tagged with the parent run and the metric (`register_best_model`; ENS and LAP
trials have no single-adapter model, so the best trial that has one is registered).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from melora.errors import MeLoraError
from orchestrator import state_files, tracking
from orchestrator.config import RunConfig
from orchestrator.redaction import redact
from orchestrator.sweep.schema import (
    SweepError,
    SweepPlan,
    Trial,
    format_value,
    trial_run_name,
    value_word,
)
from orchestrator.tracking import model as mlflow_model
from orchestrator.tracking.conventions import ENS_MEMBER, ENSEMBLE, TRAINED

STATE_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
TABLE_METRICS = ("acc", "ece", "nll")
TABLE_SAMPLES = (0, 10)


# ----- running ----------------------------------------------------------------------------------
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


def run_sweep(
    plan: SweepPlan,
    resume: bool = False,
    address: str | None = None,
    trainable=None,
    evaluate_ensembles: bool = True,
    retry_failed: bool = False,
) -> SweepOutcome:
    """Run (or with `resume`, continue) the sweep on Ray Tune, then evaluate its ENS trials from
    their members' runs; returns what MLflow has at the end. `retry_failed` (with `resume`) runs
    the trials that failed again, each in the same MLflow run, from its last checkpoint.

    The module docstring says how a start is made exclusive and all or nothing.
    `trainable` replaces the trial body, `train_trial` by default (same signature: config, plan);
    benchmarks/sweep_scheduling.py passes a placeholder that only holds a trial's resources, and
    `evaluate_ensembles=False` (its placeholders leave no member runs to evaluate).
    """
    from orchestrator.train.trainer import init_ray

    if retry_failed and not resume:
        raise SweepError(
            "retry_failed needs resume: failed trials are retried by --resume --retry-failed"
        )
    hint = (
        "Two drivers would run its trials twice into one state folder: wait for it to end, or "
        "stop it first (then --resume); to run another sweep beside it, use --name"
    )
    with state_files.exclusive(plan.sweep_dir / LOCK_FILE, f"sweep {plan.name!r}", hint):
        state = _read_state(plan)
        started = bool(state and state.get("parent_run_id"))
        if started and not resume:
            raise SweepError(
                f"sweep {plan.name!r} exists already ({plan.sweep_dir}): pass --resume to continue "
                "it, or --name to start another"
            )
        if state and state.get("config_hash") != plan.config_hash():
            raise SweepError(
                f"sweep {plan.name!r} was started with another config (hash {state.get('config_hash')}, now "
                f"{plan.config_hash()}): --resume needs the same config file and --set values; use --name for a new sweep"
            )
        _check_scheduler(plan)
        uri = plan.tracking_uri
        tracking.check_reachable(uri)
        init_ray(address)
        import ray

        concurrency = plan.max_concurrent(ray.cluster_resources())  # SweepError: too small
        experiment_id = tracking.ensure_experiment(uri, plan.base.tracking.experiment)
        parent = _open_parent(plan, state or {}, experiment_id)
        try:
            _log_plan(plan, parent)  # again on --resume: equal values, and a start cut short here
            print(
                f"[sweep] {plan.name}: {plan.num_trials} trials, at most {concurrency} at once; "
                f"MLflow parent run {parent}",
                flush=True,
            )
            restore = started and _can_restore(plan)
            tuner = _tuner(plan, parent, concurrency, restore, trainable, retry_failed=retry_failed)
            tuner.fit()  # trial failures are in MLflow and in Tune's saved experiment, read back next
            errors = ensemble_step(plan, parent) if evaluate_ensembles else {}
            outcome = collect(plan, parent, errors)
            _finish_parent(outcome)
        except BaseException as err:
            _fail_parent(plan, parent, err)
            raise
    return outcome


def _open_parent(plan: SweepPlan, state: Mapping[str, Any], experiment_id: str) -> str:
    """The sweep's MLflow parent run: the recorded one resumed (RUNNING again), else made once
    (trainer.create_run_once: a start id in sweep.json first, then the run id)."""
    from orchestrator.train.trainer import create_run_once

    uri = plan.tracking_uri
    if state.get("parent_run_id"):
        return tracking.start_or_resume_run(uri, experiment_id, run_id=state["parent_run_id"])
    parent, start_id, _ = create_run_once(
        uri,
        experiment_id,
        plan.name,
        {"sweep": plan.name, "kind": "sweep", "config_hash": plan.config_hash()},
        None,
        state.get("start_id"),
        lambda pending: _write_state(plan, None, pending["start_id"]),
        plan.sweep_dir / STATE_FILE,
    )
    tracking.start_or_resume_run(uri, experiment_id, run_id=parent)  # an adopted one: RUNNING
    _write_state(plan, parent, start_id)
    return parent


def _check_scheduler(plan: SweepPlan) -> None:
    """Build the scheduler and the searcher once before anything is written: a setting that Tune
    refuses fails here, as a SweepError naming it, not after the sweep's state exists."""
    try:
        _scheduler_and_search(plan)
    except (AssertionError, ValueError, TypeError) as err:
        s = plan.sweep
        raise SweepError(
            f"sweep.scheduler={s.scheduler} / sweep.search={s.search} cannot work with these "
            f"settings (sweep.asha={s.asha}, sweep.metric={s.metric}): Ray Tune refuses them "
            f"({type(err).__name__}: {err}); change them and start again"
        ) from None


def _fail_parent(plan: SweepPlan, parent: str, err: BaseException) -> None:
    """End the parent run FAILED (KILLED on Ctrl-C) with the reason and how to go on, without
    hiding `err` when MLflow is what failed."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    reason = (
        f"the sweep driver stopped: {type(err).__name__}: {err}; fix the cause, then continue "
        f"with jobs/sweep.py --name {plan.name} --resume (same --config and --set values)"
    )
    try:
        with tracking.short_calls():
            tracking.set_terminated(plan.tracking_uri, parent, status, reason)
    except Exception as mlflow_err:
        print(
            f"[sweep] warning: the MLflow parent run {parent} could not be marked {status} "
            f"({type(mlflow_err).__name__}: {tracking.redact_text(str(mlflow_err))})",
            file=sys.stderr,
            flush=True,
        )


def ensemble_step(plan: SweepPlan, parent_run_id: str) -> dict[str, str]:
    """Evaluate each ENS trial from its members' FINISHED runs (`fit_ensemble`, a child run of the
    sweep); one evaluated before (a resumed sweep) is not evaluated again. Returns {trial: reason}
    for those that could not be: a member did not finish (it failed, or ASHA stopped it).

    Each evaluation is a Ray task of its own (0 CPUs: it waits on the GPU task that
    `evaluate_ensemble_run` starts with `scaling.use_gpu`, or evaluates on the CPU), so a table's
    ensembles are evaluated side by side on the cluster's GPUs, not one after another.
    """
    import ray

    ensembles = [t for t in plan.trials if t.role == ENSEMBLE]
    if not ensembles:
        return {}
    evaluate = ray.remote(num_cpus=0, max_retries=0)(_evaluate_ensemble_trial)
    source = tracking.source_tags()  # this driver's script and commit, not the Ray task's
    refs = [evaluate.remote(t.run, parent_run_id, plan.name, source) for t in ensembles]
    errors = {}
    for t, reason in zip(ensembles, ray.get(refs), strict=True):
        if reason is not None:
            errors[t.name] = reason
            print(f"[sweep] {t.name}: {reason}", flush=True)
    return errors


def _evaluate_ensemble_trial(
    run: RunConfig, parent_run_id: str, sweep: str, source: Mapping[str, str]
) -> str | None:
    """One ENS trial's evaluation (`fit_ensemble`, members already trained; `source`: the
    driver's MLflow source tags); None, or why not."""
    from orchestrator.posthoc.ensemble import fit_ensemble

    try:
        fit_ensemble(run, parent_run_id, sweep, train_missing=False, tags=dict(source))
    except MeLoraError as err:
        return f"not evaluated: {err}"
    return None


def train_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial is one `fit_run`, its final metrics reported to Tune.

    `config` is Tune's ({"trial": run name}, or Optuna's draw); `plan` the sweep's plain data.
    A trial whose MLflow run is FINISHED already (a resumed sweep) reports it and does not train.
    """
    from orchestrator.train.trainer import fit_run, recorded_run_id

    run = _trial_run(config, plan)
    uri = plan["tracking_uri"]
    previous = recorded_run_id(run)
    if previous is not None and tracking.read_run(uri, previous)[0] == "FINISHED":
        print(f"[sweep] {run.run_name} finished before (MLflow run {previous}): not run again")
        run_id, metrics = previous, tracking.read_run(uri, previous)[2]
    else:
        result = fit_run(
            run,
            parent_run_id=plan["parent_run_id"],
            sweep=plan["sweep"],
            callbacks=[ForwardValidation(plan["metric"], run.optim.max_steps)],
            source=plan.get("source"),
        )
        run_id, metrics = result.mlflow_run_id, result.metrics
    final = {k: v for k, v in metrics.items() if k.startswith(("test/", "ood/"))}
    final.update(selected_validation(uri, run_id, metrics))
    final[plan["metric"]] = final.get(plan["metric"], math.nan)
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


class CloseStoppedRuns(tune.Callback):
    """Driver side, while the sweep runs: a trial that ends with its MLflow run RUNNING was stopped
    (ASHA kills the trial's process, so fit_run never ends the run: KILLED, with the step it
    reached) or lost its process (FAILED). `collect` settles races with the dying process at the end.
    MLflow unreachable here is a warning, not an error (one short try per call, so that Tune's loop
    is not held for MLflow's minutes of retries): `collect` settles those runs at the end too.
    """

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get("step")
        self._close(trial, "KILLED", f"stopped early by the ASHA scheduler at step {step}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FAILED", f"the trial's process failed; see {trial.path}/error.txt")

    def _close(self, trial, status: str, reason: str) -> None:
        from orchestrator.train.trainer import recorded_run_id

        run_id = recorded_run_id(_trial_run(trial.config, self.plan))
        uri = self.plan["tracking_uri"]
        try:
            with tracking.short_calls():
                if run_id and tracking.read_run(uri, run_id)[0] == "RUNNING":
                    tracking.set_terminated(uri, run_id, status, reason)
        except Exception as err:  # a callback that raises would stop the whole sweep
            print(
                f"[sweep] warning: MLflow run {run_id} of trial {trial.trial_id} could not be "
                f"marked {status} ({type(err).__name__}: {tracking.redact_text(str(err))}); "
                "it is settled when the sweep ends",
                flush=True,
            )


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
    uri, data = plan.tracking_uri, _plan_data(plan, parent_run_id)
    records = {r.name: r for r in tracking.child_runs(uri, parent_run_id)}
    trials, tune_errors = list(plan.trials), dict(ensemble_errors or {})
    for trial in _tune_trials(plan):
        run = _trial_run(trial.config, data)
        if plan.sweep.search == "optuna":
            values = {k: trial.config[k] for k in plan.sweep.space}
            trials.append(
                Trial(run.run_name, values, {}, run.run_name.removeprefix(f"{plan.name}-"), run)
            )
        record = records.get(run.run_name)
        if trial.status == "ERROR":
            tune_errors[run.run_name] = f"the trial failed; see {trial.path}/error.txt"
            if record is not None and record.status == "RUNNING":
                _close(uri, record, "FAILED", tune_errors[run.run_name])
        elif trial.status == "TERMINATED" and record is not None and record.status != "FINISHED":
            step = (trial.last_result or {}).get("step")
            _close(
                uri,
                record,
                "KILLED",
                f"stopped early by the {plan.sweep.scheduler} scheduler at step {step}",
            )
    outcomes = []
    for t in trials:
        record = records.get(t.name)
        if record is None:
            status = "FAILED" if t.name in tune_errors else "MISSING"
            reason = tune_errors.get(t.name)
            outcomes.append(
                TrialOutcome(t.name, t.row, status, None, {}, reason, t.run, t.values, t.role)
            )
            continue
        metrics = dict(record.metrics)
        if record.status == "FINISHED":
            metrics.update(selected_validation(uri, record.run_id, record.metrics))
        reason = record.tags.get("failure_reason")
        outcomes.append(
            TrialOutcome(
                t.name,
                t.row,
                record.status,
                record.run_id,
                metrics,
                reason,
                t.run,
                t.values,
                t.role,
            )
        )
    done = [
        o
        for o in outcomes
        if o.status == "FINISHED"
        and o.role != ENS_MEMBER
        and math.isfinite(o.metrics.get(plan.sweep.metric, math.nan))
    ]
    pick = max if plan.mode == "max" else min
    best = pick(done, key=lambda o: o.metrics[plan.sweep.metric]) if done else None
    return SweepOutcome(plan, parent_run_id, outcomes, best)


def _tune_trials(plan: SweepPlan) -> list[Any]:
    """Tune's trials of the sweep as its saved experiment has them (status, config, last result)."""
    if not _can_restore(plan):
        return []
    return tune.ExperimentAnalysis(str(plan.sweep_dir)).trials


def _close(uri: str, record: tracking.RunRecord, status: str, reason: str) -> None:
    tracking.set_terminated(uri, record.run_id, status, reason)
    record.status = status
    record.tags["failure_reason"] = reason


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
                key = f"{split}/{task}/{metric}_n{n}"
                vals = [t.metrics[key] for t in finished if key in t.metrics]
                cells.append(_mean_std(vals, scale=1.0 if metric == "nll" else 100.0))
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


# ----- helpers: the Tune side ---------------------------------------------------------------------
def _plan_data(plan: SweepPlan, parent_run_id: str) -> dict[str, Any]:
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


def _trial_run(config: Mapping[str, Any], plan: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a Tune trial: the planned one, or (Optuna) the base with the drawn values."""
    if "trial" in config:
        return RunConfig.from_dict(plan["trials"][config["trial"]])
    values = {k: v for k, v in config.items()}
    label = "-".join(value_word(k, v) for k, v in values.items())
    name = trial_run_name(plan["sweep"], ("optuna", label))
    return RunConfig.from_dict(plan["base"]).with_overrides({**values, "name": name})


def _tuner(
    plan: SweepPlan,
    parent_run_id: str,
    concurrency: int,
    restore: bool,
    trainable=None,
    retry_failed: bool = False,
):
    """A new Tuner for the sweep, or Tune's saved experiment restored (--resume).

    `trainable`: the trial body (default `train_trial`), given the sweep's plain data as `plan`.
    `retry_failed`: errored trials run again (Tune's `resume_errored`: from the trial's last Tune
    checkpoint; ours report none, so the trial body starts again and its fit_run resumes the
    trial's Ray Train run from its own last checkpoint, in the same MLflow run).
    """
    data = _plan_data(plan, parent_run_id)
    trainable = tune.with_resources(
        tune.with_parameters(trainable or train_trial, plan=data),
        {"CPU": float(plan.sweep.driver_cpus)},
    )
    if restore:
        return tune.Tuner.restore(
            str(plan.sweep_dir), trainable, resume_unfinished=True, resume_errored=retry_failed
        )
    s = plan.sweep
    scheduler, search_alg = _scheduler_and_search(plan)
    if s.search == "optuna":
        param_space = {k: _tune_domain(d) for k, d in s.space.items()}
        num_samples = s.num_samples
    else:
        param_space = {"trial": tune.grid_search([t.name for t in plan.trials if t.tuned])}
        num_samples = 1
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=concurrency,
            # a finished trial's driver process serves the next trial: one process start-up less.
            # Not with ASHA: a stopped trial's fit may still run in that process.
            reuse_actors=s.scheduler == "none",
            trial_name_creator=lambda trial: _trial_run(trial.config, data).run_name,
            trial_dirname_creator=lambda trial: _trial_run(trial.config, data).run_name,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[CloseStoppedRuns(data)],
            verbose=1,
        ),
    )


def _scheduler_and_search(plan: SweepPlan) -> tuple[Any, Any]:
    """Tune's (scheduler, search algorithm) of the sweep; None for FIFO and for the grid."""
    s = plan.sweep
    scheduler = search_alg = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric=s.metric, mode=plan.mode, **plan.asha_args())
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=s.metric, mode=plan.mode, seed=s.search_seed)
    return scheduler, search_alg


def _can_restore(plan: SweepPlan) -> bool:
    return tune.Tuner.can_restore(str(plan.sweep_dir))


def _tune_domain(dist: Mapping[str, Any]):
    ((kind, arg),) = dist.items()
    if kind == "choice":
        return tune.choice(list(arg))
    if kind == "randint":
        return tune.randint(int(arg[0]), int(arg[1]) + 1)  # Tune's upper bound is exclusive
    return (tune.uniform if kind == "uniform" else tune.loguniform)(float(arg[0]), float(arg[1]))


# ----- helpers: MLflow and state ----------------------------------------------------------------
def _read_state(plan: SweepPlan) -> dict[str, Any] | None:
    """sweep.json, or None before the sweep's first start; a damaged one is a StateFileError
    naming the file and what to do."""
    path = plan.sweep_dir / STATE_FILE
    if not path.is_file():
        return None
    return state_files.read_json(
        path,
        f"the sweep's state is damaged. Its MLflow parent run is the run named {plan.name} with "
        f"tag kind=sweep; move the folder {plan.sweep_dir} away to start the sweep again, or "
        "start it under another --name",
    )


def _write_state(plan: SweepPlan, parent_run_id: str | None, start_id: str | None = None) -> None:
    """sweep.json, whole or not at all; `parent_run_id` None: the start id alone, written just
    before the parent run is made (trainer.create_run_once)."""
    state = {
        "name": plan.name,
        "parent_run_id": parent_run_id,
        "start_id": start_id,
        "config_hash": plan.config_hash(),
        "tracking_uri": tracking.redact_uri(plan.tracking_uri),
        "source": plan.source,
    }
    state_files.write_json(plan.sweep_dir / STATE_FILE, state)


def _log_plan(plan: SweepPlan, parent_run_id: str) -> None:
    """The parent run's params (the sweep section) and artifacts (base config, trial list)."""
    import yaml

    uri, s = plan.tracking_uri, plan.sweep
    tracking.log_params(
        uri,
        parent_run_id,
        {
            "sweep.search": s.search,
            "sweep.scheduler": s.scheduler,
            "sweep.metric": s.metric,
            "sweep.mode": plan.mode,
            "sweep.num_trials": plan.num_trials,
            "sweep.grid": json.dumps(redact(s.grid), sort_keys=True, default=str),
            "sweep.fixed": json.dumps(redact(s.fixed), sort_keys=True, default=str),
            "sweep.space": json.dumps(redact(s.space), sort_keys=True, default=str),
        },
    )
    tracking.log_text(uri, parent_run_id, plan.base.to_yaml(), "sweep/base.yaml")  # redacted
    section = yaml.safe_dump(redact(dataclasses.asdict(s)), sort_keys=False)
    tracking.log_text(uri, parent_run_id, section, "sweep/sweep.yaml")
    trials = [{"name": t.name, "values": t.values, "tags": t.tags} for t in plan.trials]
    tracking.log_text(
        uri, parent_run_id, json.dumps(redact(trials), indent=1, default=str), "sweep/trials.json"
    )


def _finish_parent(outcome: SweepOutcome) -> None:
    """Log the best trial on the parent run, register its model once the sweep ended
    (`register_best_model`), and end the run (left RUNNING while trials are unfinished)."""
    uri, parent = outcome.plan.tracking_uri, outcome.parent_run_id
    tags: dict[str, Any] = {
        "trials_total": len(outcome.trials),
        "trials_finished": outcome.count("FINISHED"),
        "trials_failed": outcome.count("FAILED"),
        "trials_stopped": outcome.count("KILLED"),
    }
    best = outcome.best
    if not outcome.unfinished:  # the sweep ended: its best model gets a registry version
        tags.update(register_best_model(outcome))
    if best is not None:
        tags.update({"best_trial": best.name, "best_run_id": best.run_id})
        tags.update({f"best.{k}": format_value(v) for k, v in best.values.items()})
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
        mlflow_model.SWEEP_RUN_TAG: outcome.parent_run_id,
        mlflow_model.SWEEP_METRIC_TAG: metric,
        mlflow_model.SWEEP_VALUE_TAG: repr(trial.metrics[metric]),
        mlflow_model.SWEEP_TRIAL_TAG: trial.name,
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
        return {"registry_error": reason}
    best = outcome.best
    note = "" if best is None or best.name == trial.name else f" ({best.name}, the best, has none)"
    print(
        f"[sweep] {plan.name}: the model of {trial.name}{note} is "
        f"{'registered as' if created else 'already'} models:/{plan.name}/{version}",
        flush=True,
    )
    return {"best_model": f"models:/{plan.name}/{version}"}


def _mean_std(values: list[float], scale: float) -> str:
    values = [v * scale for v in values if math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
