"""From a `RunConfig` to a finished, tracked Ray Train run: `fit_run(run)`.

The driver side of one training run: it checks that MLflow can be reached, creates the run's
MLflow run once (its id is stored beside the Ray Train run, so a restarted job reuses it), logs
the resolved config and the task's splits (as MLflow dataset inputs), assembles the `TorchTrainer` (scaling, storage, failure and checkpoint
config) and fits it. Ray Train restarts failed workers from the last checkpoint up to
`scaling.max_failures` times; the MLflow run id travels in the loop config, so every restart
logs to the same run.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melora.errors import ConfigError
from orchestrator import state_files, tracking
from orchestrator.config import RunConfig
from orchestrator.errors import RunConflictError, RunFailedError, StateFileError
from orchestrator.redaction import is_secret_key
from orchestrator.tracking import model as mlflow_model
from orchestrator.train.preflight import check_run_data
from orchestrator.train.worker import train_loop_per_worker

RUN_MARKER = "melora_run.json"
RUN_LOCK = "melora_run.lock"  # beside the marker: held by jobs/train.py while the run trains
# the tag that finds a run made by a start that died before recording its id (create_run_once)
START_TAG = "melora.start_id"
_RUN_ID = re.compile(r"[\w-]{1,64}")  # what a recorded MLflow run id or start id may be
_started_local_ray = False  # set by init_ray: the Ray cluster is this machine alone


@dataclass
class RunResult:
    """What a finished run left: its MLflow run, its metrics and its Ray Train folder."""

    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    path: str
    model_id: str | None = None  # the run's MLflow logged model (None: not logged, see fit_run)


def storage_path(run: RunConfig) -> str:
    """Ray Train's storage: tracking.storage_path, else <cwd>/ray_results (absolute; URIs kept)."""
    path = run.tracking.storage_path or "ray_results"
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_tags(
    run: RunConfig, sweep: str | None = None, source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The MLflow tags of a training run (DESIGN.md): method, task, seed, [sweep], the config's
    own, and MLflow's source tags: `source` (`tracking.source_tags()` read by the job that
    started the run, in another process), else this process's."""
    tags = {
        **run.tracking.tags,
        "method": run.adapter.method,
        "task": run.task.name,
        "seed": str(run.seed),
        **(source or tracking.source_tags()),
    }
    if sweep:
        tags["sweep"] = sweep
    return tags


def task_inputs(run: RunConfig) -> list[tracking.SplitInput]:
    """The run's data as MLflow dataset inputs: the task's splits under `task.split_policy`
    (contexts train, validation, test) and the test split of each `task.ood_tasks` set (ood).

    Each names its rows by the hub split and the policy's cut in `datasets` slicing syntax (the
    paper's validation of BoolQ is 'validation[:1090]', its test 'validation[1090:]') and where
    they were read: the hub dataset, the file under `task.data_dir`, or the generator of a demo
    task.
    """
    from melora.tasks import get_task, load_task, split_plan

    t = run.task
    sets = [(t.name, None, None), *((ood, ("test",), "ood") for ood in t.ood_tasks)]
    inputs = []
    for name, wanted, context in sets:
        spec = get_task(name)
        plan = split_plan(spec, t.split_policy)
        splits = load_task(name, t.split_policy, t.data_dir, t.prompt_style, wanted)
        for split, rows in splits.items():
            hub_split, part = plan[split]
            if part == "all":
                cut = hub_split
            elif part == "head":
                cut = f"{hub_split}[:{len(rows)}]"
            else:  # the tail's head is the policy's other split of the same hub split
                (head,) = (s for s, (h, p) in plan.items() if h == hub_split and p == "head")
                cut = f"{hub_split}[{len(splits[head])}:]"
            where: dict[str, str | None]
            if spec.generate is not None:
                where = {"generator": f"{spec.generate.__module__}.{spec.generate.__qualname__}"}
            elif t.data_dir is not None:
                folder, stem = Path(t.data_dir) / spec.folder, spec.files[hub_split]
                files = [folder / f"{stem}{suffix}" for suffix in (".jsonl", ".parquet")]
                where = {"file": str(next((f for f in files if f.is_file()), folder))}
            else:
                where = {"hub_path": spec.hub_path, "hub_config": spec.hub_config}
            inputs.append(
                tracking.SplitInput(
                    f"{name}/{split}", context or split, rows, hub_split=cut, **where
                )
            )
    return inputs


def prepare_tracking(
    run: RunConfig,
    parent_run_id: str | None = None,
    sweep: str | None = None,
    source: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(tracking URI, MLflow run id): reachable, experiment created (kind finetuning), run created
    once (tags `run_tags(run, sweep, source)`) or resumed, params logged, and the task's splits
    logged as dataset inputs (`task_inputs`) once: when the run has none yet.

    The run's marker (`melora_run.json` beside its Ray Train folder) records the MLflow run id,
    so that a restart resumes the same run; `create_run_once` makes a kill between creating the
    run and recording its id harmless (the next start adopts that run). A recorded run is checked
    before anything in MLflow changes (`check_rerun`): one made with other params is refused, and
    a FINISHED run is never resumed (RunConflictError; its status stays FINISHED). With remote
    storage (s3://) there is no marker: every start makes a new MLflow run.
    """
    uri = tracking.resolve_tracking_uri(run.tracking)
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(uri, run.tracking.experiment)
    marker, tags = _marker_path(run), run_tags(run, sweep, source)
    if marker is None:
        run_id = tracking.start_or_resume_run(
            uri, experiment_id, run_name=run.run_name, tags=tags, parent_run_id=parent_run_id
        )
    else:
        recorded = _read_marker(marker) if marker.is_file() else {}
        run_id, adopted = recorded.get("mlflow_run_id"), True
        if run_id is None:

            def record(state: dict[str, str]) -> None:  # "mlflow_run_id": null until it is known
                state_files.write_json(
                    marker,
                    {"mlflow_run_id": None, **state, "tracking_uri": tracking.redact_uri(uri)},
                )

            run_id, start_id, adopted = create_run_once(
                uri, experiment_id, run.run_name, tags, parent_run_id,
                recorded.get("start_id"), record, marker,
            )  # fmt: skip
            record({"mlflow_run_id": run_id, "start_id": start_id})
        if adopted:  # an existing run: checked before its status changes
            existing = check_rerun(run, uri, experiment_id, run_id)
            if existing is not None and existing.status == "FINISHED":
                raise RunConflictError(
                    f"run {run.run_name} (MLflow run {run_id}) is FINISHED: it is not trained "
                    "again and its status stays FINISHED. To train it again as a new MLflow run, "
                    f"delete its Ray Train folder {marker.parent}, or give it another name "
                    "(--set name=...)"
                )
            tracking.start_or_resume_run(uri, experiment_id, run_id=run_id)
    tracking.log_params(uri, run_id, run.flat_params())
    tracking.log_text(uri, run_id, run.to_yaml(), "config/resolved.yaml")
    if not tracking.logged_dataset_inputs(uri, run_id):  # not again when a run resumes
        tracking.log_dataset_inputs(uri, run_id, task_inputs(run))
    return uri, run_id


def create_run_once(
    uri: str,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, Any],
    parent_run_id: str | None,
    start_id: str | None,
    record: Callable[[dict[str, str]], None],
    state_file: Path,
) -> tuple[str, str, bool]:
    """Create an MLflow run that a kill at any moment cannot leave orphaned or duplicated:
    (run id, start id, adopted).

    The id of a new run can only be recorded after MLflow made it. So a fresh `start_id` is
    recorded first (`record({"start_id": ...})`, a whole write of `state_file`), and the run is
    created with it as the tag `melora.start_id`; the caller then records the run id beside it.
    A start killed in between leaves the start id alone in the state file: given that
    `start_id`, the run that carries it (same experiment, name and parent) is adopted, not
    created again. Several such runs (two starts at once, without the lock) are refused.
    """
    if start_id:
        found = [
            r
            for r in tracking.search_runs(
                uri, [experiment_id], f"tags.`{START_TAG}` = '{start_id}'"
            )
            if r.name == run_name and r.tags.get("mlflow.parentRunId") == parent_run_id
        ]
        if len(found) > 1:
            ids = ", ".join(r.run_id for r in found)
            raise RunConflictError(
                f"{len(found)} MLflow runs named {run_name} ({ids}) carry the start id {start_id} "
                f"recorded in {state_file}: two starts ran at once. Keep one: delete the others "
                "(mlflow runs delete --run-id ID), then start again"
            )
        if found:
            print(
                f"[tracking] {run_name}: adopting MLflow run {found[0].run_id}, which an earlier "
                f"start created but did not record in {state_file}",
                flush=True,
            )
            return found[0].run_id, start_id, True
    else:
        start_id = uuid.uuid4().hex
        record({"start_id": start_id})
    run_id = tracking.start_or_resume_run(
        uri,
        experiment_id,
        run_name=run_name,
        tags={**tags, START_TAG: start_id},
        parent_run_id=parent_run_id,
    )
    return run_id, start_id, False


def check_rerun(
    run: RunConfig, uri: str, experiment_id: str, run_id: str
) -> tracking.RunRecord | None:
    """The recorded MLflow run `run_id` of `run` as MLflow has it (None when it is not in the
    experiment: `start_or_resume_run` then says so); RunConflictError, before anything changes,
    when its params differ from `run`'s (MLflow refuses a changed param, and a run would mix two
    configs), naming the changed params and what to do."""
    found = tracking.search_runs(uri, [experiment_id], f"attributes.run_id = '{run_id}'")
    if not found:
        return None
    record = found[0]
    changed = changed_params(record.params, run.flat_params())
    if not changed:
        return record
    shown = "; ".join(
        f"{k}: {_short(old)} (the run) -> {_short(new)} (now)" for k, (old, new) in changed.items()
    )
    folder = _marker_path(run).parent
    if record.status == "FINISHED":
        todo = (
            "A finished run never changes: give this config another name (--set name=...), or "
            f"delete the Ray Train folder {folder} to train it as a new MLflow run of the same "
            "name (the finished one stays in MLflow)"
        )
    else:
        todo = (
            "Resuming it would mix two configs in one run: run it with the config it was "
            "started with to continue it, give this config another name (--set name=...), or "
            f"delete the Ray Train folder {folder} to start it again as a new MLflow run"
        )
    raise RunConflictError(
        f"run {run.run_name} (MLflow run {run_id}, {record.status}) was made with another config: "
        f"{shown}. {todo}"
    )


def changed_params(
    logged: Mapping[str, str], params: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """{key: (logged value, value now)} of the params that `tracking.log_params(params)` would
    change: values as it writes them (URI credentials redacted, cut to MLflow's length, secret
    keys left out); keys not logged yet are not changes."""
    now = {k: tracking.param_text(v) for k, v in params.items() if not is_secret_key(k)}
    return {k: (logged[k], v) for k, v in now.items() if k in logged and logged[k] != v}


def finished_run(run: RunConfig) -> RunResult | None:
    """The run's recorded MLflow run when it FINISHED with this config (a rerun has nothing to
    do), else None; RunConflictError when it was made with another config. MLflow is only asked
    when the marker records a run."""
    run_id = recorded_run_id(run)
    if run_id is None:
        return None
    uri = tracking.resolve_tracking_uri(run.tracking)
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(uri, run.tracking.experiment)
    record = check_rerun(run, uri, experiment_id, run_id)
    if record is None or record.status != "FINISHED":
        return None
    model_id = mlflow_model.run_model_id(uri, run_id)
    return RunResult(run_id, uri, record.metrics, str(_marker_path(run).parent), model_id)


@contextmanager
def run_lock(run: RunConfig) -> Iterator[None]:
    """Hold the run's lock (`melora_run.lock` beside its marker) for the block: a second start of
    the same run while this one trains (another jobs/train.py) is refused at once
    (LockedError). No lock with remote storage (s3://)."""
    marker = _marker_path(run)
    if marker is None:
        yield
        return
    hint = (
        "Wait for it to end or stop it: two processes would train the same run into one MLflow "
        "run. To train another run beside it, give it another name (--set name=...)"
    )
    with state_files.exclusive(marker.with_name(RUN_LOCK), f"run {run.run_name}", hint):
        yield


def build_trainer(
    run: RunConfig,
    uri: str,
    run_id: str,
    fault: dict[str, int] | None = None,
    callbacks: list[Any] | None = None,
):
    """The `TorchTrainer` of a run (Ray Train V2); `callbacks` go to its RunConfig (Ray Train UserCallbacks)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    s = run.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run": run.to_dict(),
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "fault": fault,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run.run_name,
            storage_path=storage_path(run),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


def fit_run(
    run: RunConfig,
    parent_run_id: str | None = None,
    sweep: str | None = None,
    fault: dict[str, int] | None = None,
    callbacks: list[Any] | None = None,
    source: Mapping[str, str] | None = None,
) -> RunResult:
    """Train, select, evaluate and track one run; raises RunFailedError (MLflow run FAILED) on failure.

    A run that trained ends FINISHED with its adapter logged as an MLflow model
    (`orchestrator.mlflow_model`; not for ENS and LAP). When that logging fails the run still
    ends FINISHED, with a warning and the tag `melora.model_error`: its metrics and adapter
    artifact are whole, and the model can be logged later (`mlflow_model.log_run_model`).

    `fault` ({"rank": r, "step": k}) kills worker r at step k of the first attempt: the
    fault-tolerance test's switch, not a user option. `callbacks`: Ray Train callbacks, e.g. the
    sweep's forwarding of validation reports to Ray Tune. `source`: MLflow's source tags of the
    job that asked for the run (`tracking.source_tags()` in its driver; default: this process's).
    """
    check_gpu_resources(run)
    check_run_data(run)  # prompts fit task.max_length, answers are tokens: before any worker starts
    uri, run_id = prepare_tracking(run, parent_run_id, sweep, source)
    try:
        result = build_trainer(run, uri, run_id, fault, callbacks).fit()
    except Exception as err:  # Ray wraps worker errors; record the reason, then re-raise
        reason = f"{type(err).__name__}: {err}"
        try:  # MLflow may be what failed: wait a little, and never let it hide the training error
            tracking.call_until(
                lambda: tracking.set_terminated(uri, run_id, "FAILED", reason),
                tracking.MARK_FAILED_WAIT_S,
            )
        except Exception as mlflow_err:
            reason += (
                "; and the MLflow run could not be marked FAILED, it may still say RUNNING ("
                f"{type(mlflow_err).__name__}: {tracking.redact_text(str(mlflow_err))})"
            )
        raise RunFailedError(f"run {run.run_name} failed (MLflow run {run_id}): {reason}") from err
    # Rank 0 logged the final metrics, or marked the run FAILED (a NaN loss) and stopped the workers.
    status, tags, metrics = tracking.read_run(uri, run_id)
    if status == "FAILED":
        raise RunFailedError(
            f"run {run.run_name} failed (MLflow run {run_id}): {tags.get('failure_reason')}"
        )
    # The adapter as an MLflow model, its final metrics linked; a failure here leaves a good run
    # FINISHED, with the tag melora.model_error saying why (mlflow_model.log_run_model_or_warn).
    model_id = mlflow_model.log_run_model_or_warn(uri, run_id, run)
    tracking.set_terminated(uri, run_id, "FINISHED")
    return RunResult(
        mlflow_run_id=run_id,
        tracking_uri=uri,
        metrics=metrics,
        path=str(result.path),
        model_id=model_id,
    )


def check_gpu_resources(run: RunConfig) -> None:
    """Refuse `scaling.use_gpu` before any worker starts when the driver can know it cannot run:
    on the local Ray that `init_ray` started here, whose GPUs are this machine's (Ray Train would
    otherwise wait for GPU workers forever). On a cluster more GPU nodes may come (autoscaling),
    so there each worker checks its own CUDA instead (`worker.worker_device`)."""
    if not run.scaling.use_gpu or not _started_local_ray:
        return
    import ray

    s = run.scaling
    have = ray.cluster_resources().get("GPU", 0.0)
    need = s.num_workers * (s.gpus_per_worker or 1.0)
    if have < need:
        raise ConfigError(
            f"scaling.use_gpu=true needs {need:g} GPUs ({s.num_workers} workers x "
            f"{s.gpus_per_worker or 1:g}), and the local Ray started here has {have:g}: set "
            "scaling.use_gpu: false to train on CPUs, lower scaling.num_workers, or submit to a "
            "GPU cluster (RAY_ADDRESS, ray job submit)"
        )


def recorded_run_id(run: RunConfig) -> str | None:
    """The MLflow run id stored beside the run's Ray Train folder by an earlier start, or None."""
    marker = _marker_path(run)
    if marker is None or not marker.is_file():
        return None
    return _read_marker(marker).get("mlflow_run_id")


def _marker_path(run: RunConfig) -> Path | None:
    """Where the MLflow run id is stored beside the Ray Train run (None for remote storage)."""
    root = storage_path(run)
    return None if "://" in root else Path(root) / run.run_name / RUN_MARKER


def _read_marker(marker: Path) -> dict[str, str]:
    """The marker's {"mlflow_run_id", "start_id", "tracking_uri"} (the first two may be missing:
    a start that died, or a marker of an older version); StateFileError, naming the file and
    what to do, when it cannot be read."""
    fix = (
        "delete it (the next start makes a new MLflow run for this run name; the run it named, "
        "if any, stays in MLflow), or restore it as "
        '{"mlflow_run_id": "<the run id, from the MLflow UI>"}'
    )
    data = state_files.read_json(marker, fix)
    for key in ("mlflow_run_id", "start_id"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and _RUN_ID.fullmatch(value)):
            raise StateFileError(
                f"state file {marker} cannot be read ({key}={str(value)[:80]!r} is not an id): {fix}"
            )
    return data


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connect to a cluster (`address` or $RAY_ADDRESS), or start a local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
    )  # faster reports on small runs
    address = address or os.environ.get("RAY_ADDRESS")
    global _started_local_ray
    if address:
        ray.init(address=address)
    else:
        _started_local_ray = True
        # Ray 2.60 turns token authentication on for a local Ray and, finding no token, writes a
        # new one into the home folder: say so rather than doing it silently.
        home_token = Path.home() / ".ray" / "auth_token"
        if (
            os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
            and not os.environ.get("RAY_AUTH_TOKEN")
            and not Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or home_token).is_file()
        ):
            print(
                f"[ray] no Ray authentication token found: Ray writes a new one to {home_token} "
                "(set RAY_AUTH_TOKEN_PATH to a token file, or RAY_AUTH_TOKEN, to keep it elsewhere)",
                flush=True,
            )
        # the dashboard (on 127.0.0.1) serves the state API that frees stopped trials' workers
        ray.init(
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )
