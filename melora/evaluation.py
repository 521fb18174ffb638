"""The N-sample predictive over answer tokens, and the evaluation of a run on its test and OOD sets.

A batch (as `melora.tasks`' collate makes it) is a dict with

- `input_ids` (B, T) long and `attention_mask` (B, T), left-padded, so position -1 is every
  row's last prompt token;
- `labels` (B,) long, the index of the right answer among the K answer tokens;
- `answer_token_ids` (K,) long, the token id of each answer ("A".."E", or "True"/"False");
- `choice_mask` (B, K) bool, True where the row has that choice (optional: all True if absent).

The class logits are the next-token logits at the last position restricted to the answer tokens,
with the choices a row does not have set to -inf (probability 0). The predictive with N samples is

    p(y | x) = (1/N) sum_{s=1..N} softmax(class_logits(x; theta_s)),   theta_s ~ q,

the average of N softmax vectors, not the softmax of averaged logits (METHOD.md). N = 0 is the
deterministic mean adapter. An ensemble averages its members' predictives with equal weights.
`predict_with_entropy` also keeps the mean over the draws of each draw's entropy, so that the
mutual information (epistemic uncertainty, `melora.metrics.mutual_information`) needs no more
than one (N_ex, K) tensor, whatever N.

Metric keys follow DESIGN.md: `<prefix>/<task>/<metric>_n<N>`, e.g. `test/arc_easy/ece_n10` and
`ood/mmlu_college_physics/auroc_n0` (MLflow refuses '@', hence `_n<N>`).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from melora import metrics
from melora.adapters import adapted_layers, sampling
from melora.errors import MeLoraError

Batch = Mapping[str, Any]
Model = nn.Module | Sequence[nn.Module]  # one model, or the members of an ensemble

DEFAULT_N_SAMPLES = (0, 1, 10)  # mean adapter, the paper's "sampled once", BLoB's default
_REQUIRED_KEYS = ("input_ids", "attention_mask", "labels", "answer_token_ids")


# ----- the predictive ------------------------------------------------------------------------
def class_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits over the answer tokens at the last position, float32, shape (B, K).

    `model(input_ids, attention_mask).logits[:, -1, :][:, answer_token_ids]`, with -inf where
    `choice_mask` is False. The batch's tensors are moved to the model's device.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in batch]
    if missing:
        raise MeLoraError(
            f"the batch lacks {missing}: batches must come from melora.tasks' collate "
            f"(keys {list(_REQUIRED_KEYS)} and optionally 'choice_mask')"
        )
    device = _device_of(model)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    answer_ids = torch.as_tensor(batch["answer_token_ids"], dtype=torch.long, device=device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **_last_logits_only(model))
    last = out.logits[:, -1, :]
    logits = last[:, answer_ids].float()
    choice_mask = batch.get("choice_mask")
    if choice_mask is not None:
        choice_mask = torch.as_tensor(choice_mask, dtype=torch.bool, device=device)
        if choice_mask.shape != logits.shape:
            raise MeLoraError(
                f"choice_mask has shape {tuple(choice_mask.shape)} but the class logits have "
                f"shape {tuple(logits.shape)} (batch x answer tokens)"
            )
        if not choice_mask.any(dim=1).all():
            raise MeLoraError(
                "a row of choice_mask has no True entry: every example needs a choice"
            )
        logits = logits.masked_fill(~choice_mask, float("-inf"))
    return logits


def _last_logits_only(model: nn.Module) -> dict[str, int]:
    """`{"logits_to_keep": 1}` where the model's forward takes it (Hugging Face causal LMs, also
    inside DeepSpeed's engine), else `{}`: only the last position's vocabulary logits are computed
    and kept, not batch x length x vocab of them (at Llama2's 32,000 tokens and length 300, 38 MB
    per example in fp32, for every one of the N forwards)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's module
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(inner)) else {}


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def predict(model: nn.Module, loader: Iterable[Batch], n_samples: int) -> tuple[Tensor, Tensor]:
    """The N-sample predictive over a loader: (probs (N_ex, K) float32, labels (N_ex,) long), on CPU.

    `n_samples = 0`: one forward per batch with the mean adapter (`melora.sampling(model, "mean")`).
    `n_samples = n >= 1`: n forwards per batch under `melora.sampling(model, "sample")`, and the
    mean of the n softmax vectors. The n forwards run one after another (not as one batch of n
    copies), because the "batch" sample granularity draws one C per forward: a batch of copies
    would share one draw. Draws come from torch's global RNG, in loader order, batch by batch.

    Runs under `torch.no_grad()` and `model.eval()`; the train/eval flag and every layer's
    sampling mode are restored afterwards. A model without adapters is accepted for
    `n_samples = 0` only (its plain deterministic forward). `predict_with_entropy` gives the
    same probabilities (the same draws) and the per-example expected entropy besides.
    """
    result = predict_with_entropy(model, loader, n_samples)
    return result.probs, result.labels


@dataclass(frozen=True)
class Predictive:
    """The N-sample predictive of one set, with the aleatoric part of its uncertainty.

    `probs` (N_ex, K) float32, the mean of the draws' softmaxes; `labels` (N_ex,) long;
    `expected_entropy` (N_ex,) float64, the mean over the draws of each draw's entropy in nats
    (`melora.metrics.expected_entropy`); `draws` = the softmaxes averaged per example,
    max(n_samples, 1). Mutual information is 0 by construction when `draws` is 1.
    """

    probs: Tensor
    labels: Tensor
    expected_entropy: Tensor
    draws: int

    def mutual_information(self) -> Tensor:
        """Per example H[mean softmax] - mean entropy, in nats (`melora.metrics.mutual_information`)."""
        return torch.from_numpy(metrics.mutual_information(self.probs, self.expected_entropy))


def predict_with_entropy(model: nn.Module, loader: Iterable[Batch], n_samples: int) -> Predictive:
    """`predict`, plus the per-example mean over the draws of each draw's entropy (a `Predictive`).

    Each draw's entropy -sum_k p_k log p_k (0 log 0 = 0) is computed in float64 from its softmax
    and summed on the fly, so no more than one (N_ex, K) tensor is kept for any N.
    """
    _check_n_samples(n_samples)
    probs, entropies, labels = [], [], []
    with _predictive_mode(model, n_samples), torch.no_grad():
        for batch in loader:
            batch_probs, batch_entropy = _batch_probs(model, batch, n_samples)
            probs.append(batch_probs.cpu())
            entropies.append(batch_entropy.cpu())
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long).cpu())
    if not probs:
        raise MeLoraError("the loader yielded no batches: there is nothing to evaluate")
    return Predictive(
        _concat_probs(probs), torch.cat(labels), torch.cat(entropies), max(n_samples, 1)
    )


def predict_ensemble(
    models: Sequence[nn.Module], loader: Iterable[Batch], n_samples: int = 0
) -> tuple[Tensor, Tensor]:
    """Equal-weight average of the members' predictives: (1/M) sum_m predict(model_m, loader, n).

    With n >= 1 this is the average of all M * n softmax vectors. The loader is iterated once per
    member, so it must yield the same examples in the same order each time (no shuffling):
    members whose labels disagree are an error.
    """
    if len(models) == 0:
        raise MeLoraError("predict_ensemble needs at least one member model")
    total, labels = predict(models[0], loader, n_samples)
    total = total.double()
    for i, member in enumerate(models[1:], start=1):
        probs, member_labels = predict(member, loader, n_samples)
        if not torch.equal(member_labels, labels):
            raise MeLoraError(
                f"ensemble member {i} saw different labels than member 0: the loader must yield "
                "the same examples in the same order on every pass (turn shuffling off)"
            )
        total += probs.double()
    return (total / len(models)).float(), labels


def _batch_probs(model: nn.Module, batch: Batch, n_samples: int) -> tuple[Tensor, Tensor]:
    """The mean of max(n_samples, 1) softmax vectors, one forward each, and the mean entropy."""
    draws = max(n_samples, 1)
    total = torch.softmax(class_logits(model, batch), dim=-1)
    entropy = _entropy(total)
    for _ in range(draws - 1):
        probs = torch.softmax(class_logits(model, batch), dim=-1)
        total += probs
        entropy += _entropy(probs)
    return total / draws, entropy / draws


def _entropy(probs: Tensor) -> Tensor:
    """-sum_k p_k log p_k per row in float64, 0 log 0 = 0 (`melora.metrics.entropy` in torch)."""
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(dim=-1)


@contextmanager
def _predictive_mode(model: nn.Module, n_samples: int) -> Iterator[None]:
    """model.eval() and the sampling mode for N = n_samples inside; both restored on exit."""
    has_adapters = next(adapted_layers(model), None) is not None
    if not has_adapters and n_samples > 0:
        raise MeLoraError(
            f"n_samples={n_samples} needs a model with adapters to sample from "
            "(melora.attach); use n_samples=0 for a model without adapters"
        )
    mode = "mean" if n_samples == 0 else "sample"
    was_training = model.training
    with sampling(model, mode) if has_adapters else nullcontext():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _concat_probs(chunks: list[Tensor]) -> Tensor:
    """Concatenate per-batch probabilities whose K may differ, padding with probability 0.

    A batch whose `answer_token_ids` are fewer (say "A".."D" where another batch has "A".."E")
    gets zero columns on the right, so column k must mean the same answer in every batch.
    """
    width = max(c.shape[1] for c in chunks)
    return torch.cat([nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


def _check_n_samples(n_samples: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise MeLoraError(
            f"n_samples={n_samples!r} is invalid: use 0 for the mean adapter or n >= 1 samples"
        )


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _predict_any(model: Model, loader: Iterable[Batch], n_samples: int) -> tuple[Tensor, Tensor]:
    if isinstance(model, nn.Module):
        return predict(model, loader, n_samples)
    return predict_ensemble(model, loader, n_samples)


# ----- evaluation of sets --------------------------------------------------------------------
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
        f"{prefix}/{task}/n{n}": _predict_any(model, loader, n)
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
        set_name, n_tag = key.rsplit("/", 1)
        for name, value in metrics.compute_all(probs, labels, n_bins).items():
            out[f"{set_name}/{name}_{n_tag}"] = value
        if id_predictions is not None:
            id_probs, _ = _id_entry(id_predictions, id_task, n_tag)
            out[f"{set_name}/auroc_{n_tag}"] = metrics.ood_auroc(id_probs, probs)
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
        set_name, n_tag = key.rsplit("/", 1)
        probs, labels = value[:2] if isinstance(value, tuple) else (value.probs, value.labels)
        for name, number in metrics.selective(probs, labels).items():
            out[f"{set_name}/{name}_{n_tag}"] = number
        if not isinstance(value, Predictive) or value.draws < 2:
            continue
        out[f"{set_name}/mi_{n_tag}"] = metrics.mean_mutual_information(
            value.probs, value.expected_entropy
        )
        if id_predictions is not None:
            ref = id_predictions[_id_key(id_predictions, id_task, n_tag)]
            if isinstance(ref, Predictive) and ref.draws >= 2:
                out[f"{set_name}/auroc_mi_{n_tag}"] = metrics.ood_auroc_mi(
                    ref.probs, ref.expected_entropy, value.probs, value.expected_entropy
                )
    return out


def _id_key(id_predictions: Mapping[str, Any], id_task: str | None, n_tag: str) -> str:
    matches = [k for k in id_predictions if k.endswith(f"/{id_task}/{n_tag}")]
    if len(matches) != 1:
        raise MeLoraError(
            f"no in-distribution predictions for task {id_task!r} at {n_tag}: "
            f"available are {sorted(id_predictions)}"
        )
    return matches[0]


def _id_entry(
    id_predictions: Predictions, id_task: str | None, n_tag: str
) -> tuple[Tensor, Tensor]:
    return id_predictions[_id_key(id_predictions, id_task, n_tag)]


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
        from melora.plots import reliability_diagrams  # matplotlib only when drawing

        return reliability_diagrams(self.predictions, out_dir, n_bins)


def evaluate_run(
    model: Model,
    test_loaders: Mapping[str, Iterable[Batch]],
    ood_loaders: Mapping[str, Iterable[Batch]] | None = None,
    id_task: str | None = None,
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
        id_task = _resolve_id_task(test_loaders, id_task)
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
            out[f"{prefix}/{task}/n{n}"] = result if samples else replace(result, draws=1)
    return out


def _pairs(predictions: Mapping[str, Predictive | tuple[Tensor, Tensor]]) -> Predictions:
    return {
        k: v[:2] if isinstance(v, tuple) else (v.probs, v.labels) for k, v in predictions.items()
    }


def _resolve_id_task(test_loaders: Mapping[str, Any], id_task: str | None) -> str:
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
