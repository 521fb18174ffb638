"""The DeepSpeed config dict: batch arithmetic, precision, ZeRO blocks, and DeepSpeed's own parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from melora import ConfigError
from orchestrator.config import RunConfig
from orchestrator.train.deepspeed_config import deepspeed_config
from tests._dist import free_port

# (zero_stage, on_gpu): stage 0 on a GPU runs in fp32 (bf16 at stage 0 is refused by the config)
CASES = [(0, False), (2, False), (3, False), (0, True), (2, True), (3, True)]


def _run(stage: int, on_gpu: bool, **optim: object) -> RunConfig:
    overrides = {
        "scaling.zero_stage": stage,
        "scaling.use_gpu": on_gpu,
        "optim.kl_optimizer": "joint",
    }
    if stage == 0 and on_gpu:
        overrides["model.dtype"] = "float32"
    overrides.update({f"optim.{k}": v for k, v in optim.items()})
    return RunConfig().with_overrides(overrides)


@pytest.mark.parametrize("stage, on_gpu", CASES)
def test_dict_for_each_stage_and_device(stage: int, on_gpu: bool) -> None:
    run = _run(stage, on_gpu, batch_size=3, grad_accum=2, max_grad_norm=0.5)
    cfg = deepspeed_config(run, world_size=4, on_gpu=on_gpu)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 3 * 2 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": on_gpu and stage != 0}
    assert cfg["fp16"] == {"enabled": False}
    assert (
        "optimizer" not in cfg and "scheduler" not in cfg
    )  # the worker passes torch AdamW + its schedule
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    if stage >= 2:
        assert zero["overlap_comm"] is on_gpu and zero["contiguous_gradients"] is True
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    json.dumps(cfg)  # plain data: it travels to Ray workers and into HfDeepSpeedConfig


def test_no_clipping_is_zero_and_explicit_dtypes_win() -> None:
    cfg = deepspeed_config(_run(2, False, max_grad_norm=None), world_size=1, on_gpu=False)
    assert cfg["gradient_clipping"] == 0.0
    bf16_cpu = RunConfig().with_overrides({"model.dtype": "bfloat16"})
    assert deepspeed_config(bf16_cpu, world_size=2, on_gpu=False)["bf16"]["enabled"] is True
    fp32_gpu = RunConfig().with_overrides({"model.dtype": "float32", "scaling.use_gpu": True})
    assert deepspeed_config(fp32_gpu, world_size=2, on_gpu=True)["bf16"]["enabled"] is False


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_bad_world_size(world_size: object) -> None:
    with pytest.raises(ConfigError, match="world_size"):
        deepspeed_config(RunConfig(), world_size=world_size, on_gpu=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("stage, on_gpu", CASES)
def test_deepspeed_parses_it(stage: int, on_gpu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeedConfig validates keys (unknown ZeRO keys are errors) and the batch arithmetic.

    It needs no process group: it reads the world size from deepspeed.comm, patched here to 4 so
    that the `train_batch_size` check runs against the same world size as the dict.
    """
    from deepspeed.runtime import config as ds_config

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 4)
    cfg = deepspeed_config(
        _run(stage, on_gpu, batch_size=2, grad_accum=3), world_size=4, on_gpu=on_gpu
    )
    parsed = ds_config.DeepSpeedConfig(cfg)
    assert parsed.world_size == 4
    assert parsed.train_batch_size == 24
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled is (on_gpu and stage != 0)
    assert parsed.gradient_clipping == 1.0
    assert parsed.optimizer_name is None and parsed.scheduler_name is None
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save is False
    bad = dict(cfg, train_batch_size=cfg["train_batch_size"] + 1)
    with pytest.raises(AssertionError, match="train_batch_size"):
        ds_config.DeepSpeedConfig(bad)


_INIT_STEP_PROBE = textwrap.dedent(
    """
    import json, sys, torch, deepspeed
    stage, bf16 = int(sys.argv[1]), sys.argv[2] == "bf16"
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
           "bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}}
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    print(json.dumps([float(s["step"]) for s in opt.state.values()]))
    """
)


@pytest.mark.slow
def test_why_zero0_bf16_is_refused(tmp_path: Path) -> None:
    """DeepSpeed's stage-0 bf16 wrapper steps AdamW once at start-up, with zero gradients; ZeRO-2 does not.

    This is why the config refuses zero_stage 0 with bf16. When this test fails, DeepSpeed has fixed
    it: drop that refusal in orchestrator/config/run.py (`check_combinations`). One process (world size 1, gloo); the first
    DeepSpeed start on a CPU compiles a comm op (about 100 s on 2 cores), cached in the usual
    torch extensions folder that every DeepSpeed test shares.
    """
    script = tmp_path / "probe.py"
    script.write_text(_INIT_STEP_PROBE)
    port = free_port()
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    steps = {}
    for stage in (0, 2):
        out = subprocess.run(
            [sys.executable, str(script), str(stage), "bf16"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        steps[stage] = json.loads(out.stdout.strip().splitlines()[-1])
    assert steps[0] == [1.0, 1.0], (
        "stage-0 bf16 no longer takes a start-up step: remove the refusal"
    )
    assert steps[2] == []


def test_bf16_reduces_and_accumulates_gradients_in_fp32() -> None:
    """bf16 weights, fp32 gradient sums: the adapter's small gradients keep their bits."""
    bf16 = deepspeed_config(_run(2, True), world_size=2, on_gpu=True)
    assert bf16["communication_data_type"] == "fp32"
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(_run(2, False), world_size=2, on_gpu=False)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32
