"""The per-worker training loop (Ray Train), readable top to bottom.

    train_loop_per_worker(config)
      setup:     model + tokenizer, melora.attach, the task's loaders, DeepSpeed, resume
      train:     per step: NLL (+ weighted KL), AdamW through DeepSpeed, [SGD on the KL]
      validate:  every eval_every steps: val metrics, a checkpoint, report to Ray Train
      finish:    load the best adapter, evaluate test and OOD sets at N = 0, 1, 10, log to MLflow

Every rank runs every forward (ZeRO-3 gathers weights collectively), so evaluation is sharded
over the ranks and gathered. Rank 0 alone talks to MLflow (through `orchestrator.tracking`).
The posterior noise and dropout draw from torch's global RNG, reseeded at every step from
(seed, step, rank), so a run resumed from a checkpoint repeats the draws of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

import melora
from melora import metrics as M
from melora.errors import ConfigError, MeLoraError
from melora.evaluation import (
    Predictive,
    class_logits,
    predict_with_entropy,
    uncertainty_metrics_of,
)
from melora.objective import draw_prior_eps, kl_weight
from melora.tasks import demo_model_config, demo_tokenizer, load_task, make_loader
from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.errors import NonFiniteLossError, TrackingError
from orchestrator.train import collectives
from orchestrator.train.deepspeed_config import deepspeed_config

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


# ----- the loop ---------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"run": RunConfig dict, "mlflow_run_id", "tracking_uri", ...}."""
    run = RunConfig.from_dict(config["run"])
    if run.adapter.method == "ens":
        raise ValueError(
            "adapter.method='ens' is not one training run: train its LoRA members and evaluate "
            "them together with orchestrator.ensemble.fit_ensemble (the sweep does this)"
        )
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(run, ctx.get_local_rank())  # refuses use_gpu without CUDA
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    import datasets
    import deepspeed

    datasets.disable_progress_bars()
    logger = RankZeroLogger(
        rank, config.get("tracking_uri"), config.get("mlflow_run_id"), spool_dir=run_folder(ctx)
    )

    # --- setup. A user error here (config, data, tokenizer, adapter targets) ends the run FAILED
    # on every rank at once: a retry by Ray Train would fail the same way.
    try:
        ds_config = deepspeed_config(run, world_size=world, on_gpu=on_gpu)
        tokenizer, model = build_model(run, ds_config, on_gpu)
        torch.manual_seed(run.seed)  # the same adapter initialisation on every rank
        melora.attach(model, run.adapter)
        data = TaskData(run, tokenizer, rank, world)
        setup_error = None
    except MeLoraError as err:
        setup_error = f"rank {rank}: {type(err).__name__}: {err}"
    reason = collectives.first_error(setup_error)
    if reason is not None:
        logger.fail(reason)
        ray.train.report({"failed": reason, "step": 0})
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=run.optim.lr, weight_decay=run.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    state = TrainState()
    best_adapter: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state, best_adapter = restore(engine, Path(ckpt_dir), rank)
        logger.print(f"resumed at step {state.step} from {checkpoint.path}")
    objective = Objective(engine, run, batches_per_epoch=len(data.train_loader), rank=rank)

    # --- train
    progress = Progress(run.optim.max_steps, state.step, logger)
    batches = data.train_batches(start_step=state.step)
    log_every = max(1, min(run.eval.eval_every, run.optim.max_steps) // 10)
    while state.step < run.optim.max_steps:
        try:
            train_metrics = objective.step(state.step, batches)
        except NonFiniteLossError as err:
            logger.fail(
                str(err)
            )  # MLflow: FAILED with the reason; the run stops, it is not retried
            ray.train.report({"failed": str(err), "step": state.step})
            return
        state.step += 1
        if state.step % log_every == 0 or state.step == run.optim.max_steps:
            logger.log_metrics(train_metrics, state.step)
            progress.update(state.step, train_metrics)
        maybe_inject_fault(config.get("fault"), rank, state.step, checkpoint is not None)
        if state.step % run.eval.eval_every == 0 or state.step == run.optim.max_steps:
            val = validate(engine, data, run)
            logger.log_metrics(val, state.step)
            if is_better(run, val, state):
                state.best_value, state.best_step = val.get(run.eval.select_metric), state.step
                best_adapter = gathered_adapter_state(engine.module)
            state.history.append({"step": state.step, **val})
            save_and_report(
                engine, state, best_adapter, {**train_metrics, **val, "step": state.step}, rank
            )

    # --- finish: the best adapter on the test and OOD sets (LAP: its Laplace predictive)
    load_adapter_state(engine.module, best_adapter)
    if run.adapter.method == "lap":
        from orchestrator.train.laplace import evaluate_final_laplace

        final, predictions = evaluate_final_laplace(engine.module, data, run)
    else:
        final, predictions = evaluate_final(engine, data, run)
    final["best_step"] = state.best_step or state.step
    with tempfile.TemporaryDirectory() as tmp, gathered(engine.module):
        if rank == 0:
            write_final_artifacts(Path(tmp), engine.module, predictions, run)
        logger.finish(final, Path(tmp), state.step)
    ray.train.report({**final, "step": state.step})


# ----- the objective --------------------------------------------------------------------------------
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
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_local_fp32_param

    if getattr(params[0]._z3_optimizer, "offload_optimizer", False):
        raise MeLoraError(
            "optim.kl_optimizer='sgd' under ZeRO-3 writes DeepSpeed's fp32 partitions in place, "
            "which optimizer offload keeps elsewhere; orchestrator.deepspeed_config never offloads"
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


# ----- model and data -------------------------------------------------------------------------------
def worker_device(run: RunConfig, local_rank: int) -> torch.device:
    """This worker's device: GPU `local_rank` with `scaling.use_gpu`, else the CPU.

    `use_gpu` where torch sees no usable CUDA is refused: falling back to the CPU would train a
    13B model in fp32 on CPUs for days, without a word.
    """
    if not run.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "scaling.use_gpu=true, but this Ray Train worker sees no usable CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install a CUDA "
            "build of torch and a working driver on the GPU nodes, or set scaling.use_gpu: false "
            "to train on CPUs"
        )
    return torch.device("cuda", local_rank)


def build_model(run: RunConfig, ds_config: dict[str, Any], on_gpu: bool) -> tuple[Any, nn.Module]:
    """(tokenizer, model): the demo's tiny random Llama, or `from_pretrained` (hub id or folder).

    Base weights are bf16 on GPU ('auto') and fp32 on CPU. Under ZeRO-3 they load partitioned:
    `HfDeepSpeedConfig` is alive while `from_pretrained` runs, so no process holds the whole model.
    `trust_remote_code` is never set.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = torch.bfloat16 if run.model.resolved_dtype(on_gpu) == "bfloat16" else torch.float32
    tokenizer = load_tokenizer(run.model.name_or_path)
    if run.model.name_or_path == "demo":
        torch.manual_seed(0)  # one fixed "pretrained" demo model, whatever the run's seed
        model = LlamaForCausalLM(demo_model_config(tokenizer)).to(dtype)
    else:
        keep_alive = None
        if run.scaling.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            init_deepspeed_comm()  # zero.Init inside from_pretrained reads the world size from it
            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must live during from_pretrained
        model = AutoModelForCausalLM.from_pretrained(
            run.model.name_or_path, dtype=dtype, trust_remote_code=False
        )
        del keep_alive
    if run.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer: the demo's, or `AutoTokenizer.from_pretrained` (left padding; EOS pads
    when the tokenizer has no pad token). The driver's pre-flight check loads the same one."""
    if name_or_path == "demo":
        return demo_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def init_deepspeed_comm() -> None:
    """Give DeepSpeed's comm layer the process group Ray Train already made (gloo or NCCL).

    `deepspeed.initialize` would do this itself, but a ZeRO-3 `from_pretrained` runs before it:
    there `deepspeed.zero.Init` parses the DeepSpeed config while `deepspeed.comm` is still
    uninitialised, takes world size 1 and fails the batch check (`train_batch_size ... !=
    micro_batch * grad_acc * world_size`) on every rank. `dist_init_required=False`: DeepSpeed
    wraps the existing group and never creates one. A no-op without a process group.
    """
    if not collectives.distributed():
        return
    import deepspeed

    deepspeed.init_distributed(dist_init_required=False)


class TaskData:
    """The task's loaders: the training split sharded over ranks, evaluation sets sharded and padded."""

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

    def shard_loader(self, dataset):
        """This rank's slice of `dataset`, padded so that every rank runs the same number of batches."""
        n, bs = len(dataset), self.run.eval.batch_size
        per_rank = math.ceil(n / (self.world * bs)) * bs
        indices = [(self.rank * per_rank + i) % n for i in range(per_rank)]
        return indices, make_loader(
            dataset.select(indices), self.tokenizer, bs, max_length=self.run.task.max_length
        )


def sharded_predict(
    module: nn.Module, data: TaskData, dataset, n_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`melora.evaluation.predict` over all ranks: (probs, labels) of `sharded_predictive`."""
    result = sharded_predictive(module, data, dataset, n_samples)
    return result.probs, result.labels


def sharded_predictive(module: nn.Module, data: TaskData, dataset, n_samples: int) -> Predictive:
    """`melora.evaluation.predict_with_entropy` over all ranks: each predicts its shard; the shards
    (probabilities, labels and per-example expected entropies) are gathered in dataset order."""
    indices, loader = data.shard_loader(dataset)
    local = predict_with_entropy(module, loader, n_samples)
    mine = (indices, local.probs, local.labels, local.expected_entropy)
    if data.world > 1:
        gathered: list[Any] = [None] * data.world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    by_index: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for idx, p, y, h in gathered:
        for i, row_p, row_y, row_h in zip(idx, p, y, h, strict=True):
            by_index.setdefault(i, (row_p, row_y, row_h))  # the padding repeats examples
    rows = [by_index[i] for i in sorted(by_index)]
    return Predictive(
        probs=torch.stack([r[0] for r in rows]),
        labels=torch.stack([r[1] for r in rows]),
        expected_entropy=torch.stack([r[2] for r in rows]),
        draws=local.draws,
    )


def validate(engine, data: TaskData, run: RunConfig) -> dict[str, float]:
    """`val/<metric>` on the validation split at N = eval.val_n_samples ({} without a validation split)."""
    if data.validation is None:
        return {}
    n = run.eval.val_n_samples if run.adapter.samples_at_test else 0
    probs, labels = sharded_predict(engine.module, data, data.validation, n)
    return {f"val/{k}": v for k, v in M.compute_all(probs, labels, run.eval.ece_bins).items()}


def evaluate_final(
    engine, data: TaskData, run: RunConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """`test/<task>/<metric>_n<N>` and `ood/<task>/<metric>_n<N>` (with `auroc`) at every N,
    and the predictions `{"test/<task>/n<N>": (probs, labels), ...}` for the reliability diagrams.

    Metrics: acc, nll, ece, brier, and the selective-prediction aurc and acc_cov80 at every N;
    mi (mean mutual information) at N >= 2 and, on OOD sets, auroc (max probability) at every N
    and auroc_mi (by MI) at N >= 2 (`melora.evaluation.uncertainty_metrics_of`).
    Only methods that sample at test (BLoB, Me-LoRA, MCD: `AdapterConfig.samples_at_test`) draw
    at N >= 1; LoRA's rows at every N are its mean (dropout-free) prediction, without mi."""
    out: dict[str, float] = {}
    predictions: dict[str, Any] = {}
    calibrate = temperature_scaling(engine.module, data, run, out)
    for n in run.eval.n_samples:
        drawn = n if run.adapter.samples_at_test else 0
        reseed(run.seed, 10**9 + drawn, data.rank)
        test_key = f"test/{run.task.name}/n{n}"
        id_pred = calibrate(sharded_predictive(engine.module, data, data.test, drawn))
        predictions[test_key] = (id_pred.probs, id_pred.labels)
        for k, v in M.compute_all(id_pred.probs, id_pred.labels, run.eval.ece_bins).items():
            out[f"test/{run.task.name}/{k}_n{n}"] = v
        out.update(uncertainty_metrics_of({test_key: id_pred}))
        for name, dataset in data.ood.items():
            pred = calibrate(sharded_predictive(engine.module, data, dataset, drawn))
            predictions[f"ood/{name}/n{n}"] = (pred.probs, pred.labels)
            for k, v in M.compute_all(pred.probs, pred.labels, run.eval.ece_bins).items():
                out[f"ood/{name}/{k}_n{n}"] = v
            out[f"ood/{name}/auroc_n{n}"] = M.ood_auroc(id_pred.probs, pred.probs)
            out.update(
                uncertainty_metrics_of(
                    {f"ood/{name}/n{n}": pred}, {test_key: id_pred}, run.task.name
                )
            )
    return out, predictions


def temperature_scaling(module: nn.Module, data: TaskData, run: RunConfig, out: dict[str, float]):
    """For adapter.method 'ts': one temperature T fitted on the validation split's mean
    predictive (`melora.baselines.temperature`), logged as `temperature`; returns the map from a
    `Predictive` to its temperature-scaled one (its expected entropy becomes the entropy of the
    scaled probabilities: one deterministic draw). Other methods: the identity."""
    if run.adapter.method != "ts":
        return lambda pred: pred
    from melora.baselines.temperature import apply_temperature, fit_temperature

    val = sharded_predictive(module, data, data.validation, 0)
    temperature = fit_temperature(val.probs, val.labels)
    out["temperature"] = temperature

    def scale(pred: Predictive) -> Predictive:
        probs = apply_temperature(pred.probs, temperature)
        entropy = torch.from_numpy(M.entropy(probs)).to(pred.expected_entropy.dtype)
        return dataclasses.replace(pred, probs=probs, expected_entropy=entropy, draws=1)

    return scale


def write_final_artifacts(
    out: Path, module: nn.Module, predictions: dict[str, Any], run: RunConfig
) -> None:
    """The run's artifacts: the (best) adapter, its PEFT export, reliability diagrams, the
    accuracy-coverage curves of the ID test set (`selective/test_<task>.png`, one curve per N),
    the resolved YAML."""
    from melora.plots import accuracy_coverage_plot, reliability_diagrams

    melora.save_adapter(module, out / "adapter")
    melora.export_mean_lora(module, out / "peft_lora")
    reliability_diagrams(predictions, out / "reliability", n_bins=run.eval.ece_bins)
    task = run.task.name
    curves = {
        f"N={n}": predictions[f"test/{task}/n{n}"]
        for n in run.eval.n_samples
        if f"test/{task}/n{n}" in predictions
    }
    if curves:
        accuracy_coverage_plot(
            curves,
            out / "selective" / f"test_{task}.png",
            title=f"test/{task}: selective prediction",
        )
    (out / "config").mkdir()
    (out / "config" / "resolved.yaml").write_text(run.to_yaml())


# ----- optimisation helpers ---------------------------------------------------------------------------
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


# ----- checkpoints -----------------------------------------------------------------------------------------
@contextmanager
def gathered(module: nn.Module):
    """Inside: the adapter parameters whole on every rank (ZeRO-3 partitions them outside a forward)."""
    params = [p for _, p in melora.adapter_parameters(module)]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

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
    import ray.train

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
    from safetensors.torch import load_file

    engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False)
    state = TrainState(**json.loads((ckpt_dir / STATE_FILE).read_text()))
    best = load_file(str(ckpt_dir / BEST_ADAPTER_DIR / melora.adapters.ADAPTER_WEIGHTS))
    return state, best


def maybe_inject_fault(fault: dict[str, int] | None, rank: int, step: int, resumed: bool) -> None:
    """For the fault-tolerance test: on the first attempt, kill this worker process at a given step."""
    if fault and not resumed and rank == fault["rank"] and step == fault["step"]:
        os.kill(os.getpid(), signal.SIGKILL)


# ----- rank-0 logging --------------------------------------------------------------------------------------
def run_folder(ctx) -> Path | None:
    """The Ray Train run's folder (<storage_path>/<run name>: its checkpoints, melora_run.json)
    when the storage is a folder (local or mounted, such as EFS); None for remote storage (s3://).

    Read from Ray Train's StorageContext (a DeveloperAPI in Ray 2.60): the worker's own working
    folder is Ray's, so a relative tracking.storage_path cannot be resolved here."""
    try:
        import pyarrow.fs

        storage = ctx.get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return Path(storage.experiment_fs_path)
    except (AttributeError, ImportError):  # another Ray version: the logger says where it spools
        pass
    return None


class RankZeroLogger:
    """Progress lines and MLflow logging, from rank 0 only (a no-op elsewhere).

    Metrics go through a `tracking.MetricSpool` in the Ray Train run's folder (`spool_dir`):
    written to disk first and sent when MLflow answers, each with the timestamp and step it was
    logged with, so that a tracking server that goes away costs no point and blocks no step (one
    short call per back-off); a restarted worker sends first what the last one could not.
    The end of the run (`finish`, `fail`) waits up to `tracking.flush_wait_s()` (300 s;
    $MELORA_MLFLOW_FLUSH_WAIT_S) for MLflow to take the rest, the artifacts or the FAILED status;
    when it is still down the worker raises TrackingError (Ray Train may retry it from the last
    checkpoint, under scaling.max_failures), the metrics stay on disk and the error says how to
    send them. Artifacts are not spooled: they are uploaded at the end, retried within that wait,
    and a run resumed from its last checkpoint uploads them again. From its start to `finish` or
    `fail`, MLflow's system metrics of rank 0's node (CPU, memory, its GPUs) go to the run
    (`tracking.SystemMetrics`: here, where the GPUs are, not in the driver).
    """

    def __init__(
        self,
        rank: int,
        tracking_uri: str | None,
        run_id: str | None,
        spool_dir: str | os.PathLike | None = None,
    ) -> None:
        self.rank, self.uri, self.run_id = rank, tracking_uri, run_id
        self.active = rank == 0 and tracking_uri is not None and run_id is not None
        self.spool: tracking.MetricSpool | None = None
        self.system_metrics: tracking.SystemMetrics | None = None
        self._reachable = True
        if self.active:
            if spool_dir is None:
                spool_dir = Path(tempfile.gettempdir()) / "melora_mlflow_spool" / run_id
                self.print(
                    f"the run's storage is not a folder: metrics waiting for MLflow are kept in "
                    f"{spool_dir} on this node only"
                )
            self.spool = tracking.MetricSpool(spool_dir, tracking_uri, run_id)
            if self.spool.pending:
                self.print(
                    f"{len(self.spool.pending)} metric records that an earlier attempt could not "
                    f"send are in {self.spool.path}: sending them"
                )
            self._note(self.spool.send())
            self.system_metrics = tracking.start_system_metrics(tracking_uri, run_id)

    def print(self, line: str) -> None:
        if self.rank == 0:
            print(f"[melora] {line}", flush=True)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.active and values:
            self._note(self.spool.add(values, step))

    def fail(self, reason: str) -> None:
        """End the MLflow run FAILED with `reason`, after sending the metrics so far. When MLflow
        stays unreachable for `tracking.flush_wait_s()`, a TrackingError that carries `reason`."""
        self.print(f"FAILED: {reason}")
        if not self.active:
            return
        if self.system_metrics is not None:
            self.system_metrics.stop()
        wait = tracking.flush_wait_s()
        deadline = time.monotonic() + wait
        self.spool.flush(wait)
        try:
            tracking.call_until(
                lambda: tracking.set_terminated(self.uri, self.run_id, "FAILED", reason),
                max(0.0, deadline - time.monotonic()),
            )
        except Exception as err:
            if not tracking.is_transient(err):
                raise
            raise TrackingError(
                f"{reason}; and MLflow at {tracking.redact_uri(self.uri)} could not be reached for "
                f"{wait:g} s to mark run {self.run_id} FAILED ({err}). "
                + self.spool.unsent_message()
            ) from err

    def finish(self, final: dict[str, float], artifacts: Path, step: int) -> None:
        """Log the final metrics and every artifact folder written by `write_final_artifacts`,
        waiting up to `tracking.flush_wait_s()` for MLflow to take them and everything pending."""
        if self.rank != 0:
            return
        shown = {k: v for k, v in final.items() if k.endswith(("acc_n0", "ece_n0", "nll_n0"))}
        self.print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if not self.active:
            return
        if self.system_metrics is not None:
            self.system_metrics.stop()
        wait = tracking.flush_wait_s()
        deadline = time.monotonic() + wait
        self.log_metrics(final, step)
        if not self.spool.flush(wait):
            raise TrackingError(
                f"MLflow at {tracking.redact_uri(self.uri)} could not be reached for {wait:g} s at "
                f"the end of the run ({self.spool.last_error}; ${tracking.FLUSH_WAIT_ENV} sets "
                "the wait): " + self.spool.unsent_message()
            )
        self._note(True)
        for sub in sorted(p.name for p in artifacts.iterdir()):
            try:
                tracking.call_until(
                    lambda sub=sub: tracking.log_artifacts(
                        self.uri, self.run_id, artifacts / sub, sub
                    ),
                    max(0.0, deadline - time.monotonic()),
                    timeout_s=tracking.ARTIFACT_TIMEOUT_S,
                )
            except Exception as err:
                if not tracking.is_transient(err):
                    raise
                raise TrackingError(
                    f"MLflow at {tracking.redact_uri(self.uri)} took no artifact {sub!r} for "
                    f"{wait:g} s at the end of the run ({err}); the metrics are all sent. Rerun "
                    "the same command once it is back: the run resumes from its last checkpoint "
                    "in the same MLflow run and uploads its artifacts"
                ) from err

    def _note(self, sent: bool) -> None:
        """One line when MLflow stops taking metrics, one when it takes them again."""
        if sent == self._reachable:
            return
        self._reachable = sent
        where = tracking.redact_uri(self.uri)
        if sent:
            self.print(f"MLflow at {where} is back: the waiting metrics are sent")
        else:
            self.print(
                f"MLflow at {where} cannot be reached ({self.spool.last_error}): metrics are kept "
                f"in {self.spool.path} and sent when it is back; training goes on"
            )


class Progress:
    """One line per logging interval: step, NLL, KL and the estimated time left."""

    def __init__(self, total: int, start: int, logger: RankZeroLogger) -> None:
        self.total, self.start, self.logger, self.t0 = total, start, logger, time.monotonic()

    def update(self, step: int, values: dict[str, float]) -> None:
        done = step - self.start
        rate = (time.monotonic() - self.t0) / max(done, 1)
        eta = rate * (self.total - step)
        self.logger.print(
            f"step {step}/{self.total}  nll {values['train/nll']:.4f}  kl {values['train/kl']:.2f}  "
            f"lr {values['train/lr']:.2e}  {rate:.2f} s/step  eta {eta:.0f} s"
        )
