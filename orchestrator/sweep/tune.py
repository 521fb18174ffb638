"""Run a planned sweep on Ray Tune, tracked in MLflow: `run_sweep(plan)`, then `results_table`.

    base, section = load_experiment("jobs/configs/demo.yaml", overrides)
    plan = plan_sweep(base, section, name="demo")   # plan.py: the trials
    outcome = run_sweep(plan, resume=False)          # Ray Tune over fit_run; one MLflow parent run
    print(results_table(outcome))                    # outcome.py

How it runs (Ray 2.60, Train V2): each trial is a Tune function trainable (`trial.train_trial`)
that builds the trial's `RunConfig` and calls `fit_run`, which fits a `TorchTrainer`; the
deprecated `Tuner(trainer)` is not used. Tune reserves only a trial's driver; its workers are
requested by the trainer inside it, so the trials running at once are capped at what the cluster
holds for whole trials (driver + workers): otherwise drivers could take every CPU and wait
forever for their workers. Validation reports are forwarded from Ray Train to Tune (for ASHA and
Optuna). ENS trials are not Tune trials: once Tune returns, `ensemble_step` evaluates each from
its members' runs (trained trials of the same sweep; plan.py says how they are planned).

State lives in `<storage>/<sweep>/`: Tune's experiment, `sweep.json` (state.py: the MLflow parent
run id, the config hash) and `runs/<run name>/` (each trial's Ray Train run with its MLflow run
id). `--resume` restores Tune's experiment: finished trials are not run again (a trial whose
MLflow run is FINISHED reports it instead of training), unfinished ones call fit_run again, which
resumes from the last checkpoint in the same MLflow run.

One driver per sweep, all or nothing: `run_sweep` holds a lock on `<storage>/<sweep>/sweep.lock`
(a POSIX lock, state_files.exclusive: it works on EFS/NFS and dies with its process) from its
first step to its last, so a second start of the same sweep, `--resume` included, is refused at
once naming the holder. Everything that can be checked is checked before the state is written or
the parent run is made (the state, the scheduler, MLflow reachable, the cluster holding one
trial); a refused sweep leaves neither. A failure after that ends the parent run FAILED with the
reason, and `--resume` goes on once the cause is fixed. `tracking.storage_path` is always a folder
here (plan_sweep refuses URIs).

A failed trial: fit_run marks its MLflow run FAILED with the reason and raises; the error reaches
Tune, which records the trial as ERROR and goes on (`fail_fast=False`). The parent run ends FAILED
naming the failed trials; `--resume` does not retry them (a NaN loss would fail again), but
`--resume --retry-failed` does: Tune resumes its errored trials, each trial's fit_run resumes the
same (FAILED) MLflow run from its last checkpoint, and the parent run ends FINISHED when they all
finish. A trial that ASHA stops is marked KILLED in MLflow, with the step it reached.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray import tune

from melora.errors import MeLoraError
from orchestrator import state_files, tracking
from orchestrator.config import RunConfig
from orchestrator.errors import SweepError
from orchestrator.posthoc.ensemble import fit_ensemble
from orchestrator.sweep.outcome import SweepOutcome, collect, finish_parent
from orchestrator.sweep.plan import SweepPlan
from orchestrator.sweep.state import LOCK_FILE, fail_parent, log_plan, open_parent, read_state
from orchestrator.sweep.trial import train_trial, trainable_data, trial_run
from orchestrator.tracking.conventions import ENSEMBLE
from orchestrator.train import trainer
from orchestrator.train.run_marker import recorded_run_id


def run_sweep(
    plan: SweepPlan,
    resume: bool = False,
    address: str | None = None,
    trainable: Callable[..., None] | None = None,
    evaluate_ensembles: bool = True,
    *,
    retry_failed: bool = False,
) -> SweepOutcome:
    """Run (or with `resume`, continue) the sweep on Ray Tune, then evaluate its ENS trials from
    their members' runs; returns what MLflow has at the end. `retry_failed` (with `resume`) runs
    the trials that failed again, each in the same MLflow run, from its last checkpoint.

    The module docstring says how a start is made exclusive and all or nothing.
    `trainable` replaces the trial body, `train_trial` by default (same signature: config,
    sweep_data); benchmarks/sweep_scheduling.py passes a placeholder that only holds a trial's
    resources, and `evaluate_ensembles=False` (its placeholders leave no member runs to evaluate).
    """
    if retry_failed and not resume:
        raise SweepError(
            "retry_failed needs resume: failed trials are retried by --resume --retry-failed"
        )
    hint = (
        "Two drivers would run its trials twice into one state folder: wait for it to end, or "
        "stop it first (then --resume); to run another sweep beside it, use --name"
    )
    with state_files.exclusive(plan.sweep_dir / LOCK_FILE, f"sweep {plan.name!r}", hint):
        state = read_state(plan)
        started = bool(state and state.get("parent_run_id"))
        check_start(plan, state, resume)
        check_scheduler(plan)
        uri = plan.tracking_uri
        tracking.check_reachable(uri)
        trainer.init_ray(address)
        concurrency = plan.max_concurrent(ray.cluster_resources())  # SweepError: too small
        experiment_id = tracking.ensure_experiment(uri, plan.base.tracking.experiment)
        parent = open_parent(plan, state or {}, experiment_id)
        try:
            log_plan(plan, parent)  # again on --resume: equal values, and a start cut short here
            print(
                f"[sweep] {plan.name}: {plan.num_trials} trials, at most {concurrency} at once; "
                f"MLflow parent run {parent}",
                flush=True,
            )
            restore = started and tune.Tuner.can_restore(str(plan.sweep_dir))
            tuner = build_tuner(
                plan, parent, concurrency, restore, trainable=trainable, retry_failed=retry_failed
            )
            tuner.fit()  # trial failures are in MLflow and in Tune's saved experiment, read back next
            errors = ensemble_step(plan, parent) if evaluate_ensembles else {}
            outcome = collect(plan, parent, errors)
            finish_parent(outcome)
        except BaseException as err:
            fail_parent(plan, parent, err)
            raise
    return outcome


def check_start(plan: SweepPlan, state: Mapping[str, Any] | None, resume: bool) -> None:
    """A start of a sweep that ran needs --resume, and --resume the config it started with."""
    if state and state.get("parent_run_id") and not resume:
        raise SweepError(
            f"sweep {plan.name!r} exists already ({plan.sweep_dir}): pass --resume to continue "
            "it, or --name to start another"
        )
    if state and state.get("config_hash") != plan.config_hash():
        raise SweepError(
            f"sweep {plan.name!r} was started with another config (hash {state.get('config_hash')}, now "
            f"{plan.config_hash()}): --resume needs the same config file and --set values; use --name for a new sweep"
        )


def check_scheduler(plan: SweepPlan) -> None:
    """Build the scheduler and the searcher once before anything is written: a setting that Tune
    refuses fails here, as a SweepError naming it, not after the sweep's state exists."""
    try:
        scheduler_and_search(plan)
    except (AssertionError, ValueError, TypeError) as err:
        s = plan.sweep
        raise SweepError(
            f"sweep.scheduler={s.scheduler} / sweep.search={s.search} cannot work with these "
            f"settings (sweep.asha={s.asha}, sweep.metric={s.metric}): Ray Tune refuses them "
            f"({type(err).__name__}: {err}); change them and start again"
        ) from None


