"""A run's checkpoints and the adapter across ranks.

`TrainState` (where the loop is, the best validation so far) and the DeepSpeed state are saved
by `save_and_report` into a Ray Train checkpoint (DeepSpeed shards from every rank, the current
and best adapters and the state from rank 0) and read back by `restore`. Under ZeRO-3 the adapter
is partitioned: `gathered` makes it whole for a block, `gathered_adapter_state` copies it out,
`load_adapter_state` puts one back. `run_folder` is the Ray Train run's folder on disk.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import melora

STATE_FILE = "state.json"
DS_DIR, DS_TAG = "deepspeed", "state"
ADAPTER_DIR, BEST_ADAPTER_DIR = "adapter", "best_adapter"


@dataclass
class TrainState:
    """What a checkpoint carries besides the DeepSpeed state: where we are and the best so far."""

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@contextmanager
def gathered(module: nn.Module):
    """Inside: the adapter parameters whole on every rank (ZeRO-3 partitions them outside a forward)."""
    params = [p for _, p in melora.adapter_parameters(module)]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # why: heavy; only ZeRO-3 (a worker that has it loaded) gets here

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def gathered_adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter state on the CPU (a collective under ZeRO-3: call it on every rank)."""
    with gathered(module):
        return {k: v.clone() for k, v in melora.adapter_state_dict(module).items()}


def load_adapter_state(module: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Copy `state` into the adapter parameters (under ZeRO-3, rank 0's copy is scattered back)."""
    if state is None:
        return
    with gathered(module), torch.no_grad():
        for name, p in melora.adapter_parameters(module):
            p.copy_(state[name].to(p.dtype))


def save_and_report(
    engine, state: TrainState, best_adapter, metrics: dict[str, float], rank: int
) -> None:
    """Write a checkpoint (DeepSpeed shards from every rank, adapters and state from rank 0) and report it."""
    import ray.train  # why: heavy; only a Ray Train worker saves checkpoints

    adapter = gathered_adapter_state(engine.module)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            melora.save_adapter(engine.module, tmp / ADAPTER_DIR, state_dict=adapter)
            melora.save_adapter(
                engine.module, tmp / BEST_ADAPTER_DIR, state_dict=best_adapter or adapter
            )
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))


def restore(engine, ckpt_dir: Path, rank: int) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Load the DeepSpeed state, the train state and the best adapter of a checkpoint."""
    from safetensors.torch import load_file  # why: only a resumed worker reads one

    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False)
    state = TrainState(**json.loads((ckpt_dir / STATE_FILE).read_text()))
    best = load_file(str(ckpt_dir / BEST_ADAPTER_DIR / melora.adapters.ADAPTER_WEIGHTS))
    return state, best


def run_folder(ctx) -> Path | None:
    """The Ray Train run's folder (<storage_path>/<run name>: its checkpoints, melora_run.json)
    when the storage is a folder (local or mounted, such as EFS); None for remote storage (s3://).

    Read from Ray Train's StorageContext (a DeveloperAPI in Ray 2.60): the worker's own working
    folder is Ray's, so a relative tracking.storage_path cannot be resolved here."""
    try:
        import pyarrow.fs  # why: Ray's dependency, only where Ray Train runs

        storage = ctx.get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return Path(storage.experiment_fs_path)
    except (AttributeError, ImportError):  # another Ray version: the logger says where it spools
        pass
    return None
