"""Temperature scaling (Guo et al. 2017): the cheapest calibration, the bar a Bayesian method must clear.

A trained (MAP) model's class probabilities p are replaced by

    p_T(c) = softmax(log p / T)_c = p(c)^(1/T) / sum_c' p(c')^(1/T),

which equals softmax(z / T) for the class logits z (log p and z differ by a per-row constant).
One temperature T > 0 is fitted on the validation split by minimising the NLL. With beta = 1/T
and l = log p, NLL(beta) = mean_i [logsumexp_c(beta l_ic) - beta l_iy] is convex in beta, and its
derivative mean_i [E_{p_beta}[l_i] - l_iy] increases with beta, so bisection on the derivative
finds the minimiser in `BETA_RANGE` to float64 precision. The accuracy never changes (the argmax
of a row does not move); only the confidence does. Choices absent from a row (p = 0) stay at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from melora.errors import ConfigError

BETA_RANGE = (1e-3, 1e3)  # T between 0.001 and 1000


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """p_T = softmax(log p / T) row by row (a zero probability stays zero)."""
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0")
    return torch.softmax(probs.double().log() / temperature, dim=-1).to(probs.dtype)


def fit_temperature(probs: Tensor, labels: Tensor, iterations: int = 200) -> float:
    """The T minimising the NLL of `apply_temperature(probs, T)` on (probs, labels) (module doc)."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise ConfigError(
            f"fit_temperature needs probs (n, classes) and n labels, n >= 1; "
            f"got probs {tuple(probs.shape)} and labels {tuple(labels.shape)}"
        )
    log_p = probs.double().log()
    present = torch.isfinite(log_p)
    l_masked = torch.where(present, log_p, torch.zeros_like(log_p))
    l_y = l_masked.gather(1, labels.long().view(-1, 1)).squeeze(1)

    def slope(beta: float) -> float:  # d NLL / d beta
        p_beta = torch.softmax(beta * log_p, dim=-1)
        return float(((p_beta * l_masked).sum(dim=1) - l_y).mean())

    lo, hi = BETA_RANGE
    if slope(lo) >= 0:
        return 1.0 / lo
    if slope(hi) <= 0:
        return 1.0 / hi
    for _ in range(iterations):  # bisection in log beta
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 1.0 / ((lo * hi) ** 0.5)
