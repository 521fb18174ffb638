"""Runs that cannot run as asked are refused by name: `scaling.use_gpu` without a GPU, and prompts
longer than task.max_length (found by the driver, before any worker starts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from melora import ConfigError
from melora.tasks import TaskError
from orchestrator.config import RunConfig
from orchestrator.train import trainer
from orchestrator.train.model import worker_device
from orchestrator.train.preflight import check_run_data

GPU_RUN = {"scaling.use_gpu": True, "scaling.num_workers": 2}


def test_worker_without_cuda_refuses_use_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu=true.*no usable CUDA"):
        worker_device(RunConfig().with_overrides(GPU_RUN), local_rank=0)
    assert worker_device(RunConfig(), local_rank=1) == torch.device("cpu")


def test_worker_with_cuda_takes_its_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_device(RunConfig().with_overrides(GPU_RUN), 1) == torch.device("cuda", 1)


def test_driver_refuses_before_tracking_on_a_local_ray_without_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ray

    monkeypatch.setattr(trainer, "_started_local_ray", True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    run = RunConfig().with_overrides(
        {**GPU_RUN, "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu=true needs 2 GPUs.*has 1"):
        trainer.fit_run(run)
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run existed
    # enough GPUs, or a cluster that may grow: no refusal from the driver
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    trainer.check_gpu_resources(run)
    monkeypatch.setattr(trainer, "_started_local_ray", False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    trainer.check_gpu_resources(run)


def test_prompts_longer_than_max_length_are_refused_before_tracking(tmp_path: Path) -> None:
    """The demo's prompts take 38 tokens at least: task.max_length=8 is refused by the driver,
    naming the task, the split and the limit, before any MLflow run or Ray worker exists."""
    run = RunConfig().with_overrides(
        {
            "task.max_length": 8,
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.storage_path": str(tmp_path / "ray_results"),
        }
    )
    with pytest.raises(TaskError, match=r"task demo, train split: .* 38 tokens > max_length=8"):
        trainer.fit_run(run)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    check_run_data(run.with_overrides({"task.max_length": 38}))  # 38 tokens fit


def test_arc_easy_with_the_stories260k_tokenizer_at_300_tokens_is_refused(
    stories_dir: Path, data_dir: Path, data_slice, tmp_path: Path
) -> None:
    """The issue's case: ARC-Easy with stories260k's tokenizer at max_length 300. One training
    example (NAEP_2000_8_S21+9) needs 304 tokens even with its question emptied."""
    counts = {"train": 80, "validation": 5, "test": 5}  # the 76th training row is that example
    arc = data_slice(data_dir, tmp_path, "arc_easy", counts)
    run = RunConfig().with_overrides(
        {"model.name_or_path": str(stories_dir), "task.name": "arc_easy", "task.data_dir": str(arc)}
    )
    with pytest.raises(TaskError, match=r"arc_easy, train split: .*304 tokens > max_length=300"):
        check_run_data(run)
    check_run_data(run.with_overrides({"task.max_length": 320}))
