"""The paper's objective as optimiser steps on a DeepSpeed engine (`Objective`), and the step
helpers the loop shares with it: the learning-rate schedule (`lr_lambda`), the per-step reseeding
of torch's RNG (`reseed`, `step_generator`) and the all-ranks finiteness check (`all_finite`).

The SGD step on the KL (kl_optimizer "sgd") writes DeepSpeed's own fp32 copy of the adapter:
`_sgd_on_fragments` under ZeRO-1/2 (and bf16), `_kl_sgd_step_zero3` under ZeRO-3.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import melora
from melora.errors import MeLoraError
from melora.evaluation import class_logits
from melora.objective import draw_prior_eps, kl_weight
from orchestrator.config import RunConfig
from orchestrator.errors import NonFiniteLossError
from orchestrator.train import collectives


class Objective:
    """The paper's objective on a DeepSpeed engine; one `step` call is one optimiser step (METHOD.md).

    Per step: the NLL of the answer token (mean over the batch) and, for BLoB and Me-LoRA, the KL
    with prior std sigma_p + eps (eps drawn once per step, the same on every rank) weighted by pi
    (Blundell or uniform over the M optimiser steps of the epoch: `melora.objective.kl_weight`).
    - kl_optimizer "joint": AdamW (through DeepSpeed) on NLL + pi * KL, the KL collected inside
      the layers' forward (works under every ZeRO stage).
    - kl_optimizer "sgd": AdamW on the NLL, then a plain SGD step (lr kl_lr x the same schedule)
      on pi * KL at the parameters AdamW just moved: theta <- theta - lr_kl * pi * grad KL(theta).
      DeepSpeed keeps its own fp32 copy of the parameters under ZeRO-2/3 (and bf16), so the step is
      written to that copy (each rank its own part of it) and the module's copy is refreshed from
      it; under ZeRO-3 the adapter is gathered for it. The KL gradient is identical on every rank.
    Under data parallelism DeepSpeed averages the gradients over ranks: the mean of the ranks'
    batch-mean NLLs plus pi * grad KL (the KL is the same on every rank).
    """

    def __init__(self, engine, run: RunConfig, batches_per_epoch: int, rank: int) -> None:
        """`batches_per_epoch`: micro-batches per epoch on each rank (an optimiser step takes
        `optim.grad_accum` of them)."""
        self.engine, self.run, self.rank = engine, run, rank
        self.batches_per_epoch = batches_per_epoch
        self.bayesian = run.adapter.is_bayesian
        self.two_step_kl = self.bayesian and run.optim.kl_optimizer == "sgd"
        self.schedule = lr_lambda(run)

    def kl_weight(self, step: int) -> float:
        """pi of optimiser step `step`: the weights of each epoch's optimiser steps sum to 1."""
        if not self.bayesian:
            return 0.0
        optim = self.run.optim
        return kl_weight(step, self.batches_per_epoch, optim.kl_weighting, optim.grad_accum)

    def step(self, step: int, batches) -> dict[str, float]:
        """One optimiser step (grad_accum micro-batches) at 0-based `step`; returns the train metrics."""
        run, engine = self.run, self.engine
        # Batches first: a DataLoader starting an epoch draws from the global RNG, which must then
        # be reseeded, so that a resumed run repeats the draws of an uninterrupted one.
        micro_batches = [next(batches) for _ in range(run.optim.grad_accum)]
        reseed(run.seed, step, self.rank)
        pi = self.kl_weight(step)
        eps = draw_prior_eps(run.adapter.prior_noise, step_generator(run.seed, step))
        joint_kl = self.bayesian and not self.two_step_kl
        engine.train()
        nll_sum, kl_value = 0.0, 0.0
        for batch in micro_batches:
            with melora.kl_from_forward(engine.module, eps) if joint_kl else nullcontext() as kl:
                logits = class_logits(engine, batch)
            nll = F.cross_entropy(logits, batch["labels"].to(logits.device))
            loss = nll + pi * kl.total() if joint_kl else nll
            if not all_finite(loss):
                raise NonFiniteLossError(f"non-finite loss at step {step + 1}: nll {nll.item()}")
            engine.backward(loss)
            engine.step()
            nll_sum += nll.item()
            kl_value = kl.total().item() if joint_kl else kl_value
        if self.two_step_kl:  # the second step, on pi * KL at the parameters AdamW just moved
            kl_value = self.kl_sgd_step(pi, eps, lr=run.optim.kl_lr * self.schedule(step))
        return {
            "train/nll": nll_sum / run.optim.grad_accum,
            "train/kl": kl_value,
            "train/lr": engine.get_lr()[0],
            "train/pi": pi,
            "train/prior_eps": eps,
        }

    def kl_sgd_step(self, pi: float, eps: float, lr: float) -> float:
        """theta <- theta - lr * pi * grad KL(theta) on every adapter tensor; returns KL(theta).

        The step is written where DeepSpeed keeps the parameters' value (its fp32 copy under
        ZeRO-2/3 or bf16, the parameters themselves under stage 0 in fp32), and the module's copy
        is refreshed from it. The KL gradient is the same on every rank, so each rank steps its
        own part of the fp32 copy without communication; the collectives per call do not depend
        on the number of adapted layers: at most two under ZeRO-3 (`_kl_sgd_step_zero3`), one
        under ZeRO-1/2 (`_sgd_on_fragments`), none under stage 0.
        """
        module = self.engine.module
        params = [p for _, p in melora.adapter_parameters(module)]
        if any(hasattr(p, "ds_id") for p in params):
            return _kl_sgd_step_zero3(module, params, pi, eps, lr)
        kl = melora.kl_divergence(module, eps)
        stepped, grads = _kl_gradients(pi * kl, params)
        with torch.no_grad():
            if stepped and all(hasattr(p, "_hp_mapping") for p in stepped):
                _sgd_on_fragments(stepped, grads, lr)
            elif stepped:  # stage 0 in fp32: no other copy
                torch._foreach_add_(stepped, grads, alpha=-lr)
        return kl.item()


def _kl_gradients(loss: torch.Tensor, params: list[nn.Parameter]):
    """(the parameters `loss` depends on, their gradients): Me-LoRA's KL does not read B."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    return [p for p, _ in used], [g for _, g in used]


def _sgd_on_fragments(params: list[nn.Parameter], grads: list[torch.Tensor], lr: float) -> None:
    """The SGD step under ZeRO-1/2 (or DeepSpeed's bf16 optimiser), with one all-reduce.

    Each rank's optimiser holds a contiguous fragment of some tensors' fp32 copy
    (`p._hp_mapping`: deepspeed/utils/mixed_precision_linkage.py, tensor_fragment.py; what
    `safe_get_full_fp32_param` reads with an all-reduce per tensor). Each rank steps its fragments
    in place, writes them into a zeroed buffer of the whole adapter, and one all-reduce (a sum)
    assembles every new value on every rank for the module's copy.
    """
    sizes = [p.numel() for p in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    slots = buffer.split(sizes)
    fragments, grad_parts, slot_parts = [], [], []
    for p, g, slot in zip(params, grads, slots, strict=True):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this rank holds no part of p's fp32 copy
            continue
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        fragments.append(mapping.get_hp_fragment())
        grad_parts.append(g.reshape(-1).narrow(0, start, numel))
        slot_parts.append(slot.narrow(0, start, numel))
    if fragments:
        torch._foreach_add_(fragments, grad_parts, alpha=-lr)
        torch._foreach_copy_(slot_parts, fragments)
    # the default group: with data parallelism only (the project's configs) DeepSpeed's
    # data-parallel group (`p._dp_group`) is the whole world
    summed = collectives.all_reduce(buffer).split(sizes)
    torch._foreach_copy_(params, [part.view_as(p) for p, part in zip(params, summed, strict=True)])


def _kl_sgd_step_zero3(module: nn.Module, params: list[nn.Parameter], pi, eps, lr) -> float:
    """The SGD step on the KL under ZeRO-3, with at most two collectives whatever the layers.

    Between steps DeepSpeed keeps an adapter tensor whole on every rank when it is no larger than
    `stage3_param_persistence_threshold` (1e5 entries by default: Llama2-13B's r = 8 factors are),
    and partitioned otherwise; its fp32 copy is always partitioned, rank k holding entries
    [k s, (k + 1) s) of the flattened tensor (s = ceil(numel / world); the last ranks' slices end
    in padding), and so is the module's copy (`p.ds_tensor`).
    1. One coalesced all-gather of the partitioned adapter tensors (`all_gather_coalesced`, the
       call ZeRO-3's forward fetch makes), if any; the KL of all layers and its gradient; the
       gathered copies are released (no collective).
    2. Each rank steps its own slice of each fp32 copy in place (the local API,
       `safe_get_local_fp32_param`: stage3.py `get_local_fp32_param`, no collective) and copies
       it into its slice of the module's copy, as DeepSpeed's own step does
       (stage3.py `_reassign_or_swap_out_partitioned_parameters`).
    3. The tensors kept whole are re-gathered from the new slices with one coalesced all-gather
       (DeepSpeed's `_post_step` re-gathers them too, but with one all-gather per tensor:
       `_allgather_params_coalesced`); the partitioned ones are fetched by the next forward.
    """
    # why: deepspeed is heavy and only a ZeRO-3 worker reaches this
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # why: see above
    from deepspeed.utils import safe_get_local_fp32_param  # why: see above

    if getattr(params[0]._z3_optimizer, "offload_optimizer", False):
        raise MeLoraError(
            "optim.kl_optimizer='sgd' under ZeRO-3 writes DeepSpeed's fp32 partitions in place, "
            "which optimizer offload keeps elsewhere; orchestrator.train.deepspeed_config never offloads"
        )
    partitioned = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if partitioned:
        partitioned[0].all_gather_coalesced(partitioned).wait()
    try:
        kl = melora.kl_divergence(module, eps)
        stepped, grads = _kl_gradients(pi * kl, params)
    finally:
        if partitioned:
            partitioned[0].partition(param_list=partitioned)  # frees the gathered copies
    if not stepped:
        return kl.item()
    with torch.no_grad():
        masters, master_parts, grad_parts = [], [], []
        for p, g in zip(stepped, grads, strict=True):
            master = safe_get_local_fp32_param(p)  # this rank's slice of the fp32 copy (a view)
            start = master.numel() * dist.get_rank(group=p.ds_process_group)
            numel = min(master.numel(), p.ds_numel - start)  # the rest is padding
            masters.append(master)
            if numel > 0:
                master_parts.append(master.narrow(0, 0, numel))
                grad_parts.append(g.reshape(-1).narrow(0, start, numel))
            p.ds_secondary_tensor = None  # a ZeRO++ copy of the old slice (stage3.py _post_step)
        if master_parts:
            torch._foreach_add_(master_parts, grad_parts, alpha=-lr)
        torch._foreach_copy_([p.ds_tensor for p in stepped], masters)
        whole = [p for p in stepped if p.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole)  # drops the old whole copies (no collective)
            whole[0].all_gather_coalesced(whole).wait()
    return kl.item()


def lr_lambda(run: RunConfig):
    """The schedule's multiplier of step t: linear warm-up over warmup_ratio, then linear / cosine / constant."""
    total, warmup = run.optim.max_steps, int(run.optim.warmup_ratio * run.optim.max_steps)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        progress = (t - warmup) / max(1, total - warmup)
        if run.optim.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if run.optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG (posterior draws, dropout) from (seed, step, rank)."""
    torch.manual_seed((seed * 1_000_003 + step) * 131 + rank)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that gives every rank the same draw at a step (the prior noise eps)."""
    return torch.Generator().manual_seed(seed * 7_919 + step)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce, so that all ranks stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
    return collectives.all_reduce(bad, op=dist.ReduceOp.MAX).item() == 0
