"""Everything MLflow about runs: with `adapter_pyfunc.py` (a run's adapter as an MLflow model's
code), the only package of the project that imports mlflow. Callers use it as `tracking.x`; this
file only names the public API of its modules:

    store.py           where: the tracking URI (resolved, checked), one MlflowClient per URI,
                       MLflow's limits on names and values
    conventions.py     the names: every tag (and the resolved-config artifact) that one part of
                       the project writes and another reads
    runs.py            opening and closing a tracked run (the one owner): the experiment, a run
                       started once or resumed, its config logged, FINISHED / FAILED with reason
    log.py             what a run holds, written: params, metrics, tags, text, artifacts
    query.py           runs read back: status, tags, metrics, history, artifacts, search
    datasets.py        a run's data as MLflow dataset inputs
    retries.py         outages, calls' side: bounded calls, transient errors, bounded retries
    spool.py           outages, metrics' side: rank 0's metrics on disk first (MetricSpool)
    system_metrics.py  MLflow's system metrics (CPU, memory, GPU) of the training machine
    source.py          where a run comes from: MLflow's source tags (script, git commit)
    model.py           a run's adapter as an MLflow logged model, and the Model Registry

Small stateless functions over `MlflowClient(tracking_uri=uri)`: no global `mlflow.set_tracking_uri`
and no active-run state, because Ray workers share processes and one process may log to several
runs. The driver resolves the URI, checks it, creates the experiment and the run before training;
rank 0 of the workers logs to that run id, and a restarted worker reuses it.

    uri, experiment_id = open_experiment(cfg.tracking)   # of kind finetuning
    run_id = start_or_resume_run(uri, experiment_id, run_name=cfg.run_name, tags={...})
    log_run_config(uri, run_id, cfg.flat_params(), cfg.to_yaml())
    log_dataset_inputs(uri, run_id, [SplitInput("demo/train", "train", rows, "train", ...)])
    log_metrics(uri, run_id, {"train/nll": 0.7, "train/kl": 12.0}, step=10)
    set_terminated(uri, run_id, "FAILED", reason="train/nll is nan at step 37")

What MLflow's UI builds on, set here the way `mlflow.start_run` would: the experiment's kind
(`mlflow.experimentKind: finetuning`, so the UI opens on the training runs), the runs' source tags
(`mlflow.source.name`, `.type`, `.git.commit`, `.git.dirty`; `MlflowClient.create_run` sets none by
itself), the dataset inputs (the runs table's Dataset column) and the `system/*` metrics.
"""

from orchestrator.redaction import is_secret_key, redact_text, redact_uri
from orchestrator.tracking import conventions
from orchestrator.tracking.conventions import EXPERIMENT_KIND_TAG, FINETUNING
from orchestrator.tracking.datasets import (
    DATASET_CONTEXTS,
    SplitInput,
    log_dataset_inputs,
    logged_dataset_inputs,
)
from orchestrator.tracking.log import (
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    eval_metric_key,
    log_artifacts,
    log_metrics,
    log_params,
    log_text,
    param_text,
    set_tags,
)
from orchestrator.tracking.query import (
    RunRecord,
    child_runs,
    download_adapter,
    download_artifact,
    experiments,
    metric_history,
    read_run,
    run_config,
    search_runs,
)
from orchestrator.tracking.retries import (
    ARTIFACT_TIMEOUT_S,
    CALL_TIMEOUT_S,
    DEFAULT_FLUSH_WAIT_S,
    FLUSH_WAIT_ENV,
    MARK_FAILED_WAIT_S,
    call_until,
    flush_wait_s,
    is_transient,
    short_calls,
)
from orchestrator.tracking.runs import (
    TERMINAL_STATUSES,
    create_run_once,
    ensure_experiment,
    failing_run,
    log_run_config,
    open_experiment,
    set_terminated,
    start_or_resume_run,
    tracked_run,
    try_set_terminated,
)
from orchestrator.tracking.source import RAY_JOB_ENV, entry_point, git_commit, source_tags
from orchestrator.tracking.spool import PENDING_FILE, SENT_FILE, MetricSpool, flush_pending
from orchestrator.tracking.store import (
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    TRUNCATED,
    check_name,
    check_reachable,
    resolve_tracking_uri,
    sqlite_path,
)
from orchestrator.tracking.system_metrics import SystemMetrics, start_system_metrics

__all__ = [
    "ARTIFACT_TIMEOUT_S",
    "CALL_TIMEOUT_S",
    "DATASET_CONTEXTS",
    "DEFAULT_FLUSH_WAIT_S",
    "EXPERIMENT_KIND_TAG",
    "FINETUNING",
    "FLUSH_WAIT_ENV",
    "MARK_FAILED_WAIT_S",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_LENGTH",
    "MAX_TAG_LENGTH",
    "METRICS_PER_BATCH",
    "PARAMS_PER_BATCH",
    "PENDING_FILE",
    "RAY_JOB_ENV",
    "SENT_FILE",
    "TERMINAL_STATUSES",
    "TRUNCATED",
    "MetricSpool",
    "RunRecord",
    "SplitInput",
    "SystemMetrics",
    "call_until",
    "check_name",
    "check_reachable",
    "child_runs",
    "conventions",
    "create_run_once",
    "download_adapter",
    "download_artifact",
    "ensure_experiment",
    "entry_point",
    "eval_metric_key",
    "experiments",
    "failing_run",
    "flush_pending",
    "flush_wait_s",
    "git_commit",
    "is_secret_key",
    "is_transient",
    "log_artifacts",
    "log_dataset_inputs",
    "log_metrics",
    "log_params",
    "log_run_config",
    "log_text",
    "logged_dataset_inputs",
    "metric_history",
    "open_experiment",
    "param_text",
    "read_run",
    "run_config",
    "redact_text",
    "redact_uri",
    "resolve_tracking_uri",
    "search_runs",
    "set_tags",
    "set_terminated",
    "short_calls",
    "source_tags",
    "sqlite_path",
    "start_or_resume_run",
    "start_system_metrics",
    "tracked_run",
    "try_set_terminated",
]