# ----- ENS trials: evaluated after Tune, from their members' runs ------------------------------
def ensemble_step(plan: SweepPlan, parent_run_id: str) -> dict[str, str]:
    """Evaluate each ENS trial from its members' FINISHED runs (`fit_ensemble`, a child run of the
    sweep); one evaluated before (a resumed sweep) is not evaluated again. Returns {trial: reason}
    for those that could not be: a member did not finish (it failed, or ASHA stopped it).

    Each evaluation is a Ray task of its own (0 CPUs: it waits on the GPU task that
    `evaluate_ensemble_run` starts with `scaling.use_gpu`, or evaluates on the CPU), so a table's
    ensembles are evaluated side by side on the cluster's GPUs, not one after another.
    """
    ensembles = [t for t in plan.trials if t.role == ENSEMBLE]
    if not ensembles:
        return {}
    evaluate = ray.remote(num_cpus=0, max_retries=0)(evaluate_ensemble_trial)
    source = tracking.source_tags()  # this driver's script and commit, not the Ray task's
    refs = [evaluate.remote(t.run, parent_run_id, plan.name, source) for t in ensembles]
    errors = {}
    for t, reason in zip(ensembles, ray.get(refs), strict=True):
        if reason is not None:
            errors[t.name] = reason
            print(f"[sweep] {t.name}: {reason}", flush=True)
    return errors


