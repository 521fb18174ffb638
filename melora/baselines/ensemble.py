"""Deep ensembles of LoRA adapters (ENS): the equal-weight average of the members' probabilities,

    p_ens(y | x) = (1/M) sum_m p_m(y | x),

with M = 3 LoRA members trained from seeds 1, 2, 3 (METHOD.md). The members are ordinary LoRA
runs. `predict_members` evaluates one base model with each member's adapter loaded in turn, so an
ensemble of M adapters needs the memory of one model (`melora.evaluation.predict_ensemble` does
the same over M models held at once).

Member seeds of distinct ensembles: ENS seed s has the members `ensemble_seeds(s, M)` =
M(s-1)+1 .. Ms, so ENS seed 1 is the paper's (1, 2, 3) and ENS seeds 1, 2, 3 use nine distinct LoRA
runs. The spread over ENS seeds is then the spread of independent ensembles; ensembles that share
members would understate it.

Uncertainty: the members are the draws of the ensemble's predictive. `evaluate_ensemble` logs the
selective-prediction metrics and, with M >= 2 deterministic (LoRA) members, the decomposition
total = H(p_ens), aleatoric = (1/M) sum_m H(p_m), epistemic = their difference (the mutual
information between the prediction and the member, `mi_n<N>`, and the OOD AUROC by it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from melora import metrics
from melora.adapters import adapter_config, load_adapter
from melora.errors import MeLoraError
from melora.evaluation import (
    DEFAULT_N_SAMPLES,
    Batch,
    Predictions,
    Predictive,
    RunEvaluation,
    metrics_of,
    predict_sets,
    resolve_id_task,
    uncertainty_metrics_of,
)

DEFAULT_SIZE = 3


def ensemble_seeds(seed: int, size: int = DEFAULT_SIZE) -> tuple[int, ...]:
    """The member seeds of ENS seed `seed`: size(seed-1)+1 .. size*seed (seed 1: (1, 2, 3))."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 1:
        raise MeLoraError(f"ensemble seed {seed!r} must be an integer >= 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MeLoraError(f"ensemble size {size!r} must be an integer >= 1")
    return tuple(range(size * (seed - 1) + 1, size * seed + 1))


def average_predictions(members: Sequence[Predictions]) -> Predictions:
    """Key by key, the mean of the members' probabilities; every member must have the same keys and labels."""
    if not members:
        raise MeLoraError("an ensemble needs at least one member's predictions")
    keys = list(members[0])
    out: Predictions = {}
    for key in keys:
        total, labels = None, None
        for i, member in enumerate(members):
            if key not in member:
                raise MeLoraError(f"ensemble member {i} has no predictions for {key!r}")
            probs, member_labels = member[key]
            if labels is None:
                total, labels = probs.double().clone(), member_labels
                continue
            if not torch.equal(member_labels, labels) or probs.shape != total.shape:
                raise MeLoraError(
                    f"ensemble member {i} predicted other examples than member 0 for {key!r}: "
                    "the loaders must yield the same examples in the same order for every member"
                )
            total += probs.double()
        out[key] = ((total / len(members)).float(), labels)
    return out


def predict_members(
    model: nn.Module,
    adapter_dirs: Sequence[str | os.PathLike],
    loaders: Mapping[str, Iterable[Batch]],
    n_samples: Sequence[int] = (0,),
    prefix: str = "test",
) -> Predictions:
    """The ensemble's predictions `{"<prefix>/<task>/n<N>": (probs, labels)}` on every loader.

    Loads each adapter folder (`melora.save_adapter`) into `model` in turn (the model keeps the
    last one) and averages the members' `predict_sets`. Members whose config does not sample at
    test (LoRA: `AdapterConfig.samples_at_test`) are predicted once with the mean adapter, and
    that prediction stands for every N.
    """
    return _predict_members(model, adapter_dirs, {prefix: loaders}, n_samples)[0]


def evaluate_ensemble(
    model: nn.Module,
    adapter_dirs: Sequence[str | os.PathLike],
    test_loaders: Mapping[str, Iterable[Batch]],
    ood_loaders: Mapping[str, Iterable[Batch]] | None = None,
    id_task: str | None = None,
    *,
    n_samples: Sequence[int] = DEFAULT_N_SAMPLES,
    n_bins: int = 15,
) -> RunEvaluation:
    """`melora.evaluation.evaluate_run` for an ensemble of adapters on one base model: the same
    keys (`test/<task>/<metric>_n<N>`, `ood/<task>/<metric>_n<N>` with `auroc`)."""
    ood_loaders = ood_loaders or {}
    if ood_loaders:
        id_task = resolve_id_task(test_loaders, id_task)
    both, predictive = _predict_members(
        model, adapter_dirs, {"test": test_loaders, "ood": ood_loaders}, n_samples
    )
    test = {k: v for k, v in both.items() if k.startswith("test/")}
    ood = {k: v for k, v in both.items() if k.startswith("ood/")}
    result = metrics_of(test, n_bins)
    result.update(metrics_of(ood, n_bins, id_predictions=test, id_task=id_task))
    test_pred = {k: v for k, v in predictive.items() if k.startswith("test/")}
    ood_pred = {k: v for k, v in predictive.items() if k.startswith("ood/")}
    result.update(uncertainty_metrics_of(test_pred))
    if ood_pred:
        result.update(uncertainty_metrics_of(ood_pred, test_pred, id_task))
    return RunEvaluation(metrics=result, predictions=both)


def members_predictive(members: Sequence[Predictions]) -> dict[str, Predictive]:
    """Key by key, the ensemble's `Predictive` with the members as its draws: probs = their mean,
    expected_entropy = the mean of their entropies, draws = the number of members."""
    averaged = average_predictions(members)
    out = {}
    for key, (probs, labels) in averaged.items():
        entropies = [metrics.entropy(member[key][0]) for member in members]
        expected = torch.tensor(sum(entropies) / len(members), dtype=torch.float64)
        out[key] = Predictive(probs, labels, expected, draws=len(members))
    return out


def _predict_members(
    model: nn.Module,
    adapter_dirs: Sequence[str | os.PathLike],
    sets: Mapping[str, Mapping[str, Iterable[Batch]]],
    n_samples: Sequence[int],
) -> tuple[Predictions, dict[str, Predictive]]:
    """Each member's adapter loaded once, predicted on every set of every prefix, then averaged:
    (the averaged predictions, and for deterministic members each key's `members_predictive`;
    members that sample at test average their own draws first, so their keys get none)."""
    if not adapter_dirs:
        raise MeLoraError("an ensemble needs at least one member adapter folder")
    config = adapter_config(model)
    sampled = tuple(n_samples) if config.samples_at_test else (0,)
    members = []
    for directory in adapter_dirs:
        load_adapter(model, directory)
        members.append(
            {
                key: value
                for prefix, loaders in sets.items()
                for key, value in predict_sets(model, loaders, sampled, prefix).items()
            }
        )
    averaged = average_predictions(members)
    if config.samples_at_test:
        return averaged, {}
    predictive = members_predictive(members)
    every_n = [  # deterministic members: the mean prediction stands for every N
        (f"{prefix}/{task}/n{n}", f"{prefix}/{task}/n0")
        for prefix, loaders in sets.items()
        for task in loaders
        for n in n_samples
    ]
    return (
        {key: averaged[n0] for key, n0 in every_n},
        {key: predictive[n0] for key, n0 in every_n},
    )
