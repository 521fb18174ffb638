"""The per-worker training loop (Ray Train), readable top to bottom.

    train_loop_per_worker(config)
      setup:     model + tokenizer, melora.attach, the task's loaders, DeepSpeed, resume
      train:     per step: NLL (+ weighted KL), AdamW through DeepSpeed, [SGD on the KL]
      validate:  every eval_every steps: val metrics, a checkpoint, report to Ray Train
      finish:    load the best adapter, evaluate test and OOD sets at N = 0, 1, 10, log to MLflow

Every rank runs every forward (ZeRO-3 gathers weights collectively), so evaluation is sharded
over the ranks and gathered (`dist_eval`). Rank 0 alone talks to MLflow (`logger`, through
`orchestrator.tracking`). The posterior noise and dropout draw from torch's global RNG, reseeded
at every step from (seed, step, rank), so a run resumed from a checkpoint repeats the draws of an
uninterrupted one (`objective`). Model and tokenizer: `model`; data: `data`; checkpoints:
`checkpoint`.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import melora
from melora.errors import MeLoraError
from orchestrator.config import RunConfig
from orchestrator.errors import NonFiniteLossError
from orchestrator.train import collectives
from orchestrator.train.checkpoint import (
    TrainState,
    gathered,
    gathered_adapter_state,
    load_adapter_state,
    restore,
    run_folder,
    save_and_report,
)
from orchestrator.train.data import TaskData
from orchestrator.train.deepspeed_config import deepspeed_config
from orchestrator.train.dist_eval import evaluate_final, validate, write_final_artifacts
from orchestrator.train.laplace import evaluate_final_laplace
from orchestrator.train.logger import Progress, RankZeroLogger
from orchestrator.train.model import build_model, worker_device
from orchestrator.train.objective import Objective, lr_lambda


@dataclass
class Worker:
    """What every phase of the loop reads and updates: the run, this rank, the DeepSpeed engine,
    the task's data, the logger, the train state and the best adapter so far."""

    run: RunConfig
    rank: int
    engine: Any
    data: TaskData
    logger: RankZeroLogger
    state: TrainState = field(default_factory=TrainState)
    best_adapter: dict[str, torch.Tensor] | None = None


# ----- the loop ---------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"run": RunConfig dict, "mlflow_run_id", "tracking_uri", ...}."""
    run = RunConfig.from_dict(config["run"])
    if run.adapter.method == "ens":
        raise ValueError(
            "adapter.method='ens' is not one training run: train its LoRA members and evaluate "
            "them together with orchestrator.posthoc.ensemble.fit_ensemble (the sweep does this)"
        )
    import ray.train  # why: heavy; the driver imports this module only to hand the loop to Ray

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(run, ctx.get_local_rank())  # refuses use_gpu without CUDA
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    import datasets  # why: heavy, worker only
    import deepspeed  # why: heavy; it reads DS_ACCELERATOR (set just above) on import

    datasets.disable_progress_bars()
    logger = RankZeroLogger(
        rank, config.get("tracking_uri"), config.get("mlflow_run_id"), spool_dir=run_folder(ctx)
    )

    # --- setup. A user error here (config, data, tokenizer, adapter targets) ends the run FAILED
    # on every rank at once: a retry by Ray Train would fail the same way.
    setup = _setup(run, rank, world, on_gpu)
    reason = collectives.first_error(setup if isinstance(setup, str) else None)
    if reason is not None:
        logger.fail(reason)
        ray.train.report({"failed": reason, "step": 0})
        return
    ds_config, model, data = setup
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=run.optim.lr, weight_decay=run.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    worker = Worker(run, rank, engine, data, logger)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            worker.state, worker.best_adapter = restore(engine, Path(ckpt_dir), rank)
        logger.print(f"resumed at step {worker.state.step} from {checkpoint.path}")

    # --- train, validating and checkpointing every eval.eval_every steps
    if _train(worker, fault=config.get("fault"), resumed=checkpoint is not None):
        # --- finish: the best adapter on the test and OOD sets (LAP: its Laplace predictive)
        _finish(worker)


def _setup(
    run: RunConfig, rank: int, world: int, on_gpu: bool
) -> tuple[dict[str, Any], nn.Module, TaskData] | str:
    """(DeepSpeed config, model with its adapter attached, the task's data), or the reason this
    rank could not set up (a `MeLoraError`: config, data, tokenizer, adapter targets)."""
    try:
        ds_config = deepspeed_config(run, world_size=world, on_gpu=on_gpu)
        tokenizer, model = build_model(run, ds_config, on_gpu)
        torch.manual_seed(run.seed)  # the same adapter initialisation on every rank
        melora.attach(model, run.adapter)
        return ds_config, model, TaskData(run, tokenizer, rank, world)
    except MeLoraError as err:
        return f"rank {rank}: {type(err).__name__}: {err}"


