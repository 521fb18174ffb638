"""A report table and its cells: the metrics (how each is printed and ranked), the columns (the
evaluated sets, in the paper's order), `Table`, and `table_cells`, the text of every cell with its
best / second mark. layout.py fills tables from runs; render.py prints them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.report.cells import MISSING, mean_std
from orchestrator.report.paper_tables import PaperTable
from orchestrator.report.rows import base_label

DEFAULT_METRICS = ("acc", "ece", "nll")
OOD_ONLY = ("auroc", "auroc_mi")  # need an ID set to compare with: no cell in a test column
SAMPLED_ONLY = ("mi", "auroc_mi")  # logged only where the predictive averages N >= 2 draws
TASK_ORDER = (  # the paper's column order; other tasks follow alphabetically
    "winogrande_s",
    "arc_challenge",
    "arc_easy",
    "winogrande_m",
    "openbookqa",
    "boolq",
    "mmlu_college_chemistry",
    "mmlu_college_physics",
    "mmlu_college_mathematics",
)
TASK_LABELS = {
    "winogrande_s": "WG-S",
    "winogrande_m": "WG-M",
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "openbookqa": "OBQA",
    "boolq": "BoolQ",
    "mmlu_college_chemistry": "Chem.",
    "mmlu_college_physics": "Phy.",
    "mmlu_college_mathematics": "Math.",
}


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is printed and ranked."""

    label: str
    higher_is_better: bool | None  # None: no better direction (MI), so no best / second marks
    scale: float  # 100: printed in percent
    decimals: int

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]


METRICS = {
    "acc": MetricSpec("ACC", True, 100.0, 2),
    "ece": MetricSpec("ECE", False, 100.0, 2),
    "nll": MetricSpec("NLL", False, 1.0, 2),
    "brier": MetricSpec("Brier", False, 1.0, 3),
    "auroc": MetricSpec("AUROC", True, 100.0, 2),
    "aurc": MetricSpec("AURC", False, 100.0, 2),  # area under the risk-coverage curve
    "acc_cov80": MetricSpec("ACC@80", True, 100.0, 2),  # accuracy at 80% coverage
    "mi": MetricSpec("MI", None, 1.0, 4),  # mean mutual information (epistemic), nats
    "auroc_mi": MetricSpec("AUROC-MI", True, 100.0, 2),  # OOD detection by MI
}


@dataclass(frozen=True)
class Column:
    """One evaluated set: `test/<name>` (a training task) or `ood/<name>`."""

    split: str
    name: str

    @property
    def label(self) -> str:
        return TASK_LABELS.get(self.name, self.name)


@dataclass
class Table:
    """One table in the paper's layout: rows = metric x method, columns = evaluated sets."""

    title: str
    kind: str  # "id" or "ood"
    columns: list[Column]
    rows: list[str]
    metrics: list[str]
    values: dict[tuple[str, str, Column], list[float]]  # (metric, row, column) -> raw values
    n_used: dict[str, int | None]
    paper: PaperTable | None = None
    paper_rows: dict[str, str] = field(default_factory=dict)  # our row -> paper row
    notes: list[str] = field(default_factory=list)


def task_key(name: str) -> tuple[int, str]:
    """The sort key of a task: the paper's order (TASK_ORDER), then alphabetical."""
    return (TASK_ORDER.index(name) if name in TASK_ORDER else len(TASK_ORDER), name)


def ordered_tasks(names: Iterable[str]) -> list[str]:
    """The distinct task names, in the paper's order."""
    return sorted(set(names), key=task_key)


def table_cells(table: Table) -> list[tuple[str, str, bool, list[tuple[str, str]]]]:
    """[(metric, row label, is_paper_row, [(text, mark), ...] per column)], mark in '', 'best', 'second'."""
    out = []
    for metric in table.metrics:
        spec = METRICS[metric]
        lines = []
        for row in table.rows:
            texts = [
                mean_std(
                    table.values.get((metric, row, c), ()), scale=spec.scale, decimals=spec.decimals
                )
                for c in table.columns
            ]
            lines.append((row, False, texts))
            if row in table.paper_rows:
                prow = table.paper_rows[row]
                texts = [_paper_text(table.paper, metric, prow, c) for c in table.columns]
                lines.append((f"{base_label(row)} (paper)", True, texts))
        for paper_flag in (False, True):
            group = [cells for _, is_paper, cells in lines if is_paper == paper_flag]
            for j in range(len(table.columns)):
                marks = ranks([cells[j][1] for cells in group], spec.higher_is_better)
                for cells, mark in zip(group, marks, strict=True):
                    cells[j] = (cells[j][0], mark)
        out += [(metric, row, is_paper, cells) for row, is_paper, cells in lines]
    return out


def _paper_text(table: PaperTable, metric: str, prow: str, col: Column) -> tuple[str, float | None]:
    """The paper's cell as printed ('72.35 ± 0.75', '? ' where unreadable) and its mean."""
    cell = table.cell(metric, prow, col.name)
    if cell is None:
        return MISSING, None
    if cell.mean is None:
        return "?", None
    std = "?" if cell.std is None else f"{cell.std:.2f}"
    return f"{cell.mean:.2f} ± {std}", cell.mean


def ranks(values: list[float | None], higher: bool | None) -> list[str]:
    """'best', 'second' or '' for each value of one column by the metric's direction; equal
    values share the mark, None is never marked, and no direction (`higher=None`) marks nothing."""
    if higher is None:  # a metric without a better direction is not ranked
        return [""] * len(values)
    distinct = sorted({v for v in values if v is not None}, reverse=higher)
    best = distinct[0] if distinct else None
    second = distinct[1] if len(distinct) > 1 else None
    return [
        "best" if v == best and v is not None else "second" if v == second and v is not None else ""
        for v in values
    ]
