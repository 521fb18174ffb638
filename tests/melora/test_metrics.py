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
HAND_NLL = -(math.log(0.90) + math.log(0.15) + math.log(0.70) + math.log(0.45)) / 4
HAND = {"acc": 0.5, "nll": HAND_NLL, "ece": 0.4, "brier": 0.5625}  # ece with 5 bins


def test_hand_case_accuracy() -> None:
    assert metrics.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(2 / 4)


def test_hand_case_nll() -> None:
    assert metrics.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(HAND_NLL, abs=1e-12)


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
    assert out == pytest.approx(HAND, abs=1e-12)
    assert set(out) == {"acc", "nll", "ece", "brier"}
    assert all(type(v) is float for v in out.values())


def test_torch_float32_and_numpy_inputs_agree_and_give_floats() -> None:
    probs32 = torch.tensor(HAND_PROBS, dtype=torch.float32)
    labels = torch.tensor(HAND_LABELS)
    for key, fn in (("acc", metrics.accuracy), ("nll", metrics.nll), ("brier", metrics.brier)):
        value = fn(probs32, labels)
        assert type(value) is float
        assert value == pytest.approx(HAND[key], abs=1e-6), key
    value = metrics.ece(probs32, labels, n_bins=5)
    assert type(value) is float and value == pytest.approx(HAND["ece"], abs=1e-6)
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
    import torchmetrics as tm  # declared in the test extra: missing, the test fails

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
    import torchmetrics as tm  # declared in the test extra: missing, the test fails

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
    from sklearn import metrics as sklearn_metrics  # declared in the test extra

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


# ----- the uncertainty decomposition --------------------------------------------------------------
def _entropy_by_hand(p) -> float:
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0)


def _draws(seed: int, s: int, n: int, k: int) -> np.ndarray:
    """(S, N, K) softmax draws, some entries exactly 0 (a masked choice)."""
    rng = np.random.default_rng(seed)
    draws = rng.dirichlet(np.full(k, 0.5), size=(s, n))
    draws[:, 0, -1] = 0.0
    return draws / draws.sum(axis=2, keepdims=True)


@pytest.mark.parametrize("seed", range(4))
def test_mutual_information_matches_a_loop_over_draws(seed: int) -> None:
    s, n, k = 2 + seed, 30, 2 + seed
    draws = _draws(seed, s, n, k)
    mean = draws.mean(axis=0)
    expected_h, mi = [], []
    for i in range(n):
        h_draws = [_entropy_by_hand(draws[t, i]) for t in range(s)]
        expected_h.append(sum(h_draws) / s)
        mi.append(_entropy_by_hand([sum(draws[t, i, c] for t in range(s)) / s for c in range(k)]) - expected_h[-1])  # fmt: skip
    np.testing.assert_allclose(metrics.expected_entropy(draws), expected_h, rtol=0, atol=1e-12)
    got = metrics.mutual_information(mean, expected_h)
    np.testing.assert_allclose(got, mi, rtol=0, atol=1e-12)
    assert metrics.mean_mutual_information(mean, expected_h) == pytest.approx(
        np.mean(mi), abs=1e-12
    )
    assert (got >= 0).all() and (got <= math.log(k) + 1e-12).all() and got.max() > 1e-3
    # as float32 torch tensors (the predictive's dtype) it agrees to float32 rounding
    got32 = metrics.mutual_information(
        torch.tensor(mean, dtype=torch.float32), torch.tensor(expected_h)
    )
    np.testing.assert_allclose(got32, mi, rtol=0, atol=1e-5)


def test_entropy_hand_cases() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(metrics.entropy(probs), [0.0, math.log(2), math.log(3)], atol=1e-12)
    with pytest.raises(ValueError, match="not logits"):
        metrics.entropy(np.array([[2.0, -1.0]]))


