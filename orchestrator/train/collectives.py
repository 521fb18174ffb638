"""The collectives the orchestrator calls itself, each on the device its backend takes.

NCCL (Ray Train with `use_gpu`) takes CUDA tensors only: a CPU tensor fails there ("No backend
type associated with device type cpu"), while gloo takes CPU tensors, so CPU tests hide the
mistake. Every tensor collective in `orchestrator/` goes through this module, which moves the
tensor to `collective_device()` and the result back. (`all_gather_object` pickles and picks its
own device; DeepSpeed's collectives are DeepSpeed's.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """Where the default process group's collectives take tensors: this process's GPU under NCCL,
    else the CPU (gloo). Ray Train sets the worker's current CUDA device to its local rank."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed() -> bool:
    """Whether a process group exists (collectives are no-ops without one)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """`tensor` reduced over all ranks (a new tensor on `tensor`'s device; `tensor` itself unchanged)."""
    if not distributed():
        return tensor.clone()
    on_device = tensor.to(collective_device(), copy=True)
    dist.all_reduce(on_device, op=op)
    return on_device.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank (a new tensor on `tensor`'s device)."""
    if not distributed():
        return tensor.clone()
    on_device = tensor.to(collective_device(), copy=True)
    dist.broadcast(on_device, src=src)
    return on_device.to(tensor.device)


def first_error(reason: str | None) -> str | None:
    """Every rank's `reason` gathered: the lowest rank's non-None one, or None when no rank failed.

    Lets all ranks stop together after an error that some rank alone may have met, instead of
    the others waiting in the next collective for a rank that has gone.
    """
    if not distributed():
        return reason
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r is not None), None)
