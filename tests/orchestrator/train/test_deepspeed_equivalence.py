"""The DeepSpeed path (2 gloo processes, the worker's `Objective`) takes the adapter to the same
values as a plain single-process PyTorch loop written here, for every accepted combination of
ZeRO stage and KL optimiser, over several steps with posterior sampling and dropout on."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import melora
from melora.evaluation import class_logits
from melora.objective import draw_prior_eps, kl_weight
from tests._dist import free_port, join_gloo_group, leave_gloo_group

pytestmark = pytest.mark.slow

WORLD, MICRO_BATCH, STEPS, STEPS_PER_EPOCH = 2, 3, 4, 5
# (zero_stage, kl_optimizer): every combination config validation accepts on CPU (fp32).
COMBINATIONS = [(0, "sgd"), (0, "joint"), (2, "sgd"), (2, "joint"), (3, "sgd"), (3, "joint")]


def run_config(stage: int, kl_optimizer: str):
    from orchestrator.config import RunConfig

    return RunConfig.from_dict(
        {
            "seed": 3,
            "adapter": {"method": "melora", "r": 4, "dropout": 0.1, "sigma_p": 0.2},
            "optim": {
                "lr": 0.01,
                "kl_lr": 0.05,
                "weight_decay": 0.01,
                "max_steps": 10,
                "warmup_ratio": 0.1,
                "batch_size": MICRO_BATCH,
                "kl_optimizer": kl_optimizer,
                "max_grad_norm": 1.0,
            },
            "scaling": {"num_workers": WORLD, "zero_stage": stage},
        }
    )


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def global_batches() -> list[dict[str, torch.Tensor]]:
    """One global batch per step (WORLD x MICRO_BATCH rows), with a padded row and a 2-choice row."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS):
        n = WORLD * MICRO_BATCH
        mask = torch.ones(n, 7, dtype=torch.long)
        mask[1, :2] = 0
        choice_mask = torch.ones(n, 3, dtype=torch.bool)
        choice_mask[2, 2] = False
        labels = torch.randint(0, 3, (n,), generator=gen)
        labels[2] = labels[2] % 2
        out.append(
            {
                "input_ids": torch.randint(4, 64, (n, 7), generator=gen),
                "attention_mask": mask,
                "labels": labels,
                "answer_token_ids": torch.tensor([10, 11, 12]),
                "choice_mask": choice_mask,
            }
        )
    return out


def shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return {k: (v if k == "answer_token_ids" else v[rows]) for k, v in batch.items()}


def _deepspeed_child(rank: int, port: int, out_dir: str) -> None:
    join_gloo_group(rank, port, WORLD)
    import deepspeed

    from orchestrator.train.checkpoint import gathered_adapter_state
    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.objective import Objective, lr_lambda

    for stage, kl_optimizer in COMBINATIONS:
        run = run_config(stage, kl_optimizer)
        model = tiny_model()
        torch.manual_seed(run.seed)
        melora.attach(model, run.adapter)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=run.optim.lr, weight_decay=run.optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(run, WORLD, on_gpu=False),
        )
        objective = Objective(engine, run, STEPS_PER_EPOCH, rank)
        batches = iter([shard(b, rank) for b in global_batches()])
        for step in range(STEPS):
            objective.step(step, batches)
        state = gathered_adapter_state(engine.module)
        if rank == 0:
            save_file(state, os.path.join(out_dir, f"stage{stage}_{kl_optimizer}.safetensors"))
    leave_gloo_group()


def plain_pytorch(stage: int, kl_optimizer: str) -> dict[str, torch.Tensor]:
    """The same training written as a plain single-process loop over the global batch."""
    from orchestrator.train.objective import lr_lambda, reseed, step_generator

    run = run_config(stage, kl_optimizer)
    model = tiny_model()
    torch.manual_seed(run.seed)
    melora.attach(model, run.adapter)
    model.train()
    params = [p for _, p in melora.adapter_parameters(model)]
    adamw = torch.optim.AdamW(params, lr=run.optim.lr, weight_decay=run.optim.weight_decay)
    adamw_sched = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda(run))
    sgd = torch.optim.SGD(params, lr=run.optim.kl_lr)
    sgd_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lr_lambda(run))
    for step, batch in enumerate(global_batches()):
        pi = kl_weight(step, STEPS_PER_EPOCH, run.optim.kl_weighting)
        eps = draw_prior_eps(run.adapter.prior_noise, step_generator(run.seed, step))
        # each rank's rows see that rank's posterior draw and dropout mask; the gradient is their mean
        nlls = []
        for rank in range(WORLD):
            reseed(run.seed, step, rank)
            part = shard(batch, rank)
            nlls.append(F.cross_entropy(class_logits(model, part), part["labels"]))
        loss = torch.stack(nlls).mean()
        if kl_optimizer == "joint":
            loss = loss + pi * melora.kl_divergence(model, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.optim.max_grad_norm)
        adamw.step()
        adamw_sched.step()
        adamw.zero_grad()
        if kl_optimizer == "sgd":
            (pi * melora.kl_divergence(model, eps)).backward()
            sgd.step()
            sgd_sched.step()
            sgd.zero_grad()
    return {k: v.clone() for k, v in melora.adapter_state_dict(model).items()}


def test_deepspeed_matches_plain_pytorch(tmp_path) -> None:
    mp.spawn(_deepspeed_child, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    run = run_config(0, "joint")
    model = tiny_model()
    torch.manual_seed(run.seed)
    initial = melora.adapter_state_dict(melora.attach(model, run.adapter))
    for stage, kl_optimizer in COMBINATIONS:
        got = load_file(str(tmp_path / f"stage{stage}_{kl_optimizer}.safetensors"))
        expected = plain_pytorch(stage, kl_optimizer)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(
                got[name],
                expected[name],
                rtol=1e-4,
                atol=1e-6,
                msg=f"{stage}/{kl_optimizer}: {name}",
            )
        # and training moved every kind of adapter tensor
        for suffix in ("lora_A", "lora_B", "lora_M", "lora_H"):
            name = next(n for n in expected if n.endswith(suffix))
            assert not torch.allclose(expected[name], initial[name]), name
