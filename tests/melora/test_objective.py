"""The KL weighting schedule and the prior noise against direct computations."""

from __future__ import annotations

import pytest
import torch

from melora.errors import ConfigError
from melora.objective import draw_prior_eps, kl_weight


@pytest.mark.parametrize("M", [1, 3, 7, 40])
def test_blundell_weights_are_2_to_the_M_minus_i_over_2_to_the_M_minus_1(M: int) -> None:
    weights = [kl_weight(step, M, "blundell") for step in range(M)]
    # Blundell et al. Eq. 9: the i-th batch (i = 1..M) of an epoch gets 2^(M-i) / (2^M - 1)
    direct = [2 ** (M - i) / (2**M - 1) for i in range(1, M + 1)]
    assert weights == pytest.approx(direct, rel=1e-12)
    assert sum(weights) == pytest.approx(1.0)
    # the schedule restarts every epoch
    assert [kl_weight(step, M, "blundell") for step in range(M, 2 * M)] == pytest.approx(weights)


def test_blundell_does_not_overflow_for_long_epochs() -> None:
    M = 5000
    assert kl_weight(0, M) == pytest.approx(0.5)
    assert kl_weight(10, M) == pytest.approx(2.0**-11)
    assert kl_weight(M - 1, M) == 0.0  # 2^-5000 underflows to 0, not to an error or nan
    assert sum(kl_weight(s, M) for s in range(M)) == pytest.approx(1.0)


def test_uniform_weights() -> None:
    assert [kl_weight(s, 4, "uniform") for s in range(8)] == [0.25] * 8


def test_kl_weight_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="'blundel'.*'blundell', 'uniform'"):
        kl_weight(0, 4, "blundel")
    with pytest.raises(ConfigError, match="batches_per_epoch=0"):
        kl_weight(0, 0)
    with pytest.raises(ConfigError, match="grad_accum=0"):
        kl_weight(0, 4, grad_accum=0)


@pytest.mark.parametrize("scheme", ["blundell", "uniform"])
@pytest.mark.parametrize("grad_accum", [1, 2, 3])
def test_kl_weights_sum_to_one_over_each_epoch_of_optimiser_steps(scheme: str, grad_accum: int):
    """7 micro-batches an epoch (not a multiple of 2 or 3): the weights of the optimiser steps whose
    first micro-batch falls in an epoch sum to 1, epoch after epoch, and Blundell's halve within it."""
    L, epochs = 7, 6
    by_epoch: dict[int, list[float]] = {}
    for step in range(epochs * L // grad_accum):
        epoch = step * grad_accum // L  # micro-batch step * grad_accum opens this step
        by_epoch.setdefault(epoch, []).append(kl_weight(step, L, scheme, grad_accum))
    for epoch, weights in by_epoch.items():
        if epoch == max(by_epoch):
            continue  # the range may cut the last epoch short
        assert sum(weights) == pytest.approx(1.0, rel=1e-12), (epoch, weights)
        assert len(weights) in (L // grad_accum, -(-L // grad_accum))
        if scheme == "blundell":
            assert weights[0] == pytest.approx(2 ** (len(weights) - 1) / (2 ** len(weights) - 1))
            for a, b in zip(weights, weights[1:], strict=False):
                assert b == pytest.approx(a / 2)


def test_prior_noise_is_uniform_shared_and_off_when_disabled() -> None:
    assert draw_prior_eps(False) == 0.0
    a = draw_prior_eps(True, torch.Generator().manual_seed(7))
    b = draw_prior_eps(True, torch.Generator().manual_seed(7))
    assert a == b  # the same seed on every rank gives the same eps
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_prior_eps(True, gen) for _ in range(20_000)])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(1 / 12, abs=0.003)
