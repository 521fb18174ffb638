"""Me-LoRA's posterior noise survives DeepSpeed's bf16 mode (a real engine, 1 gloo process, CPU).

Under `bf16` DeepSpeed casts every parameter to bf16, the adapter's included. Near M = I bf16's
spacing (0.004-0.008) exceeds Omega = H**2 (about 0.002 at initialisation), so a C = M + Omega * E
formed in bf16 loses most of its diagonal noise (about 81% of the diagonal draws come out exactly
M). The layers form C in float32; here the C that each forward really uses is read off
`F.linear` and its diagonal noise, divided by Omega, must be a standard normal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests._dist import free_port, join_gloo_group, leave_gloo_group

pytestmark = pytest.mark.slow
R, FORWARDS = 8, 60


def _child(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_gloo_group(0, port, 1)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import LlamaConfig, LlamaForCausalLM

    import melora
    from orchestrator.config import RunConfig
    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.objective import Objective, lr_lambda

    report: dict = {}
    drawn: list[torch.Tensor] = []
    real_linear = F.linear

    def spy(x, weight, bias=None):
        if weight.shape == (R, R):
            drawn.append(weight.detach().float().clone())
        return real_linear(x, weight, bias)

    for stage in (2, 3):
        run = RunConfig().with_overrides(
            {
                "model.dtype": "bfloat16",
                "scaling.zero_stage": stage,
                "adapter.r": R,
                "adapter.dropout": 0.0,
                "optim.batch_size": 4,
                "optim.grad_accum": 2,
                "optim.kl_optimizer": "sgd",
            }
        )
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        torch.manual_seed(run.seed)
        melora.attach(model, run.adapter)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(run, world_size=1, on_gpu=False),
        )
        layers = [m for m in engine.module.modules() if isinstance(m, melora.MeLoraLinear)]
        h = layers[0].lora_H
        masters = [safe_get_full_fp32_param(p) for _, p in melora.adapter_parameters(engine.module)]
        out: dict = {
            "adapter_dtype": str(h.dtype),
            "master_dtypes": sorted({str(m.dtype) for m in masters}),
            "communication_dtype": str(engine.communication_data_type),
        }

        # the C of every sampled forward, read where the layer uses it: F.linear(u, C)
        drawn.clear()
        F.linear = spy
        engine.train()
        ids = torch.randint(4, 64, (2, 6))
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            refs = [(m.lora_M.detach().float(), m.omega.detach().float()) for m in layers]
        with torch.no_grad():
            for _ in range(FORWARDS):
                engine.module(input_ids=ids)
        F.linear = real_linear
        assert len(drawn) == FORWARDS * len(layers), len(drawn)
        z = []
        for i, C in enumerate(drawn):
            M, omega = refs[i % len(layers)]
            z.append(torch.diagonal(C - M) / torch.diagonal(omega))
        z = torch.cat(z)
        out["diag_draws"] = z.numel()
        out["diag_noise_std_over_omega"] = float(z.std())
        out["diag_exact_zero_fraction"] = float((z == 0).float().mean())
        out["diag_within_half_omega"] = float((z.abs() < 0.5).float().mean())  # N(0,1): 0.383

        # and it trains: a few steps of the two-step objective, finite and moving H's masters
        before = [m.clone() for m in masters]
        batches = iter(
            [
                {
                    "input_ids": torch.randint(4, 64, (4, 7)),
                    "attention_mask": torch.ones(4, 7, dtype=torch.long),
                    "labels": torch.randint(0, 3, (4,)),
                    "answer_token_ids": torch.tensor([10, 11, 12]),
                    "choice_mask": torch.ones(4, 3, dtype=torch.bool),
                }
                for _ in range(6)
            ]
        )
        objective = Objective(engine, run, 5, 0)  # 5 batches per epoch, rank 0
        metrics = [objective.step(step, batches) for step in range(3)]
        out["finite"] = all(torch.isfinite(torch.tensor(m["train/nll"])) for m in metrics)
        after = [safe_get_full_fp32_param(p) for _, p in melora.adapter_parameters(engine.module)]
        out["masters_moved"] = sum(
            not torch.equal(a, b) for a, b in zip(after, before, strict=True)
        )
        report[stage] = out
    Path(out_dir, "report.json").write_text(json.dumps(report))
    leave_gloo_group()


def test_bf16_keeps_the_posterior_noise(tmp_path: Path) -> None:
    port = free_port()
    mp.spawn(_child, args=(port, str(tmp_path)), nprocs=1, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    for stage, got in report.items():
        assert got["adapter_dtype"] == "torch.bfloat16", stage  # DeepSpeed cast it
        # (C - M) / Omega on the diagonal is N(0, 1): its spread, and not rounded to a few values
        # (in bf16 about 84% are exactly 0 and the rest +-0.0078 / Omega, with about the same std)
        assert got["diag_draws"] >= 1000
        assert got["diag_exact_zero_fraction"] < 0.01, got
        assert 0.9 < got["diag_noise_std_over_omega"] < 1.1, got
        assert 0.33 < got["diag_within_half_omega"] < 0.44, got
        assert got["master_dtypes"] == ["torch.float32"], stage  # fp32 masters
        assert got["communication_dtype"] == "torch.float32", stage  # fp32 reduction
        assert got["finite"] and got["masters_moved"] > 0, got
