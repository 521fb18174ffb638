"""Printing the report: a table in Markdown (**best**, <ins>second</ins>) or LaTeX (booktabs), its
footer (the N of each row), and every final metric of every run as CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from melora.keys import parse_final_key
from orchestrator.report.cells import MISSING
from orchestrator.report.rows import Run
from orchestrator.report.tables import METRICS, Table, table_cells

CSV_FIELDS = ("adapter.sigma_p", "adapter.r", "adapter.prior_noise", "optim.weight_decay")


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
    lines += ["", footer(table)]
    if table.notes:
        lines += ["", "Missing or partial:", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines)


def render_latex(table: Table) -> str:
    """The table as a LaTeX `table` with booktabs rules, cells as $mean_{std}$."""
    cols = "ll" + "c" * len(table.columns)
    head = " & ".join(["Metric", "Method"] + [tex(c.label) for c in table.columns])
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex(table.title)}. {tex(footer(table))}}}",
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
        label = f"\\textit{{{tex(row)}}}" if is_paper else tex(row)
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


def footer(table: Table) -> str:
    """The line under a table: what the cells are, the N of each row, the paper's table."""
    ns = ", ".join(
        f"{row} {'?' if n is None else n}" for row, n in table.n_used.items() if n is not None
    )
    pct = "/".join(METRICS[m].label for m in table.metrics if METRICS[m].scale == 100.0)
    text = f"Mean ± std over seeds{f'; {pct} in %' if pct else ''}. N (posterior samples) per row: {ns or MISSING}."
    if table.paper is not None:
        text += f" Paper rows: Table {table.paper.number} ({table.paper.model})."
    return text


def tex(text: str) -> str:
    """`text` escaped for LaTeX (± as $\\pm$, — as --)."""
    text = text.replace("\\", "\\textbackslash{}")
    for ch in "&%$#_{}":
        text = text.replace(ch, "\\" + ch)
    return text.replace("±", "$\\pm$").replace("—", "--").replace("~", "\\textasciitilde{}")


def runs_csv(runs: Iterable[Run]) -> str:
    """Every final metric of every run, one value a line (raw, unscaled); a run without any, one
    line with the value columns empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["run_id", "run_name", "status", "row", "method", "task", "seed", *CSV_FIELDS]
        + ["split", "set", "metric", "n_samples", "value"]
    )
    for run in runs:
        head = [run.run_id, run.name, run.status, run.row, run.method, run.task, run.seed]
        head += [run.params.get(f, "") for f in CSV_FIELDS]
        finals = sorted(  # N as text, as it sorts in the key ("10" before "2")
            ((k.split, k.task, k.metric, str(k.n)), v)
            for key, v in run.metrics.items()
            if (k := parse_final_key(key))
        )
        for (split, name, metric, n), value in finals:
            writer.writerow([*head, split, name, metric, n, repr(float(value))])
        if not finals:
            writer.writerow([*head, "", "", "", "", ""])
    return out.getvalue()
