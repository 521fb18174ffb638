"""Evaluation across the ranks of a run, and the run's final artifacts.

Every rank runs every forward (ZeRO-3 gathers weights collectively), so an evaluation set is
sharded over the ranks (`shard_loader`: padded by wrapping, so that every rank runs as many
batches) and the rows are gathered back in dataset order (`gather_in_order`). On that:
`sharded_predictive` (`melora.evaluation.predict_with_entropy` over all ranks), `validate` (the
`val/<metric>` of the loop), `evaluate_final` (test and OOD metrics of the best adapter, with
temperature scaling for TS) and `write_final_artifacts`. The LAP step (`train.laplace`) shards
and gathers with the same two functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import melora
from melora import metrics as M
from melora.baselines.temperature import apply_temperature, fit_temperature
from melora.evaluation import (
    Predictive,
    metrics_of,
    predict_with_entropy,
    uncertainty_metrics_of,
)
from melora.keys import predictions_key, val_key
from melora.tasks import make_loader
from orchestrator.config import RunConfig
from orchestrator.train.data import TaskData
from orchestrator.train.objective import reseed


# ----- sharding and gathering ------------------------------------------------------------------
def shard_loader(data: TaskData, dataset, batch_size: int) -> tuple[list[int], Any]:
    """(indices, loader): this rank's slice of `dataset`, padded by wrapping so that every rank
    runs the same number of batches of `batch_size`."""
    n = len(dataset)
    per_rank = math.ceil(n / (data.world * batch_size)) * batch_size
    indices = [(data.rank * per_rank + i) % n for i in range(per_rank)]
    loader = make_loader(
        dataset.select(indices), data.tokenizer, batch_size, max_length=data.run.task.max_length
    )
    return indices, loader


def gather_in_order(
    indices: list[int], columns: Sequence[torch.Tensor], world: int
) -> list[torch.Tensor]:
    """Each column (one row per entry of `indices`) gathered over the ranks, rows in dataset
    order, each example once (the padding of `shard_loader` repeats examples: the first rank's
    row is kept). One `all_gather_object` when `world` > 1."""
    mine = (indices, tuple(columns))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    by_index: dict[int, tuple[torch.Tensor, ...]] = {}
    for idx, cols in gathered:
        for i, *row in zip(idx, *cols, strict=True):
            by_index.setdefault(i, tuple(row))
    order = sorted(by_index)
    return [torch.stack([by_index[i][c] for i in order]) for c in range(len(columns))]


def sharded_predictive(module: nn.Module, data: TaskData, dataset, n_samples: int) -> Predictive:
    """`melora.evaluation.predict_with_entropy` over all ranks: each predicts its shard; the shards
    (probabilities, labels and per-example expected entropies) are gathered in dataset order."""
    indices, loader = shard_loader(data, dataset, data.run.eval.batch_size)
    local = predict_with_entropy(module, loader, n_samples)
    probs, labels, entropy = gather_in_order(
        indices, (local.probs, local.labels, local.expected_entropy), data.world
    )
    return Predictive(probs=probs, labels=labels, expected_entropy=entropy, draws=local.draws)


# ----- the evaluations of a run ----------------------------------------------------------------
def validate(engine, data: TaskData, run: RunConfig) -> dict[str, float]:
    """`val/<metric>` on the validation split at N = eval.val_n_samples ({} without a validation split)."""
    if data.validation is None:
        return {}
    n = run.eval.val_n_samples if run.adapter.samples_at_test else 0
    pred = sharded_predictive(engine.module, data, data.validation, n)
    return {
        val_key(k): v for k, v in M.compute_all(pred.probs, pred.labels, run.eval.ece_bins).items()
    }


def evaluate_final(
    engine, data: TaskData, run: RunConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """`test/<task>/<metric>_n<N>` and `ood/<task>/<metric>_n<N>` (with `auroc`) at every N,
    and the predictions `{"test/<task>/n<N>": (probs, labels), ...}` for the reliability diagrams.

    Metrics: acc, nll, ece, brier, and the selective-prediction aurc and acc_cov80 at every N;
    mi (mean mutual information) at N >= 2 and, on OOD sets, auroc (max probability) at every N
    and auroc_mi (by MI) at N >= 2 (`melora.evaluation.metrics_of`, `uncertainty_metrics_of`,
    as `melora.evaluation.evaluate_run` computes them on one process).
    Only methods that sample at test (BLoB, Me-LoRA, MCD: `AdapterConfig.samples_at_test`) draw
    at N >= 1; LoRA's rows at every N are its mean (dropout-free) prediction, without mi."""
    out: dict[str, float] = {}
    calibrate = temperature_scaling(engine.module, data, run, out)
    task = run.task.name
    test: dict[str, Predictive] = {}
    ood: dict[str, Predictive] = {}
    for n in run.eval.n_samples:  # in this order: the draws of every set at N follow one reseed
        drawn = n if run.adapter.samples_at_test else 0
        reseed(run.seed, 10**9 + drawn, data.rank)
        test[predictions_key("test", task, n)] = calibrate(
            sharded_predictive(engine.module, data, data.test, drawn)
        )
        for name, dataset in data.ood.items():
            ood[predictions_key("ood", name, n)] = calibrate(
                sharded_predictive(engine.module, data, dataset, drawn)
            )
    test_pairs = {k: (p.probs, p.labels) for k, p in test.items()}
    ood_pairs = {k: (p.probs, p.labels) for k, p in ood.items()}
    bins = run.eval.ece_bins
    out.update(metrics_of(test_pairs, bins))
    out.update(metrics_of(ood_pairs, bins, id_predictions=test_pairs, id_task=task))
    out.update(uncertainty_metrics_of(test))
    out.update(uncertainty_metrics_of(ood, id_predictions=test, id_task=task))
    return out, {**test_pairs, **ood_pairs}


def temperature_scaling(module: nn.Module, data: TaskData, run: RunConfig, out: dict[str, float]):
    """For adapter.method 'ts': one temperature T fitted on the validation split's mean
    predictive (`melora.baselines.temperature`), logged as `temperature`; returns the map from a
    `Predictive` to its temperature-scaled one (its expected entropy becomes the entropy of the
    scaled probabilities: one deterministic draw). Other methods: the identity."""
    if run.adapter.method != "ts":
        return lambda pred: pred
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
    # why: matplotlib is heavy, and only rank 0 draws, once at the end
    from melora.plots import accuracy_coverage_plot, reliability_diagrams  # why: see above

    melora.save_adapter(module, out / "adapter")
    melora.export_mean_lora(module, out / "peft_lora")
    reliability_diagrams(predictions, out / "reliability", n_bins=run.eval.ece_bins)
    task = run.task.name
    curves = {
        f"N={n}": predictions[predictions_key("test", task, n)]
        for n in run.eval.n_samples
        if predictions_key("test", task, n) in predictions
    }
    if curves:
        accuracy_coverage_plot(
            curves,
            out / "selective" / f"test_{task}.png",
            title=f"test/{task}: selective prediction",
        )
    (out / "config").mkdir()
    (out / "config" / "resolved.yaml").write_text(run.to_yaml())
