"""melora.metrics against hand-computed answers, brute-force loops and, where installed,
torchmetrics and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from melora import metrics

# Four binary examples; with 5 bins (edges 0, .2, .4, .6, .8, 1) no confidence is on an edge.
#   p            y  conf  correct  bin (right-closed)
#   [.90, .10]   0  .90   yes      (.8, 1]
#   [.15, .85]   0  .85   no       (.8, 1]
#   [.30, .70]   1  .70   yes      (.6, .8]
#   [.55, .45]   1  .55   no       (.4, .6]
HAND_PROBS = np.array([[0.90, 0.10], [0.15, 0.85], [0.30, 0.70], [0.55, 0.45]])
HAND_LABELS = np.array([0, 0, 1, 1])


def test_hand_case_accuracy() -> None:
    assert metrics.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(2 / 4)


def test_hand_case_nll() -> None:
    expected = -(math.log(0.90) + math.log(0.15) + math.log(0.70) + math.log(0.45)) / 4
    assert metrics.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(expected, abs=1e-12)


def test_hand_case_ece() -> None:
    # (.8, 1]: 2 examples, acc 1/2, mean conf .875 -> 2/4 * .375 = .1875
    # (.6, .8]: 1 example,  acc 1,   conf .70     -> 1/4 * .30  = .0750
    # (.4, .6]: 1 example,  acc 0,   conf .55     -> 1/4 * .55  = .1375
    # ECE = .1875 + .075 + .1375 = .4
    assert metrics.ece(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.4, abs=1e-12)


def test_hand_case_brier() -> None:
    # (.9-1)^2+.1^2 = .02; .15-1 and .85: 2 * .7225 = 1.445; .3^2+(.7-1)^2 = .18; 2 * .3025 = .605
    # mean = (.02 + 1.445 + .18 + .605) / 4 = 2.25 / 4
    assert metrics.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(0.5625, abs=1e-12)


def test_compute_all_gives_the_four_metrics() -> None:
    out = metrics.compute_all(HAND_PROBS, HAND_LABELS, n_bins=5)
    assert out == pytest.approx({"acc": 0.5, "nll": out["nll"], "ece": 0.4, "brier": 0.5625})
    assert set(out) == {"acc", "nll", "ece", "brier"}
    assert all(type(v) is float for v in out.values())


def test_torch_float32_and_numpy_inputs_agree_and_give_floats() -> None:
    probs32 = torch.tensor(HAND_PROBS, dtype=torch.float32)
    labels = torch.tensor(HAND_LABELS)
    for fn in (metrics.accuracy, metrics.nll, metrics.brier, metrics.ece):
        value = fn(probs32, labels)
        assert type(value) is float
        assert value == pytest.approx(fn(HAND_PROBS, HAND_LABELS), abs=1e-6)
    assert metrics.accuracy(HAND_PROBS.tolist(), HAND_LABELS.tolist()) == 0.5


def test_perfectly_calibrated_sets_have_zero_ece() -> None:
    # 10 examples at confidence .7 with 7 right, 5 at confidence .6 with 3 right.
    probs = np.array([[0.7, 0.3]] * 10 + [[0.4, 0.6]] * 5)
    labels = np.array([0] * 7 + [1] * 3 + [1] * 3 + [0] * 2)
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(probs, labels, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_certain_and_right_is_perfect() -> None:
    probs, labels = np.eye(3), np.array([0, 1, 2])
    assert metrics.accuracy(probs, labels) == 1.0
    assert metrics.nll(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.brier(probs, labels) == 0.0


def test_certain_and_wrong_hits_the_clamp_and_the_brier_maximum() -> None:
    probs, labels = np.array([[1.0, 0.0]]), np.array([1])
    assert metrics.nll(probs, labels) == pytest.approx(-math.log(metrics.NLL_CLAMP))
    assert metrics.brier(probs, labels) == pytest.approx(2.0)
    assert metrics.ece(probs, labels) == pytest.approx(1.0)


def test_ece_bins_are_right_closed_with_one_point_zero_in_the_last_bin() -> None:
    # 5 bins, float64. Right-closed: 1.0 and .95 share (.8, 1]; .8 is on an edge, so (.6, .8].
    #   (.8, 1]:  acc 1, conf .975 -> 2/3 * .025 = .016667
    #   (.6, .8]: acc 0, conf .8   -> 1/3 * .8   = .266667
    # (Recent torchmetrics bins left-closed with 1.0 alone: it would give 0.25 here.)
    probs = np.array([[1.0, 0.0], [0.95, 0.05], [0.8, 0.2]])
    labels = np.array([0, 0, 1])
    bins = metrics.calibration_bins(probs, labels, n_bins=5)
    np.testing.assert_array_equal(bins.count, [0, 0, 0, 1, 2])
    np.testing.assert_allclose(bins.edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert metrics.ece(probs, labels, n_bins=5) == pytest.approx((0.05 + 0.8) / 3, abs=1e-12)


def test_a_confidence_on_the_lowest_edges_goes_to_the_lower_bin() -> None:
    # K = 5 uniform: confidence exactly .2 = 1/5, the first inner edge: bin 0 (closed at both ends).
    probs, labels = np.full((2, 5), 0.2), np.array([0, 3])
    np.testing.assert_array_equal(metrics.calibration_bins(probs, labels, 5).count, [2, 0, 0, 0, 0])


def _ece_brute_force(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """A loop over bins and examples, written independently of melora.metrics."""
    total, n = 0.0, len(labels)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        conf_sum, correct, count = 0.0, 0, 0
        for p, y in zip(probs, labels, strict=True):
            c = max(p)
            if (lo < c or (b == 0 and c == lo)) and c <= hi:
                count += 1
                conf_sum += c
                correct += int(list(p).index(c) == y)
        if count:
            total += count / n * abs(correct / count - conf_sum / count)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_a_brute_force_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 300)), int(rng.integers(2, 6))
    probs = rng.dirichlet(np.full(k, 0.3), size=n)
    labels = rng.integers(0, k, size=n)
    for n_bins in (1, 10, 15):
        expected = _ece_brute_force(probs, labels, n_bins)
        assert metrics.ece(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_matches_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics")
    gen = torch.Generator().manual_seed(0)
    for k in (2, 4, 5):
        probs = torch.softmax(3 * torch.randn(500, k, generator=gen), dim=1)
        labels = torch.randint(0, k, (500,), generator=gen)
        for n_bins in (10, 15):
            expected = tm.functional.calibration_error(
                probs, labels, task="multiclass", num_classes=k, n_bins=n_bins, norm="l1"
            )
            assert metrics.ece(probs, labels, n_bins) == pytest.approx(float(expected), abs=1e-5)


def test_torchmetrics_differs_only_on_edges_as_documented() -> None:
    # The docstring of calibration_bins says recent torchmetrics bins left-closed with 1.0 alone:
    # on the edge case above it gives (.8 with .95: 2/3 * |.5 - .875|) + (1.0 alone: 0) = .25.
    tm = pytest.importorskip("torchmetrics")
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.8, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    theirs = tm.functional.calibration_error(
        probs, labels, task="multiclass", num_classes=2, n_bins=5, norm="l1"
    )
    assert float(theirs) == pytest.approx(0.25, abs=1e-6)
    assert metrics.ece(probs, labels, n_bins=5) == pytest.approx((0.05 + 0.8) / 3, abs=1e-12)


def _auroc_probs(scores: list[float]) -> np.ndarray:
    """Binary probability rows whose max probability is each score (scores >= .5)."""
    return np.array([[s, 1 - s] for s in scores])


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "expected"),
    [
        ([0.9, 0.95, 0.8], [0.6, 0.7], 1.0),  # every ID example more confident
        ([0.6, 0.7], [0.9, 0.95, 0.8], 0.0),  # every ID example less confident
        ([0.6, 0.9], [0.6, 0.9], 0.5),  # same scores: pairs .5 + 0 + 1 + .5 = 2 of 4
        ([0.7, 0.7, 0.7], [0.7, 0.7], 0.5),  # all tied
        # ID .9 beats both (2), .7 ties .7 (.5) and beats .5 (1), .6 beats .5 (1): 4.5 / 6
        ([0.9, 0.7, 0.6], [0.7, 0.5], 0.75),
    ],
)
def test_ood_auroc_hand_counted(id_scores, ood_scores, expected) -> None:
    value = metrics.ood_auroc(_auroc_probs(id_scores), _auroc_probs(ood_scores))
    assert value == pytest.approx(expected, abs=1e-12)


def test_ood_auroc_accepts_different_class_counts() -> None:
    id_probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    ood_probs = torch.tensor([[0.6, 0.4]])
    # .9 > .6 (1), .5 < .6 (0): 1 / 2
    assert metrics.ood_auroc(id_probs, ood_probs) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_ood_auroc_matches_pair_counting_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Scores on a grid of tenths, so that ties occur.
    id_probs = _auroc_probs(list(rng.integers(5, 11, size=60) / 10))
    ood_probs = _auroc_probs(list(rng.integers(5, 11, size=40) / 10))
    s, t = id_probs.max(axis=1), ood_probs.max(axis=1)
    pairs = sum((si > tj) + 0.5 * (si == tj) for si in s for tj in t) / (len(s) * len(t))
    value = metrics.ood_auroc(id_probs, ood_probs)
    assert value == pytest.approx(pairs, abs=1e-12)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    y = np.r_[np.ones(len(s)), np.zeros(len(t))]
    assert value == pytest.approx(sklearn_metrics.roc_auc_score(y, np.r_[s, t]), abs=1e-12)


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.array([0.5, 0.5]), np.array([0]), r"probs must have shape \(N, K\)"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "N > 0"),
        (np.array([[0.5, 0.5]]), np.array([[0]]), r"labels must have shape \(N,\)"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), "disagree on N"),
        (np.array([[0.5, 0.5]]), np.array([2]), r"labels must lie in \[0, 2\)"),
        (np.array([[0.5, 0.5]]), np.array([-1]), r"labels must lie in \[0, 2\)"),
        (np.array([[0.5, 0.5]]), np.array([0.0]), "integer class indices"),
        (np.array([[2.0, -1.0]]), np.array([0]), "not logits"),
        (np.array([[0.2, 0.2]]), np.array([0]), "sum to 1"),
        (np.array([[np.nan, 0.5]]), np.array([0]), "NaN"),
        (np.array([[1, 0]]), np.array([0]), "floating-point"),
    ],
)
def test_invalid_inputs_are_explained(probs, labels, message) -> None:
    for fn in (metrics.accuracy, metrics.nll, metrics.ece, metrics.brier, metrics.compute_all):
        with pytest.raises(ValueError, match=message):
            fn(probs, labels)


def test_invalid_n_bins_and_ood_shapes() -> None:
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        metrics.ece(HAND_PROBS, HAND_LABELS, n_bins=0)
    with pytest.raises(ValueError, match=r"id_probs must have shape \(N, K\)"):
        metrics.ood_auroc(np.array([0.9, 0.1]), HAND_PROBS)
    with pytest.raises(ValueError, match="ood_probs must have N > 0"):
        metrics.ood_auroc(HAND_PROBS, np.zeros((0, 2)))
