"""Metrics of a predictive distribution over K classes: ACC, NLL, ECE, Brier, OOD AUROC, the
uncertainty decomposition (entropy, mutual information) and selective prediction (AURC).

Every function takes `probs` of shape (N, K) (rows are probability vectors: the N-sample
predictive of `melora.evaluation.predict`) and integer `labels` of shape (N,), as torch tensors,
numpy arrays or nested lists, and returns a python float (per-example quantities: a float64
array of shape (N,)). The maths is done in float64 numpy.

Classes a row does not have (a 3-choice question in a 5-choice batch) simply carry probability 0.
The predicted class is `argmax_k p_k`; ties go to the lowest class index (numpy's argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NLL_CLAMP = 1e-12
"""`nll` uses -log(max(p_y, NLL_CLAMP)): a zero probability costs 27.63 nats instead of infinity."""

_SUM_TOLERANCE = 1e-3  # how far a row's sum may be from 1 (float32 averages are ~1e-6 off)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.to(torch.float64) if x.is_floating_point() else x
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} must be a tensor or an array, got {type(x).__name__}: {e}") from e


def _check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """`probs` as a float64 (N, K) array of probability rows, or a ValueError saying what is wrong."""
    p = _to_numpy(probs, name)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape (N, K) (examples x classes), got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"{name} must have N > 0 examples and K > 0 classes, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{name} must be floating-point probabilities, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or inf; every entry must be a finite probability")
    if p.min() < 0.0 or p.max() > 1.0 + _SUM_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]: "
            "pass softmax probabilities, not logits"
        )
    worst = np.abs(p.sum(axis=1) - 1.0).max()
    if worst > _SUM_TOLERANCE:
        raise ValueError(
            f"each row of {name} must sum to 1 (largest |sum - 1| is {worst:.4g}): "
            "pass softmax probabilities, not logits"
        )
    return p


def _check_inputs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (N, K) probabilities and int64 (N,) labels in [0, K)."""
    p = _check_probs(probs)
    y = _to_numpy(labels, "labels")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got shape {y.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"probs and labels disagree on N: probs has {p.shape[0]} rows, labels {y.shape[0]}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) for probs with K = {n_classes} classes, "
            f"got values in [{y.min()}, {y.max()}]"
        )
    return p, y


def accuracy(probs: Any, labels: Any) -> float:
    """ACC = (1/N) sum_i [argmax_k p_ik == y_i]."""
    p, y = _check_inputs(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs: Any, labels: Any) -> float:
    """NLL = (1/N) sum_i -log max(p_{i, y_i}, NLL_CLAMP), in nats.

    The clamp at `NLL_CLAMP` = 1e-12 only matters for a probability that is exactly (or nearly)
    zero, which float32 softmax gives for logit gaps above about 103; it caps one example's cost
    at -log(1e-12) = 27.63 so that a single such example cannot make the mean infinite.
    """
    p, y = _check_inputs(probs, labels)
    p_true = p[np.arange(len(y)), y]
    return float(np.mean(-np.log(np.maximum(p_true, NLL_CLAMP))))


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: (1/N) sum_i sum_k (p_ik - [k == y_i])^2, in [0, 2].

    This is the convention of Brier (1950) and of BLoB's code (summed over classes, not divided
    by K, and not the binary top-label variant); 0 is a perfect, certain prediction.
    """
    p, y = _check_inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics of top-label confidence; empty bins have count 0 and NaN means."""

    edges: np.ndarray  # (B + 1,) the edges 0, 1/B, ..., 1
    count: np.ndarray  # (B,) number of examples per bin
    confidence: np.ndarray  # (B,) mean top-label confidence per bin
    accuracy: np.ndarray  # (B,) fraction of correct top-label predictions per bin


