"""Runs that cannot run as asked are refused by name: `scaling.use_gpu` without a GPU, and a ZeRO-3
SGD KL step whose tensors do not split over the workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from melora import ConfigError
from orchestrator import trainer
from orchestrator.config import RunConfig
from orchestrator.worker import worker_device

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


@pytest.mark.parametrize("workers", [3, 6])
def test_zero3_sgd_refuses_workers_that_do_not_divide_r_squared(workers: int) -> None:
    """safe_set_full_fp32_param cuts a tensor into num_workers equal parts: 64 = 8 x 8 on 3 or 6
    workers cannot be cut so; 4 or 8 workers, the joint KL, or ZeRO-2 run."""
    base = {"scaling.zero_stage": 3, "optim.kl_optimizer": "sgd", "adapter.r": 8}
    with pytest.raises(
        ConfigError, match=r"adapter\.r=8 with scaling\.num_workers=" + str(workers)
    ):
        RunConfig().with_overrides({**base, "scaling.num_workers": workers})
    RunConfig().with_overrides({**base, "scaling.num_workers": 4})
    RunConfig().with_overrides({**base, "scaling.num_workers": workers, "scaling.zero_stage": 2})
    RunConfig().with_overrides(
        {**base, "scaling.num_workers": workers, "optim.kl_optimizer": "joint"}
    )
