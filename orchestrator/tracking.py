"""Everything MLflow, in one place: the only module of the project that imports mlflow.

Small stateless functions over `MlflowClient(tracking_uri=uri)`: no global `mlflow.set_tracking_uri`
and no active-run state, because Ray workers share processes and one process may log to several
runs. The driver resolves the URI, checks it, creates the experiment and the run before training;
rank 0 of the workers logs to that run id, and a restarted worker reuses it.

    uri = resolve_tracking_uri(cfg.tracking)
    check_reachable(uri)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    run_id = start_or_resume_run(uri, experiment_id, run_name=cfg.run_name, tags={...})
    log_params(uri, run_id, cfg.flat_params())
    log_metrics(uri, run_id, {"train/nll": 0.7, "train/kl": 12.0}, step=10)
    set_terminated(uri, run_id, "FAILED", reason="train/nll is nan at step 37")
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from melora.errors import MeLoraError
from orchestrator.config import TrackingConfig
from orchestrator.redaction import is_secret_key, redact_text, redact_uri

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
MAX_KEY_LENGTH = 250  # MLflow's limit on a param, metric or tag key
PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch call
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRUNCATED = "...[truncated]"
_NAME = re.compile(r"[\w./\- ]+")  # MLflow's allowed characters, minus ':' (refused on Windows)


class TrackingError(MeLoraError, RuntimeError):
    """MLflow cannot be used as configured (server unreachable, run or experiment missing)."""


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
    """The id of the experiment `name`, created when missing.

    With a sqlite URI and no `artifact_location`, artifacts go to `<database folder>/mlruns`
    (absolute), next to the database, wherever the process runs.
    """
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_path(uri)
        if artifact_location is None and db is not None and db.name not in ("", ":memory:"):
            artifact_location = (db.resolve().parent / "mlruns").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} at {redact_uri(uri)} is deleted: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another tracking.experiment"
        )
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

    Resuming never creates a second run: it checks that `run_id` exists in `experiment_id` and
    sets its status back to RUNNING. Store the returned id with the Ray Train run and pass it on
    every restart.
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
        return run_id
    clean = {
        k: _truncate(redact_text(str(v)), MAX_TAG_LENGTH)
        for k, v in (tags or {}).items()
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
    items = [
        Param(_check_name(k), _truncate(redact_text(str(v)), MAX_PARAM_LENGTH))
        for k, v in params.items()
        if k not in dropped
    ]
    client = _client(uri)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
    return dropped


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


# ----- helpers ----------------------------------------------------------------------------------
def git_sha(repo_dir: str | os.PathLike | None = None) -> str:
    """The commit of the repository (this project's by default), '+dirty' if tracked files changed; 'unknown' without git."""
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "") if sha else "unknown"


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
