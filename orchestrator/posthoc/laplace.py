"""LAP post hoc: a KFAC Laplace approximation around the adapter of a finished LoRA run, as a new
MLflow run (`jobs/evaluate.py --laplace <run>`); the in-worker step it runs is
`orchestrator.train.laplace.evaluate_final_laplace`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from melora.adapters import attach, load_adapter, read_adapter_config
from orchestrator import tracking
from orchestrator.errors import PosthocError
from orchestrator.posthoc.runs import (
    download_adapter,
    finished_run_config,
    log_evaluation,
    whole_model,
)
from orchestrator.tracking.conventions import MAP_RUN_TAG
from orchestrator.train.data import TaskData
from orchestrator.train.laplace import evaluate_final_laplace
from orchestrator.train.trainer import RunResult, run_tags


def laplace_from_run(
    map_run_id: str,
    uri: str,
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    sweep: str | None = None,
) -> RunResult:
    """LAP around the adapter of a finished LoRA (or LAP) run, as a new MLflow run (method lap).

    The MAP run's resolved config with `adapter.method: lap` and `overrides` (e.g.
    {"laplace.link_approx": "probit"}) is the new run's config; it gets the tag `map_run` and the
    param `laplace.map_run_id`. One process, the base model whole (on a GPU with
    `scaling.use_gpu`): a MAP run trained under ZeRO-3 is fine here (its config is logged with
    zero_stage 2, the stage LAP's config allows; the MAP run keeps its own).
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = finished_run_config(uri, map_run_id, tmp)
        if source.adapter.method not in ("lora", "lap"):
            raise PosthocError(
                f"MLflow run {map_run_id} trained adapter.method {source.adapter.method!r}: LAP "
                "needs a LoRA (MAP) adapter, a run of method 'lora' or 'lap'"
            )
        lap = {
            "adapter.method": "lap",
            "name": f"{source.name}-lap" if source.name else None,
            "tracking.tracking_uri": uri,
        }
        if source.scaling.zero_stage == 3:
            lap["scaling.zero_stage"] = 2
        run = source.with_overrides(lap).with_overrides(overrides or {})
        adapter_dir = download_adapter(uri, map_run_id, tmp)
        with tracking.tracked_run(
            run.tracking,
            run_name=run.run_name,
            tags={**run_tags(run, sweep), MAP_RUN_TAG: map_run_id},
            params={**run.flat_params(), "laplace.map_run_id": map_run_id},
            config_yaml=run.to_yaml(),
            parent_run_id=parent_run_id,
        ) as (_, run_id):
            tokenizer, model, _ = whole_model(run)
            attach(model, read_adapter_config(adapter_dir))
            load_adapter(model, adapter_dir)
            data = TaskData(run, tokenizer, rank=0, world=1)
            final, predictions = evaluate_final_laplace(model, data, run)
            log_evaluation(uri, run_id, run, final, predictions)
    return RunResult(mlflow_run_id=run_id, tracking_uri=uri, metrics=final, path="")
