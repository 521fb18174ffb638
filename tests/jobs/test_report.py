"""jobs/report.py against a real sqlite MLflow store holding synthetic sweeps with known metrics.

The store is built with MlflowClient directly (not through the code under test): a parent run
per sweep and one child run per (method, task, seed), as orchestrator.sweep tags them. Expected
cells are computed here with numpy from the values that were logged.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestrator.errors import ReportError
from orchestrator.report.build import build_report, write_report

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("report_cli", REPO / "jobs" / "report.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)  # jobs/ is scripts, not a package
PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = (1, 2, 3)
TASKS = {
    "winogrande_s": (),
    "arc_easy": (),
    "openbookqa": ("arc_challenge", "mmlu_college_physics"),
}
METHODS = {  # trial word -> (method tag, params, the report's row, the N the report takes)
    "map": ("lora", {"optim.weight_decay": "1e-05"}, "MAP", 0),
    "blob": (
        "blob",
        {"optim.weight_decay": "0.0", "adapter.flipout": "False", "adapter.prior_noise": "True"},
        "BLoB",
        1,
    ),
    "melora": (
        "melora",
        {"optim.weight_decay": "0.0", "adapter.prior_noise": "True"},
        "Me-LoRA",
        1,
    ),
}
LEVEL = {  # per method: ACC Me-LoRA > MAP > BLoB; ECE and NLL Me-LoRA < BLoB < MAP
    "map": {"acc": 0.75, "ece": 0.15, "nll": 0.90, "brier": 0.30, "auroc": 0.60},
    "blob": {"acc": 0.70, "ece": 0.08, "nll": 0.60, "brier": 0.25, "auroc": 0.70},
    "melora": {"acc": 0.80, "ece": 0.05, "nll": 0.50, "brier": 0.20, "auroc": 0.80},
    "ens": {"acc": 0.72, "ece": 0.10, "nll": 0.70, "brier": 0.28, "auroc": 0.65},
}
ENS_SEEDS = (1, 2)  # ENS on winogrande_s only: members MAP seeds 1-3, and 4-6 trained for it
FAILED = ("blob", "arc_easy", 3)  # this trial FAILED: no metrics
REASON = "train/nll is nan at step 37"
LLAMA = "meta-llama/Llama-2-13b-hf"
PERCENT = {"acc": 100.0, "ece": 100.0, "nll": 1.0}


@dataclass
class Store:
    uri: str
    values: dict  # (word, split, set, metric, n, seed) -> logged value
    parents: dict  # sweep name -> parent run id


def _value(word: str, name: str, seed: int, metric: str, n: int) -> float:
    rng = random.Random(f"{word}/{name}/{seed}/{metric}/{n}")
    return LEVEL[word][metric] + rng.uniform(-0.005, 0.005) + 0.001 * n


def _png(path: Path) -> Path:
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [0, 1])
    fig.savefig(path, format="png")
    return path


def _sweep(client: MlflowClient, experiment_id: str, sweep: str) -> str:
    run = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, "kind": "sweep"})
    return run.info.run_id


def _trial(
    client, experiment_id, parent, sweep, name, method, task, seed, params, metrics, status
) -> str:
    tags = {"sweep": sweep, "method": method, "task": task, "seed": str(seed), "git_sha": "abc"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {
        "name": name,
        "seed": str(seed),
        "adapter.method": method,
        "task.name": task,
        "model.name_or_path": "demo",
        "tracking.tags": "{}",
        **params,
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 5000) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    if status == "FAILED":
        client.set_tag(run_id, "failure_reason", REASON)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    png = _png(root / "diagram.png")
    values, parents, planned, map_ids = {}, {}, [], {}

    # t2: MAP, BLoB, Me-LoRA x 3 tasks x 3 seeds on "Llama2-13B"; N in 0, 1, 10
    eid = client.create_experiment("t2", artifact_location=(root / "artifacts").as_uri())
    parents["t2"] = parent = _sweep(client, eid, "t2")
    for word, (method, params, _, n_report) in METHODS.items():
        for task, ood in TASKS.items():
            for seed in SEEDS:
                failed = (word, task, seed) == FAILED
                metrics = {}
                for n in (0, 1, 10):
                    for split, name in [("test", task)] + [("ood", o) for o in ood]:
                        for metric in ("acc", "ece", "nll", "brier") + (
                            ("auroc",) if split == "ood" else ()
                        ):
                            v = _value(word, name, seed, metric, n)
                            values[(word, split, name, metric, n, seed)] = v
                            metrics[f"{split}/{name}/{metric}_n{n}"] = v
                planned.append(f"t2-{word}-{task}-seed{seed}")
                run_id = _trial(
                    client, eid, parent, "t2", planned[-1], method, task, seed,
                    {**params, "task.ood_tasks": str(list(ood)).replace("'", '"'), "model.name_or_path": LLAMA},
                    {} if failed else metrics, "FAILED" if failed else "FINISHED",
                )  # fmt: skip
                if word == "map" and task == "winogrande_s":
                    map_ids[seed] = run_id
                if seed == 1:
                    folder = root / "png" / run_id
                    folder.mkdir(parents=True)
                    shutil.copy(png, folder / f"test_{task}_n{n_report}.png")
                    client.log_artifacts(run_id, str(folder), "reliability")
    helper_ids = [  # what orchestrator.posthoc.ensemble trains for ENS seed 2: not in the MAP row
        _trial(
            client, eid, parent, "t2", f"lora-winogrande_s-seed{seed}", "lora", "winogrande_s",
            seed, {"optim.weight_decay": "1e-05", "model.name_or_path": LLAMA},
            {f"test/winogrande_s/{m}_n0": 0.0 for m in ("acc", "ece", "nll")}, "FINISHED",
        )
        for seed in (4, 5, 6)
    ]  # fmt: skip
    for seed in ENS_SEEDS:
        ids = [map_ids[s] for s in (1, 2, 3)] if seed == 1 else helper_ids
        metrics = {}
        for n in (0, 1, 10):
            for metric in ("acc", "ece", "nll", "brier"):
                v = values[("ens", "test", "winogrande_s", metric, n, seed)] = _value(
                    "ens", "winogrande_s", seed, metric, n
                )
                metrics[f"test/winogrande_s/{metric}_n{n}"] = v
        params = {
            "optim.weight_decay": "1e-05",
            "model.name_or_path": LLAMA,
            "ensemble.member_seeds": "[1, 2, 3]" if seed == 1 else "[4, 5, 6]",
            "ensemble.member_run_ids": json.dumps(ids),
        }
        planned.append(f"t2-ens-winogrande_s-seed{seed}")
        run_id = _trial(client, eid, parent, "t2", planned[-1], "ens", "winogrande_s", seed, params, metrics, "FINISHED")  # fmt: skip
        client.set_tag(run_id, "ensemble_members", ",".join(ids))
    trials = [
        {"name": n, "values": {}, "tags": {}} for n in planned
    ]  # as orchestrator.sweep logs it
    client.log_text(parent, json.dumps(trials), "sweep/trials.json")
    client.set_terminated(parent, "FINISHED")

    # sr: Me-LoRA sigma_p x r x 2 seeds on the demo task, N in 0 and 10 only
    eid = client.create_experiment("sr", artifact_location=(root / "artifacts").as_uri())
    parents["sr"] = parent = _sweep(client, eid, "sr")
    for sigma in (0.1, 0.5):
        for r in (4, 8):
            for seed in (1, 2):
                metrics = {
                    f"test/demo/{m}_n{n}": 0.5 + sigma / 10 + r / 100 + seed / 1000 + n / 10000
                    for m in ("acc", "ece", "nll")
                    for n in (0, 10)
                }
                params = {"adapter.sigma_p": sigma, "adapter.r": r, "adapter.prior_noise": "True"}
                name = f"sr-sigma_p{sigma}-r{r}-seed{seed}"
                _trial(client, eid, parent, "sr", name, "melora", "demo", seed, params, metrics, "FINISHED")  # fmt: skip
    client.set_terminated(parent, "FINISHED")
    # a second sweep in the same experiment (as `jobs/sweep.py --name sr_asha` makes)
    parents["sr_asha"] = parent = _sweep(client, eid, "sr_asha")
    metrics = {"test/demo/acc_n10": 0.9, "test/demo/ece_n10": 0.1, "test/demo/nll_n10": 0.3}
    _trial(client, eid, parent, "sr_asha", "sr_asha-s1", "melora", "demo", 1, {}, metrics, "FINISHED")  # fmt: skip
    client.set_terminated(parent, "FINISHED")

    # broken: a sweep whose trials all failed; solo: two jobs/train.py runs without a sweep
    eid = client.create_experiment("broken")
    parent = _sweep(client, eid, "broken")
    for seed in (1, 2):
        _trial(client, eid, parent, "broken", f"broken-{seed}", "melora", "demo", seed, {}, {}, "FAILED")  # fmt: skip
    eid = client.create_experiment("solo")
    for seed in (1, 2):
        metrics = {
            "test/demo/acc_n0": 0.6 + seed / 100,
            "test/demo/ece_n0": 0.1,
            "test/demo/nll_n0": 0.7,
        }
        _trial(client, eid, None, "", f"solo-{seed}", "lora", "demo", seed, {}, metrics, "FINISHED")  # fmt: skip
    return Store(uri, values, parents)


# ----- helpers ------------------------------------------------------------------------------------
def md_table(markdown: str, title: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(metric label, row): {column label: cell}} of the Markdown table under '## <title>'."""
    block = markdown.split(f"## {title}\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    lines = block.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out, metric = {}, None
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        metric = cells[0].split()[0] if cells[0] else metric
        out[(metric, cells[1])] = dict(zip(header[2:], cells[2:], strict=True))
    return out


def plain(cell: str) -> str:
    return cell.replace("**", "").replace("<ins>", "").replace("</ins>", "")


def expected_cell(store: Store, word: str, split: str, name: str, metric: str, n: int) -> str:
    task = name if split == "test" else "openbookqa"
    seeds = ENS_SEEDS if word == "ens" else [s for s in SEEDS if (word, task, s) != FAILED]
    vals = np.array([store.values[(word, split, name, metric, n, s)] for s in seeds])
    vals = vals * PERCENT[metric]
    return f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"


LABEL = {
    "winogrande_s": "WG-S",
    "arc_easy": "ARC-E",
    "openbookqa": "OBQA",
    "arc_challenge": "ARC-C",
}
LABEL["mmlu_college_physics"] = "Phy."
METRIC = {"acc": "ACC", "ece": "ECE", "nll": "NLL"}


# ----- the tables ---------------------------------------------------------------------------------
def test_cells_equal_the_runs_mean_and_std(store: Store) -> None:
    report = build_report(store.uri, "t2")
    assert report.sweep == "t2" and report.parent_run_id == store.parents["t2"]
    md = report.markdown()
    in_dist = md_table(md, "In-distribution: test sets")
    ood = md_table(md, "Trained on OBQA: in-distribution and OOD sets")
    assert list(in_dist[("ACC", "MAP")]) == ["WG-S", "ARC-E", "OBQA"]  # the paper's column order
    assert list(ood[("ACC", "MAP")]) == ["OBQA", "ARC-C", "Phy."]
    assert [row for metric, row in in_dist if metric == "ACC"] == ["MAP", "ENS", "BLoB", "Me-LoRA"]
    for word, (_, _, row, n) in METHODS.items():
        for metric in ("acc", "ece", "nll"):
            for task in TASKS:
                got = plain(in_dist[(METRIC[metric], row)][LABEL[task]])
                assert got == expected_cell(store, word, "test", task, metric, n), (row, task)
            for name in TASKS["openbookqa"]:
                got = plain(ood[(METRIC[metric], row)][LABEL[name]])
                assert got == expected_cell(store, word, "ood", name, metric, n), (row, name)
    assert "N (posterior samples) per row: MAP 0, ENS 0, BLoB 1, Me-LoRA 1." in md
    assert (
        "- BLoB rows as the paper re-implemented it: flipout off, prior noise on "
        "(Me-LoRA's KL regularisation)" in md
    )
    # ENS: one row whatever its member seeds; its members trained for it alone are left out
    for metric in ("acc", "ece", "nll"):
        got = plain(in_dist[(METRIC[metric], "ENS")]["WG-S"])
        assert got == expected_cell(store, "ens", "test", "winogrande_s", metric, 0)
    assert in_dist[("ACC", "ENS")]["ARC-E"] == "—" and "- ENS x ARC-E: no runs" in md
    assert "3 LoRA runs trained only as ENS members are not in the tables: " in md
    assert "lora-winogrande_s-seed4, lora-winogrande_s-seed5, lora-winogrande_s-seed6" in md


def test_best_is_bold_and_second_underlined_by_the_metrics_direction(store: Store) -> None:
    table = md_table(build_report(store.uri, "t2").markdown(), "In-distribution: test sets")
    for task in ("WG-S", "OBQA"):
        assert table[("ACC", "Me-LoRA")][task].startswith("**")  # highest
        assert table[("ACC", "MAP")][task].startswith("<ins>")
        assert (
            "*" not in table[("ACC", "BLoB")][task] and "<ins>" not in table[("ACC", "BLoB")][task]
        )
        for metric in ("ECE", "NLL"):  # lowest
            assert table[(metric, "Me-LoRA")][task].startswith("**")
            assert table[(metric, "BLoB")][task].startswith("<ins>")
            assert table[(metric, "MAP")][task][0].isdigit()


def test_a_failed_trial_is_left_out_and_listed(store: Store) -> None:
    md = build_report(store.uri, "t2").markdown()
    assert "run t2-blob-arc_easy-seed3 (BLoB, arc_easy, seed 3) is FAILED: " + REASON in md
    assert "BLoB x ARC-E: 2 seeds (the others 3)" in md
    assert "runs: 1 FAILED, 28 FINISHED" in md


def test_paper_numbers_beside_ours_and_absent_rows(store: Store) -> None:
    md = build_report(store.uri, "t2", paper=[2, 3]).markdown()
    table = md_table(md, "In-distribution: test sets")
    rows = [row for metric, row in table if metric == "ACC"]
    assert rows == [
        "MAP", "MAP (paper)", "MCD", "MCD (paper)", "ENS", "ENS (paper)", "LAP", "LAP (paper)",
        "BLoB", "BLoB (paper)", "Me-LoRA", "Me-LoRA (paper)",
    ]  # fmt: skip
    assert list(table[("ACC", "MAP")]) == ["WG-S", "ARC-C", "ARC-E", "WG-M", "OBQA", "BoolQ"]
    # cells read off the paper text by hand (Table 2)
    assert plain(table[("ACC", "Me-LoRA (paper)")]["WG-S"]) == "68.67 ± 0.07"
    assert plain(table[("ECE", "BLoB (paper)")]["ARC-E"]) == "4.58 ± 0.04"
    assert plain(table[("NLL", "MAP (paper)")]["BoolQ"]) == "0.39 ± 0.01"
    assert plain(table[("ACC", "MCD (paper)")]["BoolQ"]) == "84.18 ± ?"  # std unreadable
    assert (
        table[("ACC", "LAP (paper)")]["WG-S"] == "**72.64 ± 0.16**"
    )  # ranked among the paper's rows
    assert table[("ACC", "MAP (paper)")]["WG-S"] == "<ins>72.35 ± 0.75</ins>"
    # rows and columns we have no runs for: a dash, and listed
    assert set(table[("ACC", "MCD")].values()) == {"—"}
    assert plain(table[("ACC", "ENS")]["WG-S"]) == expected_cell(
        store, "ens", "test", "winogrande_s", "acc", 0
    )
    assert table[("ACC", "Me-LoRA")]["BoolQ"] == "—"
    assert "- no runs of MCD, LAP (the paper's numbers are shown alone)" in md
    assert "- no runs evaluate ARC-C, WG-M, BoolQ" in md
    assert "- paper Table 2, ACC MCD BoolQ: std cut off in the extracted text" in md
    ood = md_table(md, "Trained on OBQA: in-distribution and OOD sets")
    assert list(ood[("ACC", "MAP")]) == ["OBQA", "ARC-C", "ARC-E", "Chem.", "Phy.", "Math."]
    assert plain(ood[("ACC", "Me-LoRA (paper)")]["Chem."]) == "42.75 ± 0.08"  # Table 3
    assert plain(ood[("NLL", "BLoB (paper)")]["OBQA"]) == "0.49 ± 0.00"
    assert ood[("ACC", "Me-LoRA (paper)")]["Math."] == "?"
    assert "paper Table 3, all of Math.: cut off in the extracted text" in md


def test_paper_auto_picks_the_tables_of_the_runs_model(store: Store) -> None:
    md = build_report(store.uri, "t2", paper="auto").markdown()
    assert "Paper rows: Table 2 (Llama2-13B)." in md and "Paper rows: Table 3 (Llama2-13B)." in md
    md = build_report(store.uri, "sr", paper="auto").markdown()  # the demo model: none
    assert "(paper)" not in md and "no paper numbers: the runs' model" in md


def test_n_samples_chosen_for_every_row(store: Store) -> None:
    report = build_report(store.uri, "t2", n_samples=10)
    table = md_table(report.markdown(), "In-distribution: test sets")
    for word, (_, _, row, _) in METHODS.items():
        assert plain(table[("ECE", row)]["WG-S"]) == expected_cell(
            store, word, "test", "winogrande_s", "ece", 10
        )
    assert "per row: MAP 10, ENS 10, BLoB 10, Me-LoRA 10." in report.markdown()


def test_latex_marks_best_and_second(store: Store) -> None:
    tex = build_report(store.uri, "t2").latex()
    assert "\\usepackage{booktabs}" in tex and tex.count("\\begin{tabular}{llccc}") == 2
    mean, std = expected_cell(store, "melora", "test", "winogrande_s", "acc", 1).split(" ± ")
    assert f"$\\mathbf{{{mean}_{{{std}}}}}$" in tex
    mean, std = expected_cell(store, "map", "test", "winogrande_s", "acc", 0).split(" ± ")
    assert f"$\\underline{{{mean}_{{{std}}}}}$" in tex
    assert "ACC $\\uparrow$ & MAP &" in tex and "ECE $\\downarrow$ & MAP &" in tex


# ----- rows, N fallback, figures, files ---------------------------------------------------------
def test_sweep_rows_split_by_the_swept_fields_and_figures(store: Store, tmp_path: Path) -> None:
    report = build_report(store.uri, "sr")
    table = md_table(report.markdown(), "In-distribution: test sets")
    rows = [row for metric, row in table if metric == "ACC"]
    assert rows == [
        "Me-LoRA (r=4, sigma_p=0.1)", "Me-LoRA (r=4, sigma_p=0.5)",
        "Me-LoRA (r=8, sigma_p=0.1)", "Me-LoRA (r=8, sigma_p=0.5)",
    ]  # fmt: skip
    # no N = 1 was logged: the paper's choice falls back to N = 10
    vals = np.array([0.5 + 0.05 + 0.08 + s / 1000 + 10 / 10000 for s in (1, 2)]) * 100
    assert plain(table[("ACC", "Me-LoRA (r=8, sigma_p=0.5)")]["demo"]) == (
        f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"
    )
    assert "Me-LoRA (r=4, sigma_p=0.1) 10" in report.markdown()
    written = write_report(report, tmp_path / "sr", log=False)
    figure = tmp_path / "sr" / "figures" / "sweep_me-lora_demo.png"
    assert figure in written and figure.read_bytes().startswith(PNG)


def test_cli_writes_the_report_and_logs_it_to_the_parent(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "t2"
    argv = ["--experiment", "t2", "--tracking-uri", store.uri, "--paper", "--out", str(out)]
    assert cli.main(argv) == 0
    for name in ("report.md", "report.tex", "runs.csv"):
        assert (out / name).stat().st_size > 0
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [f"reliability_{t}.png" for t in ("arc_easy", "openbookqa", "winogrande_s")]
    assert all((out / "figures" / f).read_bytes().startswith(PNG) for f in figures)
    assert "Table 2 (Llama2-13B)" in (out / "report.md").read_text()
    assert not list(out.rglob(".*.tmp"))
    client = MlflowClient(store.uri)
    logged = {f.path for f in client.list_artifacts(store.parents["t2"], "report")}
    assert {"report/report.md", "report/report.tex", "report/runs.csv", "report/figures"} <= logged
    logged = {f.path for f in client.list_artifacts(store.parents["t2"], "report/figures")}
    assert "report/figures/reliability_openbookqa.png" in logged
    # the CSV holds every logged value of every run, unscaled
    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    finished = [r for r in rows if r["status"] == "FINISHED"]
    assert len(finished) == sum(1 for k in store.values if (k[0], k[2], k[5]) != FAILED) - 0
    row = next(
        r
        for r in finished
        if r["run_name"] == "t2-melora-openbookqa-seed2" and r["set"] == "arc_challenge"
        and r["metric"] == "auroc" and r["n_samples"] == "10"
    )  # fmt: skip
    assert float(row["value"]) == store.values[("melora", "ood", "arc_challenge", "auroc", 10, 2)]
    assert row["row"] == "Me-LoRA" and row["optim.weight_decay"] == "0.0"
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert [r["run_name"] for r in failed] == ["t2-blob-arc_easy-seed3"] and failed[0][
        "metric"
    ] == ""


def test_sweep_selection(store: Store) -> None:
    assert build_report(store.uri, "sr").sweep == "sr"  # the one named like the experiment
    other = build_report(store.uri, "sr_asha")  # a sweep name, found in experiment sr
    assert (other.experiment, other.sweep) == ("sr", "sr_asha")
    assert other.parent_run_id == store.parents["sr_asha"]
    assert build_report(store.uri, "sr", sweep="sr_asha").parent_run_id == store.parents["sr_asha"]
    with pytest.raises(ReportError, match=r"has no sweep 'nope'; its sweeps: \['sr', 'sr_asha'\]"):
        build_report(store.uri, "sr", sweep="nope")
    solo = build_report(store.uri, "solo")  # no sweep: the experiment's runs
    assert solo.parent_run_id is None and "read as standalone runs" in solo.markdown()
    solo_table = md_table(solo.markdown(), "In-distribution: test sets")
    assert solo_table[("ACC", "LoRA")]["demo"] == "**61.50 ± 0.71**"  # lora without weight decay


def test_errors_say_what_is_missing(store: Store, tmp_path: Path, capsys) -> None:
    with pytest.raises(ReportError, match=r"no MLflow experiment or sweep 'nope' .*'broken'"):
        build_report(store.uri, "nope")
    with pytest.raises(ReportError, match=r"'broken'.* has no finished runs \(2 FAILED\)"):
        build_report(store.uri, "broken")
    with pytest.raises(ReportError, match="metrics \\['f1'\\] unknown"):
        build_report(store.uri, "t2", metrics=["acc", "f1"])
    with pytest.raises(ReportError, match="Table 7 is not stored"):
        build_report(store.uri, "t2", paper=[7])
    assert cli.main(["--experiment", "broken", "--tracking-uri", store.uri]) == 1
    assert "has no finished runs" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli.main(["--experiment", "t2", "--tracking-uri", missing]) == 1
    assert "no MLflow database" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_all_six_method_rows_of_the_paper(tmp_path: Path) -> None:
    """MAP, MCD, ENS, LAP, BLoB and Me-LoRA runs, tagged as the sweep and the baselines tag them,
    each get their row, in the paper's order, with the N the report takes for that method."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("six", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = _sweep(client, eid, "six")
    rows = {  # method tag -> (params, row, N the report takes, level of test acc)
        "lora": ({"optim.weight_decay": "1e-05"}, "MAP", 0, 0.70),
        "mcd": ({"optim.weight_decay": "1e-05", "adapter.dropout": "0.1"}, "MCD", 10, 0.71),
        "ens": ({"optim.weight_decay": "1e-05"}, "ENS", 0, 0.72),
        "lap": ({"optim.weight_decay": "1e-05"}, "LAP", 10, 0.73),
        "blob": ({"optim.weight_decay": "0.0"}, "BLoB", 1, 0.74),
        "melora": (
            {"optim.weight_decay": "0.0", "adapter.prior_noise": "True"},
            "Me-LoRA",
            1,
            0.75,
        ),
    }
    logged = {}
    for method, (params, _, _, level) in rows.items():
        for seed in (1, 2):
            metrics = {}
            for n in (0, 1, 10):
                for metric in ("acc", "ece", "nll", "brier"):
                    metrics[f"test/arc_easy/{metric}_n{n}"] = level + 0.01 * seed + 0.001 * n
            logged[(method, seed)] = metrics
            _trial(
                client, eid, parent, "six", f"six-{method}-seed{seed}", method, "arc_easy",
                seed, {**params, "task.ood_tasks": "[]"}, metrics, "FINISHED",
            )  # fmt: skip
    md = build_report(uri, "six").markdown()
    table = md_table(md, "In-distribution: test sets")
    assert [row for metric, row in table if metric == "ACC"] == [
        "MAP", "MCD", "ENS", "LAP", "BLoB", "Me-LoRA"
    ]  # fmt: skip
    for method, (_, row, n, _) in rows.items():
        values = np.array([logged[(method, s)][f"test/arc_easy/acc_n{n}"] for s in (1, 2)]) * 100
        assert (
            plain(table[("ACC", row)]["ARC-E"]) == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
        )
    assert "N (posterior samples) per row: MAP 0, MCD 10, ENS 0, LAP 10, BLoB 1, Me-LoRA 1." in md


def test_uncertainty_and_selective_metrics_are_read_and_shown(tmp_path: Path) -> None:
    """mi, auroc_mi, aurc and acc_cov80 (melora.evaluation.uncertainty_metrics_of) are parsed,
    printed and ranked; MI, logged only by methods that sample at N >= 2, is never ranked and its
    absence in the MAP row is one note, not one per cell."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("unc", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = _sweep(client, eid, "unc")
    levels = {  # method -> (params, aurc, acc_cov80, mi, auroc_mi)
        "lora": ({"optim.weight_decay": "1e-05"}, 0.20, 0.80, None, None),
        "melora": ({"optim.weight_decay": "0.0"}, 0.10, 0.90, 0.05, 0.70),
    }
    logged = {}
    for method, (params, aurc, cov, mi, auroc_mi) in levels.items():
        for seed in (1, 2):
            m = {}
            for n in (0, 10):
                for split, name in (("test", "openbookqa"), ("ood", "arc_challenge")):
                    m[f"{split}/{name}/acc_n{n}"] = 0.7
                    m[f"{split}/{name}/aurc_n{n}"] = aurc + 0.01 * seed
                    m[f"{split}/{name}/acc_cov80_n{n}"] = cov + 0.01 * seed
                    if mi is not None and n == 10:
                        m[f"{split}/{name}/mi_n{n}"] = mi + 0.001 * seed
                if split == "ood":
                    m[f"ood/arc_challenge/auroc_n{n}"] = 0.6
                    if auroc_mi is not None and n == 10:
                        m[f"ood/arc_challenge/auroc_mi_n{n}"] = auroc_mi + 0.01 * seed
            logged[(method, seed)] = m
            _trial(
                client, eid, parent, "unc", f"unc-{method}-seed{seed}", method, "openbookqa",
                seed, {**params, "task.ood_tasks": '["arc_challenge"]'}, m, "FINISHED",
            )  # fmt: skip
    client.set_terminated(parent, "FINISHED")
    report = build_report(
        uri, "unc", n_samples=10, metrics=["acc", "aurc", "acc_cov80", "mi", "auroc_mi"]
    )
    md = report.markdown()
    table = md_table(md, "Trained on OBQA: in-distribution and OOD sets")

    def cell(method: str, key: str, scale: float, decimals: int) -> str:
        vals = np.array([logged[(method, s)][key] for s in (1, 2)]) * scale
        return f"{vals.mean():.{decimals}f} ± {vals.std(ddof=1):.{decimals}f}"

    for col, split, name in (("OBQA", "test", "openbookqa"), ("ARC-C", "ood", "arc_challenge")):
        for label, metric in (("AURC", "aurc"), ("ACC@80", "acc_cov80")):
            for method, row in (("lora", "MAP"), ("melora", "Me-LoRA")):
                expected = cell(method, f"{split}/{name}/{metric}_n10", 100.0, 2)
                assert plain(table[(label, row)][col]) == expected, (label, row, col)
        assert table[("AURC", "Me-LoRA")][col].startswith("**")  # lower is better
        assert table[("ACC@80", "Me-LoRA")][col].startswith("**")  # higher is better
        mi = cell("melora", f"{split}/{name}/mi_n10", 1.0, 4)
        assert table[("MI", "Me-LoRA")][col] == mi  # printed, never bold: no better direction
        assert table[("MI", "MAP")][col] == "—"
    assert (
        table[("AUROC-MI", "Me-LoRA")]["ARC-C"]
        == "**" + cell("melora", "ood/arc_challenge/auroc_mi_n10", 100.0, 2) + "**"
    )
    assert table[("AUROC-MI", "Me-LoRA")]["OBQA"] == "—"  # OOD only, like AUROC
    assert "| MI | MAP |" in md and "| AURC ↓ | MAP |" in md and "| ACC@80 ↑ | MAP |" in md
    assert (
        "MI/AUROC-MI: only for methods whose predictive averages several draws" in md
        and "none for MAP" in md
    )
    assert "mi_n10 missing" not in md and "auroc_mi_n10 missing" not in md
    assert "MI & MAP" in report.latex() and "AURC $\\downarrow$ & MAP" in report.latex()
    # runs.csv keeps every new key, with its metric name parsed whole
    rows = list(csv.DictReader(io.StringIO(report.csv())))
    parsed = {(r["split"], r["set"], r["metric"], r["n_samples"]) for r in rows}
    for key in logged[("melora", 1)]:
        split, name, rest = key.split("/")
        metric, n = rest.rsplit("_n", 1)
        assert (split, name, metric, n) in parsed, key
    assert {"aurc", "acc_cov80", "mi", "auroc_mi", "auroc", "acc"} == {r["metric"] for r in rows}
    out = tmp_path / "cli"
    argv = ["--experiment", "unc", "--tracking-uri", uri, "--n-samples", "10", "--no-log"]
    assert cli.main([*argv, "--metrics", "mi,auroc_mi,aurc,acc_cov80", "--out", str(out)]) == 0
    assert "AUROC-MI" in (out / "report.md").read_text()
