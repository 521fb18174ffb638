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
unreadable cells are in `orchestrator.paper_tables`.

Figures: test ACC and ECE against sigma_p and against the rank r (one line per value of the
other) for every row group whose runs vary them, and the reliability diagrams of each row's
first seed side by side per task (the runs' `reliability/test_<task>_n<N>.png` artifacts).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import tracking
from orchestrator.errors import ReportError
from orchestrator.report.paper_tables import TABLES, PaperTable
from orchestrator.tracking.conventions import ENS_MEMBER, ROLE_TAG

DEFAULT_METRICS = ("acc", "ece", "nll")
ROW_ORDER = ("MAP", "LoRA", "MAP+TS", "MCD", "ENS", "LAP", "BLoB", "Me-LoRA", "Me-LoRA w/o noise")
PAPER_ROW = {  # our row -> the paper's row name
    "MAP": "MAP",
    "MCD": "MCD",
    "ENS": "ENS",
    "LAP": "LAP",
    "BLoB": "BLoB",
    "Me-LoRA": "Ours",
    "Me-LoRA w/o noise": "w/o noise",
}
N_PREFERENCE = {  # n_samples="paper": per method, the first N the runs logged
    "blob": (1, 10, 0),
    "melora": (1, 10, 0),
    "mcd": (10, 1, 0),
    "lap": (10, 1, 0),
    "lora": (0, 1, 10),
    "ens": (0, 1, 10),
    "ts": (0, 1, 10),
}
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
SWEPT_AXES = ("adapter.sigma_p", "adapter.r")  # the x axes of the sweep figures
TILES_PER_LINE = 4  # reliability diagrams side by side, then wrapped
_NOT_A_ROW_FIELD = ("name", "seed")  # with task.* and tracking.*: never splits a row
_FINAL = re.compile(
    r"(test|ood)/([\w.-]+)/(acc_cov80|acc|nll|ece|brier|auroc_mi|auroc|mi|aurc)_n(\d+)"
)
OOD_ONLY = ("auroc", "auroc_mi")  # need an ID set to compare with: no cell in a test column
SAMPLED_ONLY = ("mi", "auroc_mi")  # logged only where the predictive averages N >= 2 draws
MISSING = "—"


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
class Run:
    """One training run as the report reads it."""

    run_id: str
    name: str
    status: str
    method: str
    label: str  # the row's method label (MAP, BLoB, Me-LoRA, ...)
    task: str
    seed: str
    ood_sets: tuple[str, ...]
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    reason: str | None
    quals: tuple[tuple[str, str], ...] = ()  # the fields that split the label's rows, and values
    row: str = ""  # the label with its qualifiers: "Me-LoRA (sigma_p=0.1)"


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
        head = f"# Report: {self.sweep or self.experiment}\n\n" + _source_line(self)
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
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        fields = ["adapter.sigma_p", "adapter.r", "adapter.prior_noise", "optim.weight_decay"]
        writer.writerow(
            ["run_id", "run_name", "status", "row", "method", "task", "seed", *fields]
            + ["split", "set", "metric", "n_samples", "value"]
        )
        for run in self.runs:
            head = [run.run_id, run.name, run.status, run.row, run.method, run.task, run.seed]
            head += [run.params.get(f, "") for f in fields]
            finals = sorted(
                (m.groups(), v) for k, v in run.metrics.items() if (m := _FINAL.fullmatch(k))
            )
            for (split, name, metric, n), value in finals:
                writer.writerow([*head, split, name, metric, n, repr(float(value))])
            if not finals:
                writer.writerow([*head, "", "", "", "", ""])
        return out.getvalue()


# ----- reading MLflow ---------------------------------------------------------------------------
def build_report(
    uri: str,
    experiment: str,
    sweep: str | None = None,
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
    exp_name, sweep_name, parent, records, notes = _find_runs(uri, experiment, sweep)
    helpers = _ensemble_helpers(uri, parent, records)
    if helpers:
        notes.append(
            f"{len(helpers)} LoRA run{'s' * (len(helpers) != 1)} trained only as ENS members "
            "are not in the tables: "
            + ", ".join(sorted(r.name for r in records if r.run_id in helpers))
        )
    runs = _assign_rows([_to_run(r) for r in records if r.run_id not in helpers])
    finished = [r for r in runs if r.status == "FINISHED"]
    if not finished:
        raise ReportError(
            f"{_what(exp_name, sweep_name)} at {tracking.redact_uri(uri)} has no finished runs "
            f"({_status_counts(runs)}){_first_reason(runs)}"
        )
    tables = _tables(runs, list(metrics), n_samples, paper, notes)
    notes.extend(_blob_notes(finished))
    for run in runs:
        if run.status != "FINISHED":
            notes.append(
                f"run {run.name} ({run.row}, {run.task}, seed {run.seed}) is {run.status}"
                + (f": {run.reason}" if run.reason else "")
                + "; left out"
            )
    return Report(uri, exp_name, sweep_name, parent, runs, tables, notes, n_samples)


def _find_runs(uri: str, experiment: str, sweep: str | None):
    """(experiment, sweep, parent run id, the trials or standalone runs, notes)."""
    exps = tracking.experiments(uri)
    where = tracking.redact_uri(uri)
    notes: list[str] = []
    if experiment in exps:
        query = "tags.kind = 'sweep'"
        found = [(experiment, p) for p in tracking.search_runs(uri, [exps[experiment]], query)]
        names = sorted({p.tags.get("sweep", "?") for _, p in found})
        if sweep is not None:
            found = [(e, p) for e, p in found if p.tags.get("sweep") == sweep]
            if not found:
                raise ReportError(
                    f"experiment {experiment!r} at {where} has no sweep {sweep!r}; its sweeps: {names}"
                )
        elif len(names) > 1:
            found = [(e, p) for e, p in found if p.tags.get("sweep") == experiment]
            if not found:
                raise ReportError(
                    f"experiment {experiment!r} at {where} holds several sweeps {names}: choose one with --sweep"
                )
        if not found:
            runs = [
                r
                for r in tracking.search_runs(uri, [exps[experiment]])
                if r.tags.get("kind") != "sweep"
            ]
            if not runs:
                raise ReportError(f"experiment {experiment!r} at {where} has no runs")
            notes.append(
                f"experiment {experiment!r} has no sweep: its {len(runs)} runs are read as standalone runs"
            )
            return experiment, None, None, runs, notes
    elif sweep is not None or "'" in experiment:
        raise ReportError(
            f"no MLflow experiment {experiment!r} at {where}; experiments there: {sorted(exps)}"
        )
    else:  # a sweep of this name in any experiment (a sweep started with --name)
        query = f"tags.kind = 'sweep' and tags.sweep = '{experiment}'"
        found = [(n, p) for n, eid in exps.items() for p in tracking.search_runs(uri, [eid], query)]
        if not found:
            raise ReportError(
                f"no MLflow experiment or sweep {experiment!r} at {where}; experiments there: {sorted(exps)}"
            )
    exp_name, parent = found[-1]
    if len(found) > 1:
        notes.append(
            f"{len(found)} parent runs of sweep {parent.tags.get('sweep')!r}: the latest ({parent.run_id}) is reported"
        )
    children = tracking.child_runs(uri, parent.run_id)
    if not children:
        raise ReportError(
            f"sweep {parent.tags.get('sweep')!r} (MLflow run {parent.run_id}) at {where} has no trial runs"
        )
    if parent.status == "RUNNING":
        notes.append("the sweep is still running: the tables hold the trials finished so far")
    return exp_name, parent.tags.get("sweep"), parent.run_id, children, notes


def _ensemble_helpers(uri: str, parent: str | None, records: list[tracking.RunRecord]) -> set[str]:
    """Ids of the LoRA runs trained only as ENS members (LoRA seeds 4-9 for ENS seeds 2 and 3):
    the sweep's member trials (tag sweep.role=ens_member), or members that `fit_ensemble` trained
    itself, which are not trials the sweep planned (its sweep/trials.json)."""
    tagged = {r.run_id for r in records if r.tags.get(ROLE_TAG) == ENS_MEMBER}
    members = {m for r in records for m in r.tags.get("ensemble_members", "").split(",") if m}
    if not members or parent is None:
        return tagged
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(uri, parent, "sweep/trials.json", tmp)
        planned = {t.get("name") for t in json.loads(path.read_text())} if path else set()
    if not planned:  # optuna and standalone runs plan nothing ahead: keep every run
        return tagged
    return tagged | {r.run_id for r in records if r.run_id in members and r.name not in planned}


def _to_run(r: tracking.RunRecord) -> Run:
    method = r.tags.get("method") or r.params.get("adapter.method") or "?"
    task = r.tags.get("task") or r.params.get("task.name") or "?"
    ood = list(_json_list(r.params.get("task.ood_tasks")))
    for key in r.metrics:
        m = _FINAL.fullmatch(key)
        if m and m.group(1) == "ood" and m.group(2) not in ood:
            ood.append(m.group(2))
    return Run(
        run_id=r.run_id,
        name=r.name,
        status=r.status,
        method=method,
        label=method_row(method, r.params),
        task=task,
        seed=r.tags.get("seed") or r.params.get("seed") or "?",
        ood_sets=tuple(ood),
        params=dict(r.params),
        metrics=dict(r.metrics),
        reason=r.tags.get("failure_reason"),
    )


def _blob_notes(runs: list[Run]) -> list[str]:
    """How the BLoB rows were run, read from their params: the paper's replication (no flipout,
    Me-LoRA's KL regularisation with prior noise) or the official BLoB (flipout, a fixed prior)."""
    kinds = {
        (False, True): "as the paper re-implemented it",
        (True, False): "as the official BLoB",
    }
    settings = {
        (
            _is_true(r.params.get("adapter.flipout", "true")),
            _is_true(r.params.get("adapter.prior_noise", "true")),
        )
        for r in runs
        if r.method == "blob"
    }
    notes = []
    for flipout, noise in sorted(settings):
        prior = "on (Me-LoRA's KL regularisation)" if noise else "off (a fixed prior)"
        notes.append(
            f"BLoB rows {kinds.get((flipout, noise), 'in a variant')}: "
            f"flipout {'on' if flipout else 'off'}, prior noise {prior}"
        )
    return notes


def _is_true(value: str) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def method_row(method: str, params: Mapping[str, str]) -> str:
    """The paper's method row of a run (module docstring): MAP, LoRA, MCD, ENS, LAP, BLoB, Me-LoRA, ..."""
    if method == "lora":
        return "MAP" if (_as_float(params.get("optim.weight_decay")) or 0.0) > 0 else "LoRA"
    if method == "melora":
        noise = _is_true(params.get("adapter.prior_noise", "true"))
        return "Me-LoRA" if noise else "Me-LoRA w/o noise"
    labels = {"blob": "BLoB", "mcd": "MCD", "ens": "ENS", "lap": "LAP", "ts": "MAP+TS"}
    return labels.get(method, method)


def _assign_rows(runs: list[Run]) -> list[Run]:
    """Split a label's runs into rows by the config fields that differ between runs of one task
    and one seed (so fields that follow the seed, like an ensemble's member seeds, do not)."""
    out = []
    for label, group in _group(runs, lambda r: r.label).items():
        alike = _group(group, lambda r: (r.task, r.seed))
        keys = sorted(
            {
                k
                for same in alike.values()
                for k in {k for r in same for k in r.params}
                if _splits_rows(k) and len({r.params.get(k) for r in same}) > 1
            }
        )
        for r in group:
            quals = tuple((k, r.params.get(k, "?")) for k in keys)
            out.append(dataclasses.replace(r, quals=quals, row=_row_name(label, quals)))
    by_id = {r.run_id: r for r in out}
    return [by_id[r.run_id] for r in runs]


def _row_name(label: str, quals: Iterable[tuple[str, str]]) -> str:
    text = ", ".join(f"{_short(k)}={v}" for k, v in quals)
    return f"{label} ({text})" if text else label


def _rows_of(runs: Iterable[Run]) -> list[str]:
    """The distinct rows of `runs`, in the paper's method order, then by qualifier values."""

    def key(r: Run):
        rank = ROW_ORDER.index(r.label) if r.label in ROW_ORDER else len(ROW_ORDER)
        values = [(_as_float(v) is None, _as_float(v) or 0.0, v) for _, v in r.quals]
        return (rank, r.label, values)

    return list(dict.fromkeys(r.row for r in sorted(runs, key=key)))


def _splits_rows(key: str) -> bool:
    return key not in _NOT_A_ROW_FIELD and not key.startswith(("task.", "tracking."))


# ----- the tables -------------------------------------------------------------------------------
def _tables(runs: list[Run], metrics: list[str], n_samples, paper, notes: list[str]) -> list[Table]:
    tasks = _ordered({r.task for r in runs})
    ood_of = {t: _ordered({s for r in runs if r.task == t for s in r.ood_sets}) for t in tasks}
    papers = _paper_tables(runs, paper, notes)
    tables = []
    if len(tasks) > 1 or not any(ood_of.values()):
        columns = [Column("test", t) for t in tasks]
        tables.append(
            _table(
                "In-distribution: test sets",
                "id",
                columns,
                runs,
                metrics,
                n_samples,
                papers.get("id"),
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
            tables.append(_table(title, "ood", columns, runs, metrics, n_samples, ptable))
    return tables


def _table(
    title: str,
    kind: str,
    columns: list[Column],
    runs: list[Run],
    metrics: list[str],
    n_samples,
    paper: PaperTable | None,
) -> Table:
    """One table: our rows (with the paper's rows and columns merged in), values and notes."""
    train_tasks = {c.name for c in columns} if kind == "id" else {columns[0].name}
    mine = [r for r in runs if r.task in train_tasks]
    rows = _rows_of(mine)
    paper_rows: dict[str, str] = {}
    if paper is not None:
        columns, rows, paper_rows = _merge_paper(paper, columns, rows)
    n_used = {row: _row_n([r for r in mine if r.row == row], n_samples) for row in rows}
    shown = [m for m in metrics if not (m in OOD_ONLY and kind == "id")]
    values: dict[tuple[str, str, Column], list[float]] = {}
    notes: list[str] = []
    absent = [row for row in rows if not any(r.row == row for r in mine)]
    if absent:
        alone = " (the paper's numbers are shown alone)" if paper else ""
        notes.append(f"no runs of {', '.join(absent)}{alone}")
    unrun = [c.label for c in columns if not any(_evaluates(r, c) for r in mine)]
    if unrun:
        notes.append(f"no runs evaluate {', '.join(unrun)}")
    for row in rows:
        row_runs = [r for r in mine if r.row == row]
        for col in columns:
            col_runs = [r for r in row_runs if _evaluates(r, col)]
            done = [r for r in col_runs if r.status == "FINISHED"]
            if not row_runs or col.label in unrun:
                continue
            if not col_runs:
                notes.append(f"{row} x {col.label}: no runs")
            elif not done:
                notes.append(f"{row} x {col.label}: no finished runs ({_status_counts(col_runs)})")
            for metric in shown if done else []:
                if metric in OOD_ONLY and col.split == "test":
                    continue
                key = f"{col.split}/{col.name}/{metric}_n{n_used[row]}"
                vals = [r.metrics[key] for r in done if math.isfinite(r.metrics.get(key, math.nan))]
                if vals:
                    values[(metric, row, col)] = vals
                if len(vals) < len(done) and not (metric in SAMPLED_ONLY and not vals):
                    notes.append(
                        f"{row} x {col.label}: {key} missing or not finite in "
                        f"{len(done) - len(vals)} of {len(done)} finished runs"
                    )
    sampled_only = [METRICS[m].label for m in shown if m in SAMPLED_ONLY]
    unsampled = [
        row
        for row in rows
        if any(r.row == row for r in mine)
        and not any(k[0] in SAMPLED_ONLY and k[1] == row for k in values)
    ]
    if sampled_only and unsampled:
        notes.append(
            f"{'/'.join(sampled_only)}: only for methods whose predictive averages several draws "
            "(BLoB, Me-LoRA, MCD at N >= 2, e.g. --n-samples 10; ENS, its members, at every N); "
            f"none for {', '.join(unsampled)}"
        )
    counts = collections.Counter(len(v) for v in values.values())
    usual = counts.most_common(1)[0][0] if counts else 0
    single_ens = [  # ENS seed 1 alone: its own note instead of "1 seeds"
        row
        for row in rows
        if _base(row) == "ENS" and {len(v) for (_, r, _), v in values.items() if r == row} == {1}
    ]
    notes += [
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
    notes += [f"{row} x {label}: {k} seeds (the others {usual})" for row, label, k in odd]
    if paper is not None:
        notes += _paper_notes(paper, shown)
    return Table(
        title, kind, columns, rows, shown, values, n_used, paper, paper_rows, _dedupe(notes)
    )


def _merge_paper(
    paper: PaperTable, columns: list[Column], rows: list[str]
) -> tuple[list[Column], list[str], dict[str, str]]:
    """The paper's columns and rows merged with ours, in the paper's order; {our row: paper row}.

    Each paper row follows our rows of the same method (a placeholder row when we have none)."""
    theirs = [  # an OOD table's first column is its in-distribution test set
        Column("test" if paper.kind == "id" or i == 0 else "ood", name)
        for i, name in enumerate(paper.columns)
    ]
    columns = columns + [c for c in theirs if c not in columns]
    columns.sort(key=lambda c: (theirs.index(c) if c in theirs else len(theirs), _task_key(c.name)))
    ordered, paper_rows = [], {}
    for prow in paper.rows:
        same = [r for r in rows if _base(r) == _ours(prow)] or [_ours(prow)]
        ordered += same
        paper_rows[same[-1]] = prow
    return columns, ordered + [r for r in rows if r not in ordered], paper_rows


def _paper_notes(paper: PaperTable, metrics: list[str]) -> list[str]:
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
            where = f"the {METRICS[metric].label} row of {_ours(row)}"
        else:
            where = "; ".join(
                f"{METRICS[m].label} {_ours(r)} {TASK_LABELS.get(c, c)}" for m, r, c in keys
            )
        lines.append(f"paper Table {paper.number}, {where}: {reason}")
    return lines


def _evaluates(run: Run, col: Column) -> bool:
    if col.split == "test":
        return run.task == col.name
    return col.name in run.ood_sets


def _row_n(runs: list[Run], n_samples) -> int | None:
    """The N reported for a row (module docstring)."""
    if not runs:
        return None
    if isinstance(n_samples, int):
        return n_samples
    logged = {int(m.group(4)) for r in runs for k in r.metrics if (m := _FINAL.fullmatch(k))}
    for n in N_PREFERENCE.get(runs[0].method, (0, 1, 10)):
        if n in logged:
            return n
    return min(logged) if logged else 0


def _paper_tables(runs: list[Run], paper, notes: list[str]) -> dict[str, PaperTable]:
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


# ----- rendering --------------------------------------------------------------------------------
def _cell_text(values: list[float] | None, spec: MetricSpec) -> tuple[str, float | None]:
    """('72.35 ± 0.75', 72.35) for our cell; the second item is the printed mean, for ranking."""
    if not values:
        return MISSING, None
    scaled = [v * spec.scale for v in values]
    mean = f"{statistics.fmean(scaled):.{spec.decimals}f}"
    if len(scaled) == 1:
        return mean, float(mean)
    return f"{mean} ± {statistics.stdev(scaled):.{spec.decimals}f}", float(mean)


def _paper_text(table: PaperTable, metric: str, prow: str, col: Column) -> tuple[str, float | None]:
    cell = table.cell(metric, prow, col.name)
    if cell is None:
        return MISSING, None
    if cell.mean is None:
        return "?", None
    std = "?" if cell.std is None else f"{cell.std:.2f}"
    return f"{cell.mean:.2f} ± {std}", cell.mean


def table_cells(table: Table) -> list[tuple[str, str, bool, list[tuple[str, str]]]]:
    """[(metric, row label, is_paper_row, [(text, mark), ...] per column)], mark in '', 'best', 'second'."""
    out = []
    for metric in table.metrics:
        spec = METRICS[metric]
        lines = []
        for row in table.rows:
            lines.append(
                (
                    row,
                    False,
                    [_cell_text(table.values.get((metric, row, c)), spec) for c in table.columns],
                )
            )
            if row in table.paper_rows:
                prow = table.paper_rows[row]
                texts = [_paper_text(table.paper, metric, prow, c) for c in table.columns]
                lines.append((f"{_base(row)} (paper)", True, texts))
        for paper_flag in (False, True):
            group = [cells for _, is_paper, cells in lines if is_paper == paper_flag]
            for j in range(len(table.columns)):
                ranks = _ranks([cells[j][1] for cells in group], spec.higher_is_better)
                for cells, mark in zip(group, ranks, strict=True):
                    cells[j] = (cells[j][0], mark)
        out += [(metric, row, is_paper, cells) for row, is_paper, cells in lines]
    return out


def _ranks(values: list[float | None], higher: bool | None) -> list[str]:
    if higher is None:  # a metric without a better direction is not ranked
        return [""] * len(values)
    distinct = sorted({v for v in values if v is not None}, reverse=higher)
    best = distinct[0] if distinct else None
    second = distinct[1] if len(distinct) > 1 else None
    return [
        "best" if v == best and v is not None else "second" if v == second and v is not None else ""
        for v in values
    ]


def render_markdown(table: Table) -> str:
    """The table in Markdown: **best**, <ins>second</ins>, paper rows labelled '(paper)'."""
    head = ["Metric", "Method"] + [c.label for c in table.columns]
    lines = [f"## {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for metric, row, _, cells in table_cells(table):
        spec = METRICS[metric]
        name = f"{spec.label} {spec.arrow}".strip() if metric != last else ""
        last = metric
        texts = [{"best": f"**{t}**", "second": f"<ins>{t}</ins>"}.get(m, t) for t, m in cells]
        lines.append("| " + " | ".join([name, row, *texts]) + " |")
    lines += ["", _footer(table)]
    if table.notes:
        lines += ["", "Missing or partial:", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines)


def render_latex(table: Table) -> str:
    """The table as a LaTeX `table` with booktabs rules, cells as $mean_{std}$."""
    cols = "ll" + "c" * len(table.columns)
    head = " & ".join(["Metric", "Method"] + [_tex(c.label) for c in table.columns])
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex(table.title)}. {_tex(_footer(table))}}}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        head + " \\\\",
    ]
    last = None
    for metric, row, is_paper, cells in table_cells(table):
        spec = METRICS[metric]
        if metric != last:
            lines.append("\\midrule")
        arrow = {True: " $\\uparrow$", False: " $\\downarrow$", None: ""}[spec.higher_is_better]
        name = f"{spec.label}{arrow}" if metric != last else ""
        last = metric
        label = f"\\textit{{{_tex(row)}}}" if is_paper else _tex(row)
        lines.append(" & ".join([name, label, *[_tex_cell(t, m) for t, m in cells]]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def _tex_cell(text: str, mark: str) -> str:
    if text == MISSING:
        return "--"
    mean, _, std = text.partition(" ± ")
    body = f"{mean}_{{{std}}}" if std else mean
    body = {"best": f"\\mathbf{{{body}}}", "second": f"\\underline{{{body}}}"}.get(mark, body)
    return f"${body}$"


def _footer(table: Table) -> str:
    ns = ", ".join(
        f"{row} {'?' if n is None else n}" for row, n in table.n_used.items() if n is not None
    )
    pct = "/".join(METRICS[m].label for m in table.metrics if METRICS[m].scale == 100.0)
    text = f"Mean ± std over seeds{f'; {pct} in %' if pct else ''}. N (posterior samples) per row: {ns or MISSING}."
    if table.paper is not None:
        text += f" Paper rows: Table {table.paper.number} ({table.paper.model})."
    return text


def _tex(text: str) -> str:
    text = text.replace("\\", "\\textbackslash{}")
    for ch in "&%$#_{}":
        text = text.replace(ch, "\\" + ch)
    return text.replace("±", "$\\pm$").replace("—", "--").replace("~", "\\textasciitilde{}")


def _source_line(report: Report) -> str:
    where = f"MLflow {tracking.redact_uri(report.uri)}, experiment `{report.experiment}`"
    if report.sweep:
        where += f", sweep `{report.sweep}` (parent run `{report.parent_run_id}`)"
    return f"{where}; runs: {_status_counts(report.runs)}; N: {report.n_samples}."


# ----- files and figures ------------------------------------------------------------------------
def write_report(report: Report, out_dir: str | os.PathLike, log: bool = True) -> list[Path]:
    """Write report.md, report.tex, runs.csv and figures/*.png under `out_dir` (each file whole
    or not at all), and log them to the sweep's parent run under `report/` when `log`."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="melora-report-") as tmp:
        stage = Path(tmp) / "report"
        (stage / "figures").mkdir(parents=True)
        sweep_figures(report, stage / "figures")  # figures first: a missing diagram adds a note
        reliability_figures(report, stage / "figures", Path(tmp) / "downloads")
        (stage / "report.md").write_text(report.markdown(), encoding="utf-8")
        (stage / "report.tex").write_text(report.latex(), encoding="utf-8")
        (stage / "runs.csv").write_text(report.csv(), encoding="utf-8")
        written = []
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            written.append(_place(src, out / src.relative_to(stage)))
        if log and report.parent_run_id:
            tracking.log_artifacts(report.uri, report.parent_run_id, stage, "report")
    return written


def sweep_figures(report: Report, out_dir: Path) -> list[Path]:
    """Test ACC and ECE against sigma_p and the rank, one PNG per row group and task that varies them."""
    from matplotlib.figure import Figure

    done = [r for r in report.runs if r.status == "FINISHED"]
    paths = []
    for (group, task), runs in _group(done, lambda r: (_strip_axes(r), r.task)).items():
        axes = [a for a in SWEPT_AXES if len(_by_param(runs, a)) > 1]
        if not axes:
            continue
        n = _row_n(runs, report.n_samples)
        fig = Figure(figsize=(4.5 * len(axes), 7), layout="constrained")
        grid = fig.subplots(2, len(axes), squeeze=False)
        for j, x_axis in enumerate(axes):
            other = next(a for a in SWEPT_AXES if a != x_axis)
            for i, metric in enumerate(("acc", "ece")):
                ax = grid[i][j]
                for value, line_runs in sorted(_by_param(runs, other).items()):
                    xs, means, stds = _curve(line_runs, x_axis, f"test/{task}/{metric}_n{n}")
                    label = f"{_short(other)}={value:g}" if not math.isnan(value) else None
                    if xs:
                        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
                ax.set_xscale("log", base=2 if x_axis == "adapter.r" else 10)
                ticks = sorted(v for v in _by_param(runs, x_axis) if not math.isnan(v))
                ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
                ax.minorticks_off()
                ax.set(xlabel=_short(x_axis), ylabel=f"test {METRICS[metric].label} (%)")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize="small")
        fig.suptitle(f"{group} on {task}: N = {n}, mean ± std over seeds")
        paths.append(_save_figure(fig, out_dir / f"sweep_{_slug(group)}_{_slug(task)}.png"))
    return paths


def _by_param(runs: list[Run], key: str) -> dict[float, list[Run]]:
    """Runs grouped by the numeric value of param `key` (NaN where absent)."""
    out: dict[float, list[Run]] = {}
    for r in runs:
        value = _as_float(r.params.get(key))
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


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def reliability_figures(report: Report, out_dir: Path, download_dir: Path) -> list[Path]:
    """Per training task, each row's reliability diagram (its first seed) side by side."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    done = [r for r in report.runs if r.status == "FINISHED"]
    paths, absent = [], []
    for task in _ordered({r.task for r in done}):
        rows = _rows_of(r for r in done if r.task == task)
        images = []
        for row in rows:
            runs = [r for r in done if r.task == task and r.row == row]
            first = min(runs, key=lambda r: (_as_float(r.seed) or 0.0, r.seed))
            n = _row_n(runs, report.n_samples)
            path = tracking.download_artifact(
                report.uri,
                first.run_id,
                f"reliability/test_{task}_n{n}.png",
                download_dir / first.run_id,
            )
            if path is None:
                absent.append(f"{first.name} (N = {n})")
            else:
                images.append((f"{row}\nseed {first.seed}, N = {n}", imread(path)))
        if not images:
            continue
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
        paths.append(_save_figure(fig, out_dir / f"reliability_{_slug(task)}.png"))
    if absent:
        report.notes.append(
            f"no reliability diagram (reliability/test_<task>_n<N>.png) in runs {', '.join(absent)}"
        )
    return paths


def _save_figure(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


# ----- helpers ----------------------------------------------------------------------------------
def _group(items: Iterable, key) -> dict:
    out: dict = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def _ours(paper_row: str) -> str:
    """Our label of a paper row: 'Ours' -> 'Me-LoRA'."""
    return next(k for k, v in PAPER_ROW.items() if v == paper_row)


def _base(row: str) -> str:
    """'Me-LoRA (sigma_p=0.1)' -> 'Me-LoRA'."""
    return row.split(" (", 1)[0]


def _strip_axes(run: Run) -> str:
    """The run's row without its sigma_p and r qualifiers: the group a sweep figure draws."""
    return _row_name(run.label, [(k, v) for k, v in run.quals if k not in SWEPT_AXES])


def _task_key(name: str):
    return (TASK_ORDER.index(name) if name in TASK_ORDER else len(TASK_ORDER), name)


def _ordered(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=_task_key)


def _as_float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _status_counts(runs: Iterable[Run]) -> str:
    counts = collections.Counter(r.status for r in runs)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def _first_reason(runs: Iterable[Run]) -> str:
    reason = next((r.reason for r in runs if r.reason), None)
    return f"; first failure: {reason}" if reason else ""


def _what(experiment: str, sweep: str | None) -> str:
    return f"sweep {sweep!r} (experiment {experiment!r})" if sweep else f"experiment {experiment!r}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_").lower()


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
