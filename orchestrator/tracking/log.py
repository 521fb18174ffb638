"""What a run holds, written: params (`log_params`, and `param_text`, the text a param value
becomes), metrics, tags, text and artifact files; and the key of a final metric."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param

from orchestrator.redaction import is_secret_key, redact_text
from orchestrator.tracking import store
from orchestrator.tracking.store import MAX_PARAM_LENGTH, MAX_TAG_LENGTH

PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params in batches of 100; returns the keys dropped because they look like secrets.

    Values become text (URI credentials redacted), cut to MLflow's 6000 characters (ending in
    '...[truncated]').
    Re-logging an equal value (a resumed run) is fine; MLflow refuses a changed one.
    """
    dropped = [k for k in params if is_secret_key(k)]
    items = [
        Param(store.check_name(k), param_text(v)) for k, v in params.items() if k not in dropped
    ]
    client = store.client(uri)
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
    return store.truncate(redact_text(str(value)), MAX_PARAM_LENGTH)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log scalar metrics (floats, ints, 0-d tensors) at `step`; every name is checked first.

    Names may hold letters, digits, '_', '-', '.', ' ' and '/' (MLflow refuses '@', for example).
    A bad name is a ValueError and nothing of the call is logged.
    """
    timestamp = int(time.time() * 1000)
    items = [
        Metric(store.check_name(k), float(v), timestamp, int(step)) for k, v in metrics.items()
    ]
    client = store.client(uri)
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])


def log_artifacts(
    uri: str, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None
) -> None:
    """Copy the files under `local_dir` into the run's artifacts, under `artifact_path`."""
    if not Path(local_dir).is_dir():
        raise FileNotFoundError(f"artifact folder {local_dir} does not exist")
    store.client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set or overwrite tags (unlike params, tags may change); secret-looking keys are skipped."""
    client = store.client(uri)
    for key, value in tags.items():
        if not is_secret_key(key):
            value = redact_text(str(value))
            client.set_tag(run_id, store.check_name(key), store.truncate(value, MAX_TAG_LENGTH))


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Write `text` as the artifact `artifact_file` (for example 'config/resolved.yaml'), with
    the credentials of any URI in it redacted."""
    store.client(uri).log_text(run_id, redact_text(text), artifact_file)


def eval_metric_key(split: str, task: str, metric: str, n_samples: int) -> str:
    """'test/openbookqa/ece_n10': the key of a final metric of `task` at N = `n_samples`."""
    if split not in ("test", "ood"):
        raise ValueError(f"split={split!r}: final metrics are 'test' or 'ood'")
    return store.check_name(f"{split}/{task}/{metric}_n{n_samples}")