def calibration_bins(probs: Any, labels: Any, n_bins: int = 15) -> CalibrationBins:
    """Bin the top-label confidence c_i = max_k p_ik into `n_bins` equal-width bins over [0, 1].

    Bins are right-closed: bin b (0-based) holds (b/B, (b+1)/B], except that bin 0 also holds 0.
    So a confidence of exactly 1.0 is in the last bin, and a confidence exactly on an inner edge
    j/B is in the lower bin j-1. The edges are j/B in float64, compared with the confidence in
    float64 (a float32 0.4 is 0.4000000059604645 and so lies above the edge 6/15).
    This is the binning of Guo et al. (2017). Recent torchmetrics (used by BLoB) bins
    left-closed, [b/B, (b+1)/B), with a separate bin for confidence exactly 1.0; the two agree
    unless a confidence falls exactly on an edge.
    """
    p, y = _check_inputs(probs, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # The number of inner edges strictly below c is the index of c's right-closed bin.
    index = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(index, weights=correct, minlength=n_bins) / count
    return CalibrationBins(edges=edges, count=count, confidence=mean_conf, accuracy=mean_acc)


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins (L1):

        ECE = sum_b (n_b / N) * | acc_b - conf_b |

    where n_b is the number of examples whose confidence c_i = max_k p_ik falls in bin b,
    acc_b the fraction of them whose argmax is the label and conf_b their mean confidence;
    empty bins contribute 0. See `calibration_bins` for the edge convention (right-closed).
    15 bins is BLoB's default; Laplace-LoRA used 10.
    """
    bins = calibration_bins(probs, labels, n_bins)
    filled = bins.count > 0
    weights = bins.count[filled] / bins.count.sum()
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(weights * gaps))


def ood_auroc(id_probs: Any, ood_probs: Any) -> float:
    """AUROC of telling in-distribution from OOD examples by max probability.

    The score of an example is s = max_k p_k; ID examples are the positives. With n1 ID scores
    s_i and n0 OOD scores t_j,

        AUROC = (1 / (n1 n0)) sum_i sum_j ( [s_i > t_j] + 1/2 [s_i == t_j] ),

    computed as the Mann-Whitney U statistic: U = R_ID - n1 (n1 + 1) / 2 with R_ID the sum of
    the ID examples' ranks in the pooled scores (ties get their average rank), AUROC = U / (n1 n0).
    1.0: every ID example is more confident than every OOD one; 0.5: no better than chance.
    The two sets may have different numbers of classes.
    """
    s_id = _check_probs(id_probs, "id_probs").max(axis=1)
    s_ood = _check_probs(ood_probs, "ood_probs").max(axis=1)
    return _auroc_of_scores(s_id, s_ood)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x in ascending order, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # the rank of the last member of each group of equal values
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _auroc_of_scores(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Mann-Whitney AUROC of ID (positive) against OOD scores, ties counting 1/2 (`ood_auroc`)."""
    n1, n0 = len(id_scores), len(ood_scores)
    ranks = _average_ranks(np.concatenate([id_scores, ood_scores]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


# ----- the uncertainty decomposition --------------------------------------------------------------
_MI_TOLERANCE = 1e-4
"""How far (nats) the expected entropy may exceed the entropy of the mean before it is an error:
float32 averaging of N softmaxes costs about 1e-6; more means the inputs do not belong together."""


def entropy(probs: Any) -> np.ndarray:
    """H(p_i) = -sum_k p_ik log p_ik per row, in nats, with 0 log 0 = 0: a (N,) float64 array.

    0 for a certain prediction, log K for the uniform one over K classes.
    """
    p = _check_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def expected_entropy(draws: Any) -> np.ndarray:
    """E_s[H(p^s_i)] = (1/S) sum_{s=1..S} H(p^s_i): the mean over S draws of each draw's entropy.

    `draws` has shape (S, N, K), the softmax of each of S posterior draws (dropout masks,
    ensemble members) for N examples; returns a (N,) float64 array. This is the aleatoric part of
    the predictive uncertainty; `melora.evaluation.predict_with_entropy` accumulates it batch by
    batch, so the S probability tensors need not be kept.
    """
    d = _to_numpy(draws, "draws")
    if d.ndim != 3 or d.shape[0] == 0:
        raise ValueError(f"draws must have shape (S, N, K) with S >= 1, got shape {d.shape}")
    return np.mean([entropy(d[s]) for s in range(d.shape[0])], axis=0)


def _check_expected_entropy(p: np.ndarray, expected: Any, name: str) -> np.ndarray:
    h = _to_numpy(expected, name)
    if h.shape != (p.shape[0],):
        raise ValueError(f"{name} must have shape ({p.shape[0]},) (one per example), got {h.shape}")
    if not np.issubdtype(h.dtype, np.floating) or not np.isfinite(h).all() or h.min() < 0.0:
        raise ValueError(f"{name} must hold finite entropies >= 0 in nats, got {h!r:.200}")
    return h.astype(np.float64)


def mutual_information(probs: Any, expected_entropy: Any) -> np.ndarray:
    """Per example, the epistemic part of the predictive uncertainty, in nats (a (N,) array):

        total      H[p_bar_i]                    p_bar_i = (1/S) sum_s p^s_i   (`probs`)
        aleatoric  E_s[H(p^s_i)]                 (`expected_entropy`, see `expected_entropy`)
        epistemic  MI_i = H[p_bar_i] - E_s[H(p^s_i)]

    MI is the mutual information between the label and the posterior draw (BALD, Houlsby et al.
    2011); it is >= 0 by the concavity of H (Jensen), 0 when every draw gives the same softmax,
    and at most log K. Differences below 0 by rounding (float32 averaging, up to 1e-4) are
    clipped to 0; a larger expected entropy than the mean's entropy is an error, since it cannot
    come from the same draws. With S = 1 (or a deterministic model) MI is identically 0.
    """
    p = _check_probs(probs)
    h = _check_expected_entropy(p, expected_entropy, "expected_entropy")
    mi = entropy(p) - h
    if mi.min() < -_MI_TOLERANCE:
        raise ValueError(
            f"expected_entropy exceeds the entropy of the mean prediction by up to {-mi.min():.4g} "
            "nats: pass the mean over draws of each draw's entropy, and the mean of the draws' "
            "softmaxes as probs (not logits, not a sum over draws)"
        )
    return np.maximum(mi, 0.0)


def mean_mutual_information(probs: Any, expected_entropy: Any) -> float:
    """(1/N) sum_i MI_i, the mean epistemic uncertainty of a set (`mutual_information`), in nats."""
    return float(np.mean(mutual_information(probs, expected_entropy)))


def ood_auroc_mi(
    id_probs: Any, id_expected_entropy: Any, ood_probs: Any, ood_expected_entropy: Any
) -> float:
    """AUROC of telling in-distribution from OOD examples by mutual information (`ood_auroc`'s
    statistic with the score s = -MI_i): an OOD example should show more epistemic uncertainty.

    1.0: every ID example has a lower MI than every OOD one; ties (say MI = 0 on both) count 1/2.
    """
    s_id = -mutual_information(id_probs, id_expected_entropy)
    s_ood = -mutual_information(ood_probs, ood_expected_entropy)
    return _auroc_of_scores(s_id, s_ood)


# ----- selective prediction -----------------------------------------------------------------------
def risk_coverage_curve(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk), each (N,): keep the k most confident examples, k = 1..N.

    Examples are ranked by confidence c_i = max_k p_ik, most confident first; coverage_k = k / N
    and risk_k = (errors among the top k) / k, an error being argmax_k p_ik != y_i (the argmax of
    `accuracy`). This is the risk-coverage curve of Geifman and El-Yaniv (2017).

    Ties: examples of equal confidence cannot be ordered by the ranker, so a cut inside a group
    of g tied examples with e errors counts the errors expected under a uniformly random order of
    the group: j * e / g for the first j of them. The curve is then the mean over every order of
    the tied examples, and does not depend on the order of the rows (a stable or index-order
    tie-break would reward the order the examples happen to be listed in).
    """
    p, y = _check_inputs(probs, labels)
    conf = p.max(axis=1)
    errors = (p.argmax(axis=1) != y).astype(np.float64)
    # Groups of equal confidence, most confident first (np.unique sorts -conf ascending).
    _, group, counts = np.unique(-conf, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    group_errors = np.bincount(group, weights=errors, minlength=len(counts))
    starts = np.cumsum(counts) - counts
    errors_before = np.cumsum(group_errors) - group_errors
    k = np.arange(1, len(y) + 1, dtype=np.float64)
    g = np.repeat(np.arange(len(counts)), counts)  # the group at each rank
    expected_errors = errors_before[g] + (k - starts[g]) * group_errors[g] / counts[g]
    return k / len(y), expected_errors / k


def aurc(probs: Any, labels: Any) -> float:
    """Area under the risk-coverage curve: AURC = (1/N) sum_{k=1..N} risk_k (`risk_coverage_curve`).

    Lower is better. 0 when every prediction is right; with e errors among N examples a perfect
    ranker (every error less confident than every right answer) reaches the minimum
    (1/N) sum_{k=N-e+1..N} (k - N + e) / k, and 1 means every prediction is wrong.
    """
    _, risk = risk_coverage_curve(probs, labels)
    return float(np.mean(risk))


def coverage_count(n: int, coverage: float) -> int:
    """ceil(coverage * n), the number of examples kept at `coverage` (rounded to 1e-9 first, so
    that 0.07 * 100 = 7.000000000000001 in floats keeps 7 examples, not 8)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    return max(1, math.ceil(round(coverage * n, 9)))


def accuracy_at_coverage(probs: Any, labels: Any, coverage: float = 0.8) -> float:
    """Accuracy on the ceil(coverage * N) most confident examples: 1 - risk_k at that k.

    Ties at the cut count as in `risk_coverage_curve` (the mean over the orders of the tied group).
    At coverage 1 this is `accuracy`.
    """
    _, risk = risk_coverage_curve(probs, labels)
    return float(1.0 - risk[coverage_count(len(risk), coverage) - 1])


def selective(probs: Any, labels: Any) -> dict[str, float]:
    """The selective-prediction metrics: {"aurc": `aurc`, "acc_cov80": accuracy at 80% coverage}."""
    return {"aurc": aurc(probs, labels), "acc_cov80": accuracy_at_coverage(probs, labels, 0.8)}


def compute_all(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """The four per-set metrics: {"acc", "nll", "ece", "brier"}."""
    return {
        "acc": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
    }
