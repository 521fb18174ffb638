"""The evaluation of a run on its test and OOD sets: the predictive of every set at every N
(`melora.predictive`, whose names are importable from here as well), and its metrics.

Prediction keys are `<prefix>/<task>/n<N>` and metric keys `<prefix>/<task>/<metric>_n<N>`
(`melora.keys`, DESIGN.md), e.g. `test/arc_easy/ece_n10` and `ood/mmlu_college_physics/auroc_n0`
(MLflow refuses '@', hence `_n<N>`); the prefix is 'test' or 'ood'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from melora import metrics
from melora.errors import MeLoraError
from melora.keys import FINAL_SPLITS, final_key, parse_predictions_key, predictions_key
from melora.predictive import (
    Batch,
    Predictive,
    class_logits,
    predict,
    predict_ensemble,
    predict_with_entropy,
)

__all__ = [  # this module's own names, and those of `melora.predictive` its callers import here
    "DEFAULT_N_SAMPLES",
    "Batch",
    "Model",
    "Predictions",
    "Predictive",
    "RunEvaluation",
    "class_logits",
    "evaluate",
    "evaluate_run",
    "metrics_of",
    "predict",
    "predict_ensemble",
    "predict_sets",
    "predict_with_entropy",
    "resolve_id_task",
    "uncertainty_metrics_of",
]

Model = nn.Module | Sequence[nn.Module]  # one model, or the members of an ensemble

DEFAULT_N_SAMPLES = (0, 1, 10)  # mean adapter, the paper's "sampled once", BLoB's default


def _predict_any(model: Model, loader: Iterable[Batch], n_samples: int) -> tuple[Tensor, Tensor]:
    if isinstance(model, nn.Module):
        return predict(model, loader, n_samples)
    return predict_ensemble(model, loader, n_samples)


Predictions = dict[str, tuple[Tensor, Tensor]]
"""Predictive outputs keyed `<prefix>/<task>/n<N>` -> (probs, labels)."""


def predict_sets(
    model: Model,
    loaders: Mapping[str, Iterable[Batch]],
    n_samples: Sequence[int] = DEFAULT_N_SAMPLES,
    prefix: str = "test",
) -> Predictions:
    """Run `predict` (or `predict_ensemble` for a list of models) on every set at every N."""
    return {
        predictions_key(prefix, task, n): _predict_any(model, loader, n)
        for task, loader in loaders.items()
        for n in n_samples
    }


def metrics_of(
    predictions: Predictions,
    n_bins: int = 15,
    id_predictions: Predictions | None = None,
    id_task: str | None = None,
) -> dict[str, float]:
    """ACC, NLL, ECE, Brier for each entry `<prefix>/<task>/n<N>` as `<prefix>/<task>/<metric>_n<N>`.

    With `id_predictions` and `id_task` (the in-distribution set, keyed `test/<id_task>/n<N>`),
    each entry also gets `<prefix>/<task>/auroc_n<N>`: `metrics.ood_auroc` of the ID set's
    probabilities at the same N against this set's.
    """
    out: dict[str, float] = {}
    for key, (probs, labels) in predictions.items():
        split, task, n = parse_predictions_key(key)
        for name, value in metrics.compute_all(probs, labels, n_bins).items():
            out[final_key(split, task, name, n)] = value
        if id_predictions is not None:
            id_probs, _ = id_predictions[_id_key(id_predictions, id_task, n)]
            out[final_key(split, task, "auroc", n)] = metrics.ood_auroc(id_probs, probs)
    return out


def uncertainty_metrics_of(
    predictions: Mapping[str, Predictive | tuple[Tensor, Tensor]],
    id_predictions: Mapping[str, Predictive | tuple[Tensor, Tensor]] | None = None,
    id_task: str | None = None,
) -> dict[str, float]:
    """Selective prediction and the uncertainty decomposition of each entry `<prefix>/<task>/n<N>`:

    - `<prefix>/<task>/aurc_n<N>` and `acc_cov80_n<N>` for every entry (`melora.metrics.selective`:
      the area under the risk-coverage curve, and the accuracy of the 80% most confident examples);
    - `<prefix>/<task>/mi_n<N>`, the mean mutual information (`metrics.mean_mutual_information`),
      for a `Predictive` that averaged `draws` >= 2 softmaxes: with one draw (N = 0 or 1, or a
      method that does not sample at test) MI is identically 0 and is not reported;
    - with `id_predictions` and `id_task`: `<prefix>/<task>/auroc_mi_n<N>`, `metrics.ood_auroc_mi`
      against the ID set at the same N, when both have MI.
    Plain (probs, labels) entries (an ensemble's) get the selective metrics only.
    """
    out: dict[str, float] = {}
    for key, value in predictions.items():
        split, task, n = parse_predictions_key(key)
        probs, labels = value[:2] if isinstance(value, tuple) else (value.probs, value.labels)
        for name, number in metrics.selective(probs, labels).items():
            out[final_key(split, task, name, n)] = number
        if not isinstance(value, Predictive) or value.draws < 2:
            continue
        out[final_key(split, task, "mi", n)] = metrics.mean_mutual_information(
            value.probs, value.expected_entropy
        )
        if id_predictions is not None:
            ref = id_predictions[_id_key(id_predictions, id_task, n)]
            if isinstance(ref, Predictive) and ref.draws >= 2:
                out[final_key(split, task, "auroc_mi", n)] = metrics.ood_auroc_mi(
                    ref.probs, ref.expected_entropy, value.probs, value.expected_entropy
                )
    return out


def _id_key(id_predictions: Mapping[str, Any], id_task: str | None, n: int) -> str:
    """The one key of `id_predictions` that holds task `id_task` at N = `n` (in either split)."""
    wanted = {predictions_key(split, str(id_task), n) for split in FINAL_SPLITS}
    matches = [k for k in id_predictions if k in wanted]
    if len(matches) != 1:
        raise MeLoraError(
            f"no in-distribution predictions for task {id_task!r} at n{n}: "
            f"available are {sorted(id_predictions)}"
        )
    return matches[0]


def evaluate(
    model: Model,
    loaders: Mapping[str, Iterable[Batch]],
    n_samples: Sequence[int] = DEFAULT_N_SAMPLES,
    prefix: str = "test",
    n_bins: int = 15,
) -> dict[str, float]:
    """`{"<prefix>/<task>/<metric>_n<N>": value}` for every set, N and metric (acc, nll, ece, brier)."""
    return metrics_of(predict_sets(model, loaders, n_samples, prefix), n_bins)


@dataclass
class RunEvaluation:
    """What `evaluate_run` measured: the metrics, and the predictions to draw diagrams from."""

    metrics: dict[str, float] = field(default_factory=dict)
    predictions: Predictions = field(default_factory=dict)

    def reliability_diagrams(self, out_dir: str | os.PathLike[str], n_bins: int = 15) -> list[Path]:
        """Write one reliability diagram per set and N (see `melora.plots.reliability_diagrams`)."""
        from melora.plots import reliability_diagrams  # why: matplotlib only when drawing

        return reliability_diagrams(self.predictions, out_dir, n_bins)


def evaluate_run(
    model: Model,
    test_loaders: Mapping[str, Iterable[Batch]],
    ood_loaders: Mapping[str, Iterable[Batch]] | None = None,
    id_task: str | None = None,
    *,
    n_samples: Sequence[int] = DEFAULT_N_SAMPLES,
    n_bins: int = 15,
) -> RunEvaluation:
    """Evaluate a trained model (or an ensemble) on every test set and every OOD set at each N.

    Keys: `test/<task>/<metric>_n<N>` and `ood/<task>/<metric>_n<N>` for acc, nll, ece, brier,
    aurc and acc_cov80, plus `ood/<task>/auroc_n<N>`, the AUROC of telling `test/<id_task>` from
    that OOD set by max probability at the same N. A single model that samples at test
    (`AdapterConfig.samples_at_test`) also gets `mi_n<N>` and, on OOD sets, `auroc_mi_n<N>` at
    N >= 2 (`uncertainty_metrics_of`). `id_task` may be left out when there is exactly one test set.
    """
    ood_loaders = ood_loaders or {}
    if ood_loaders:
        id_task = resolve_id_task(test_loaders, id_task)
    test = _predictive_sets(model, test_loaders, n_samples, prefix="test")
    ood = _predictive_sets(model, ood_loaders, n_samples, prefix="ood")
    test_pairs, ood_pairs = _pairs(test), _pairs(ood)
    result = metrics_of(test_pairs, n_bins)
    result.update(metrics_of(ood_pairs, n_bins, id_predictions=test_pairs, id_task=id_task))
    result.update(uncertainty_metrics_of(test))
    result.update(uncertainty_metrics_of(ood, id_predictions=test, id_task=id_task))
    return RunEvaluation(metrics=result, predictions={**test_pairs, **ood_pairs})


def _predictive_sets(
    model: Model, loaders: Mapping[str, Iterable[Batch]], n_samples: Sequence[int], prefix: str
) -> dict[str, Predictive | tuple[Tensor, Tensor]]:
    """`predict_sets`, with a `Predictive` per entry for a single model (an ensemble: pairs).

    A model whose adapters do not sample at test (LoRA) gives the same softmax at every draw:
    its entries count as one draw, so that no (identically 0) MI is reported for it."""
    if not isinstance(model, nn.Module):
        return predict_sets(model, loaders, n_samples, prefix)
    config = getattr(model, "melora_config", None)
    samples = config is not None and config.samples_at_test
    out: dict[str, Predictive | tuple[Tensor, Tensor]] = {}
    for task, loader in loaders.items():
        for n in n_samples:
            result = predict_with_entropy(model, loader, n)
            out[predictions_key(prefix, task, n)] = result if samples else replace(result, draws=1)
    return out


def _pairs(predictions: Mapping[str, Predictive | tuple[Tensor, Tensor]]) -> Predictions:
    return {
        k: v[:2] if isinstance(v, tuple) else (v.probs, v.labels) for k, v in predictions.items()
    }


def resolve_id_task(test_loaders: Mapping[str, Any], id_task: str | None) -> str:
    """The in-distribution test set the OOD AUROC compares against: `id_task`, checked to be
    one of `test_loaders`, or the one test set when it is left out."""
    if id_task is None:
        if len(test_loaders) != 1:
            raise MeLoraError(
                f"id_task is needed for the OOD AUROC when there are several test sets: "
                f"choose one of {sorted(test_loaders)}"
            )
        return next(iter(test_loaders))
    if id_task not in test_loaders:
        raise MeLoraError(
            f"id_task={id_task!r} is not a test set: choose one of {sorted(test_loaders)}"
        )
    return id_task
