"""The N-sample predictive over a task's answer tokens, of one adapted model or an ensemble.

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

Its names are importable from `melora.evaluation` as well, which evaluates sets with them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from melora import metrics
from melora.adapters import adapted_layers, sampling
from melora.errors import MeLoraError

Batch = Mapping[str, Any]

_REQUIRED_KEYS = ("input_ids", "attention_mask", "labels", "answer_token_ids")


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
