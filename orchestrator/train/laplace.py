"""LAP as the last step of a trial: a KFAC Laplace approximation around the trained MAP adapter.

    final, predictions = evaluate_final_laplace(engine.module, data, run)   # in the worker

It replaces `dist_eval.evaluate_final` for `adapter.method: lap` and gives the same keys
(`test/<task>/<metric>_n<N>`, `ood/<task>/<metric>_n<N>` with `auroc`) plus `lap/*`:
N = 0 is the MAP prediction, N >= 1 the linearised (GLM) predictive with N logit samples
(`melora.baselines.laplace`).

Across Ray Train workers: laplace-torch fits in one process, so every rank fits the same KFAC
on the whole training set (the curvature is a sum over it; the fit is a small part of the
cost). The prior-precision gridsearch and the predictions, where the Jacobians cost most, are
sharded over the ranks: the validation NLL per grid value is summed over ranks, and the
predictions are sharded and gathered as `dist_eval.sharded_predictive`'s are. Rank 0's prior precision is broadcast,
so every rank predicts with the same posterior. ZeRO-3 is refused by config validation (the
weights must be whole); `jobs/evaluate.py --laplace <run>` is the way there.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from melora.baselines.laplace import LaplaceLoRA
from melora.evaluation import metrics_of, uncertainty_metrics_of
from melora.keys import predictions_key
from melora.tasks import make_loader
from orchestrator.config import RunConfig
from orchestrator.train import collectives
from orchestrator.train.data import TaskData
from orchestrator.train.dist_eval import gather_in_order, shard_loader

LAP_SEED_OFFSET = 2 * 10**9  # MC draws of the Laplace predictive: their own stream per (seed, rank)


def evaluate_final_laplace(
    module, data: TaskData, run: RunConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, predictions) of LAP around `module`'s current (best) adapter; see the module doc.

    `data` is the worker's `TaskData` (its `train`, `validation`, `test`, `ood` sets, `tokenizer`,
    `rank`, `world`). The module's LoRA layers are swapped for Laplace views during the step and
    put back after it.
    """
    cfg, t = run.laplace, run.task
    rank, world = data.rank, data.world
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + LAP_SEED_OFFSET + rank)
    fit_loader = make_loader(
        data.train, data.tokenizer, cfg.fit_batch_size, max_length=t.max_length
    )
    with LaplaceLoRA(module, cfg) as lap:
        lap.fit(fit_loader)
        val_loader = None
        if cfg.prior_tuning == "gridsearch":
            _, val_loader = shard_loader(data, data.validation, cfg.predict_batch_size)
        lap.tune_prior_precision(val_loader, all_reduce=sum_over_ranks(world), generator=generator)
        if world > 1:  # the same posterior on every rank, whatever rounding made of the fit
            lap.prior_precision = collectives.broadcast(lap.prior_precision.cpu(), src=0)
        t0 = time.perf_counter()
        n_samples = run.eval.n_samples
        test = _sharded_sets(
            lap, data, {t.name: data.test}, n_samples=n_samples, prefix="test", generator=generator
        )
        ood = _sharded_sets(
            lap, data, data.ood, n_samples=n_samples, prefix="ood", generator=generator
        )
        predict_seconds = time.perf_counter() - t0
        prior = lap.prior_precision
        memory = lap.memory_bytes()
        info = {
            "lap/prior_precision": float(prior.mean()),
            "lap/log_marglik": lap.log_marginal_likelihood(),
            "lap/fit_seconds": lap.fit_seconds or 0.0,
            "lap/tune_seconds": lap.tune_seconds or 0.0,
            "lap/predict_seconds": predict_seconds,
            "lap/kfac_bytes": float(memory["factors"]),
            "lap/kfac_eig_bytes": float(memory["eigendecomposition"]),
        }
    final = metrics_of(test, run.eval.ece_bins)
    final.update(metrics_of(ood, run.eval.ece_bins, id_predictions=test, id_task=t.name))
    final.update(uncertainty_metrics_of({**test, **ood}))  # selective prediction (no MI yet)
    final.update(info)
    return final, {**test, **ood}


def _sharded_sets(lap: LaplaceLoRA, data: TaskData, sets, *, n_samples, prefix: str, generator):
    """`{"<prefix>/<task>/n<N>": (probs, labels)}` over all ranks, rows in dataset order."""
    out = {}
    for name, dataset in sets.items():
        indices, loader = shard_loader(data, dataset, lap.config.predict_batch_size)
        local = lap.predict(loader, n_samples, generator)
        labels, *probs = gather_in_order(
            indices, [local[n_samples[0]][1], *(local[n][0] for n in n_samples)], data.world
        )
        for n, p in zip(n_samples, probs, strict=True):
            out[predictions_key(prefix, name, n)] = (p, labels)
    return out


def sum_over_ranks(world: int):
    """An in-place sum over the ranks (None for a single process)."""
    if world <= 1:
        return None

    def all_reduce(tensor: torch.Tensor) -> None:
        tensor.copy_(collectives.all_reduce(tensor))

    return all_reduce
