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
