"""A real checkpoint (stories260K) loaded as Llama2-13B is: `from_pretrained` of a folder under
ZeRO-3 on 2 gloo processes whose process group was made first, as Ray Train makes it.

`model.build_model` must give DeepSpeed's comm layer that process group before `from_pretrained`
enters `deepspeed.zero.Init`; otherwise zero.Init reads world size 1 and fails its batch check
(`train_batch_size ... != micro_batch * grad_acc * world_size`) on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests._dist import free_port, join_gloo_group, leave_gloo_group

pytestmark = pytest.mark.slow
WORLD = 2


def _child(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_gloo_group(rank, port, WORLD)  # as Ray Train does
    import melora
    from orchestrator.config import RunConfig
    from orchestrator.train.checkpoint import gathered_adapter_state
    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.model import build_model

    run = RunConfig().with_overrides(
        {
            "model.name_or_path": model_dir,
            "scaling.zero_stage": 3,
            "scaling.num_workers": WORLD,
            "optim.batch_size": 2,
            "adapter.r": 4,
        }
    )
    report: dict = {}
    try:
        tokenizer, model = build_model(run, deepspeed_config(run, WORLD, on_gpu=False), False)
        params = dict(model.named_parameters())
        report["partitioned"] = all(hasattr(p, "ds_id") for p in params.values())
        report["shards"] = [[p.ds_numel, p.ds_tensor.numel()] for p in params.values()]
        report["held_numel"] = sum(p.numel() for p in params.values())  # placeholders: 0 each
        report["pad_token"] = tokenizer.pad_token
        torch.manual_seed(run.seed)
        melora.attach(model, run.adapter)
        report["adapter_shapes"] = {
            k: list(v.shape) for k, v in gathered_adapter_state(model).items()
        }
    except Exception as err:  # the reason travels to the test, not only to stderr
        report["error"] = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    leave_gloo_group()


def test_from_pretrained_under_zero3_loads_partitioned(stories_dir: Path, tmp_path: Path) -> None:
    mp.spawn(_child, args=(free_port(), str(stories_dir), str(tmp_path)), nprocs=WORLD, join=True)
    config = json.loads((stories_dir / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in report, f"rank {rank}: {report.get('error')}"
        assert report["partitioned"]
        # 260,032 parameters in all; no process held them whole: each keeps its half as a shard
        assert sum(full for full, _ in report["shards"]) == 260_032
        assert all(local == -(-full // WORLD) for full, local in report["shards"])
        assert report["held_numel"] == 0
        assert report["pad_token"]
        # and the adapter, gathered, is whole: A (r x in), B (out x r), M and H (r x r)
        shapes = report["adapter_shapes"]
        assert len(shapes) == layers * 2 * 4
        for name, shape in shapes.items():
            out = kv if ".v_proj." in name else d
            expected = {"lora_A": [4, d], "lora_B": [out, 4], "lora_M": [4, 4], "lora_H": [4, 4]}
            assert shape == expected[name.rsplit(".", 1)[-1]], name
