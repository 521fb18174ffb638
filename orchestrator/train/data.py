"""The task's data in a worker (`TaskData`): its splits, the OOD test sets, and the training
split's loader sharded over the ranks (`DistributedSampler`), walked step by step
(`train_batches`). The evaluation sets are sharded by `dist_eval.shard_loader`.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DistributedSampler

from melora.errors import ConfigError
from melora.tasks import load_task, make_loader
from orchestrator.config import RunConfig


class TaskData:
    """The task's splits and the training loader, sharded over the ranks (evaluation sets: `dist_eval`)."""

    def __init__(self, run: RunConfig, tokenizer: Any, rank: int, world: int) -> None:
        t = run.task
        self.run, self.tokenizer, self.rank, self.world = run, tokenizer, rank, world
        splits = load_task(t.name, t.split_policy, t.data_dir, t.prompt_style)
        self.train = splits["train"]
        self.validation = splits.get("validation")
        self.test = splits["test"]
        self.ood = {
            name: load_task(name, t.split_policy, t.data_dir, t.prompt_style, splits=("test",))[
                "test"
            ]
            for name in t.ood_tasks
        }
        self.sampler = DistributedSampler(
            self.train, num_replicas=world, rank=rank, shuffle=True, seed=run.seed, drop_last=True
        )
        self.train_loader = make_loader(
            self.train,
            tokenizer,
            run.optim.batch_size,
            max_length=t.max_length,
            sampler=self.sampler,
            drop_last=True,
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"task {t.name}: {len(self.train)} training examples make no batch of "
                f"optim.batch_size={run.optim.batch_size} on each of {world} workers: lower "
                "optim.batch_size or scaling.num_workers"
            )

    def train_batches(self, start_step: int):
        """Training batches forever, epoch after epoch, starting where step `start_step` was."""
        per_epoch = len(self.train_loader)
        micro = start_step * self.run.optim.grad_accum
        epoch, skip = divmod(micro, per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            for i, batch in enumerate(self.train_loader):
                if i >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0