def _train(worker: Worker, *, fault: dict[str, int] | None, resumed: bool) -> bool:
    """The optimiser steps from the worker's step to optim.max_steps; False when the loss went
    non-finite (the MLflow run is then FAILED with the reason and the run is not retried)."""
    import ray.train  # why: heavy, worker only (imported already by train_loop_per_worker)

    run, state, logger = worker.run, worker.state, worker.logger
    objective = Objective(
        worker.engine, run, batches_per_epoch=len(worker.data.train_loader), rank=worker.rank
    )
    progress = Progress(run.optim.max_steps, state.step, logger)
    batches = worker.data.train_batches(start_step=state.step)
    log_every = max(1, min(run.eval.eval_every, run.optim.max_steps) // 10)
    while state.step < run.optim.max_steps:
        try:
            train_metrics = objective.step(state.step, batches)
        except NonFiniteLossError as err:
            logger.fail(
                str(err)
            )  # MLflow: FAILED with the reason; the run stops, it is not retried
            ray.train.report({"failed": str(err), "step": state.step})
            return False
        state.step += 1
        if state.step % log_every == 0 or state.step == run.optim.max_steps:
            logger.log_metrics(train_metrics, state.step)
            progress.update(state.step, train_metrics)
        maybe_inject_fault(fault, worker.rank, state.step, resumed)
        if state.step % run.eval.eval_every == 0 or state.step == run.optim.max_steps:
            _validate_and_save(worker, train_metrics)
    return True


def _validate_and_save(worker: Worker, train_metrics: dict[str, float]) -> None:
    """Validation metrics, the best adapter by `eval.select_metric`, a checkpoint reported to Ray Train."""
    run, state = worker.run, worker.state
    val = validate(worker.engine, worker.data, run)
    worker.logger.log_metrics(val, state.step)
    if is_better(run, val, state):
        state.best_value, state.best_step = val.get(run.eval.select_metric), state.step
        worker.best_adapter = gathered_adapter_state(worker.engine.module)
    state.history.append({"step": state.step, **val})
    metrics = {**train_metrics, **val, "step": state.step}
    save_and_report(worker.engine, state, worker.best_adapter, metrics, worker.rank)


def _finish(worker: Worker) -> None:
    """The best adapter evaluated (LAP: its Laplace predictive), its artifacts written by rank 0,
    everything logged to MLflow, the final metrics reported to Ray Train."""
    import ray.train  # why: heavy, worker only (imported already by train_loop_per_worker)

    run, engine, step = worker.run, worker.engine, worker.state.step
    load_adapter_state(engine.module, worker.best_adapter)
    if run.adapter.method == "lap":
        final, predictions = evaluate_final_laplace(engine.module, worker.data, run)
    else:
        final, predictions = evaluate_final(engine, worker.data, run)
    final["best_step"] = worker.state.best_step or step
    with tempfile.TemporaryDirectory() as tmp, gathered(engine.module):
        if worker.rank == 0:
            write_final_artifacts(Path(tmp), engine.module, predictions, run)
        worker.logger.finish(final, Path(tmp), step)
    ray.train.report({**final, "step": step})


# ----- the loop's rules -------------------------------------------------------------------------
def is_better(run: RunConfig, val: dict[str, float], state: TrainState) -> bool:
    """Whether `val` beats the best so far by `eval.select_metric` (without a validation split: the latest wins).

    A non-finite value (NaN, inf) never becomes the best, and any finite value beats a best that
    is missing or non-finite (a checkpoint saved before this rule), so one bad validation cannot
    freeze the selection."""
    value = val.get(run.eval.select_metric)
    if value is None:
        return True
    if not math.isfinite(value):
        return False
    if state.best_value is None or not math.isfinite(state.best_value):
        return True
    return value > state.best_value if run.eval.select_mode == "max" else value < state.best_value


def maybe_inject_fault(fault: dict[str, int] | None, rank: int, step: int, resumed: bool) -> None:
    """For the fault-tolerance test: on the first attempt, kill this worker process at a given step.

    It waits first for Ray Train's controller to have collected the reports before this step (it
    polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a worker killed
    sooner takes its last checkpoint report with it, and the restart begins at step 0."""
    if fault and not resumed and rank == fault["rank"] and step == fault["step"]:
        time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
        os.kill(os.getpid(), signal.SIGKILL)