def evaluate_ensemble_trial(
    run: RunConfig, parent_run_id: str, sweep: str, source: Mapping[str, str]
) -> str | None:
    """One ENS trial's evaluation (`fit_ensemble`, members already trained; `source`: the
    driver's MLflow source tags); None, or why not."""
    try:
        fit_ensemble(run, parent_run_id, sweep, train_missing=False, tags=dict(source))
    except MeLoraError as err:
        return f"not evaluated: {err}"
    return None


# ----- the Tuner ----------------------------------------------------------------------------------
def build_tuner(
    plan: SweepPlan,
    parent_run_id: str,
    concurrency: int,
    restore: bool,
    *,
    trainable: Callable[..., None] | None = None,
    retry_failed: bool = False,
) -> tune.Tuner:
    """A new Tuner for the sweep, or Tune's saved experiment restored (--resume).

    `trainable`: the trial body (default `train_trial`), given the sweep's plain data as
    `sweep_data`. `retry_failed`: errored trials run again (Tune's `resume_errored`: from the
    trial's last Tune checkpoint; ours report none, so the trial body starts again and its fit_run
    resumes the trial's Ray Train run from its own last checkpoint, in the same MLflow run).
    """
    data = trainable_data(plan, parent_run_id)
    trainable = tune.with_resources(
        tune.with_parameters(trainable or train_trial, sweep_data=data),
        {"CPU": float(plan.sweep.driver_cpus)},
    )
    if restore:
        return tune.Tuner.restore(
            str(plan.sweep_dir), trainable, resume_unfinished=True, resume_errored=retry_failed
        )
    s = plan.sweep
    scheduler, search_alg = scheduler_and_search(plan)
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
            trial_name_creator=lambda trial: trial_run(trial.config, data).run_name,
            trial_dirname_creator=lambda trial: trial_run(trial.config, data).run_name,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[CloseStoppedRuns(data)],
            verbose=1,
        ),
    )


def scheduler_and_search(plan: SweepPlan) -> tuple[Any, Any]:
    """Tune's (scheduler, search algorithm) of the sweep; None for FIFO and for the grid."""
    s = plan.sweep
    scheduler = search_alg = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler  # why: only for scheduler asha

        scheduler = ASHAScheduler(metric=s.metric, mode=plan.mode, **plan.asha_args())
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # why: needs optuna, an optional package

        search_alg = OptunaSearch(metric=s.metric, mode=plan.mode, seed=s.search_seed)
    return scheduler, search_alg


def _tune_domain(dist: Mapping[str, Any]) -> Any:
    ((kind, arg),) = dist.items()
    if kind == "choice":
        return tune.choice(list(arg))
    if kind == "randint":
        return tune.randint(int(arg[0]), int(arg[1]) + 1)  # Tune's upper bound is exclusive
    return (tune.uniform if kind == "uniform" else tune.loguniform)(float(arg[0]), float(arg[1]))


class CloseStoppedRuns(tune.Callback):
    """Driver side, while the sweep runs: a trial that ends with its MLflow run RUNNING was stopped
    (ASHA kills the trial's process, so fit_run never ends the run: KILLED, with the step it
    reached) or lost its process (FAILED). `collect` settles races with the dying process at the end.
    MLflow unreachable here is a warning, not an error (one short try per call, so that Tune's loop
    is not held for MLflow's minutes of retries): `collect` settles those runs at the end too.
    """

    def __init__(self, sweep_data: dict[str, Any]) -> None:
        self.sweep_data = sweep_data

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get("step")
        self._close(trial, "KILLED", f"stopped early by the ASHA scheduler at step {step}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FAILED", f"the trial's process failed; see {trial.path}/error.txt")

    def _close(self, trial, status: str, reason: str) -> None:
        run_id = recorded_run_id(trial_run(trial.config, self.sweep_data))
        uri = self.sweep_data["tracking_uri"]
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
