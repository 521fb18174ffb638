"""Abstention: answer a prompt only when its predictive entropy is at most a threshold.

`abstention_threshold` picks, on a validation split's predictive, the largest entropy threshold t
such that the prompts with H[p] <= t are answered with at least the requested accuracy; a prompt
above t abstains. The coverage it reports is the fraction of the validation split answered, the
coverage to expect on data like it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from melora import metrics
from melora.errors import ConfigError


@dataclass(frozen=True)
class Abstention:
    """Answer a prompt when its predictive entropy is at most `threshold` (nats), else abstain.

    `accuracy` and `coverage` are measured on the split the threshold was picked on (the
    fraction of it answered, and the accuracy there); `target` is the accuracy that was asked.
    """

    threshold: float
    target: float
    accuracy: float
    coverage: float

    def abstains(self, entropy: float) -> bool:
        """True when a prompt of this entropy is left unanswered."""
        return bool(entropy > self.threshold)


def abstention_threshold(probs: Any, labels: Any, target_accuracy: float) -> Abstention:
    """The entropy threshold with the largest coverage whose answered part reaches the accuracy.

    With u_i = H[p_i] (`melora.metrics.entropy`) and c_i = [argmax_k p_ik == y_i], answering the
    examples with u_i <= t has coverage |{u_i <= t}| / n and accuracy mean(c_i : u_i <= t). The
    candidates t are the distinct u_i (a threshold cannot split examples of equal entropy); the
    largest t whose accuracy is >= `target_accuracy` is chosen (accuracy need not fall
    monotonically with t, so this is a search, not a bisection). None reaching it is a
    `ConfigError` giving the best accuracy on offer.
    """
    if isinstance(target_accuracy, bool) or not 0.0 < float(target_accuracy) <= 1.0:
        raise ConfigError(f"abstain_at={target_accuracy!r} must be an accuracy in (0, 1]")
    entropy = metrics.entropy(probs)
    p = np.asarray(torch.as_tensor(probs).double())
    y = np.asarray(torch.as_tensor(labels))
    if y.shape != (len(p),):
        raise ConfigError(f"labels must have shape ({len(p)},), got {y.shape}")
    order = np.argsort(entropy, kind="stable")
    u, correct = entropy[order], (p.argmax(axis=1) == y)[order]
    accuracy = np.cumsum(correct) / np.arange(1, len(u) + 1)
    ends = np.flatnonzero(np.append(u[1:] != u[:-1], True))  # the last index of each tie group
    reached = ends[accuracy[ends] >= target_accuracy]
    if len(reached) == 0:
        best = ends[np.argmax(accuracy[ends])]
        raise ConfigError(
            f"no entropy threshold reaches accuracy {target_accuracy:g} on the {len(u)} "
            f"validation examples: the best is {accuracy[best]:.4f}, answering the "
            f"{best + 1} most certain (coverage {(best + 1) / len(u):.4f}); ask for less"
        )
    k = int(reached[-1])
    return Abstention(
        threshold=float(u[k]),
        target=float(target_accuracy),
        accuracy=float(accuracy[k]),
        coverage=(k + 1) / len(u),
    )
