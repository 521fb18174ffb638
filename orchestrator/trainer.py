"""From a `RunConfig` to a finished, tracked Ray Train run: `fit_run(run)`.

The driver side of one training run: it checks that MLflow can be reached, creates the run's
MLflow run once (its id is stored beside the Ray Train run, so a restarted job reuses it), logs
the resolved config, assembles the `TorchTrainer` (scaling, storage, failure and checkpoint
config) and fits it. Ray Train restarts failed workers from the last checkpoint up to
`scaling.max_failures` times; the MLflow run id travels in the loop config, so every restart
logs to the same run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melora.errors import ConfigError, MeLoraError
from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.worker import train_loop_per_worker

RUN_MARKER = "melora_run.json"
_started_local_ray = False  # set by init_ray: the Ray cluster is this machine alone


class RunFailedError(MeLoraError, RuntimeError):
    """The training run failed; the MLflow run is marked FAILED with the reason."""


@dataclass
class RunResult:
    """What a finished run left: its MLflow run, its metrics and its Ray Train folder."""

    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    path: str


def storage_path(run: RunConfig) -> str:
    """Ray Train's storage: tracking.storage_path, else <cwd>/ray_results (absolute; URIs kept)."""
    path = run.tracking.storage_path or "ray_results"
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_tags(run: RunConfig, sweep: str | None = None) -> dict[str, str]:
    """The MLflow tags of a training run (DESIGN.md): method, task, seed, git_sha, [sweep], and the config's own."""
    tags = {
        **run.tracking.tags,
        "method": run.adapter.method,
        "task": run.task.name,
        "seed": str(run.seed),
    }
    tags["git_sha"] = tracking.git_sha()
    if sweep:
        tags["sweep"] = sweep
    return tags


def prepare_tracking(
    run: RunConfig, parent_run_id: str | None = None, sweep: str | None = None
) -> tuple[str, str]:
    """(tracking URI, MLflow run id): reachable, experiment created, run created once or resumed, params logged."""
    uri = tracking.resolve_tracking_uri(run.tracking)
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(uri, run.tracking.experiment)
    marker = _marker_path(run)
    previous = (
        json.loads(marker.read_text())["mlflow_run_id"] if marker and marker.is_file() else None
    )
    run_id = tracking.start_or_resume_run(
        uri,
        experiment_id,
        run_id=previous,
        run_name=run.run_name,
        tags=run_tags(run, sweep),
        parent_run_id=parent_run_id,
    )
    if marker and previous is None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking.redact_uri(uri)}) + "\n"
        )
    tracking.log_params(uri, run_id, run.flat_params())
    tracking.log_text(uri, run_id, run.to_yaml(), "config/resolved.yaml")
    return uri, run_id


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
) -> RunResult:
    """Train, select, evaluate and track one run; raises RunFailedError (MLflow run FAILED) on failure.

    `fault` ({"rank": r, "step": k}) kills worker r at step k of the first attempt: the
    fault-tolerance test's switch, not a user option. `callbacks`: Ray Train callbacks, e.g. the
    sweep's forwarding of validation reports to Ray Tune.
    """
    check_gpu_resources(run)
    uri, run_id = prepare_tracking(run, parent_run_id, sweep)
    try:
        result = build_trainer(run, uri, run_id, fault, callbacks).fit()
    except Exception as err:  # Ray wraps worker errors; record the reason, then re-raise
        reason = f"{type(err).__name__}: {err}"
        tracking.set_terminated(uri, run_id, "FAILED", reason)
        raise RunFailedError(f"run {run.run_name} failed (MLflow run {run_id}): {reason}") from err
    # Rank 0 logged the final metrics, or marked the run FAILED (a NaN loss) and stopped the workers.
    status, tags, metrics = tracking.read_run(uri, run_id)
    if status == "FAILED":
        raise RunFailedError(
            f"run {run.run_name} failed (MLflow run {run_id}): {tags.get('failure_reason')}"
        )
    tracking.set_terminated(uri, run_id, "FINISHED")
    return RunResult(mlflow_run_id=run_id, tracking_uri=uri, metrics=metrics, path=str(result.path))


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
    return json.loads(marker.read_text())["mlflow_run_id"]


def _marker_path(run: RunConfig) -> Path | None:
    """Where the MLflow run id is stored beside the Ray Train run (None for remote storage)."""
    root = storage_path(run)
    return None if "://" in root else Path(root) / run.run_name / RUN_MARKER


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
