"""Laying runs out as the paper's tables: which tables, columns and rows, the values of each cell
(over the finished runs, at the row's N), what is missing, and the paper's rows merged in.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from melora.keys import final_key
from orchestrator.errors import ReportError
from orchestrator.report.paper_tables import TABLES, PaperTable
from orchestrator.report.rows import Run, base_label, our_label, row_n, rows_of, status_counts
from orchestrator.report.tables import (
    METRICS,
    OOD_ONLY,
    SAMPLED_ONLY,
    TASK_LABELS,
    Column,
    Table,
    ordered_tasks,
    task_key,
)

Values = dict[tuple[str, str, Column], list[float]]  # (metric, row, column) -> raw values


def tables_of(
    runs: list[Run],
    metrics: list[str],
    n_samples: str | int,
    paper: str | Sequence[int] | None,
    notes: list[str],
) -> list[Table]:
    """The in-distribution table (several tasks, or no OOD sets) and one OOD table per task with
    OOD sets; notes on the paper's tables not shown go to `notes`."""
    tasks = ordered_tasks({r.task for r in runs})
    ood_of = {t: ordered_tasks({s for r in runs if r.task == t for s in r.ood_sets}) for t in tasks}
    papers = paper_tables(runs, paper, notes)
    tables = []
    if len(tasks) > 1 or not any(ood_of.values()):
        columns = [Column("test", t) for t in tasks]
        tables.append(
            _table(
                "In-distribution: test sets",
                "id",
                columns,
                runs,
                metrics=metrics,
                n_samples=n_samples,
                paper=papers.get("id"),
            )
        )
    for task in tasks:
        if ood_of[task]:
            columns = [Column("test", task)] + [Column("ood", s) for s in ood_of[task]]
            ptable = papers.get("ood") if task == "openbookqa" else None
            if papers.get("ood") and task != "openbookqa":
                notes.append(
                    f"Table {papers['ood'].number} is for training on openbookqa; not shown beside {task}"
                )
            title = f"Trained on {TASK_LABELS.get(task, task)}: in-distribution and OOD sets"
            tables.append(
                _table(
                    title, "ood", columns, runs, metrics=metrics, n_samples=n_samples, paper=ptable
                )
            )
    return tables


def _table(
    title: str,
    kind: str,
    columns: list[Column],
    runs: list[Run],
    *,
    metrics: list[str],
    n_samples: str | int,
    paper: PaperTable | None,
) -> Table:
    """One table: our rows (with the paper's rows and columns merged in), values and notes."""
    train_tasks = {c.name for c in columns} if kind == "id" else {columns[0].name}
    mine = [r for r in runs if r.task in train_tasks]
    rows = rows_of(mine)
    paper_rows: dict[str, str] = {}
    if paper is not None:
        columns, rows, paper_rows = merge_paper(paper, columns, rows)
    n_used = {row: row_n([r for r in mine if r.row == row], n_samples) for row in rows}
    shown = [m for m in metrics if not (m in OOD_ONLY and kind == "id")]
    notes: list[str] = []
    absent = [row for row in rows if not any(r.row == row for r in mine)]
    if absent:
        alone = " (the paper's numbers are shown alone)" if paper else ""
        notes.append(f"no runs of {', '.join(absent)}{alone}")
    unrun = [c.label for c in columns if not any(evaluates(r, c) for r in mine)]
    if unrun:
        notes.append(f"no runs evaluate {', '.join(unrun)}")
    values: Values = {}
    for row in rows:
        row_runs = [r for r in mine if r.row == row]
        for col in columns:
            if row_runs and col.label not in unrun:
                _fill_cell(values, notes, row_runs, col, metrics=shown, n=n_used[row])
    notes += _sampled_notes(rows, mine, shown, values)
    notes += _seed_notes(rows, values)
    if paper is not None:
        notes += paper_notes(paper, shown)
    return Table(
        title,
        kind,
        columns,
        rows,
        shown,
        values,
        n_used,
        paper,
        paper_rows,
        list(dict.fromkeys(notes)),
    )


def _fill_cell(
    values: Values, notes: list[str], row_runs: list[Run], col: Column, *, metrics: list[str], n
) -> None:
    """The finite values of each metric of one row and column into `values`; what is missing
    (no runs, none finished, a key absent or not finite) into `notes`."""
    row = row_runs[0].row
    col_runs = [r for r in row_runs if evaluates(r, col)]
    done = [r for r in col_runs if r.status == "FINISHED"]
    if not col_runs:
        notes.append(f"{row} x {col.label}: no runs")
    elif not done:
        notes.append(f"{row} x {col.label}: no finished runs ({status_counts(col_runs)})")
    for metric in metrics if done else []:
        if metric in OOD_ONLY and col.split == "test":
            continue
        key = final_key(col.split, col.name, metric, n)
        vals = [r.metrics[key] for r in done if math.isfinite(r.metrics.get(key, math.nan))]
        if vals:
            values[(metric, row, col)] = vals
        if len(vals) < len(done) and not (metric in SAMPLED_ONLY and not vals):
            notes.append(
                f"{row} x {col.label}: {key} missing or not finite in "
                f"{len(done) - len(vals)} of {len(done)} finished runs"
            )