def test_mutual_information_of_identical_draws_is_zero() -> None:
    draws = np.repeat(_draws(0, 1, 20, 4), 5, axis=0)  # five equal draws
    mi = metrics.mutual_information(draws.mean(axis=0), metrics.expected_entropy(draws))
    np.testing.assert_allclose(mi, 0.0, atol=1e-12)
    by_hand = [_entropy_by_hand(p) for p in draws[0]]
    assert metrics.mean_mutual_information(draws[0], by_hand) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_two_certain_draws_that_disagree_is_log_2() -> None:
    draws = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # aleatoric 0, total log 2: all epistemic
    mean = draws.mean(axis=0)
    assert metrics.entropy(mean)[0] == pytest.approx(math.log(2))
    assert metrics.expected_entropy(draws)[0] == 0.0
    assert metrics.mean_mutual_information(mean, [0.0]) == pytest.approx(math.log(2), abs=1e-12)
    # the same mean from two uncertain draws that agree: all aleatoric, MI 0
    assert metrics.mean_mutual_information(mean, [math.log(2)]) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_refuses_inputs_that_do_not_belong_together() -> None:
    mean = np.array([[0.9, 0.1]])
    with pytest.raises(ValueError, match="exceeds the entropy of the mean"):
        metrics.mutual_information(mean, [math.log(2)])  # more than H(mean) = 0.325
    with pytest.raises(ValueError, match="expected_entropy must have shape"):
        metrics.mutual_information(mean, [0.1, 0.2])
    with pytest.raises(ValueError, match="finite entropies >= 0"):
        metrics.mutual_information(mean, [-0.5])
    with pytest.raises(ValueError, match=r"draws must have shape \(S, N, K\)"):
        metrics.expected_entropy(mean)


