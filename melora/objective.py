"""The pieces of the training objective (METHOD.md, "Objective and optimisers").

Per step: the NLL of the answer token, and the KL weighted by pi_i, with the prior std
sigma_p + eps where eps ~ U(0, 1) is drawn once per step (paper Eq. 8) when `prior_noise` is on.
"""

from __future__ import annotations

import torch

from melora.errors import ConfigError

KL_WEIGHTINGS = ("blundell", "uniform")


def kl_weight(
    step: int, batches_per_epoch: int, scheme: str = "blundell", grad_accum: int = 1
) -> float:
    """The KL weight pi of the `step`-th optimiser step (0-based, counted over the whole run).

    An epoch is one pass over the `batches_per_epoch` micro-batches of the training loader; each
    optimiser step consumes `grad_accum` micro-batches, in order, across epoch boundaries, and
    belongs to the epoch of its first micro-batch. With L = batches_per_epoch and g = grad_accum,
    the steps of epoch e are t = ceil(e L / g), ..., ceil((e + 1) L / g) - 1: M_e steps (M_e is
    floor or ceil of L / g), and step t is the i-th of them (i = t - ceil(e L / g) + 1).

    blundell: pi_i = 2^(M - i) / (2^M - 1) for the i-th step (i = 1..M) of each epoch of M
              steps (Blundell et al. 2015, Eq. 9): 1/2 of the epoch's KL on the first step, halving
              after, summing to 1 over the epoch.
    uniform:  pi = 1 / M.
    So the weights sum to 1 over the optimiser steps of every epoch, whatever grad_accum.

    METHOD.md writes 2^i / (2^M - 1) with i running M, ..., 1: the same order, but its weights
    sum to 2 over an epoch (2^M / (2^M - 1) on the first batch), twice Blundell's, which it cites;
    its correction names Blundell's form, which this is. BLoB's code uses 2^i / (2^(M+1) - 1)
    with i running 1, ..., M (increasing; also summing to about 1).
    Computed as 2^(-i) / (1 - 2^-M) so that large M does not overflow.
    """
    if scheme not in KL_WEIGHTINGS:
        raise ConfigError(
            f"kl_weighting={scheme!r} is not allowed: choose one of {list(KL_WEIGHTINGS)}"
        )
    if batches_per_epoch < 1:
        raise ConfigError(f"batches_per_epoch={batches_per_epoch!r} must be >= 1")
    if grad_accum < 1:
        raise ConfigError(f"grad_accum={grad_accum!r} must be >= 1")
    i, M = epoch_position(step, batches_per_epoch, grad_accum)
    if scheme == "uniform":
        return 1.0 / M
    return 2.0**-i / (1.0 - 2.0**-M)


def epoch_position(step: int, batches_per_epoch: int, grad_accum: int = 1) -> tuple[int, int]:
    """(i, M): optimiser step `step` is the i-th (1-based) of the M steps of its epoch (`kl_weight`)."""
    L, g = batches_per_epoch, grad_accum
    epoch = step * g // L  # the epoch of the step's first micro-batch
    first = -(-epoch * L // g)  # ceil(e L / g): the epoch's first step
    next_first = -(-(epoch + 1) * L // g)
    return step - first + 1, next_first - first


def draw_prior_eps(prior_noise: bool, generator: torch.Generator | None = None) -> float:
    """eps ~ U(0, 1) when `prior_noise` (once per step, shared by every layer), else 0.

    Pass a generator seeded identically on every rank so that all ranks use the same eps.
    """
    if not prior_noise:
        return 0.0
    return float(torch.rand((), generator=generator))
