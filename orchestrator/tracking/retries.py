"""MLflow outages, the calls' side: each HTTP call bounded (`short_calls`), a failed call told
transient or a refusal (`is_transient`), a call tried again for a bounded time (`call_until`), and
how long the end of a run waits for MLflow (`flush_wait_s`). The metrics' side is `spool.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.exceptions import MlflowException

from orchestrator.errors import TrackingError

CALL_TIMEOUT_S = 10  # one MLflow HTTP call of the workers: seconds to connect and for each answer
ARTIFACT_TIMEOUT_S = 60  # one artifact upload (a 13B model's adapter is tens of MB)
FLUSH_WAIT_ENV = "MELORA_MLFLOW_FLUSH_WAIT_S"
MARK_FAILED_WAIT_S = 30.0  # the driver marking a failed run FAILED (fit_run, the sweep callbacks)
DEFAULT_FLUSH_WAIT_S = 300.0
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
