"""Temperature scaling against a brute-force search of the validation NLL."""

from __future__ import annotations

import math

import pytest
import torch

from melora import metrics
from melora.baselines.temperature import apply_temperature, fit_temperature
from melora.errors import ConfigError


def _sample(n: int, true_temperature: float, seed: int = 0):
    """Logits z; labels drawn from softmax(z / true_temperature): the model's softmax(z) is
    over-confident for a true temperature above 1. A fourth choice is absent from half the rows."""
    gen = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    z[: n // 2, 3] = float("-inf")
    labels = torch.multinomial(torch.softmax(z / true_temperature, dim=1), 1, generator=gen)
    return torch.softmax(z, dim=1), labels.squeeze(1)


def test_apply_temperature_equals_the_softmax_of_the_scaled_logits() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.3, float("-inf")]], dtype=torch.float64)
    got = apply_temperature(torch.softmax(z, dim=1), 2.5)
    torch.testing.assert_close(got, torch.softmax(z / 2.5, dim=1))
    assert got[1, 2] == 0.0
    torch.testing.assert_close(apply_temperature(torch.softmax(z, 1), 1.0), torch.softmax(z, 1))


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.0])
def test_the_fitted_temperature_minimises_the_nll_as_a_grid_search_does(true_temperature) -> None:
    probs, labels = _sample(4000, true_temperature)
    fitted = fit_temperature(probs, labels)
    grid = [math.exp(x / 200) for x in range(-400, 401)]  # T from e^-2 to e^2, steps of 0.5%
    # the NLL at every T at once: -log softmax(log p / T)[y], written out directly
    log_p = probs.log().unsqueeze(0) / torch.tensor(grid, dtype=torch.float64).view(-1, 1, 1)
    log_q = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)
    nll = (-log_q.gather(2, labels.view(1, -1, 1).expand(len(grid), -1, 1))).mean(dim=(1, 2))
    nll = nll.tolist()
    best = grid[min(range(len(grid)), key=nll.__getitem__)]
    assert fitted == pytest.approx(best, rel=0.006)
    assert metrics.nll(apply_temperature(probs, fitted), labels) <= min(nll) + 1e-9
    assert fitted == pytest.approx(true_temperature, rel=0.15)  # a consistent estimate


def test_temperature_scaling_keeps_the_accuracy_and_lowers_an_over_confident_ece() -> None:
    probs, labels = _sample(3000, 2.0, seed=1)
    scaled = apply_temperature(probs, fit_temperature(probs, labels))
    assert torch.equal(scaled.argmax(1), probs.argmax(1))
    assert metrics.ece(scaled, labels) < 0.5 * metrics.ece(probs, labels)


def test_bad_input_is_refused_with_the_shapes() -> None:
    with pytest.raises(ConfigError, match=r"probs \(3,\) and labels \(3,\)"):
        fit_temperature(torch.ones(3), torch.zeros(3))
    with pytest.raises(ConfigError, match="temperature=0"):
        apply_temperature(torch.ones(2, 2) / 2, 0)
