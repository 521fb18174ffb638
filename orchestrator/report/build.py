"""MLflow runs -> the paper's tables (Markdown, LaTeX), every run's values (CSV) and figures (PNG).

    report = build_report(uri, "table2_id_13b", paper="auto")   # reads MLflow; writes nothing
    print(report.markdown())
    write_report(report, Path("reports/table2_id_13b"))           # files, and the sweep's parent run

Which runs. `experiment` names an MLflow experiment (or, failing that, a sweep anywhere in the
store). In the experiment, the sweep is the parent run tagged `kind=sweep` (`--sweep` picks one
when there are several; by default the one named like the experiment); its child runs are the
trials, less the LoRA runs trained only as ENS members (tag sweep.role=ens_member, or trained by
`fit_ensemble` itself outside the sweep's plan). An experiment without a sweep is read as standalone `jobs/train.py` runs. Only FINISHED
runs enter the tables; the others are listed with their status and reason.

Rows (the paper's method rows), from each run's `method` tag and params:
    lora with optim.weight_decay > 0 -> MAP (the paper's MAP)   lora without -> LoRA
    mcd -> MCD   ens -> ENS   lap -> LAP   ts -> MAP+TS (temperature scaling)   blob -> BLoB
    melora with adapter.prior_noise -> Me-LoRA (the paper's "Ours")
    melora without                  -> Me-LoRA w/o noise (Tables 4 and 5)
Runs of one row that differ in any other config field between runs of the same task and seed
(not the name, task.* or tracking.*), such as the demo's two sigma_p values, are split into rows
qualified by that field:
"Me-LoRA (sigma_p=0.1)". Columns are the training tasks' test sets (in-distribution table) or,
for a task with `task.ood_tasks`, its test set followed by its OOD sets (one OOD table per task),
in the paper's order.

Which N (posterior samples; `test/<task>/<metric>_n<N>`). `n_samples="paper"` (the default) takes
per method the first of these that the runs logged: BLoB and Me-LoRA N = 1 (the paper: "sampled
once" in training, validation and testing), else 10, else 0; MCD and LAP N = 10 (METHOD.md), else
1, else 0; LoRA / MAP, MAP+TS and ENS N = 0 (deterministic: every N gives the same predictive). An integer
uses that N for every row. The N of each row is printed under each table.

Cells: mean and standard deviation over the runs (seeds) of a row and column, the std with
Bessel's correction (n - 1; the paper does not say which); ACC, ECE and AUROC in percent, NLL and
Brier raw, as the paper prints them. Best in bold and second best underlined, by the value as
printed and the metric's direction (ACC and AUROC higher, ECE, NLL and Brier lower); equal printed
values share the mark. A row or cell without finished runs prints "—" and is listed under the table.
Beyond the paper (`metrics=`): `aurc` (area under the risk-coverage curve, %, lower), `acc_cov80`
(accuracy of the 80% most confident, %, higher), `mi` (mean mutual information in nats, not
ranked) and `auroc_mi` (OOD AUROC by MI, %, higher); MI exists only for methods that sample at
test at N >= 2, so their rows need `n_samples=10` (or whichever N >= 2 the runs logged).

`paper` adds the paper's published numbers as rows "<method> (paper)" under ours, ranked among
themselves: "auto" picks by the runs' model (Llama2-13B: Tables 2 and 3, or 4 and 5 when a
"w/o noise" row is present; Llama2-7B: Tables 8 and 9), or name the tables ("2,3"). The paper's
rows and columns then appear even where no run of ours exists. The transcription and its
unreadable cells are in `orchestrator.report.paper_tables`.

Figures: test ACC and ECE against sigma_p and against the rank r (one line per value of the
other) for every row group whose runs vary them, and the reliability diagrams of each row's
first seed side by side per task (the runs' `reliability/test_<task>_n<N>.png` artifacts).

This module puts the rooms together: runs.py reads MLflow, rows.py assigns rows and N, layout.py
fills the tables (tables.py: Table, metrics, marks; cells.py: "mean ± std"), render.py prints
them, figures.py draws.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator import tracking
from orchestrator.errors import ReportError
from orchestrator.report.figures import reliability_figures, sweep_figures
from orchestrator.report.layout import tables_of
from orchestrator.report.render import render_latex, render_markdown, runs_csv
from orchestrator.report.rows import (
    Run,
    assign_rows,
    blob_notes,
    status_counts,
    to_run,
)
from orchestrator.report.runs import ensemble_helpers, find_runs
from orchestrator.report.tables import DEFAULT_METRICS, METRICS, Table

__all__ = ["Report", "build_report", "write_report"]


@dataclass
class Report:
    """Everything read back for one experiment or sweep, ready to render."""

    uri: str
    experiment: str
    sweep: str | None
    parent_run_id: str | None
    runs: list[Run]
    tables: list[Table]
    notes: list[str]
    n_samples: str | int

    def markdown(self) -> str:
        """The whole report as Markdown: every table, its notes, the runs left out."""
        head = f"# Report: {self.sweep or self.experiment}\n\n" + self._source_line()
        parts = [head] + [render_markdown(t) for t in self.tables]
        if self.notes:
            parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts) + "\n"

    def latex(self) -> str:
        """Every table as a LaTeX `table` environment (needs \\usepackage{booktabs})."""
        head = f"% Report: {self.sweep or self.experiment}; needs \\usepackage{{booktabs}}\n"
        return head + "\n".join(render_latex(t) for t in self.tables)

    def csv(self) -> str:
        """Every final metric of every run, one value a line (raw, unscaled)."""
        return runs_csv(self.runs)

    def _source_line(self) -> str:
        where = f"MLflow {tracking.redact_uri(self.uri)}, experiment `{self.experiment}`"
        if self.sweep:
            where += f", sweep `{self.sweep}` (parent run `{self.parent_run_id}`)"
        return f"{where}; runs: {status_counts(self.runs)}; N: {self.n_samples}."


def build_report(
    uri: str,
    experiment: str,
    sweep: str | None = None,
    *,
    n_samples: str | int = "paper",
    metrics: Sequence[str] = DEFAULT_METRICS,
    paper: str | Sequence[int] | None = None,
) -> Report:
    """Read the runs of `experiment` (or sweep) at `uri` and lay them out as the paper's tables."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ReportError(f"metrics {bad or list(metrics)} unknown: choose from {list(METRICS)}")
    if n_samples != "paper" and (not isinstance(n_samples, int) or n_samples < 0):
        raise ReportError(f"n_samples={n_samples!r}: use 'paper' or an integer >= 0")
    found = find_runs(uri, experiment, sweep)
    records, notes = found.records, found.notes
    helpers = ensemble_helpers(uri, found.parent_run_id, records)
    if helpers:
        notes.append(
            f"{len(helpers)} LoRA run{'s' * (len(helpers) != 1)} trained only as ENS members "
            "are not in the tables: "
            + ", ".join(sorted(r.name for r in records if r.run_id in helpers))
        )
    runs = assign_rows([to_run(r) for r in records if r.run_id not in helpers])
    finished = [r for r in runs if r.status == "FINISHED"]
    if not finished:
        what = (
            f"sweep {found.sweep!r} (experiment {found.experiment!r})"
            if found.sweep
            else f"experiment {found.experiment!r}"
        )
        reason = next((r.reason for r in runs if r.reason), None)
        raise ReportError(
            f"{what} at {tracking.redact_uri(uri)} has no finished runs "
            f"({status_counts(runs)}){f'; first failure: {reason}' if reason else ''}"
        )
    tables = tables_of(runs, list(metrics), n_samples, paper, notes)
    notes.extend(blob_notes(finished))
    for run in runs:
        if run.status != "FINISHED":
            notes.append(
                f"run {run.name} ({run.row}, {run.task}, seed {run.seed}) is {run.status}"
                + (f": {run.reason}" if run.reason else "")
                + "; left out"
            )
    return Report(
        uri, found.experiment, found.sweep, found.parent_run_id, runs, tables, notes, n_samples
    )


