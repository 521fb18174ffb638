"""Where MLflow is, and how this project talks to it: the tracking URI (resolved and checked),
one `MlflowClient` per URI, and MLflow's limits on names and values.

Every module of `orchestrator.tracking` gets its client from `client(uri)`, looked up here at each
call (a test replaces `store.client` to see what would be written).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from mlflow import MlflowClient

from orchestrator.config import TrackingConfig
from orchestrator.errors import TrackingError
from orchestrator.redaction import redact_uri

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
MAX_KEY_LENGTH = 250  # MLflow's limit on a param, metric or tag key
TRUNCATED = "...[truncated]"
_NAME = re.compile(r"[\w./\- ]+")  # MLflow's allowed characters, minus ':' (refused on Windows)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.

    A relative sqlite path is made absolute (against the current folder), so that Ray workers
    with another working folder write to the same database.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    db = sqlite_path(uri)
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
    db = sqlite_path(uri)
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


@functools.lru_cache(maxsize=8)
def client(uri: str) -> MlflowClient:
    """The `MlflowClient` of `uri` (one per URI, kept)."""
    return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative or absolute), else None."""
    if not uri.startswith("sqlite://"):
        return None
    rest = uri[len("sqlite://") :].partition("?")[0]
    return Path(rest[1:]) if rest.startswith("/") else Path(rest)


def check_name(key: str) -> str:
    """`key` when MLflow takes it as a param, metric or tag key; else a ValueError saying why."""
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


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, ending in '...[truncated]' when it was longer."""
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED
