"""What LoRA, BLoB and Me-LoRA cost per training step, measured side by side in one process.

    .venv/bin/python benchmarks/adapter_cost.py                        # small Llama, fp32, CPU
    .venv/bin/python benchmarks/adapter_cost.py --threads 1 --control  # shared CPU; A/A check
    .venv/bin/python benchmarks/adapter_cost.py --kl-optimizer sgd     # the paper's two steps
    .venv/bin/python benchmarks/adapter_cost.py --counts --layers 32   # calls per step, by part
    .venv/bin/python benchmarks/adapter_cost.py --eval                 # N = 10 against N = 0
    .venv/bin/python benchmarks/adapter_cost.py --collectives          # the KL step under ZeRO
    python benchmarks/adapter_cost.py --model llama2-7b                # 7B shape, bf16, CUDA

The default run takes about 2 minutes on an idle 2-core CPU. For each method it prints the
trainable parameters, the adapter's bytes (the safetensors file that `melora.save_adapter`
writes, and the raw tensor bytes), the median training-step time and the step's memory, each also
as a ratio to LoRA; then the per-round time ratios; then the adapter's own work, timed part by part.

How it measures:
- One frozen base model (random weights from `--seed`) is shared by one copy per method, each
  with its own adapter; the adapters start from the same seed too.
- A training step is each method's real step: `zero_grad`, forward in "sample" mode (dropout on,
  C or A drawn), backward, optimiser. LoRA: AdamW on the NLL. BLoB and Me-LoRA: the NLL plus
  `pi * KL` with prior noise eps ~ U(0, 1). `--kl-optimizer joint` (default) does one backward of
  `nll + pi * KL` and one AdamW step; `sgd` does the paper's two steps (METHOD.md, "Objective and
  optimisers"): AdamW on the NLL, then SGD on `pi * KL`.
- The loss is `--loss last` (default: the next-token NLL at the last position, over the whole
  vocabulary, the shape of what the project trains) or `lm` (the full causal-LM loss).
- Steps run round-robin (LoRA, BLoB, Me-LoRA, LoRA, ...) so that drifting machine load hits all
  methods alike: `--warmup` rounds, then `--steps` timed rounds. Besides each method's median,
  the report gives the median and interquartile range of the per-round ratios to LoRA, and the
  ratio of the best steps. `--control` adds a second, identical LoRA: its ratios show the
  measurement's own bias and noise.
- Memory of one step, after the timed rounds (so the optimiser state exists), with the gradients
  set to None first: on CUDA `max_memory_allocated` minus the memory allocated before the step;
  on CPU, which has no allocator statistics, the running maximum of the allocation / free events
  that `torch.profiler` records (profile_memory=True), summed in time order (checked first on a
  case with a known answer). Both are the step's extra memory: activations, temporaries and
  gradients. "Peak" adds what the method holds between steps (base weights and buffers, adapter
  parameters, optimiser state, from tensor sizes): the peak of a process training only it.
- The adapter's own work (the low-rank updates, the KL, the optimiser) is timed apart from the
  base model, best of 20, to show what an overhead is made of below the whole step's noise; the
  kernel count (computing ATen calls per step) predicts how launch-bound small ops grow on a GPU.
- The optimisers are torch's multi-tensor (`foreach`) AdamW and SGD, torch's default on CUDA
  (`--optimiser-impl for-loop`: one tensor at a time, torch's default on CPU). Under DeepSpeed
  ZeRO-1/2/3 the optimiser steps flat partitions, so its cost does not grow with the adapter's
  tensors either way. BLoB runs without flipout, as the paper's BLoB rows (`--blob-flipout`: with).
- `--counts` only counts the computing calls of a step and of its parts (the update in "mean"
  mode, what sampling adds, the KL, the optimiser), each beyond LoRA's; `--eval` compares an
  evaluation at N = 10 with one at N = 0 (calls and time). Counts are deterministic.
- `--collectives` only counts, by kind, the collectives of one call of the paper's second step
  (`Objective.kl_sgd_step`, SGD on pi * KL) under DeepSpeed ZeRO-3 (adapter kept whole, partitioned,
  or both between steps) and ZeRO-2, on 2 gloo CPU processes (each a fresh run of this script),
  at 8 and 32 blocks of q_proj/v_proj (`--layers N`: N only), r 3; and checks the step against a
  plain SGD step. tests/orchestrator/train/test_kl_step_collectives.py asserts on the same reports.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig

import melora
from melora.evaluation import predict_with_entropy
from melora.objective import draw_prior_eps, kl_weight

METHODS = ("lora", "blob", "melora")
MODEL_SIZES = {
    # hidden, intermediate, layers, heads: small enough for a 2-core CPU
    "small": (512, 1376, 8, 8),
    # the same code path at a fraction of the size: the call counts equal small's (for tests)
    "tiny": (64, 128, 8, 4),
    "llama2-7b": (4096, 11008, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=sorted(MODEL_SIZES),
        default="small",
        help="Llama architecture, random weights",
    )
    p.add_argument(
        "--device",
        default=None,
        help="default: cpu for 'small' and 'tiny', cuda for the llama2 sizes",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="base weights; default: float32 on cpu, bfloat16 on cuda",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules")
    p.add_argument(
        "--steps", type=int, default=30, help="timed rounds (one step of each method per round)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--kl-optimizer", choices=("joint", "sgd"), default="joint")
    p.add_argument("--loss", choices=("last", "lm"), default="last")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="each layer makes its noise and KL in its own forward: the path under ZeRO-3",
    )
    p.add_argument(
        "--blob-flipout",
        action="store_true",
        help="BLoB with flipout (its official code); default off, as the paper's BLoB rows",
    )
    p.add_argument(
        "--optimiser-impl",
        choices=("foreach", "for-loop"),
        default="foreach",
        help="foreach: torch's multi-tensor AdamW / SGD (torch's default on CUDA); for-loop: one "
        "tensor at a time (torch's default on CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the --model size's)"
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="only the evaluation's cost: N = 10 against N = 0, calls and time (best of --steps)",
    )
    p.add_argument(
        "--counts",
        action="store_true",
        help="only count the computing calls of a step, part by part (no timing; seconds)",
    )
    p.add_argument(
        "--collectives",
        action="store_true",
        help="only count the collectives of the two-step KL's SGD step (Objective.kl_sgd_step) "
        "under ZeRO-2 and ZeRO-3 on 2 gloo CPU processes, at 8 and 32 blocks (or --layers); "
        "about a minute",
    )
    p.add_argument("--collectives-worker", default=None, help=argparse.SUPPRESS)  # one rank
    p.add_argument(
        "--control",
        action="store_true",
        help="also time a second, identical LoRA: its ratio to LoRA shows the measurement's bias",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.model in ("small", "tiny") else "cuda"
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


# ----- models ----------------------------------------------------------------------------------
def build_base(args: argparse.Namespace) -> nn.Module:
    """A Llama of the chosen size with random weights, built directly on the device in its dtype."""
    hidden, intermediate, layers, heads = MODEL_SIZES[args.model]
    layers = args.layers or layers
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=max(4096, args.seq),
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])


def build_models(base: nn.Module, args: argparse.Namespace) -> dict[str, nn.Module]:
    """One copy of `base` per method, sharing its frozen weights, each with its adapter attached."""
    shared = {id(p): p for p in base.parameters()}
    models = {}
    for name in arm_names(args):
        method = name.split("-")[0]
        model = copy.deepcopy(base, memo=dict(shared))
        torch.manual_seed(args.seed + 1)  # the same A for every method
        config = melora.AdapterConfig(
            method=method,
            r=args.rank,
            alpha=2 * args.rank,
            dropout=0.1,
            target_modules=tuple(args.targets.split(",")),
            flipout=args.blob_flipout,
        )
        melora.attach(model, config)
        if args.layer_by_layer:
            melora.posterior.layer_by_layer(model)
        if args.gradient_checkpointing:
            enable_checkpointing(model)
        model.train()
        melora.sampling(model, "sample")
        models[name] = model
    return models


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the method's name changed in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def arm_names(args: argparse.Namespace) -> list[str]:
    """The methods in round-robin order; `--control` adds a second LoRA ("lora-2") as an A/A check."""
    return [*METHODS, "lora-2"] if args.control else list(METHODS)


# ----- the training step -----------------------------------------------------------------------
@dataclass
class Trainer:
    """One method's model, optimisers and batch; `step()` is one full training step."""

    method: str
    model: nn.Module
    ids: Tensor
    targets: Tensor
    loss: str
    adamw: torch.optim.Optimizer
    sgd: (
        torch.optim.Optimizer | None
    )  # the paper's second optimiser, on pi * KL (--kl-optimizer sgd)
    steps_per_epoch: int = 100  # for pi's schedule only: its value does not change the cost
    n: int = 0

    @classmethod
    def create(
        cls, method: str, model: nn.Module, ids: Tensor, targets: Tensor, args: argparse.Namespace
    ) -> Trainer:
        params = [p for _, p in melora.adapter_parameters(model)]
        foreach = args.optimiser_impl == "foreach"
        adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, foreach=foreach)
        two_step = method != "lora" and args.kl_optimizer == "sgd"
        sgd = torch.optim.SGD(params, lr=1e-4, foreach=foreach) if two_step else None
        return cls(method, model, ids, targets, args.loss, adamw, sgd)

    def nll(self) -> Tensor:
        if self.loss == "lm":
            return self.model(self.ids, labels=self.ids, use_cache=False).loss
        logits = self.model(self.ids, logits_to_keep=1, use_cache=False).logits[:, -1]
        return F.cross_entropy(logits.float(), self.targets)

    def kl(self) -> Tensor:
        pi = kl_weight(self.n, self.steps_per_epoch)
        return pi * melora.kl_divergence(self.model, draw_prior_eps(True))

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)

    def optimiser_step(self) -> None:
        """The optimiser step(s) on the gradients present (AdamW, and SGD in the two-step form)."""
        self.adamw.step()
        if self.sgd is not None:
            self.sgd.step()

    def step(self) -> None:
        self.zero_grad()
        if self.method == "lora":
            self.nll().backward()
            self.adamw.step()
        elif self.sgd is None:  # joint: one backward of nll + pi * KL, one AdamW step
            pi = kl_weight(self.n, self.steps_per_epoch)
            with melora.kl_from_forward(self.model, draw_prior_eps(True)) as kl:
                nll = self.nll()  # the KL collected in the forward, as the training worker does
            (nll + pi * kl.total()).backward()
            self.adamw.step()
        else:  # the paper's two steps: AdamW on the NLL, then SGD on pi * KL
            self.nll().backward()
            self.adamw.step()
            self.sgd.zero_grad(set_to_none=True)
            self.kl().backward()
            self.sgd.step()
        self.n += 1


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of one call of `fn`, with the GPU synchronised and no GC pause inside."""
    gc.disable()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    gc.enable()
    return elapsed


def time_round_robin(
    trainers: dict[str, Trainer], rounds: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Step every method in turn, `warmup` untimed rounds then `rounds` timed ones; seconds per step."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(warmup + rounds):
        gc.collect()
        for name, trainer in trainers.items():
            elapsed = seconds(trainer.step, device)
            if r >= warmup:
                times[name].append(elapsed)
    return times


# ----- where the adapter's time goes ----------------------------------------------------------
def adapter_parts(trainer: Trainer, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The adapter's own work in a step, as separately timeable calls (the base model left out).

    update: the low-rank update `delta(x)` of every adapted layer, forward + backward, in sample
    mode on a random input of the step's shape; kl: `kl_divergence` forward + backward (BLoB and
    Me-LoRA); optimiser: the optimiser step(s) over the adapter parameters.
    """
    layers = [layer for _, layer in melora.adapted_layers(trainer.model)]
    shapes = {(args.batch, args.seq, layer.in_features) for layer in layers}
    inputs = {shape[-1]: torch.randn(shape, device=args.device) for shape in shapes}

    def update() -> None:
        for layer in layers:
            out = layer.delta(inputs[layer.in_features], True)
            out.backward(torch.ones_like(out))

    def kl() -> None:
        melora.kl_divergence(trainer.model, 0.5).backward()

    parts = {"update": update, "kl": kl, "optimiser": trainer.optimiser_step}
    if trainer.method == "lora":
        del parts["kl"]
    return parts


def adapter_work_ms(
    trainers: dict[str, Trainer], args: argparse.Namespace, reps: int = 20
) -> dict[str, dict[str, float]]:
    """Best-of-`reps` milliseconds of each adapter part per method, interleaved like the steps.

    The minimum, not the median: these calls are short, and on a shared machine the minimum is
    the estimate least disturbed by other processes.
    """
    parts = {name: adapter_parts(trainer, args) for name, trainer in trainers.items()}
    best = {name: dict.fromkeys(calls, math.inf) for name, calls in parts.items()}
    for rep in range(reps + 1):  # the first pass warms up and creates the gradients
        gc.collect()
        for name, calls in parts.items():
            for part, fn in calls.items():
                elapsed = seconds(fn, args.device) * 1e3
                if rep > 0:
                    best[name][part] = min(best[name][part], elapsed)
    for trainer in trainers.values():
        trainer.zero_grad()
    return best


# Calls that only make views, read metadata or wrap other calls: not kernels of their own.
NON_KERNEL_OPS = {
    "aten::" + name
    for name in (
        "_local_scalar_dense _reshape_alias promote_types _to_copy _unsafe_view alias as_strided chunk contiguous "
        "detach dropout empty empty_like empty_strided expand flatten is_nonzero item lift_fresh "
        "linear matmul narrow new_zeros permute reshape resolve_conj resolve_neg result_type select "
        "slice split squeeze t to transpose unbind unflatten unsqueeze view"
    ).split()
}


def computing_calls(fn: Callable[[], object]) -> int:
    """ATen calls made by `fn()` that compute (on a GPU, about its kernel launches).

    Counted from the profiler: calls outside NON_KERNEL_OPS with no computing ATen call inside,
    except that a multi-tensor call (`_foreach_*`, `_fused_*`) counts once, whatever its tensors:
    on CPU it loops over them (the per-tensor calls inside are not counted), on CUDA it launches
    one kernel per chunk of tensors (`multi_tensor_apply`). Deterministic: the same code gives
    the same count on any machine.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def computes(e) -> bool:  # a profiler FunctionEvent
        return e.name.startswith("aten::") and e.name not in NON_KERNEL_OPS

    def multi_tensor(e) -> bool:
        return e.name.startswith(("aten::_foreach_", "aten::_fused_"))

    def inside_multi_tensor(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if multi_tensor(parent):
                return True
            parent = parent.cpu_parent
        return False

    return sum(
        1
        for e in prof.events()
        if computes(e)
        and not inside_multi_tensor(e)
        and (multi_tensor(e) or not any(map(computes, e.cpu_children)))
    )


def kernel_ops(trainer: Trainer) -> int:
    """Computing calls of one training step (from zeroed gradients, as every step starts)."""
    trainer.zero_grad()
    return computing_calls(trainer.step)


def part_calls(trainer: Trainer) -> dict[str, int]:
    """Computing calls of a step and of its parts, each run alone from zeroed gradients.

    forward_mean / forward_sample: forward + backward of the NLL in "mean" / "sample" mode (for
    LoRA, "sample" is dropout); kl: `kl_divergence` forward + backward; optimiser: the optimiser
    step(s) on present gradients; step: one whole training step.
    """
    model = trainer.model

    def forward_backward(mode: str) -> Callable[[], None]:
        def run() -> None:
            with melora.sampling(model, mode):
                trainer.nll().backward()

        return run

    counts = {}
    for mode in ("mean", "sample"):
        trainer.zero_grad()
        counts[f"forward_{mode}"] = computing_calls(forward_backward(mode))
    trainer.zero_grad()
    bayesian = trainer.method != "lora"
    counts["kl"] = (
        computing_calls(lambda: melora.kl_divergence(model, 0.5).backward()) if bayesian else 0
    )
    forward_backward("sample")()
    counts["optimiser"] = computing_calls(trainer.optimiser_step)
    counts["step"] = kernel_ops(trainer)
    trainer.zero_grad()
    return counts


def call_counts(trainers: dict[str, Trainer]) -> dict[str, dict[str, int]]:
    """`part_calls` of each method, after one step (the first creates the optimiser state)."""
    for trainer in trainers.values():
        trainer.step()
    return {name: part_calls(trainer) for name, trainer in trainers.items()}


def evaluation_cost(model: nn.Module, ids: Tensor, n_samples: int) -> Callable[[], object]:
    """One evaluation of the batch `ids` at N = n_samples (`predict_with_entropy`)."""
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.zeros(ids.shape[0], dtype=torch.long),
        "answer_token_ids": [100, 200, 300, 400],  # four answer tokens, as ARC's A-D
    }
    return lambda: predict_with_entropy(model, [batch], n_samples)


def print_evaluation_cost(
    args: argparse.Namespace, models: dict[str, nn.Module], ids: Tensor
) -> None:
    """N = 10 against N = 0 per method: computing calls, and the best of `--steps` times."""
    print(f"evaluation of one batch ({args.batch} x {args.seq}), N = 10 against N = 0")
    print(
        f"{'method':<8} {'calls N=0':>10} {'calls N=10':>11} {'x':>7} {'ms N=0':>8} {'ms N=10':>8} {'x':>7}"
    )
    for name, model in models.items():
        if name.startswith("lora"):
            continue  # LoRA's N >= 1 is MC dropout: another method
        runs = {n: evaluation_cost(model, ids, n) for n in (0, 10)}
        calls = {n: computing_calls(run) for n, run in runs.items()}
        best = dict.fromkeys(runs, math.inf)
        for _ in range(args.warmup + args.steps):
            for n, run in runs.items():
                best[n] = min(best[n], seconds(run, args.device) * 1e3)
        print(
            f"{name:<8} {calls[0]:>10,} {calls[10]:>11,} {calls[10] / calls[0]:>7.3f} "
            f"{best[0]:>8.1f} {best[10]:>8.1f} {best[10] / best[0]:>7.3f}"
        )


def extra_calls(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Each method's calls beyond LoRA's, by part; "other" is what the parts alone do not show."""
    lora = counts["lora"]
    out = {}
    for method, c in counts.items():
        dropout = lora["forward_sample"] - lora["forward_mean"]  # what "sample" costs LoRA
        parts = {
            "update": c["forward_mean"] - lora["forward_mean"],
            "sample": c["forward_sample"] - c["forward_mean"] - dropout,
            "kl": c["kl"],
            "optimiser": c["optimiser"] - lora["optimiser"],
        }
        parts["other"] = c["step"] - lora["step"] - sum(parts.values())
        parts["step"] = c["step"] - lora["step"]
        out[method] = parts
    return out


def print_counts(args: argparse.Namespace, counts: dict[str, dict[str, int]], layers: int) -> None:
    """The computing calls of a step beyond LoRA's, part by part, and as a share of LoRA's step."""
    lora_step = counts["lora"]["step"]
    print(
        f"computing calls per training step: model {args.model}, {layers} adapted layers, KL "
        f"optimiser {args.kl_optimizer}, BLoB flipout {'on' if args.blob_flipout else 'off'}, "
        f"optimiser {args.optimiser_impl}{', layer by layer' if args.layer_by_layer else ''}; "
        f"LoRA's step: {lora_step:,}"
    )
    print(
        f"{'method':<8} {'step':>7} {'extra':>7} {'extra %':>8} {'/layer':>7} "
        f"{'update':>7} {'sample':>7} {'KL':>6} {'optim':>6} {'other':>6}"
    )
    for method, e in extra_calls(counts).items():
        print(
            f"{method:<8} {counts[method]['step']:>7,} {e['step']:>+7,} "
            f"{100 * e['step'] / lora_step:>+7.1f}% {e['step'] / layers:>7.2f} "
            f"{e['update']:>+7,} {e['sample']:>+7,} {e['kl']:>+6,} {e['optimiser']:>+6,} "
            f"{e['other']:>+6,}"
        )
    print(
        "extra: calls beyond LoRA's step; update: forward + backward in 'mean' mode; sample: what\n"
        "'sample' mode adds (beyond LoRA's dropout); KL: kl_divergence forward + backward alone;\n"
        "optim: the optimiser step(s); other: the rest of the step (e.g. gradients summed from\n"
        "two uses of a tensor). Each part is run alone from zeroed gradients."
    )


# ----- the collectives of the two-step KL under ZeRO ---------------------------------------------
# `Objective.kl_sgd_step` (orchestrator/train/objective.py) under DeepSpeed on 2 gloo CPU processes: one
# call of the paper's second step, theta <- theta - lr * pi * grad KL(theta), profiled; its
# collectives counted by kind. The model is a stack of q_proj/v_proj blocks (2 adapted layers and
# 8 adapter tensors a block) with r = 3, so that M and H (9 entries) leave the last rank's
# partition padded. ZeRO-3 three ways, by DeepSpeed's `stage3_param_persistence_threshold`: every
# adapter tensor kept whole on every rank between steps (the default, 1e5 entries: Llama2-13B's
# r = 8 factors too), every one partitioned (0), and M, H whole while A, B are partitioned (20);
# and ZeRO-2. tests/orchestrator/train/test_kl_step_collectives.py asserts on what this reports.
COLLECTIVE_WORLD, COLLECTIVE_MICRO_BATCH, COLLECTIVE_R = 2, 2, 3
COLLECTIVE_PI, COLLECTIVE_EPS, COLLECTIVE_LR = 0.3, 0.25, 0.05
# case: (zero stage, stage3_param_persistence_threshold; None: DeepSpeed's default)
ZERO_CASES = {
    "zero3-whole": (3, None),
    "zero3-partitioned": (3, 0),
    "zero3-mixed": (3, 20),
    "zero2": (2, None),
}
ZERO_CASE_NOTES = {
    "zero3-whole": "whole (threshold 1e5)",
    "zero3-partitioned": "partitioned (threshold 0)",
    "zero3-mixed": "M, H whole; A, B partitioned (20)",
    "zero2": "whole; fp32 copy in fragments",
}
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "broadcast", "reduce_scatter")
COLLECTIVE_BLOCKS = (8, 32)  # the benchmark's convention: 8 and 32 blocks (16 and 64 layers)


def _collective_adapter_config() -> melora.AdapterConfig:
    return melora.AdapterConfig(method="melora", r=COLLECTIVE_R, dropout=0.0)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class _TinyLM(nn.Module):
    """A causal-LM-shaped stack of q_proj/v_proj blocks (a Llama's layers, without their cost)."""

    def __init__(self, blocks: int, d: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return SimpleNamespace(logits=self.head(x))


def _tiny_lm(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return _TinyLM(blocks)


def _collective_batch(rank: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        "input_ids": torch.randint(0, 32, (COLLECTIVE_MICRO_BATCH, 5), generator=gen),
        "attention_mask": torch.ones(COLLECTIVE_MICRO_BATCH, 5, dtype=torch.long),
        "labels": torch.randint(0, 3, (COLLECTIVE_MICRO_BATCH,), generator=gen),
        "answer_token_ids": torch.tensor([10, 11, 12]),
        "choice_mask": torch.ones(COLLECTIVE_MICRO_BATCH, 3, dtype=torch.bool),
    }


def _plain_sgd_on_kl(blocks: int, before: dict[str, Tensor]) -> dict[str, Tensor]:
    """theta - lr * pi * grad KL(theta), on a plain (undistributed) copy of the adapter."""
    model = melora.attach(_tiny_lm(blocks), _collective_adapter_config())
    params = dict(melora.adapter_parameters(model))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(before[name])
    names = list(params)
    kl = COLLECTIVE_PI * melora.kl_divergence(model, COLLECTIVE_EPS)
    grads = torch.autograd.grad(kl, [params[n] for n in names], allow_unused=True)
    return {  # B is not in the KL
        n: before[n] if g is None else before[n] - COLLECTIVE_LR * g
        for n, g in zip(names, grads, strict=True)
    }


def _fp32_masters(module: nn.Module) -> dict[str, Tensor]:
    """DeepSpeed's fp32 copy of each adapter tensor, whole (collectives: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in melora.adapter_parameters(module)}


def kl_step_case(stage: int, threshold: int | None, blocks: int, rank: int) -> dict:
    """One case on this rank (the process group up): a whole `Objective.step`, an AdamW step (the
    state in which `step` calls `kl_sgd_step`), then one profiled `kl_sgd_step` and the next step.

    Returns adapter_tensors, whole_after_adamw (adapter tensors whole on this rank after AdamW),
    collectives (the `c10d::<op>` events of the call, in order: each collective records one where
    it is called), gloo_events (the `gloo:<op>` events: one where gloo runs each), kl_finite,
    module_error / master_error (max |difference| of the module's copy / DeepSpeed's fp32 copy
    from a plain SGD step on the KL), moved (the factors the step changed) and
    next_step_consistent (the module's and the fp32 copy equal after the next step)."""
    import deepspeed
    from torch.profiler import ProfilerActivity, profile

    from melora.evaluation import class_logits
    from orchestrator.config import RunConfig
    from orchestrator.train.checkpoint import gathered_adapter_state
    from orchestrator.train.deepspeed_config import deepspeed_config
    from orchestrator.train.objective import Objective, lr_lambda

    run = RunConfig.from_dict(
        {
            "seed": 3,
            "adapter": {"method": "melora", "r": COLLECTIVE_R, "dropout": 0.0},
            "optim": {"lr": 0.01, "batch_size": COLLECTIVE_MICRO_BATCH, "kl_optimizer": "sgd"},
            "scaling": {"num_workers": COLLECTIVE_WORLD, "zero_stage": stage},
        }
    )
    model = _tiny_lm(blocks)
    torch.manual_seed(run.seed)
    melora.attach(model, run.adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=run.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    ds_config = deepspeed_config(run, COLLECTIVE_WORLD, on_gpu=False)
    if threshold is not None:
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    objective = Objective(engine, run, batches_per_epoch=4, rank=rank)
    batch = _collective_batch(rank)
    objective.step(0, iter([batch]))  # a whole step: AdamW, then the KL step
    engine.backward(F.cross_entropy(class_logits(engine, batch), batch["labels"]))
    engine.step()  # AdamW: the state in which Objective.step calls kl_sgd_step
    whole = [getattr(p, "ds_status", None) for _, p in melora.adapter_parameters(engine.module)]

    before = _fp32_masters(engine.module)  # (reads the optimiser's copy: the module's stays put)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        kl = objective.kl_sgd_step(COLLECTIVE_PI, COLLECTIVE_EPS, COLLECTIVE_LR)
    names = [e.name for e in prof.events()]
    after, masters = gathered_adapter_state(engine.module), _fp32_masters(engine.module)
    expected = _plain_sgd_on_kl(blocks, before)
    objective.step(1, iter([batch]))  # the next step runs on the state the KL step left
    report = {
        "adapter_tensors": len(before),
        "whole_after_adamw": sum(getattr(status, "name", "") == "AVAILABLE" for status in whole),
        "collectives": [n for n in names if n.startswith("c10d::")],
        "gloo_events": sum(n.startswith("gloo:") for n in names),
        "kl_finite": bool(torch.isfinite(torch.tensor(kl))),
        "module_error": max((after[n] - expected[n]).abs().max().item() for n in expected),
        "master_error": max((masters[n] - expected[n]).abs().max().item() for n in expected),
        "moved": sorted(
            {n.rsplit(".", 1)[1] for n in expected if not expected[n].equal(before[n])}
        ),
    }
    after_next, masters_next = gathered_adapter_state(engine.module), _fp32_masters(engine.module)
    report["next_step_consistent"] = all(
        torch.equal(after_next[n], masters_next[n]) for n in after_next
    )
    return report


def kl_step_worker(rank: int, cases: list[str], blocks: list[int], out: str) -> None:
    """One gloo process (its environment set by `kl_step_collectives`): every case at every number
    of blocks, the reports written to `out` as JSON, {"<case>/<blocks>": report}."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=COLLECTIVE_WORLD)
    reports: dict = {}
    for name in cases:
        stage, threshold = ZERO_CASES[name]
        for n in blocks:
            try:
                reports[f"{name}/{n}"] = kl_step_case(stage, threshold, n, rank)
            except Exception as err:  # the reason travels to the caller, not only to the log
                reports[f"{name}/{n}"] = {"error": f"{type(err).__name__}: {err}"}
    Path(out).write_text(json.dumps(reports))
    torch.distributed.destroy_process_group()


def kl_step_collectives(
    blocks: tuple[int, ...] | list[int],
    work_dir: Path | str,
    cases: tuple[str, ...] | list[str] = tuple(ZERO_CASES),
    timeout_s: float = 900,
) -> list[dict[str, dict]]:
    """`kl_step_case` of each case at each number of blocks on 2 gloo CPU processes; one dict of
    reports per rank, {"<case>/<blocks>": report or {"error": ...}}.

    Each rank is a fresh `python benchmarks/adapter_cost.py` (so the caller's imports and
    `sys.path`, a test runner's included, do not leak into it); its output goes to
    `work_dir/rank<k>.log`, its reports to `work_dir/rank<k>.json`."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    try:
        for rank in range(COLLECTIVE_WORLD):
            spec = {
                "rank": rank,
                "cases": list(cases),
                "blocks": list(blocks),
                "out": str(work_dir / f"rank{rank}.json"),
            }
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(COLLECTIVE_WORLD),
                LOCAL_RANK=str(rank),
                DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1",
            )
            log = (work_dir / f"rank{rank}.log").open("w")
            logs.append(log)
            argv = [sys.executable, str(Path(__file__).resolve())]
            argv += ["--collectives-worker", json.dumps(spec)]
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"rank {rank} ran past {timeout_s:.0f} s") from None
            if code != 0:
                tail = (work_dir / f"rank{rank}.log").read_text()[-3000:]
                raise RuntimeError(f"rank {rank} exited with {code}; its log ends:\n{tail}")
    finally:
        for proc in procs:  # a failed or late rank: its peer would wait on it forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return [
        json.loads((work_dir / f"rank{rank}.json").read_text()) for rank in range(COLLECTIVE_WORLD)
    ]


def collective_kind(event: str) -> str:
    """`c10d::allgather_into_tensor_coalesced_` -> "all_gather", and so on by kind."""
    op = event.removeprefix("c10d::")
    for kind in COLLECTIVE_KINDS:
        if kind.replace("_", "") in op.replace("_", ""):
            return kind
    return op


def print_collectives(per_rank: list[dict[str, dict]], cases: list[str], blocks: list[int]) -> None:
    """The collectives of one `kl_sgd_step` per case and number of blocks, by kind."""
    print(
        f"collectives per KL step (Objective.kl_sgd_step, kl_optimizer sgd) on {COLLECTIVE_WORLD} "
        f"gloo CPU processes; Me-LoRA r {COLLECTIVE_R}, q/v adapted, torch.profiler's c10d:: events"
    )
    header = (
        f"{'stage':<6} {'adapter between steps':<34} {'blocks':>6} {'layers':>6} {'tensors':>7} "
        + " ".join(COLLECTIVE_KINDS)
        + f" {'other':>6} {'total':>6} {'SGD error':>9}"
    )
    print(header)
    print("-" * len(header))
    ops, problems = set(), []
    for name in cases:
        for n in blocks:
            reports = [rank_reports[f"{name}/{n}"] for rank_reports in per_rank]
            failed = [(rank, r["error"]) for rank, r in enumerate(reports) if "error" in r]
            if failed:
                problems += [f"{name}/{n} rank {rank}: {error}" for rank, error in failed]
                continue
            if any(r["collectives"] != reports[0]["collectives"] for r in reports):
                problems.append(f"{name}/{n}: the ranks' collectives differ")
            report = reports[0]
            ops.update(report["collectives"])
            kinds = Counter(map(collective_kind, report["collectives"]))
            other = sum(c for k, c in kinds.items() if k not in COLLECTIVE_KINDS)
            error = max(max(r["module_error"], r["master_error"]) for r in reports)
            print(
                f"ZeRO-{ZERO_CASES[name][0]:<1} {ZERO_CASE_NOTES[name]:<34} {n:>6} {2 * n:>6} "
                f"{report['adapter_tensors']:>7} "
                + " ".join(f"{kinds[kind]:>{len(kind)}}" for kind in COLLECTIVE_KINDS)
                + f" {other:>6} {len(report['collectives']):>6} {error:>9.1e}"
            )
    print(
        "layers: adapted layers (q_proj, v_proj per block); tensors: adapter tensors (A, B, M, H);\n"
        "the counts are rank 0's (every rank makes the same calls); SGD error: max |difference| of\n"
        "the module's and DeepSpeed's fp32 copy from a plain SGD step on the KL, over the ranks."
    )
    print(f"ops: {', '.join(sorted(ops)) or 'none'}")
    for problem in problems:
        print(f"FAILED {problem}")
    if problems:
        sys.exit(1)


# ----- memory ----------------------------------------------------------------------------------
def profiled_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the bytes allocated minus freed while `fn` runs, from torch.profiler's memory events.

    Each "[memory]" event carries the signed size of one allocation (> 0) or free (< 0); their
    running sum in time order is the live bytes relative to the start, its maximum the peak.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def check_profiled_peak() -> None:
    """The profiler method on a case with a known answer: 4 MiB held, then 8 MiB more: peak 12 MiB."""

    def known() -> None:
        a = torch.empty(MiB)
        b = torch.empty(2 * MiB)
        del a, b
        c = torch.empty(MiB)
        del c

    got = profiled_peak_bytes(known)
    if got != 12 * MiB:
        sys.exit(
            f"the profiler's memory events give {got} bytes on a known 12 MiB case: CPU memory cannot be trusted"
        )


def step_extra_bytes(trainer: Trainer, device: str) -> int:
    """The peak memory one training step adds to what was allocated before it.

    The gradients are set to None first, so "before" is the same on both devices (the CPU
    profiler cannot see the free of a tensor allocated before it started): the step's extra
    memory includes the gradients it creates.
    """
    trainer.zero_grad()
    gc.collect()
    if not device.startswith("cuda"):
        return profiled_peak_bytes(trainer.step)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def tensor_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def adapter_state_bytes(trainer: Trainer) -> dict[str, int]:
    """Bytes of the adapter parameters, their gradients and the optimiser state, from tensor sizes."""
    params = [p for _, p in melora.adapter_parameters(trainer.model)]
    optimizers = [opt for opt in (trainer.adamw, trainer.sgd) if opt is not None]
    state = [
        v
        for opt in optimizers
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    ]
    # a gradient has its parameter's size (they are None between steps only after zero_grad)
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(params),
        "optimiser": tensor_bytes(state),
    }


def base_bytes(model: nn.Module) -> int:
    """The frozen base weights and every buffer of the model."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return tensor_bytes(frozen + list(model.buffers()))


# ----- sizes -----------------------------------------------------------------------------------
def adapter_sizes(model: nn.Module) -> tuple[int, int, int]:
    """(trainable parameters, bytes of the saved safetensors file, raw tensor bytes)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = melora.adapter_state_dict(model)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = melora.save_adapter(model, Path(tmp) / "adapter")
        file_bytes = (folder / "melora_adapter.safetensors").stat().st_size
    return trainable, file_bytes, raw


# ----- report ----------------------------------------------------------------------------------
def print_report(
    args: argparse.Namespace, rows: dict[str, dict], times: dict[str, list[float]]
) -> None:
    cuda = args.device.startswith("cuda")
    memory = "torch.cuda.max_memory_allocated" if cuda else "torch.profiler memory events"
    loss = (
        "last-position next-token NLL (logits_to_keep=1)"
        if args.loss == "last"
        else "full causal-LM loss"
    )
    checkpointing = "on" if args.gradient_checkpointing else "off"
    print(
        f"model {args.model} ({args.dtype}, {args.device}), batch {args.batch}, seq {args.seq}, "
        f"r {args.rank}, targets {args.targets}, gradient checkpointing {checkpointing}"
    )
    print(
        f"loss: {loss}; KL optimiser: {args.kl_optimizer}; BLoB flipout "
        f"{'on' if args.blob_flipout else 'off'}; optimiser {args.optimiser_impl}"
    )
    print(f"{args.steps} timed rounds after {args.warmup} warm-up, round-robin {', '.join(rows)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; step memory: {memory}")
    print()
    lora = rows["lora"]
    header = (
        f"{'method':<8} {'trainable':>11} {'x':>6} {'file KiB':>9} {'raw KiB':>8} {'x':>6} "
        f"{'step ms':>8} {'x':>6} {'step MiB':>9} {'x':>7} {'state MiB':>9} {'peak MiB':>9} {'x':>7}"
    )
    print(header)
    print("-" * len(header))
    for method, row in rows.items():
        print(
            f"{method:<8} {row['trainable']:>11,} {row['trainable'] / lora['trainable']:>6.3f} "
            f"{row['file'] / 1024:>9.1f} {row['raw'] / 1024:>8.1f} {row['raw'] / lora['raw']:>6.3f} "
            f"{row['ms']:>8.1f} {row['ms'] / lora['ms']:>6.3f} "
            f"{row['extra'] / MiB:>9.1f} {row['extra'] / lora['extra']:>7.4f} "
            f"{row['state'] / MiB:>9.2f} {row['peak'] / MiB:>9.1f} {row['peak'] / lora['peak']:>7.4f}"
        )
    print(
        "step ms: median step time; step MiB: the step's peak over what was allocated before it\n"
        "(gradients included); state MiB: adapter parameters + gradients + optimiser state;\n"
        "peak MiB: base weights and buffers + adapter parameters + optimiser state + step MiB."
    )
    print()
    print("step time vs LoRA, per round (a ratio of adjacent steps, robust to drifting load):")
    print(f"{'method':<8} {'median':>7} {'q1':>7} {'q3':>7} {'best ms':>8} {'best x':>7}")
    best_lora = min(times["lora"]) * 1e3
    for method in rows:
        ratios = [t / t0 for t, t0 in zip(times[method], times["lora"], strict=True)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        best = min(times[method]) * 1e3
        print(f"{method:<8} {q2:>7.3f} {q1:>7.3f} {q3:>7.3f} {best:>8.1f} {best / best_lora:>7.3f}")
    print()
    print("the adapter's own work per step, each part timed alone (ms, best of 20, interleaved):")
    print(
        f"{'method':<8} {'update':>8} {'KL':>8} {'optim':>8} {'total':>8} "
        f"{'extra vs LoRA':>14} {'kernels':>8}"
    )
    lora_work = sum(lora["work"].values())
    for method, row in rows.items():
        work = row["work"]
        total = sum(work.values())
        extra = 100 * (total - lora_work) / best_lora
        print(
            f"{method:<8} {work['update']:>8.2f} {work.get('kl', 0.0):>8.2f} {work['optimiser']:>8.2f} "
            f"{total:>8.2f} {extra:>+13.2f}% {row['ops']:>8,}"
        )
    print(
        "update: every adapted layer's delta(x), forward + backward, sample mode; KL: kl_divergence\n"
        "forward + backward; extra vs LoRA: (total - LoRA's total) / LoRA's best step time;\n"
        "kernels: computing ATen calls in one step (on a GPU, about its kernel launches)."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.collectives_worker is not None:  # one rank of --collectives
        spec = json.loads(args.collectives_worker)
        kl_step_worker(spec["rank"], spec["cases"], spec["blocks"], spec["out"])
        # End now, without Python's finalisation (tests/_dist.py's leave_gloo_group, which a
        # benchmark cannot import, says why): DeepSpeed's engines keep the gloo groups alive, and
        # a gloo thread that frees its last work's tensors while Python finalises aborts the
        # process (SIGABRT, "terminate called without an active exception": once in CI, 4 of 54
        # runs here, none of 30 with this exit). The reports are written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if args.collectives:
        blocks = [args.layers] if args.layers else list(COLLECTIVE_BLOCKS)
        with tempfile.TemporaryDirectory(prefix="kl-step-collectives-") as tmp:
            per_rank = kl_step_collectives(blocks, tmp)
        print_collectives(per_rank, list(ZERO_CASES), blocks)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):
        check_profiled_peak()
    base = build_base(args)
    models = build_models(base, args)
    del base
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(32000, (args.batch, args.seq), generator=generator).to(args.device)
    targets = torch.randint(32000, (args.batch,), generator=generator).to(args.device)
    trainers = {
        name: Trainer.create(name.split("-")[0], model, ids, targets, args)
        for name, model in models.items()
    }
    if args.eval:
        print_evaluation_cost(args, models, ids)
        return
    if args.counts:
        layers = sum(1 for _ in melora.adapted_layers(trainers["lora"].model))
        print_counts(args, call_counts(trainers), layers)
        return

    times = time_round_robin(trainers, args.steps, args.warmup, args.device)
    work = adapter_work_ms(trainers, args)
    rows = {}
    for name, trainer in trainers.items():
        trainable, file_bytes, raw = adapter_sizes(trainer.model)
        extra = step_extra_bytes(trainer, args.device)
        state = adapter_state_bytes(trainer)
        held = base_bytes(trainer.model) + state["params"] + state["optimiser"]
        rows[name] = {
            "trainable": trainable,
            "file": file_bytes,
            "raw": raw,
            "ms": statistics.median(times[name]) * 1e3,
            "extra": extra,
            "state": sum(state.values()),
            "peak": held + extra,
            "work": work[name],
            "ops": kernel_ops(trainer),
        }
    print_report(args, rows, times)


if __name__ == "__main__":
    main()