def write_report(report: Report, out_dir: str | os.PathLike, log: bool = True) -> list[Path]:
    """Write report.md, report.tex, runs.csv and figures/*.png under `out_dir` (each file whole
    or not at all), and log them to the sweep's parent run under `report/` when `log`."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="melora-report-") as tmp:
        stage = Path(tmp) / "report"
        figures = stage / "figures"
        figures.mkdir(parents=True)
        sweep_figures(report.runs, report.n_samples, figures)
        # figures before report.md: a missing reliability diagram adds a note to it
        _, absent = reliability_figures(
            report.uri, report.runs, report.n_samples, figures, Path(tmp) / "downloads"
        )
        if absent:
            report.notes.append(
                "no reliability diagram (reliability/test_<task>_n<N>.png) in runs "
                + ", ".join(absent)
            )
        (stage / "report.md").write_text(report.markdown(), encoding="utf-8")
        (stage / "report.tex").write_text(report.latex(), encoding="utf-8")
        (stage / "runs.csv").write_text(report.csv(), encoding="utf-8")
        written = []
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            written.append(_place(src, out / src.relative_to(stage)))
        if log and report.parent_run_id:
            tracking.log_artifacts(report.uri, report.parent_run_id, stage, "report")
    return written


def _place(src: Path, dst: Path) -> Path:
    """Copy `src` to `dst` through a temporary file beside it, so `dst` is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
