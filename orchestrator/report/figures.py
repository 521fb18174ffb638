"""The report's figures (PNG, matplotlib): test ACC and ECE against sigma_p and the rank r for
every row group whose runs vary them, and each row's reliability diagram side by side per task.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import uuid
from pathlib import Path

from melora.keys import final_key
from orchestrator import tracking
from orchestrator.report.rows import (
    Run,
    as_float,
    group_by,
    row_n,
    row_name,
    rows_of,
    short_name,
)
from orchestrator.report.tables import METRICS, ordered_tasks

SWEPT_AXES = ("adapter.sigma_p", "adapter.r")  # the x axes of the sweep figures
TILES_PER_LINE = 4  # reliability diagrams side by side, then wrapped


def sweep_figures(runs: list[Run], n_samples: str | int, out_dir: Path) -> list[Path]:
    """Test ACC and ECE against sigma_p and the rank, one PNG per row group and task that varies them."""
    from matplotlib.figure import Figure  # why: matplotlib only when drawing

    done = [r for r in runs if r.status == "FINISHED"]
    paths = []
    for (group, task), group_runs in group_by(done, lambda r: (_strip_axes(r), r.task)).items():
        axes = [a for a in SWEPT_AXES if len(_by_param(group_runs, a)) > 1]
        if not axes:
            continue
        n = row_n(group_runs, n_samples)
        fig = Figure(figsize=(4.5 * len(axes), 7), layout="constrained")
        grid = fig.subplots(2, len(axes), squeeze=False)
        for j, x_axis in enumerate(axes):
            for i, metric in enumerate(("acc", "ece")):
                key = final_key("test", task, metric, n)
                ylabel = f"test {METRICS[metric].label} (%)"
                _sweep_panel(grid[i][j], group_runs, x_axis, key=key, ylabel=ylabel)
        fig.suptitle(f"{group} on {task}: N = {n}, mean ± std over seeds")
        paths.append(_save_figure(fig, out_dir / f"sweep_{_slug(group)}_{_slug(task)}.png"))
    return paths


def _sweep_panel(ax, runs: list[Run], x_axis: str, *, key: str, ylabel: str) -> None:
    """One panel: metric `key` against `x_axis`, one line per value of the other swept axis."""
    other = next(a for a in SWEPT_AXES if a != x_axis)
    for value, line_runs in sorted(_by_param(runs, other).items()):
        xs, means, stds = _curve(line_runs, x_axis, key)
        label = f"{short_name(other)}={value:g}" if not math.isnan(value) else None
        if xs:
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2 if x_axis == "adapter.r" else 10)
    ticks = sorted(v for v in _by_param(runs, x_axis) if not math.isnan(v))
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.set(xlabel=short_name(x_axis), ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _by_param(runs: list[Run], key: str) -> dict[float, list[Run]]:
    """Runs grouped by the numeric value of param `key` (NaN where absent)."""
    out: dict[float, list[Run]] = {}
    for r in runs:
        value = as_float(r.params.get(key))
        out.setdefault(math.nan if value is None else value, []).append(r)
    return out


def _curve(runs: list[Run], x_axis: str, key: str) -> tuple[list[float], list[float], list[float]]:
    """(x, mean, std) in percent of metric `key` over the runs at each value of `x_axis`."""
    xs, means, stds = [], [], []
    for x, at_x in sorted(_by_param(runs, x_axis).items()):
        vals = [100 * r.metrics[key] for r in at_x if math.isfinite(r.metrics.get(key, math.nan))]
        if vals and not math.isnan(x):
            xs.append(x)
            means.append(statistics.fmean(vals))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return xs, means, stds


def _strip_axes(run: Run) -> str:
    """The run's row without its sigma_p and r qualifiers: the group a sweep figure draws."""
    return row_name(run.label, [(k, v) for k, v in run.quals if k not in SWEPT_AXES])


def reliability_figures(
    uri: str, runs: list[Run], n_samples: str | int, out_dir: Path, download_dir: Path
) -> tuple[list[Path], list[str]]:
    """Per training task, each row's reliability diagram (its first seed) side by side; and the
    runs without one (their `reliability/test_<task>_n<N>.png` artifact), as 'name (N = n)'."""
    from matplotlib.image import imread  # why: matplotlib only when drawing

    done = [r for r in runs if r.status == "FINISHED"]
    paths, absent = [], []
    for task in ordered_tasks({r.task for r in done}):
        images = []
        for row in rows_of(r for r in done if r.task == task):
            row_runs = [r for r in done if r.task == task and r.row == row]
            first = min(row_runs, key=lambda r: (as_float(r.seed) or 0.0, r.seed))
            n = row_n(row_runs, n_samples)
            path = tracking.download_artifact(
                uri, first.run_id, f"reliability/test_{task}_n{n}.png", download_dir / first.run_id
            )
            if path is None:
                absent.append(f"{first.name} (N = {n})")
            else:
                images.append((f"{row}\nseed {first.seed}, N = {n}", imread(path)))
        if images:
            paths.append(_tile(images, task, out_dir / f"reliability_{_slug(task)}.png"))
    return paths, absent


def _tile(images: list[tuple[str, object]], task: str, path: Path) -> Path:
    """The diagrams of one task, TILES_PER_LINE a line, saved to `path`."""
    from matplotlib.figure import Figure  # why: matplotlib only when drawing

    cols = min(len(images), TILES_PER_LINE)
    lines = math.ceil(len(images) / cols)
    fig = Figure(figsize=(3.6 * cols, 4.6 * lines), layout="constrained")
    axes = fig.subplots(lines, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (title, image) in zip(axes, images, strict=False):
        ax.imshow(image)
        ax.set_title(title, fontsize="medium")
    fig.suptitle(f"Reliability diagrams: {task} test set")
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_").lower()
