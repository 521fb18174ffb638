"""Reliability diagrams and accuracy-coverage curves (PNG, matplotlib's Agg renderer: no display
needed).

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so no global
backend or figure state is touched and nothing needs closing. Files are written to a temporary
file beside the target and renamed into place, so a diagram is written whole or not at all.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from melora.metrics import aurc, calibration_bins, ece, risk_coverage_curve


def reliability_diagram(
    probs: Any,
    labels: Any,
    path: str | os.PathLike[str],
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram of top-label confidence to `path` (PNG) and return the path.

    Top: per-bin accuracy as bars against the diagonal (perfect calibration), the gap to each
    bin's mean confidence marked; bottom: how many examples fall in each confidence bin.
    The bins are those of `melora.metrics.ece` and the title carries that ECE.
    """
    bins = calibration_bins(probs, labels, n_bins)
    ece_value = ece(probs, labels, n_bins)
    fig = _draw(bins.edges, bins.count, bins.accuracy, bins.confidence, ece_value, title=title)
    return _save_atomically(fig, Path(path))


def reliability_diagrams(
    predictions: Mapping[str, tuple[Any, Any]],
    out_dir: str | os.PathLike[str],
    n_bins: int = 15,
) -> list[Path]:
    """One diagram per entry of `predictions` ({"test/<task>/n<k>": (probs, labels)}).

    The file for key "test/arc_easy/n10" is `<out_dir>/test_arc_easy_n10.png`.
    """
    paths = []
    for key, (probs, labels) in predictions.items():
        path = Path(out_dir) / (key.replace("/", "_") + ".png")
        paths.append(reliability_diagram(probs, labels, path, n_bins=n_bins, title=key))
    return paths


def accuracy_coverage_plot(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write accuracy against coverage (selective prediction), one curve per entry, to `path`.

    `curves` maps a legend label (say "N=10") to (probs, labels). At coverage k/n the curve shows
    the accuracy of the k most confident examples, 1 - risk_k of `melora.metrics.risk_coverage_curve`
    (ties in confidence averaged over their orders); the legend carries each curve's AURC, and a
    dotted line marks 80% coverage (`acc_cov80`). A good ranker's curve falls from the left.
    """
    if not curves:
        raise ValueError("accuracy_coverage_plot needs at least one (probs, labels) curve")
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, (probs, labels) in curves.items():
        coverage, risk = risk_coverage_curve(probs, labels)
        ax.plot(coverage, 1.0 - risk, label=f"{label} (AURC {aurc(probs, labels):.4f})")
    ax.axvline(0.8, linestyle=":", color="gray", label="80% coverage")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (most confident first)",
           ylabel="accuracy of the kept examples")  # fmt: skip
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title or "accuracy against coverage", fontsize="medium")
    return _save_atomically(fig, Path(path))


def _draw(
    edges: np.ndarray,
    count: np.ndarray,
    acc: np.ndarray,
    conf: np.ndarray,
    ece_value: float,
    *,
    title: str | None,
) -> Figure:
    fig = Figure(figsize=(4.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    left, width = edges[:-1], np.diff(edges)
    filled = count > 0
    top.bar(left[filled], acc[filled], width=width[filled], align="edge",
            color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")  # fmt: skip
    top.bar(left[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled],
            align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.legend(loc="upper left", fontsize="small")
    heading = f"ECE = {ece_value:.4f} ({len(count)} bins)"
    top.set_title(f"{title}\n{heading}" if title else heading, fontsize="medium")
    bottom.bar(
        left, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5
    )
    bottom.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="examples")
    return fig


def _save_atomically(fig: Figure, path: Path) -> Path:
    """Write to a unique temporary sibling, then rename: the file is whole or absent.

    `open(..., "xb")` (not `mkstemp`) keeps the usual permissions (0o666 minus the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
