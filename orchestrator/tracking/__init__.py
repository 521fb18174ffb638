"""Everything MLflow about runs, in one place: with `orchestrator.mlflow_model` (a run's adapter as an
MLflow model, the Model Registry; its pyfunc code `orchestrator/adapter_pyfunc.py`), the only
module of the project that imports mlflow.

Small stateless functions over `MlflowClient(tracking_uri=uri)`: no global `mlflow.set_tracking_uri`
and no active-run state, because Ray workers share processes and one process may log to several
runs. The driver resolves the URI, checks it, creates the experiment and the run before training;
rank 0 of the workers logs to that run id, and a restarted worker reuses it.

    uri = resolve_tracking_uri(cfg.tracking)
    check_reachable(uri)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)   # of kind finetuning
    run_id = start_or_resume_run(uri, experiment_id, run_name=cfg.run_name, tags={...})
    log_params(uri, run_id, cfg.flat_params())
    log_dataset_inputs(uri, run_id, [SplitInput("demo/train", "train", rows, "train", ...)])
    log_metrics(uri, run_id, {"train/nll": 0.7, "train/kl": 12.0}, step=10)
    set_terminated(uri, run_id, "FAILED", reason="train/nll is nan at step 37")

MLflow outages (a tracking server that goes away mid-run): rank 0 logs its metrics through a
`MetricSpool`, which writes each record to disk before sending it and keeps what it cannot send
for later, so that a down server costs no metric point and blocks no training step; `short_calls`
bounds each MLflow HTTP call (MLflow's own defaults retry for minutes), `call_until` retries a
call for a bounded time, and `flush_pending` sends a spool left behind by a run that ended while
the server was down. `SystemMetrics` samples MLflow's system metrics (CPU, memory, GPU) of the
machine that trains into the run.

What MLflow's UI builds on, set here the way `mlflow.start_run` would: the experiment's kind
(`mlflow.experimentKind: finetuning`, so the UI opens on the training runs), the runs' source tags
(`mlflow.source.name`, `.type`, `.git.commit`, `.git.dirty`; `MlflowClient.create_run` sets none by
itself), the dataset inputs (the runs table's Dataset column) and the `system/*` metrics.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, SourceType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from orchestrator import state_files
from orchestrator.config import TrackingConfig
from orchestrator.errors import TrackingError
from orchestrator.redaction import is_secret_key, redact_text, redact_uri

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
MAX_KEY_LENGTH = 250  # MLflow's limit on a param, metric or tag key
PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch call
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRUNCATED = "...[truncated]"
_NAME = re.compile(r"[\w./\- ]+")  # MLflow's allowed characters, minus ':' (refused on Windows)
REPO = Path(__file__).resolve().parents[2]  # this project's checkout
# MLflow 3's experiment type, read by its UI to choose the page an experiment opens on. 3.17 has no
# Python constant for it; its UI's ExperimentKind enum has FINETUNING = "finetuning".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FINETUNING = "finetuning"
# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint (Ray 2.60,
# ray._private.runtime_env.constants): the run's source is then a JOB, else LOCAL.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
DATASET_CONTEXTS = ("train", "validation", "test", "ood")  # a dataset input's mlflow.data.context
SYSTEM_METRICS_STOP_WAIT_S = 5.0  # how long stopping the system metrics waits for their thread
DATASET_INSERT_TRIES = 3  # log_dataset_inputs: tries when another run inserted the dataset first
# a unique-key violation, as SQLite, PostgreSQL and MySQL word it
_DUPLICATE_KEY = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry", re.I)


# ----- where ------------------------------------------------------------------------------------
def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.

    A relative sqlite path is made absolute (against the current folder), so that Ray workers
    with another working folder write to the same database.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        query = uri.partition("?")[2]
        uri = f"sqlite:///{db.resolve()}" + (f"?{query}" if query else "")
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when MLflow at `uri` cannot be used.

    http(s): an HTTP answer of any status within `timeout` seconds counts as reachable (MLflow's
    own client would retry for minutes first). sqlite: the database's folder must exist (MLflow
    creates the file). file: the store's parent folder must exist. Other schemes are not checked.
    """
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"the MLflow tracking server {redact_uri(uri)} cannot be reached ({reason}); start it "
                "(for example `mlflow server --host 127.0.0.1 --port 5000`) or set "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI to one that runs"
            ) from None
        return
    db = _sqlite_path(uri)
    if db is not None and db.name not in ("", ":memory:"):
        if not db.parent.is_dir():
            raise TrackingError(
                f"the MLflow database {uri} cannot be created: the folder {db.parent} does not exist; create it or change tracking.tracking_uri"
            )
        if db.exists() and not db.is_file():
            raise TrackingError(f"the MLflow database {uri} is not a file: {db} is a folder")
    if scheme == "file":
        store = Path(urlsplit(uri).path)
        if not store.parent.is_dir():
            raise TrackingError(
                f"the MLflow store {uri} cannot be created: the folder {store.parent} does not exist"
            )


