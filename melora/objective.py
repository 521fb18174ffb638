"""The pieces of the training objective (METHOD.md, "Objective and optimisers").

Per step: the NLL of the answer token, and the KL weighted by pi_i, with the prior std
sigma_p + eps where eps ~ U(0, 1) is drawn once per step (paper Eq. 8) when `prior_noise` is on.
"""

from __future__ import annotations

import torch

from melora.errors import ConfigError

KL_WEIGHTINGS = ("blundell", "uniform")


def kl_weight(step: int, steps_per_epoch: int, scheme: str = "blundell") -> float:
    """The KL weight pi of the `step`-th optimiser step (0-based, counted over the whole run).

    blundell: pi_i = 2^(M - i) / (2^M - 1) for the i-th batch (i = 1..M) of each epoch of M
              batches (Blundell et al. 2015, Eq. 9): 1/2 of the epoch's KL on the first batch, halving
              after, summing to 1 over the epoch.
    uniform:  pi = 1 / M.

    METHOD.md writes 2^i / (2^M - 1) with i running M, ..., 1: the same order, but its weights
    sum to 2 over an epoch (2^M / (2^M - 1) on the first batch), twice Blundell's, which it cites.
    We follow Blundell (exponent i - 1 in METHOD.md's counting). BLoB's code uses
    2^i / (2^(M+1) - 1) with i running 1, ..., M (increasing; also summing to about 1).
    Computed as 2^(-i) / (1 - 2^-M) so that large M does not overflow.
    """
    if scheme not in KL_WEIGHTINGS:
        raise ConfigError(
            f"kl_weighting={scheme!r} is not allowed: choose one of {list(KL_WEIGHTINGS)}"
        )
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch={steps_per_epoch!r} must be >= 1")
    M = steps_per_epoch
    if scheme == "uniform":
        return 1.0 / M
    i = step % M + 1
    return 2.0**-i / (1.0 - 2.0**-M)


def draw_prior_eps(prior_noise: bool, generator: torch.Generator | None = None) -> float:
    """eps ~ U(0, 1) when `prior_noise` (once per step, shared by every layer), else 0.

    Pass a generator seeded identically on every rank so that all ranks use the same eps.
    """
    if not prior_noise:
        return 0.0
    return float(torch.rand((), generator=generator))