def _sampled_notes(rows: list[str], mine: list[Run], shown: list[str], values: Values) -> list[str]:
    """One note for the rows without MI (only methods that sample at N >= 2 log it)."""
    sampled_only = [METRICS[m].label for m in shown if m in SAMPLED_ONLY]
    unsampled = [
        row
        for row in rows
        if any(r.row == row for r in mine)
        and not any(k[0] in SAMPLED_ONLY and k[1] == row for k in values)
    ]
    if not (sampled_only and unsampled):
        return []
    return [
        f"{'/'.join(sampled_only)}: only for methods whose predictive averages several draws "
        "(BLoB, Me-LoRA, MCD at N >= 2, e.g. --n-samples 10; ENS, its members, at every N); "
        f"none for {', '.join(unsampled)}"
    ]


def _seed_notes(rows: list[str], values: Values) -> list[str]:
    """Cells over fewer or more seeds than most, and ENS rows of one ensemble (no std)."""
    counts = collections.Counter(len(v) for v in values.values())
    usual = counts.most_common(1)[0][0] if counts else 0
    single_ens = [  # ENS seed 1 alone: its own note instead of "1 seeds"
        row
        for row in rows
        if base_label(row) == "ENS"
        and {len(v) for (_, r, _), v in values.items() if r == row} == {1}
    ]
    notes = [
        f"{row}: one ensemble per column, so no std over seeds; ENS seeds 2 and 3 "
        "(members: LoRA seeds 4-6 and 7-9) give one"
        for row in single_ens
    ]
    odd = sorted(
        {
            (row, c.label, len(v))
            for (_, row, c), v in values.items()
            if len(v) != usual and row not in single_ens
        }
    )
    return notes + [f"{row} x {label}: {k} seeds (the others {usual})" for row, label, k in odd]


def merge_paper(
    paper: PaperTable, columns: list[Column], rows: list[str]
) -> tuple[list[Column], list[str], dict[str, str]]:
    """The paper's columns and rows merged with ours, in the paper's order; {our row: paper row}.

    Each paper row follows our rows of the same method (a placeholder row when we have none)."""
    theirs = [  # an OOD table's first column is its in-distribution test set
        Column("test" if paper.kind == "id" or i == 0 else "ood", name)
        for i, name in enumerate(paper.columns)
    ]
    columns = columns + [c for c in theirs if c not in columns]
    columns.sort(key=lambda c: (theirs.index(c) if c in theirs else len(theirs), task_key(c.name)))
    ordered, paper_rows = [], {}
    for prow in paper.rows:
        same = [r for r in rows if base_label(r) == our_label(prow)] or [our_label(prow)]
        ordered += same
        paper_rows[same[-1]] = prow
    return columns, ordered + [r for r in rows if r not in ordered], paper_rows


def paper_notes(paper: PaperTable, metrics: list[str]) -> list[str]:
    """The paper's notes on the cells shown, one line per reason: a whole column, a whole row or cells."""
    metrics = [m for m in metrics if any(k[0] == m for k in paper.cells)]
    by_reason: dict[str, list[tuple[str, str, str]]] = {}
    for key, reason in paper.notes.items():
        if key[0] in metrics:
            by_reason.setdefault(reason, []).append(key)
    lines = []
    for reason, keys in by_reason.items():
        cols, lines_of = {k[2] for k in keys}, {(k[0], k[1]) for k in keys}
        if len(cols) == 1 and len(keys) == len(metrics) * len(paper.rows):
            where = f"all of {TASK_LABELS.get(next(iter(cols)))}"
        elif len(lines_of) == 1 and len(keys) == len(paper.columns):
            metric, row = next(iter(lines_of))
            where = f"the {METRICS[metric].label} row of {our_label(row)}"
        else:
            where = "; ".join(
                f"{METRICS[m].label} {our_label(r)} {TASK_LABELS.get(c, c)}" for m, r, c in keys
            )
        lines.append(f"paper Table {paper.number}, {where}: {reason}")
    return lines


def evaluates(run: Run, col: Column) -> bool:
    """Whether `run` logs metrics on `col`: its own task's test set, or one of its OOD sets."""
    if col.split == "test":
        return run.task == col.name
    return col.name in run.ood_sets


def paper_tables(
    runs: list[Run], paper: str | Sequence[int] | None, notes: list[str]
) -> dict[str, PaperTable]:
    """{'id': table, 'ood': table} of the paper to show beside ours (`paper`: 'auto' or numbers)."""
    if paper is None:
        return {}
    if paper == "auto":
        models = collections.Counter(r.params.get("model.name_or_path", "?") for r in runs)
        model = models.most_common(1)[0][0]
        size = "13b" if "13b" in model.lower() else "7b" if "7b" in model.lower() else None
        ablation = any(r.label == "Me-LoRA w/o noise" for r in runs)
        numbers = {"13b": (4, 5) if ablation else (2, 3), "7b": (8, 9)}.get(size or "", ())
        if not numbers:
            notes.append(
                f"no paper numbers: the runs' model {model!r} is not the paper's Llama2-7B or 13B "
                "(name the tables, e.g. --paper 2,3, to show them anyway)"
            )
    else:
        numbers = tuple(paper)
    out: dict[str, PaperTable] = {}
    for number in numbers:
        if number not in TABLES:
            raise ReportError(f"paper Table {number} is not stored: choose from {sorted(TABLES)}")
        table = TABLES[number]
        if table.kind in out:
            raise ReportError(
                f"paper Tables {out[table.kind].number} and {number} are both {table.kind} tables: name one"
            )
        out[table.kind] = table
    return out
