"""The paper's Tables 2, 3, 4, 5, 8, 9 as transcribed in orchestrator/report/paper_tables.py, checked
for shape and range and, cell by cell, against the extracted paper text they were read from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.report.paper_tables import (
    ABLATION_ROWS,
    BASELINE_ROWS,
    ID_COLUMNS,
    OOD_COLUMNS,
    TABLES,
    PaperTable,
)

SHAPES = {  # number: (model, kind, rows)
    2: ("Llama2-13B", "id", BASELINE_ROWS),
    3: ("Llama2-13B", "ood", BASELINE_ROWS),
    4: ("Llama2-13B", "id", ABLATION_ROWS),
    5: ("Llama2-13B", "ood", ABLATION_ROWS),
    8: ("Llama2-7B", "id", BASELINE_ROWS),
    9: ("Llama2-7B", "ood", BASELINE_ROWS),
}
UNREADABLE = {2: (0, 1), 3: (18, 18), 4: (0, 0), 5: (8, 8), 8: (0, 0), 9: (6, 17)}  # (means, stds)
RANGES = {"acc": (20.0, 95.0), "ece": (1.0, 35.0), "nll": (0.3, 5.0)}
REGIONS = {  # number: (text that opens the table's region, text that closes it, cell order)
    2: ("Table 2: Performance of different methods", "the validation set into two parts", "mrc"),
    3: ("Motrio\tMathad\tIn-Dist.", "Table 3: Performance", "mrc"),
    4: ("Table 4: Performance of ablation", "Table 5: Performance", "mcr"),
    5: ("Table 5: Performance of ablation", "6 ABLATION STUDY", "mcr"),
    8: ("Table 8: Performance of different methods", "Table 9: Performance", "mrc"),
    9: ("Table 9: Performance", None, "mrc"),
}


@pytest.mark.parametrize("number", sorted(SHAPES))
def test_table_shape_and_ranges(number: int) -> None:
    table = TABLES[number]
    model, kind, rows = SHAPES[number]
    assert (table.number, table.model, table.kind, table.rows) == (number, model, kind, rows)
    assert table.columns == (ID_COLUMNS if kind == "id" else OOD_COLUMNS)
    keys = {(m, r, c) for m in ("acc", "ece", "nll") for r in rows for c in table.columns}
    assert set(table.cells) == keys  # 3 metrics x rows x 6 columns, nothing else
    means = [c.mean for c in table.cells.values()]
    stds = [c.std for c in table.cells.values()]
    assert (means.count(None), stds.count(None)) == UNREADABLE[number]
    for (metric, _, _), cell in table.cells.items():
        lo, hi = RANGES[metric]
        assert cell.mean is None or lo <= cell.mean <= hi, (number, metric, cell)
        assert cell.std is None or 0.0 <= cell.std <= 6.0, (number, metric, cell)
        assert cell.mean is not None or cell.std is None  # no std without its mean
    unreadable = {k for k, c in table.cells.items() if c.mean is None or c.std is None}
    assert unreadable <= set(table.notes) <= keys  # every gap is explained
    assert set(table.fragments) <= set(table.notes)


def test_hand_checked_cells() -> None:
    """A few cells read off the paper by eye."""
    assert TABLES[2].cell("acc", "Ours", "openbookqa").mean == 85.17
    assert TABLES[2].cell("ece", "BLoB", "boolq").std == 0.19
    assert TABLES[3].cell("nll", "LAP", "mmlu_college_physics").mean == 4.61
    assert TABLES[4].cell("ece", "w/o noise", "winogrande_m").mean == 1.72
    assert TABLES[5].cell("acc", "Ours", "mmlu_college_mathematics").mean == 39.30
    assert TABLES[8].cell("nll", "LAP", "arc_challenge").std == 1.44
    assert TABLES[9].cell("acc", "MAP", "mmlu_college_mathematics").std == 0.85
    assert TABLES[9].cell("nll", "Ours", "openbookqa").mean is None  # the text ends before it


def _cell_order(table: PaperTable, order: str) -> list[tuple[str, str, str]]:
    metrics = ("acc", "ece", "nll")
    if order == "mrc":
        return [(m, r, c) for m in metrics for r in table.rows for c in table.columns]
    return [(m, r, c) for m in metrics for c in table.columns for r in table.rows]


@pytest.mark.parametrize("number", sorted(SHAPES))
def test_transcription_follows_the_paper_text(number: int, shared_dir: Path) -> None:
    """Every readable cell is found in the table's text, in reading order: the mean, then its std
    a few characters on (the PDF's subscripts extract as `_{0.75}`, or run into the mean)."""
    text = (shared_dir / "seed" / "me-lora-paper.txt").read_text()
    start, end, order = REGIONS[number]
    region = text[text.index(start) : text.index(end, text.index(start)) if end else None]
    table = TABLES[number]
    position = 0
    for key in _cell_order(table, order):
        cell = table.cells[key]
        if cell.mean is None:
            continue
        pattern = rf"(?<![\d.]){re.escape(f'{cell.mean:.2f}')}"
        if cell.std is not None and key not in table.notes:
            pattern += rf"[^\d]{{0,20}}{re.escape(f'{cell.std:.2f}')}(?!\d)"
        found = re.compile(pattern).search(region, position)
        assert found, f"Table {number} {key}: {cell} not found after offset {position}"
        position = found.end()
    for key, fragment in table.fragments.items():
        assert fragment in region, f"Table {number} {key}: {fragment!r} is not in the text"


def test_table6_times_follow_the_paper_text(shared_dir: Path) -> None:
    """Each Table 6 time row equals the six integers of its line in the extracted text."""
    from orchestrator.report.paper_tables import TABLE6_SECONDS

    text = (shared_dir / "seed" / "me-lora-paper.txt").read_text()
    region = text[text.index("Table 6: Comparison of running time") :]
    region = region[: region.index("B SUPPLEMENTARY")]
    rows = [
        line.split("\t")[-7:]
        for line in region.splitlines()
        if re.search(r"\t(LoRA|BLoB|Me-LoRA)\t\d+\t", line)  # time rows: integers, not GB
    ]
    assert len(rows) == 6
    order = [(m, r) for m in ("Llama2-7B", "Llama2-13B") for r in ("LoRA", "BLoB", "Me-LoRA")]
    for (model, method), row in zip(order, rows, strict=True):
        assert row[0] == method
        want = [int(x) for x in row[1:]]
        cols = ("winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "openbookqa", "boolq")
        assert [TABLE6_SECONDS[(model, method)][c] for c in cols] == want, (model, method)


def test_gpu_hours_of_table3_by_hand() -> None:
    """benchmarks/gpu_hours.py on Table 3 (13B, trained on OBQA): MAP, MCD, LAP and the six ENS
    members train as LoRA (15 x 2667 s), BLoB 3 x 4044 s, Me-LoRA 3 x 4098 s; ENS trains nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_hours", Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_hours.py"
    )
    gpu_hours = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_hours)
    from orchestrator.config import load_experiment
    from orchestrator.sweep.plan import plan_sweep

    path = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "table3_ood_13b.yaml"
    base, section = load_experiment(path)
    trained = [t for t in plan_sweep(base, section, source=str(path)).trials if t.tuned]
    seconds = sum(gpu_hours.trial_seconds(t.run) for t in trained)
    assert len(trained) == 21 and seconds == 15 * 2667 + 3 * 4044 + 3 * 4098