def _with_mi(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Uniform binary means (entropy log 2) and expected entropies giving each MI value."""
    return np.full((len(values), 2), 0.5), math.log(2) - np.array(values)


def test_ood_auroc_by_mutual_information_hand_counted() -> None:
    # ID MI .0, .1; OOD MI .5, .05. Score -MI, ID positive: (0 vs .5) 1, (0 vs .05) 1,
    # (.1 vs .5) 1, (.1 vs .05) 0 -> 3 / 4. Max probability ties everywhere (AUROC .5).
    id_p, id_h = _with_mi([0.0, 0.1])
    ood_p, ood_h = _with_mi([0.5, 0.05])
    assert metrics.ood_auroc_mi(id_p, id_h, ood_p, ood_h) == pytest.approx(0.75, abs=1e-9)
    assert metrics.ood_auroc_mi(ood_p, ood_h, id_p, id_h) == pytest.approx(0.25, abs=1e-9)
    assert metrics.ood_auroc(id_p, ood_p) == 0.5
    zeros_p, zeros_h = _with_mi([0.0, 0.0, 0.0])
    assert metrics.ood_auroc_mi(zeros_p, zeros_h, zeros_p, zeros_h) == 0.5  # all tied


# ----- selective prediction -----------------------------------------------------------------------
def _aurc_by_loop(probs: np.ndarray, labels: np.ndarray, order: list[int]) -> tuple[float, list]:
    """AURC of one ranking `order` (most confident first): a loop over k, the risk of the top k."""
    risks = []
    for k in range(1, len(order) + 1):
        wrong = sum(int(np.argmax(probs[i]) != labels[i]) for i in order[:k])
        risks.append(wrong / k)
    return sum(risks) / len(risks), risks


# conf .9 .8 .7 .6; the two most confident right, the other two wrong: a perfect ranker
RANKED = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])


def test_aurc_hand_cases() -> None:
    # risks 0, 0, 1/3, 2/4 -> (1/3 + 1/2) / 4 = 5/24, the least AURC with 2 errors of 4
    assert metrics.aurc(RANKED, np.array([0, 0, 1, 1])) == pytest.approx(5 / 24, abs=1e-12)
    # the worst ranker (the errors most confident): risks 1, 1, 2/3, 2/4 -> 19/24
    assert metrics.aurc(RANKED, np.array([1, 1, 0, 0])) == pytest.approx(19 / 24, abs=1e-12)
    assert metrics.aurc(RANKED, np.array([0, 0, 0, 0])) == 0.0  # all correct
    assert metrics.aurc(RANKED, np.array([1, 1, 1, 1])) == 1.0  # all wrong
    coverage, risk = metrics.risk_coverage_curve(RANKED, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 2], atol=1e-12)


def test_accuracy_at_coverage_hand_cases() -> None:
    # 5 examples, 80%: the 4 most confident. conf .95 .9 .8 .7 .6: right, wrong, right, right, wrong
    probs = np.array([[0.95, 0.05], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1, 1])
    assert metrics.accuracy_at_coverage(probs, labels, 0.8) == pytest.approx(3 / 4)
    assert metrics.accuracy_at_coverage(probs, labels, 1.0) == pytest.approx(3 / 5)
    assert metrics.accuracy_at_coverage(probs, labels, 0.2) == 1.0  # the most confident alone
    # risks of the top k = 1..5: 0, 1/2, 1/3, 1/4, 2/5 -> AURC (0 + 1/2 + 1/3 + 1/4 + 2/5) / 5
    assert metrics.selective(probs, labels) == pytest.approx(
        {"aurc": 89 / 300, "acc_cov80": 0.75}, abs=1e-12
    )
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"coverage must lie in \(0, 1\]"):
            metrics.accuracy_at_coverage(probs, labels, bad)


def test_coverage_count_is_the_exact_ceiling() -> None:
    from fractions import Fraction

    for n in range(1, 400):
        assert metrics.coverage_count(n, 0.8) == math.ceil(Fraction(4, 5) * n), n
    assert metrics.coverage_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert metrics.coverage_count(400, 0.07) == 28


@pytest.mark.parametrize("seed", range(5))
def test_aurc_matches_a_loop_over_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 120)), int(rng.integers(2, 6))
    probs = rng.dirichlet(np.full(k, 0.7), size=n)  # continuous: no ties
    labels = rng.integers(0, k, size=n)
    order = sorted(range(n), key=lambda i: -max(probs[i]))
    expected, risks = _aurc_by_loop(probs, labels, order)
    assert metrics.aurc(probs, labels) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(metrics.risk_coverage_curve(probs, labels)[1], risks, atol=1e-12)
    cut = math.ceil(round(0.8 * n, 9))
    assert metrics.accuracy_at_coverage(probs, labels) == pytest.approx(1 - risks[cut - 1])


def test_aurc_ties_count_every_order_of_the_tied_examples() -> None:
    # Two examples of equal confidence, one right, one wrong: risk_1 is 1/2 in expectation
    # (either may come first), risk_2 = 1/2: AURC 1/2, whichever row is listed first. An
    # index-order tie-break would give 1/4 or 3/4.
    probs = np.array([[0.7, 0.3], [0.7, 0.3]])
    assert metrics.aurc(probs, np.array([0, 1])) == pytest.approx(0.5)
    assert metrics.aurc(probs, np.array([1, 0])) == pytest.approx(0.5)
    assert metrics.accuracy_at_coverage(probs, np.array([0, 1]), 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_aurc_with_ties_is_the_mean_over_all_rankings_consistent_with_confidence(seed) -> None:
    import itertools

    rng = np.random.default_rng(seed)
    n = 7
    conf = rng.choice([0.6, 0.7, 0.9], size=n)  # many ties
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = rng.integers(0, 2, size=n)
    valid = [o for o in itertools.permutations(range(n)) if all(conf[a] >= conf[b] for a, b in itertools.pairwise(o))]  # fmt: skip
    results = [_aurc_by_loop(probs, labels, list(o)) for o in valid]
    assert metrics.aurc(probs, labels) == pytest.approx(np.mean([r[0] for r in results]), abs=1e-12)
    mean_risks = np.mean([r[1] for r in results], axis=0)
    np.testing.assert_allclose(
        metrics.risk_coverage_curve(probs, labels)[1], mean_risks, atol=1e-12
    )
    # and it does not depend on the order of the rows
    perm = rng.permutation(n)
    expected = np.mean([r[0] for r in results])
    assert metrics.aurc(probs[perm], labels[perm]) == pytest.approx(expected, abs=1e-12)