# ----- experiments and runs ---------------------------------------------------------------------
def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment `name`, created when missing, of kind `finetuning`.

    With a sqlite URI and no `artifact_location`, artifacts go to `<database folder>/mlruns`
    (absolute), next to the database, wherever the process runs. The experiment carries the tag
    `mlflow.experimentKind: finetuning`, so that MLflow's UI opens it on its training runs (not
    on the GenAI overview): a new one from its creation, an existing one without a kind when this
    project adds a run to it. A kind someone set is kept.
    """
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_path(uri)
        if artifact_location is None and db is not None and db.name not in ("", ":memory:"):
            artifact_location = (db.resolve().parent / "mlruns").as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: FINETUNING}
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} at {redact_uri(uri)} is deleted: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another tracking.experiment"
        )
    if not experiment.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, FINETUNING)
    return experiment.experiment_id


def start_or_resume_run(
    uri: str,
    experiment_id: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create the run once (with `tags`, under `parent_run_id` if given), or resume `run_id`.

    A new run carries MLflow's source tags (`source_tags()`: this process's script, LOCAL or JOB,
    the git commit) unless `tags` gives them: a run made in a Ray worker on behalf of a job passes
    the job's own, read in its driver. Resuming never creates a second run and changes no tag but
    one: it checks that `run_id` exists in `experiment_id`, sets its status back to RUNNING and
    removes a `failure_reason` tag left by an earlier failure. Store the returned id with the Ray
    Train run and pass it on every restart.
    """
    client = _client(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise TrackingError(
                f"MLflow run {run_id} not found at {redact_uri(uri)}: it cannot be resumed; start without a run id"
            ) from None
        if run.info.experiment_id != experiment_id:
            raise TrackingError(
                f"MLflow run {run_id} belongs to experiment {run.info.experiment_id}, not {experiment_id}"
            )
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if "failure_reason" in run.data.tags:  # a FAILED run retried: the old reason is history
            client.delete_tag(run_id, "failure_reason")
        return run_id
    tags = dict(tags or {})
    if MLFLOW_SOURCE_NAME not in tags:
        tags = {**source_tags(), **tags}
    clean = {
        k: _truncate(redact_text(str(v)), MAX_TAG_LENGTH)
        for k, v in tags.items()
        if not is_secret_key(k)
    }
    if parent_run_id:
        clean["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=run_name, tags=clean).info.run_id


def set_terminated(
    uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None
) -> None:
    """End the run as FINISHED, FAILED or KILLED; `reason` goes to the tag `failure_reason`."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(
            f"status={status!r} is not a final MLflow status: choose one of {list(TERMINAL_STATUSES)}"
        )
    client = _client(uri)
    if reason is not None:
        client.set_tag(run_id, "failure_reason", _truncate(redact_text(reason), MAX_TAG_LENGTH))
    client.set_terminated(run_id, status=status)


# ----- logging ----------------------------------------------------------------------------------
def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params in batches of 100; returns the keys dropped because they look like secrets.

    Values become text (URI credentials redacted), cut to MLflow's 6000 characters (ending in
    '...[truncated]').
    Re-logging an equal value (a resumed run) is fine; MLflow refuses a changed one.
    """
    dropped = [k for k in params if is_secret_key(k)]
    items = [Param(_check_name(k), param_text(v)) for k, v in params.items() if k not in dropped]
    client = _client(uri)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
    return dropped


def param_text(value: Any) -> str:
    """A param value as `log_params` writes it: text, URI credentials redacted, cut to 6000.

    MLflow keeps params as text, and its UI's parallel-coordinates and scatter charts take a
    param whose values parse as numbers as a numeric axis, any other as a categorical one. So
    numbers are written as Python writes them, which parse back to the value: an int as '8'
    (never '8.0': the config refuses 8.0 for an int field), a float in its shortest round-trip
    form ('0.2', '1e-05', '1.0'; never padded). Booleans are 'True' / 'False', as MLflow's own
    `log_param` writes them: a two-valued category, and the text every logged run has, so a
    resumed run's params compare equal.
    """
    return _truncate(redact_text(str(value)), MAX_PARAM_LENGTH)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log scalar metrics (floats, ints, 0-d tensors) at `step`; every name is checked first.

    Names may hold letters, digits, '_', '-', '.', ' ' and '/' (MLflow refuses '@', for example).
    A bad name is a ValueError and nothing of the call is logged.
    """
    timestamp = int(time.time() * 1000)
    items = [Metric(_check_name(k), float(v), timestamp, int(step)) for k, v in metrics.items()]
    client = _client(uri)
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])


def log_artifacts(
    uri: str, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None
) -> None:
    """Copy the files under `local_dir` into the run's artifacts, under `artifact_path`."""
    if not Path(local_dir).is_dir():
        raise FileNotFoundError(f"artifact folder {local_dir} does not exist")
    _client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def read_run(uri: str, run_id: str) -> tuple[str, dict[str, str], dict[str, float]]:
    """(status, tags, latest metric values) of a run, as the tracking server has them."""
    run = _client(uri).get_run(run_id)
    return run.info.status, dict(run.data.tags), dict(run.data.metrics)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set or overwrite tags (unlike params, tags may change); secret-looking keys are skipped."""
    client = _client(uri)
    for key, value in tags.items():
        if not is_secret_key(key):
            value = redact_text(str(value))
            client.set_tag(run_id, _check_name(key), _truncate(value, MAX_TAG_LENGTH))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric of a run, in logging order."""
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


@dataclass
class RunRecord:
    """A run as read back: what a sweep's results table and the reports need."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]


def child_runs(uri: str, parent_run_id: str) -> list[RunRecord]:
    """Every run whose parent is `parent_run_id` (a sweep's trials), oldest first."""
    experiment_id = _client(uri).get_run(parent_run_id).info.experiment_id
    return search_runs(uri, [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def experiments(uri: str) -> dict[str, str]:
    """{name: id} of every active (not deleted) experiment at `uri`."""
    client, out, token = _client(uri), {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            return out


def search_runs(
    uri: str, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None
) -> list[RunRecord]:
    """Every run of `experiment_ids` matching MLflow's `filter_string` (all pages), oldest first by default.

    For example `search_runs(uri, [eid], "tags.kind = 'sweep' and tags.sweep = 'demo'")`.
    """
    client, records, token = _client(uri), [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by or ["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        records += [
            RunRecord(
                run_id=r.info.run_id,
                name=r.info.run_name,
                status=r.info.status,
                tags=dict(r.data.tags),
                metrics=dict(r.data.metrics),
                params=dict(r.data.params),
            )
            for r in page
        ]
        token = page.token
        if not token:
            return records


def download_artifact(uri: str, run_id: str, path: str, dst_dir: str | os.PathLike) -> Path | None:
    """Download the artifact file `path` (e.g. 'reliability/test_demo_n0.png') of a run into
    `dst_dir`; returns the local file, or None when the run has no such artifact."""
    client = _client(uri)
    folder = posixpath.dirname(path) or None
    if path not in {f.path for f in client.list_artifacts(run_id, folder) if not f.is_dir}:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst_dir)))


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Write `text` as the artifact `artifact_file` (for example 'config/resolved.yaml'), with
    the credentials of any URI in it redacted."""
    _client(uri).log_text(run_id, redact_text(text), artifact_file)


def eval_metric_key(split: str, task: str, metric: str, n_samples: int) -> str:
    """'test/openbookqa/ece_n10': the key of a final metric of `task` at N = `n_samples`."""
    if split not in ("test", "ood"):
        raise ValueError(f"split={split!r}: final metrics are 'test' or 'ood'")
    return _check_name(f"{split}/{task}/{metric}_n{n_samples}")


# ----- dataset inputs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitInput:
    """One split of a task that a run trains or is evaluated on, as an MLflow dataset input.

    `rows` (a `datasets.Dataset`) give MLflow's digest (a hash of up to 10,000 rows and the row
    count: equal rows, equal digest), schema and row count; the rows themselves are not uploaded.
    Where they come from is one of: `hub_path` (+ `hub_config`) on the Hugging Face hub, a local
    `file` in the hub's schema, or a `generator` function (data made in code).
    """

    name: str  # the dataset's name in MLflow, e.g. 'arc_easy/validation'
    context: str  # what the run does with it: 'train', 'validation', 'test' or 'ood'
    rows: Any  # the split's rows, a datasets.Dataset
    hub_split: str  # the rows of the hub split, in `datasets` slicing syntax: 'validation[:408]'
    hub_path: str | None = None  # hub dataset id, e.g. 'allenai/ai2_arc'
    hub_config: str | None = None  # hub config name, e.g. 'ARC-Easy'
    file: str | None = None  # the local file the hub split was read from
    generator: str | None = (
        None  # the function that made the rows, e.g. 'melora.tasks.demo.shifted'
    )


def log_dataset_inputs(uri: str, run_id: str, splits: list[SplitInput]) -> None:
    """Log `splits` as the run's dataset inputs (MLflow's Dataset column and the run page's
    Datasets), each with its role as the input tag `mlflow.data.context`.

    The source is a `HuggingFaceDatasetSource` (the hub id, config and rows of the split: the UI
    links to the hub), a `LocalArtifactDatasetSource` (the file) or a `CodeDatasetSource` (the
    generator, and the hub split it made). Logging the same inputs again adds nothing.
    """
    import mlflow.data  # pandas and friends: only where datasets are logged
    from mlflow.data.sources import (
        CodeDatasetSource,
        HuggingFaceDatasetSource,
        LocalArtifactDatasetSource,
    )

    inputs = []
    for split in splits:
        if split.context not in DATASET_CONTEXTS:
            raise ValueError(
                f"dataset input {split.name!r}: context {split.context!r} is not one of {list(DATASET_CONTEXTS)}"
            )
        if split.generator is not None:
            source = CodeDatasetSource(
                tags={"generator": split.generator, "split": split.hub_split}
            )
        elif split.file is not None:
            source = LocalArtifactDatasetSource(split.file)
        else:
            source = HuggingFaceDatasetSource(
                path=split.hub_path, config_name=split.hub_config, split=split.hub_split
            )
        with warnings.catch_warnings():  # MLflow's schema hints, pandas' deprecations in it
            warnings.simplefilter("ignore")
            info = mlflow.data.from_huggingface(
                split.rows, name=split.name, source=source
            ).to_dict()
        dataset = Dataset(
            name=info["name"],
            digest=info["digest"],
            source_type=info["source_type"],
            source=redact_text(info["source"]),
            schema=info.get("schema"),
            profile=info.get("profile"),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split.context)]))
    for attempt in range(DATASET_INSERT_TRIES if inputs else 0):
        try:
            _client(uri).log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            # Two runs of one experiment logging the same new dataset at once (a sweep's trials
            # starting together): MLflow's SQL store checks, then inserts, so one insert fails on
            # the datasets' unique key and its transaction is rolled back. The dataset exists
            # now: logging again links it to this run.
            if not _DUPLICATE_KEY.search(str(err)) or attempt == DATASET_INSERT_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def logged_dataset_inputs(uri: str, run_id: str) -> list[tuple[str, str, str]]:
    """(name, context, digest) of each dataset input of a run, as MLflow has them."""
    run = _client(uri).get_run(run_id)
    return [
        (
            d.dataset.name,
            next((t.value for t in d.tags if t.key == MLFLOW_DATASET_CONTEXT), ""),
            d.dataset.digest,
        )
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]


# ----- system metrics -------------------------------------------------------------------------------
class SystemMetrics:
    """MLflow's system metrics of this machine, logged to one run by a daemon thread.

        monitor = start_system_metrics(uri, run_id)   # None when turned off
        ...                                           # train
        monitor.stop()

    The metrics are MLflow's own (its `SystemMetricsMonitor`'s samplers and names):
    `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes` and `_percentage`,
    disk and network, and per NVIDIA GPU `system/gpu_<i>_utilization_percentage`,
    `_memory_usage_megabytes`, `_memory_usage_percentage` and `_power_usage_watts` (with
    nvidia-ml-py and an NVIDIA driver; AMD GPUs through pyrsmi). MLflow's variables apply:
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` (seconds, default 10; it wins over
    `sampling_interval_s`), `MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING` (default 1: one point
    per interval) and `MLFLOW_SYSTEM_METRICS_NODE_ID` (names become `system/<node>/...`).

    Unlike `mlflow.start_run(log_system_metrics=True)`, it works for a run made by `MlflowClient`,
    and an MLflow outage costs points, never the run: a point that MLflow does not take is
    dropped (they are samples, not a record; the training metrics are the ones spooled) and
    sampling goes on; a refusal (a deleted run) ends the thread, its error kept in `last_error`.
    `stop()` logs the last, partial interval (so a run shorter than the interval has a point
    too) and waits at most `wait_s` for the thread, a daemon that a killed process takes along.
    Steps go on from the run's last one, so a resumed run's points follow its earlier ones.
    """

    def __init__(self, uri: str, run_id: str, sampling_interval_s: float = 10.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.uri, self.run_id = uri, run_id
        # MLflow's monitor gives the samplers and its settings; its own thread is not used: it
        # stops for good at the first failed MLflow call, and `finish` waits for MLflow unbounded
        self._sampler = SystemMetricsMonitor(
            run_id, sampling_interval=sampling_interval_s, tracking_uri=uri
        )
        self.interval_s = float(self._sampler.sampling_interval)
        self.samples_per_point = max(1, int(self._sampler.samples_before_logging))
        node = self._sampler.node_id
        self.prefix = f"system/{node}/" if node else "system/"
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SystemMetrics:
        """Start sampling (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="melora-system-metrics", daemon=True
            )
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, wait_s: float = SYSTEM_METRICS_STOP_WAIT_S) -> bool:
        """Log the last interval and stop; True when the thread ended within `wait_s` seconds
        (else it ends by itself once its MLflow call returns, logging nothing more)."""
        if self._thread is None:
            return True
        self._stop.set()
        self._thread.join(wait_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        # a first sample sets the baselines, dropped: psutil measures CPU use between two calls
        # of the same thread
        self._sampler.collect_metrics()
        self._clear()
        step, samples = self._next_step(), 0
        while True:
            stopping = self._stop.wait(self.interval_s)
            self._sampler.collect_metrics()
            samples += 1
            if stopping or samples >= self.samples_per_point:
                values = {self.prefix + k: v for k, v in self._sampler.aggregate_metrics().items()}
                self._clear()
                samples = 0
                try:
                    log_metrics(self.uri, self.run_id, values, step)
                except Exception as err:  # the point is dropped
                    self.last_error = err
                    if not is_transient(err):
                        return
                step += 1
            if stopping:
                return

    def _next_step(self) -> int:
        """The step after the run's last system metrics point: 0 for a new run, or when MLflow
        does not answer."""
        try:
            history = _client(self.uri).get_metric_history(
                self.run_id, self.prefix + "cpu_utilization_percentage"
            )
        except Exception:
            return 0
        return max((m.step for m in history), default=-1) + 1

    def _clear(self) -> None:
        for sampler in self._sampler.monitors:
            sampler.clear_metrics()


def start_system_metrics(uri: str, run_id: str) -> SystemMetrics | None:
    """`SystemMetrics` of run `run_id`, started; None when `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`
    is set to false (MLflow's switch; unset, training runs log them), or, with a warning on
    stderr, when they cannot be sampled here (say a bad MLFLOW_SYSTEM_METRICS_* value): a run
    never fails for its system metrics."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as enabled

    try:
        if enabled.is_set() and not enabled.get():
            return None
        return SystemMetrics(uri, run_id).start()
    except Exception as err:
        print(
            f"[tracking] warning: no system metrics for MLflow run {run_id}: "
            f"{type(err).__name__}: {redact_text(str(err))}",
            file=sys.stderr,
            flush=True,
        )
        return None


# ----- outages: bounded calls, and rank 0's metrics spooled on disk -----------------------------
CALL_TIMEOUT_S = 10  # one MLflow HTTP call of the workers: seconds to connect and for each answer
ARTIFACT_TIMEOUT_S = 60  # one artifact upload (a 13B model's adapter is tens of MB)
FLUSH_WAIT_ENV = "MELORA_MLFLOW_FLUSH_WAIT_S"
MARK_FAILED_WAIT_S = 30.0  # the driver marking a failed run FAILED (fit_run, the sweep callbacks)
DEFAULT_FLUSH_WAIT_S = 300.0
PENDING_FILE = "mlflow_pending.jsonl"
SENT_FILE = "mlflow_sent.json"
BACKOFF_S = (1.0, 30.0)  # a failing spool tries again after 1 s, doubling up to 30 s
_TRANSIENT = frozenset(
    {
        "INTERNAL_ERROR",  # also what MLflow's client makes of a refused connection or a 5xx
        "TEMPORARILY_UNAVAILABLE",
        "IO_ERROR",
        "SERVICE_UNDER_MAINTENANCE",
        "DEADLINE_EXCEEDED",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "COULD_NOT_ACQUIRE_LOCK",
        "UNPARSEABLE_HTTP_ERROR",  # a proxy's error page
    }
)


@contextmanager
def short_calls(timeout_s: int = CALL_TIMEOUT_S) -> Iterator[None]:
    """Inside the block, each MLflow HTTP request of this process is tried once and waits at most
    `timeout_s` seconds to connect and for each answer.

    By default MLflow 3.17 retries a failed request 7 times with exponential back-off (factor 2)
    and a 120 s timeout: minutes per call while a server is down. It reads
    MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR and _TIMEOUT at every request
    (`mlflow.utils.rest_utils.http_request`), so setting them around a call bounds it; they are
    restored after. They are the process's variables: other threads making MLflow calls at the
    same time get the short limits too.
    """
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s))),
    }
    saved = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_transient(err: BaseException) -> bool:
    """Whether a failed MLflow call may succeed when tried again later: the server down or slow,
    a timeout, a 5xx answer, rate limiting. A refusal (a bad value, no such run, no permission)
    is not: a retry would fail the same way."""
    if isinstance(err, MlflowException):
        return err.error_code in _TRANSIENT
    return isinstance(err, OSError)  # requests' errors are OSErrors


def call_until(
    fn: Callable[[], Any], wait_s: float, timeout_s: int = CALL_TIMEOUT_S, every_s: float = 1.0
) -> Any:
    """`fn()` under `short_calls(timeout_s)`, tried again every `every_s` seconds after a transient
    error (`is_transient`) until it succeeds or `wait_s` seconds have passed (one try at least);
    then the last error is raised. A refusal is raised at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with short_calls(timeout_s):
                return fn()
        except Exception as err:
            if not is_transient(err) or time.monotonic() + every_s > deadline:
                raise
        time.sleep(every_s)


def flush_wait_s() -> float:
    """How long the end of a run waits for MLflow to take what is pending (metrics, artifacts,
    the final status): $MELORA_MLFLOW_FLUSH_WAIT_S seconds, 300 by default. Set it where the
    workers run (a cluster's nodes; a local Ray inherits the driver's environment)."""
    raw = os.environ.get(FLUSH_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_FLUSH_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise TrackingError(
            f"{FLUSH_WAIT_ENV}={raw[:40]!r} is not a number of seconds >= 0: unset it (300 s) or "
            "set for example 600"
        )
    return value


class MetricSpool:
    """Rank 0's metrics, on disk first and then in MLflow: an outage loses no point and blocks no step.

    `folder` is the Ray Train run's folder (beside its checkpoints and melora_run.json), where a
    restarted worker finds it, on any node of a shared storage:
      mlflow_pending.jsonl  append-only, one line per `add`: {"seq": n, "step": s, "timestamp": ms,
                            "metrics": {key: value}}; opened, appended and closed each time (on
                            NFS/EFS the close makes the line visible to the other nodes)
      mlflow_sent.json      {"run_id": ..., "sent": n}: MLflow has every record up to seq n;
                            replaced atomically (temp file + rename) after each successful log_batch
    Records are sent in order, each metric with the timestamp and step it was logged with; a new
    spool (a restarted worker, `flush_pending`) first sends the records after `sent`. A record is
    sent twice only when the process dies between MLflow's answer and the rename; that repeat is
    exact (same key, value, timestamp and step), which MLflow's SQL stores ignore (it is their
    metrics' primary key), so each point is in the history once.
    While sending fails with a transient error (`is_transient`), `add` only appends and tries
    again after a back-off (1 s, doubling up to 30 s): a down server costs at most one short call
    (`short_calls`) per back-off. A refusal (for example a deleted run) raises TrackingError.
    `flush(wait_s)` tries until everything is sent or `wait_s` seconds have passed.
    A spool left by another MLflow run id (a new MLflow run under the same run name) is moved
    into the subfolder `mlflow_spool_<its run id>` when it holds unsent records (`flush_pending`
    sends them), else removed. A torn last line (the process died while writing it) is dropped.
    """

    def __init__(
        self, folder: str | os.PathLike, uri: str, run_id: str, timeout_s: int = CALL_TIMEOUT_S
    ) -> None:
        self.folder, self.uri, self.run_id, self.timeout_s = Path(folder), uri, run_id, timeout_s
        self.path, self.marker = self.folder / PENDING_FILE, self.folder / SENT_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_error: BaseException | None = None
        self._backoff, self._retry_at = BACKOFF_S[0], 0.0
        owner, sent = _read_sent_marker(self.marker)
        records = self._read_records()
        if owner is not None and owner != run_id:
            self._set_aside(owner, any(r["seq"] > sent for r in records))
            owner, sent, records = None, 0, []
        self.sent = sent
        self.pending = [r for r in records if r["seq"] > sent]
        self.next_seq = max([sent, *(r["seq"] for r in records)]) + 1
        if owner is None:
            self._write_marker(sent)

    def add(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Write one record (every name checked first: a bad name is a ValueError and nothing is
        written), then try to send what is pending; True when MLflow has everything."""
        values = {_check_name(k): float(v) for k, v in metrics.items()}
        if values:
            record = {
                "seq": self.next_seq,
                "step": int(step),
                "timestamp": int(time.time() * 1000),
                "metrics": values,
            }
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.next_seq += 1
            self.pending.append(record)
        return self.send()

    def send(self, now: bool = False) -> bool:
        """Send the pending records in order, unless a back-off is running (`now` ignores it);
        True when MLflow has everything."""
        if not self.pending:
            return True
        if not now and time.monotonic() < self._retry_at:
            return False
        client = _client(self.uri)
        try:
            while self.pending:
                batch, size = [], 0
                for record in self.pending:
                    if batch and size + len(record["metrics"]) > METRICS_PER_BATCH:
                        break
                    batch.append(record)
                    size += len(record["metrics"])
                items = [
                    Metric(key, value, r["timestamp"], r["step"])
                    for r in batch
                    for key, value in r["metrics"].items()
                ]
                with short_calls(self.timeout_s):
                    for i in range(0, len(items), METRICS_PER_BATCH):
                        client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])
                self._write_marker(batch[-1]["seq"])
                del self.pending[: len(batch)]
        except Exception as err:
            if not is_transient(err):
                raise TrackingError(
                    f"MLflow at {redact_uri(self.uri)} refused the metrics of run {self.run_id}: "
                    f"{redact_text(str(err))}. {self.unsent_message()}"
                ) from err
            self.last_error = err
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, BACKOFF_S[1])
            return False
        self.last_error, self._backoff, self._retry_at = None, BACKOFF_S[0], 0.0
        return True

    def flush(self, wait_s: float) -> bool:
        """Try to send everything, every second, for up to `wait_s` seconds (plus one call's
        timeout); True when MLflow has everything."""
        deadline = time.monotonic() + wait_s
        while not self.send(now=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(1.0, left))
        return True

    def unsent_message(self) -> str:
        """What is left and how to send it later."""
        return (
            f"{len(self.pending)} metric records of MLflow run {self.run_id} are kept in "
            f"{self.path}; once the server is back, rerun the same command (the run resumes from "
            "its last checkpoint in the same MLflow run and sends them first), or send them "
            'alone: python -c "from orchestrator import tracking; '
            f"tracking.flush_pending('{self.folder}', '<tracking URI>')\""
        )

    def _read_records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # no newline at the end: the writer died in the middle of this line
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
        records = []
        for number, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                record = {
                    "seq": int(raw["seq"]),
                    "step": int(raw["step"]),
                    "timestamp": int(raw["timestamp"]),
                    "metrics": {_check_name(k): float(v) for k, v in raw["metrics"].items()},
                }
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise TrackingError(
                    f"{self.path} line {number} is not a metric record ({err}): the file is "
                    "damaged; move it away to start a new spool (its unsent records are then lost)"
                ) from None
            records.append(record)
        return records

    def _write_marker(self, sent: int) -> None:
        state_files.write_json(self.marker, {"run_id": self.run_id, "sent": sent})
        self.sent = sent

    def _set_aside(self, owner: str, unsent: bool) -> None:
        if not unsent:
            self.path.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
            return
        aside = self.folder / f"mlflow_spool_{owner}"
        aside.mkdir(exist_ok=True)
        for file in (self.path, self.marker):
            if file.exists():
                os.replace(file, aside / file.name)


def _read_sent_marker(marker: Path) -> tuple[str | None, int]:
    """(run id, last sent seq) of a spool's mlflow_sent.json; (None, 0) without one."""
    if not marker.is_file():
        return None, 0
    try:
        data = json.loads(marker.read_text())
        return str(data["run_id"]), int(data["sent"])
    except (ValueError, KeyError, TypeError) as err:
        raise TrackingError(
            f"{marker} is damaged ({err}): delete it to send every record of {marker.parent / PENDING_FILE} "
            "again (MLflow's SQL stores ignore the exact repeats)"
        ) from None


def flush_pending(folder: str | os.PathLike, uri: str, wait_s: float = 0.0) -> int:
    """Send the metrics that a run left in its spool `folder` (the Ray Train run's folder, or an
    `mlflow_spool_<run id>` folder set aside in it) to the MLflow run named in its
    mlflow_sent.json at `uri`; returns how many records were sent. Raises TrackingError when some
    are still unsent after `wait_s` seconds. The run's status is not changed."""
    folder = Path(folder)
    run_id, _ = _read_sent_marker(folder / SENT_FILE)
    if run_id is None:
        raise TrackingError(
            f"{folder / SENT_FILE} not found: {folder} holds no MLflow spool (give the Ray Train "
            "run's folder, <storage_path>/<run name>)"
        )
    spool = MetricSpool(folder, uri, run_id)
    count = len(spool.pending)
    if not spool.flush(wait_s):
        raise TrackingError(
            f"MLflow at {redact_uri(uri)} cannot be reached ({redact_text(str(spool.last_error))}): "
            + spool.unsent_message()
        )
    return count


# ----- where a run comes from: MLflow's source tags --------------------------------------------------
def source_tags(script: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow's own source tags for a run started by `script` (default: this process's script):
    what `mlflow.start_run` sets by itself and `MlflowClient.create_run` does not.

    - `mlflow.source.name`: the script, relative to this checkout when inside it
      (`entry_point`): 'jobs/train.py', 'jobs/sweep.py'
    - `mlflow.source.type`: MLflow's SourceType name, JOB under `ray job submit`, else LOCAL
    - `mlflow.source.git.commit` (the 40-hex commit) and `mlflow.source.git.dirty` ('true' when
      tracked files differ from it), both left out without git or outside a repository (a
      `ray job submit` working folder: Ray does not upload .git)

    Read them in the process the person started (the job's driver) and pass them to runs made
    in Ray workers, whose own script is Ray's.
    """
    kind = SourceType.JOB if RAY_JOB_ENV in os.environ else SourceType.LOCAL
    tags = {MLFLOW_SOURCE_NAME: entry_point(script), MLFLOW_SOURCE_TYPE: SourceType.to_string(kind)}
    commit = git_commit()
    if commit is not None:
        tags[MLFLOW_GIT_COMMIT], dirty = commit
        tags[MLFLOW_GIT_DIRTY] = "true" if dirty else "false"
    return tags


def entry_point(script: str | os.PathLike | None = None) -> str:
    """`script` (default `sys.argv[0]`, the script this process runs) as MLflow's source name: a
    path relative to this checkout when it lies inside it ('jobs/sweep.py', from any working
    folder), else as given; '<console>' when there is none (MLflow's word for it)."""
    script = sys.argv[0] if script is None and sys.argv else script
    if not script or script == "-c":
        return "<console>"
    try:
        return Path(script).resolve().relative_to(REPO).as_posix()
    except (ValueError, OSError):
        return str(script)


def git_commit(repo_dir: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git repository at `repo_dir` (this checkout by default): the HEAD
    commit and whether tracked files differ from it; None without git, outside a repository or
    before its first commit."""
    repo = str(repo_dir if repo_dir is not None else REPO)

    def git(*args: str) -> str:
        return subprocess.run(  # no optional locks: `status` leaves the index as it is
            ["git", "--no-optional-locks", "-C", repo, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha, dirty) if sha else None


# ----- helpers ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative or absolute), else None."""
    if not uri.startswith("sqlite://"):
        return None
    rest = uri[len("sqlite://") :].partition("?")[0]
    return Path(rest[1:]) if rest.startswith("/") else Path(rest)


def _check_name(key: str) -> str:
    key = str(key)
    if (
        not _NAME.fullmatch(key)
        or len(key) > MAX_KEY_LENGTH
        or posixpath.normpath(key) != key
        or key.startswith("/")
    ):
        raise ValueError(
            f"MLflow key {key!r} is not allowed: use at most {MAX_KEY_LENGTH} letters, digits, '_', '-', '.', ' ' "
            "and '/' (no '@', no '//', no leading '/'), for example 'test/openbookqa/ece_n10'"
        )
    return key


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED
