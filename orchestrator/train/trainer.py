"""From a `RunConfig` to a finished, tracked Ray Train run: `fit_run(run)`.

The driver side of one training run: it checks that MLflow can be reached, creates the run's
MLflow run once (its id is stored beside the Ray Train run, so a restarted job reuses it:
`run_marker`), logs the resolved config and the task's splits (as MLflow dataset inputs),
assembles the `TorchTrainer` (scaling, storage, failure and checkpoint config) and fits it. Ray
Train restarts failed workers from the last checkpoint up to `scaling.max_failures` times; the
MLflow run id travels in the loop config, so every restart logs to the same run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melora.errors import ConfigError
from melora.tasks import get_task, split_plan
from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.errors import RunFailedError
from orchestrator.tracking import model as mlflow_model
from orchestrator.train.preflight import check_run_data, run_splits
from orchestrator.train.run_marker import (
    check_rerun,
    marker_path,
    open_marked_run,
    recorded_run_id,
    storage_path,
)
from orchestrator.train.worker import train_loop_per_worker

_started_local_ray = False  # set by init_ray: the Ray cluster is this machine alone


@dataclass
class RunResult:
    """What a finished run left: its MLflow run, its metrics and its Ray Train folder."""

    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    path: str
    model_id: str | None = None  # the run's MLflow logged model (None: not logged, see fit_run)


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
    task. The rows are those `preflight.check_run_data` checked (`preflight.run_splits`: loaded
    once per process).
    """
    data = run_splits(run)
    sets = [(run.task.name, data.task, None), *((n, {"test": d}, "ood") for n, d in data.ood)]
    inputs = []
    for name, splits, context in sets:
        for split, rows in splits.items():
            where = {**_source_of(run, name, split, splits)}
            cut = where.pop("cut")
            inputs.append(
                tracking.SplitInput(
                    f"{name}/{split}", context or split, rows, hub_split=cut, **where
                )
            )
    return inputs


def _source_of(run: RunConfig, name: str, split: str, splits: Mapping[str, Any]) -> dict[str, Any]:
    """Where task `name`'s `split` was read ({"generator"} | {"file"} | {"hub_path",
    "hub_config"}), and its "cut": the hub split and the policy's slice of it."""
    t = run.task
    spec = get_task(name)
    plan = split_plan(spec, t.split_policy)
    hub_split, part = plan[split]
    if part == "all":
        cut = hub_split
    elif part == "head":
        cut = f"{hub_split}[:{len(splits[split])}]"
    else:  # the tail's head is the policy's other split of the same hub split
        (head,) = (s for s, (h, p) in plan.items() if h == hub_split and p == "head")
        cut = f"{hub_split}[{len(splits[head])}:]"
    if spec.generate is not None:
        return {"cut": cut, "generator": f"{spec.generate.__module__}.{spec.generate.__qualname__}"}
    if t.data_dir is not None:
        folder, stem = Path(t.data_dir) / spec.folder, spec.files[hub_split]
        files = [folder / f"{stem}{suffix}" for suffix in (".jsonl", ".parquet")]
        return {"cut": cut, "file": str(next((f for f in files if f.is_file()), folder))}
    return {"cut": cut, "hub_path": spec.hub_path, "hub_config": spec.hub_config}


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
    uri, experiment_id = tracking.open_experiment(run.tracking)
    marker, tags = marker_path(run), run_tags(run, sweep, source)
    if marker is None:
        run_id = tracking.start_or_resume_run(
            uri, experiment_id, run_name=run.run_name, tags=tags, parent_run_id=parent_run_id
        )
    else:
        run_id = open_marked_run(
            run, marker, uri, experiment_id, tags=tags, parent_run_id=parent_run_id
        )
    tracking.log_run_config(uri, run_id, run.flat_params(), run.to_yaml())
    if not tracking.logged_dataset_inputs(uri, run_id):  # not again when a run resumes
        tracking.log_dataset_inputs(uri, run_id, task_inputs(run))
    return uri, run_id


def finished_run(run: RunConfig) -> RunResult | None:
    """The run's recorded MLflow run when it FINISHED with this config (a rerun has nothing to
    do), else None; RunConflictError when it was made with another config. MLflow is only asked
    when the marker records a run."""
    run_id = recorded_run_id(run)
    if run_id is None:
        return None
    uri, experiment_id = tracking.open_experiment(run.tracking)
    record = check_rerun(run, uri, experiment_id, run_id)
    if record is None or record.status != "FINISHED":
        return None
    model_id = mlflow_model.run_model_id(uri, run_id)
    return RunResult(run_id, uri, record.metrics, str(marker_path(run).parent), model_id)


def build_trainer(
    run: RunConfig,
    uri: str,
    run_id: str,
    fault: dict[str, int] | None = None,
    callbacks: list[Any] | None = None,
):
    """The `TorchTrainer` of a run (Ray Train V2); `callbacks` go to its RunConfig (Ray Train UserCallbacks)."""
    import ray.train  # why: heavy; jobs import this module and refuse bad input before Ray loads
    from ray.train.torch import TorchTrainer  # why: as above

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
    *,
    fault: dict[str, int] | None = None,
    callbacks: list[Any] | None = None,
    source: Mapping[str, str] | None = None,
) -> RunResult:
    """Train, select, evaluate and track one run; raises RunFailedError (MLflow run FAILED) on failure.

    A run that trained ends FINISHED with its adapter logged as an MLflow model
    (`orchestrator.tracking.model`; not for ENS and LAP). When that logging fails the run still
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
    with tracking.failing_run(uri, run_id, label=f"run {run.run_name}"):
        # Ray wraps worker errors: the run is marked FAILED with the reason, RunFailedError raised
        result = build_trainer(run, uri, run_id, fault, callbacks).fit()
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
    so there each worker checks its own CUDA instead (`model.worker_device`)."""
    if not run.scaling.use_gpu or not _started_local_ray:
        return
    import ray  # why: heavy; only reached with scaling.use_gpu on a local Ray

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


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connect to a cluster (`address` or $RAY_ADDRESS), or start a local Ray on 127.0.0.1."""
    import ray  # why: heavy; jobs refuse bad input before Ray loads

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
