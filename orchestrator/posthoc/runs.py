"""Evaluations made after training, from finished runs: a tracked MLflow run of their own.

ENS (`orchestrator.posthoc.ensemble`) and post-hoc LAP (`orchestrator.posthoc.laplace.laplace_from_run`)
both read finished runs back (their resolved config and adapter artifacts), load the base model
whole in one process, evaluate, and log a new run with the same metric keys as a training run.
This module holds what they share; it talks to MLflow only through `orchestrator.tracking`
(whose `tracked_run` opens and closes their runs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.errors import PosthocError
from orchestrator.train.model import build_model


def finished_run_config(uri: str, run_id: str, dst: str | Path) -> RunConfig:
    """The resolved config of a FINISHED run (its `config/resolved.yaml` artifact)."""
    try:
        status, _, _ = tracking.read_run(uri, run_id)
    except Exception as err:  # MlflowException: no such run
        raise PosthocError(
            f"MLflow run {run_id} not found at {tracking.redact_uri(uri)}: {err}"
        ) from None
    if status != "FINISHED":
        raise PosthocError(f"MLflow run {run_id} is {status}, not FINISHED: use a finished run")
    return tracking.run_config(uri, run_id, dst, PosthocError)


def download_adapter(uri: str, run_id: str, dst: str | Path) -> Path:
    """The run's `adapter/` artifact (safetensors + config) as the local folder `dst`/adapter."""
    return tracking.download_adapter(uri, run_id, Path(dst) / "adapter", PosthocError)


def whole_model(run: RunConfig) -> tuple[Any, torch.nn.Module, torch.device]:
    """(tokenizer, base model, device): the base model loaded whole in this process, in eval mode.

    On a GPU when `scaling.use_gpu` and one is visible, else the CPU; the weights' dtype follows
    `model.dtype` as in training. No DeepSpeed: ZeRO-3's partitioned loading is not used here.
    """
    on_gpu = run.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    loading = run if run.scaling.zero_stage != 3 else run.with_overrides({"scaling.zero_stage": 2})
    tokenizer, model = build_model(loading, {}, on_gpu)
    return tokenizer, model.to(device).eval(), device


def log_evaluation(
    uri: str,
    run_id: str,
    run: RunConfig,
    metrics: Mapping[str, float],
    predictions: Mapping[str, Any],
    *,
    files: Mapping[str, str] | None = None,
) -> None:
    """Log final metrics (at step 0), one reliability diagram per set and N, and text `files`
    ({artifact path: text})."""
    from melora.plots import reliability_diagrams  # matplotlib: only where diagrams are drawn

    tracking.log_metrics(uri, run_id, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        reliability_diagrams(predictions, Path(tmp) / "reliability", n_bins=run.eval.ece_bins)
        tracking.log_artifacts(uri, run_id, Path(tmp) / "reliability", "reliability")
    for path, text in (files or {}).items():
        tracking.log_text(uri, run_id, text, path)
