"""What the driver checks before any Ray worker starts: the task's data fits the run as configured.

The driver can read the data and the tokenizer the workers will use, so an error that a worker
would meet only after Ray, DeepSpeed and the model have started (and that Ray Train's retries
would meet again) is found here, in seconds, before anything is written:

- every split (train, validation, test and each OOD test set) loads;
- each task's answers are single, distinct tokens of the tokenizer (`make_collator`);
- every prompt fits `task.max_length`, after `fit_prompt` has shortened what it can (`token_ids`);
- the training split makes at least one batch of `optim.batch_size` on each of the
  `scaling.num_workers` workers.

A tokenizer that the driver cannot load (a hub id on a driver without network or credentials)
is not an error here: the workers load it themselves and a failure there ends the run FAILED on
its first try (orchestrator/train/worker.py). The check is cached per (model, task settings) in
the process, so a sweep's trials on one task pay for it once per process. The splits it loads
(`run_splits`) are kept for the same process, and `trainer.task_inputs` logs those very rows to
MLflow, without loading the task a second time.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from melora.errors import ConfigError
from melora.tasks import TaskError, load_task, make_collator, token_ids
from orchestrator.config import RunConfig
from orchestrator.train.model import load_tokenizer


class RunSplits(NamedTuple):
    """A run's data: the task's splits by name, and the test split of each OOD task, in order."""

    task: dict[str, Any]
    ood: tuple[tuple[str, Any], ...]


def run_splits(run: RunConfig) -> RunSplits:
    """`run`'s splits under its task settings (`melora.tasks.load_task`), loaded once per process."""
    return _load_splits(*_task_settings(run))


def check_run_data(run: RunConfig) -> None:
    """Raise TaskError / ConfigError (naming the task, the split and the field) when `run`'s data
    cannot be served as configured; see the module docstring for what is checked."""
    _check(
        run.model.name_or_path,
        _task_settings(run),
        max_length=run.task.max_length,
        batch_size=run.optim.batch_size,
        num_workers=run.scaling.num_workers,
    )


def _task_settings(run: RunConfig) -> tuple[str, str, str | None, str, tuple[str, ...]]:
    """(task, split_policy, data_dir, prompt_style, ood_tasks): what the splits depend on."""
    t = run.task
    return t.name, t.split_policy, t.data_dir, t.prompt_style, tuple(t.ood_tasks)


@functools.lru_cache(maxsize=4)
def _load_splits(
    task: str,
    split_policy: str,
    data_dir: str | None,
    prompt_style: str,
    ood_tasks: tuple[str, ...],
) -> RunSplits:
    splits = load_task(task, split_policy, data_dir, prompt_style)
    ood = tuple(
        (name, load_task(name, split_policy, data_dir, prompt_style, ("test",))["test"])
        for name in ood_tasks
    )
    return RunSplits(splits, ood)


@functools.lru_cache(maxsize=32)
def _check(
    name_or_path: str,
    task_settings: tuple[str, str, str | None, str, tuple[str, ...]],
    *,
    max_length: int,
    batch_size: int,
    num_workers: int,
) -> None:
    tokenizer = _driver_tokenizer(name_or_path)
    data = _load_splits(*task_settings)
    task = task_settings[0]
    splits = {**data.task, **{f"ood {name}": dataset for name, dataset in data.ood}}
    per_worker = len(splits["train"]) // num_workers
    if per_worker // batch_size == 0:
        raise ConfigError(
            f"task {task}: {len(splits['train'])} training examples make no batch of "
            f"optim.batch_size={batch_size} on each of scaling.num_workers={num_workers} workers: "
            "lower optim.batch_size or scaling.num_workers"
        )
    if tokenizer is None:
        return
    for split, dataset in splits.items():
        try:
            make_collator(dataset, tokenizer)
            token_ids(dataset, tokenizer, max_length)
        except TaskError as err:
            raise TaskError(f"task {task}, {split} split: {err}") from None


def _driver_tokenizer(name_or_path: str):
    """The workers' tokenizer, or None (with a note) when this process cannot load it."""
    try:
        return load_tokenizer(name_or_path)
    except OSError as err:
        print(
            f"[preflight] the tokenizer {name_or_path!r} cannot be loaded here ({err}); the "
            "workers check the prompts against task.max_length themselves",
            flush=True,
        )
        return None
