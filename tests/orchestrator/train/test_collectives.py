"""Every collective the orchestrator calls gets its tensor on the device the backend takes.

NCCL takes CUDA tensors only, gloo takes CPU tensors, so a CPU test run (gloo) hides a CPU tensor
sent to a collective. Here 2 gloo processes pretend to be an NCCL job on a GPU, without one:
`dist.get_backend()` answers "nccl", and a torch dispatch mode plays the GPU (a tensor moved to
"cuda" becomes a wrapper that reports device cuda:0 and computes on the CPU). Every tensor
collective called from `orchestrator/` is checked against `collectives.collective_device()`,
then runs for real over gloo on the CPU data.
"""

from __future__ import annotations

import json
import math
import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from orchestrator.train import collectives
from tests._dist import free_port, join_gloo_group, leave_gloo_group

REPO = Path(__file__).resolve().parents[3]
WORLD = 2
FAKE_GPU = torch.device("cuda", 0)
TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single",
)  # fmt: skip


# ----- the rule, in one process ----------------------------------------------------------------
def test_collective_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_no_collective_bypasses_the_helper() -> None:
    """Tensor collectives in orchestrator/ go through orchestrator/collectives.py only."""
    direct = re.compile(r"\bdist\.(" + "|".join(TENSOR_COLLECTIVES) + r")\(")
    offenders = [
        f"{path.relative_to(REPO)}:{i}"
        for path in sorted((REPO / "orchestrator").rglob("*.py"))
        if path.name != "collectives.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert not offenders, (
        f"call orchestrator.train.collectives instead of torch.distributed: {offenders}"
    )


# ----- a pretend GPU --------------------------------------------------------------------------
class OnFakeGpu(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (only inside `FakeGpu`)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, dtype=elem.dtype, device=FAKE_GPU, strides=elem.stride()
        )
        t.elem = elem
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} on a fake GPU tensor outside FakeGpu")


def _unwrap(x):
    return x.elem if isinstance(x, OnFakeGpu) else x


class FakeGpu(TorchDispatchMode):
    """Moves to 'cuda' make `OnFakeGpu` tensors; ops on them stay on the fake GPU; moves to the
    CPU give plain tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        to_gpu = device is not None and torch.device(device).type == "cuda"
        if to_gpu:
            kwargs["device"] = torch.device("cpu")
        on_gpu = any(isinstance(a, OnFakeGpu) for a in tree_leaves((args, kwargs)))
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_gpu or (on_gpu and device is None):
            return tree_map(
                lambda x: OnFakeGpu(x) if type(x) is torch.Tensor else x, out
            )  # in-place ops return their (already wrapped) argument
        return out


def _checked(name: str, real, violations: list[str]):
    """`real` collective, checked when called from orchestrator/, run on the CPU data over gloo."""

    def collective(*args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0]
        if f"{os.sep}orchestrator{os.sep}" in caller.filename:
            expected = collectives.collective_device()
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device != expected:
                    where = f"{Path(caller.filename).name}:{caller.lineno}"
                    violations.append(f"{name} at {where} got {t.device}, expected {expected}")
        return real(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    return collective


def _child(rank: int, port: int, out_dir: str) -> None:
    join_gloo_group(rank, port, WORLD)
    from orchestrator.train.laplace import sum_over_ranks
    from orchestrator.train.objective import all_finite

    violations: list[str] = []
    real_backend = dist.get_backend
    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, _checked(name, getattr(dist, name), violations))
    dist.get_backend = lambda *a, **k: "nccl"
    torch.cuda.current_device = lambda: 0
    torch.cuda._lazy_init = lambda: None  # the first move to 'cuda' asks for CUDA's set-up
    results: dict = {"backend": real_backend()}
    with FakeGpu():
        results["finite"] = all_finite(torch.tensor(1.5))
        results["one_nan"] = all_finite(torch.tensor(math.nan if rank == 1 else 0.5))
        totals = torch.tensor([1.0, float(rank)])
        sum_over_ranks(WORLD)(totals)
        results["sum"] = totals.tolist()
        results["sum_device"] = str(totals.device)
        results["broadcast"] = collectives.broadcast(torch.tensor([10.0 + rank]), src=0).tolist()
        results["reduced_max"] = collectives.all_reduce(
            torch.tensor([float(rank)]), op=dist.ReduceOp.MAX
        ).tolist()
    results["violations"] = violations
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave_gloo_group()


def test_every_collective_gets_the_backends_device(tmp_path: Path) -> None:
    port = free_port()
    mp.spawn(_child, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["backend"] == "gloo"  # the real one underneath
        assert got["violations"] == [], got["violations"]
        # and the collectives computed the right values on the way
        assert got["finite"] is True and got["one_nan"] is False
        assert got["sum"] == [2.0, 1.0] and got["sum_device"] == "cpu"
        assert got["broadcast"] == [10.0]
        assert got["reduced_max"] == [1.0]
