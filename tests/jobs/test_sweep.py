"""The sweep end to end on CPU: a small demo sweep, its driver killed after the first trial, then
`--resume`: every trial finished once, one MLflow parent run, no run duplicated, the first trial
not trained again. Real Ray Tune, Ray Train, DeepSpeed ZeRO-2 and MLflow (about 2 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, str(REPO / "jobs" / "sweep.py")]
METHODS = {"lora": {"adapter.method": "lora"}, "melora": {"adapter.method": "melora"}}


def sweep_runs(client: MlflowClient, name: str):
    """(parent runs, child runs) of the sweep `name` in the test experiment."""
    experiment = client.get_experiment_by_name("sweep-tests")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{name}'")
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("kind") != "sweep"]


def wait_for_a_finished_trial(uri: str, state: Path, proc, timeout: float) -> str:
    """The run name of the first trial whose MLflow run is FINISHED (the driver still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        if state.is_file():  # the driver created the database: a client may open it now
            client = MlflowClient(uri)
            done = [r for r in sweep_runs(client, "killed")[1] if r.info.status == "FINISHED"]
            if done:
                return done[0].info.run_name
        time.sleep(2)
    raise AssertionError(f"no trial finished within {timeout} s")


def test_killed_sweep_resumes_only_what_was_left(tmp_path: Path, tiny_sweep, stop_group) -> None:
    config = tiny_sweep("killed", {"method": METHODS, "seed": [1]}, max_concurrent_trials=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "ray_results" / "killed"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [*SWEEP, "--config", str(config)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the driver and the local Ray it starts
    )
    try:
        first = wait_for_a_finished_trial(uri, sweep_dir / "sweep.json", proc, timeout=240)
    finally:
        stop_group(proc.pid, grace=0)  # SIGKILL: the driver and its local Ray die mid-sweep
        proc.wait(timeout=30)
    client = MlflowClient(uri)
    parents, children = sweep_runs(client, "killed")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 1, "the driver was killed too late to test a resume"
    first_run = next(r for r in children if r.info.run_name == first)
    first_history = len(client.get_metric_history(first_run.info.run_id, "train/nll"))
    first_checkpoints = sorted(p.name for p in (sweep_dir / "runs" / first).glob("checkpoint_*"))
    state = json.loads((sweep_dir / "sweep.json").read_text())

    started = time.monotonic()
    again = subprocess.run(
        [*SWEEP, "--config", str(config), "--resume"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    resume_s = time.monotonic() - started
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    parents, children = sweep_runs(client, "killed")
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["trials_finished"] == "2" and parent.data.tags["best_trial"]
    assert parent.data.tags["config_hash"] == state["config_hash"]
    assert any(k.startswith("best/test/demo/") for k in parent.data.metrics)
    names = sorted(r.info.run_name for r in children)
    assert names == ["killed-lora-seed1", "killed-melora-seed1"]
    for r in children:
        assert r.info.status == "FINISHED", (r.info.run_name, r.data.tags.get("failure_reason"))
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["sweep"] == "killed" and r.data.tags["sweep.method"] in METHODS
        assert "test/demo/acc_n0" in r.data.metrics
    # the first trial was not trained again: same run, same history, same checkpoints
    assert first_run.info.run_id in {r.info.run_id for r in children}
    assert len(client.get_metric_history(first_run.info.run_id, "train/nll")) == first_history
    assert (
        sorted(p.name for p in (sweep_dir / "runs" / first).glob("checkpoint_*"))
        == first_checkpoints
    )
    assert "results of sweep killed" in again.stdout and "did not finish" not in again.stderr
    print(f"resume took {resume_s:.0f} s")  # shown with -s; the budget note is in the README

    # jobs/report.py's table, rendered from these runs, shows the runs' own metrics
    from orchestrator.report import build_report

    md = build_report(uri, "sweep-tests", sweep="killed").markdown()
    cells = markdown_cells(md, "Trained on demo: in-distribution and OOD sets")
    n_used = dict(
        item.split(" ")
        for item in md.split("N (posterior samples) per row: ", 1)[1].split(".")[0].split(", ")
    )
    for r in children:
        row = {"killed-lora-seed1": "LoRA", "killed-melora-seed1": "Me-LoRA"}[r.info.run_name]
        for metric, label, scale in (("acc", "ACC", 100), ("ece", "ECE", 100), ("nll", "NLL", 1)):
            for split, task in (("test", "demo"), ("ood", "demo_ood")):
                value = r.data.metrics[f"{split}/{task}/{metric}_n{n_used[row]}"] * scale
                shown = (
                    cells[(label, row)][task].strip("*").replace("<ins>", "").replace("</ins>", "")
                )
                assert shown == f"{value:.2f}", (row, metric, task)


def markdown_cells(markdown: str, title: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(metric label, method row): {column: cell}} of the Markdown table under '## <title>'."""
    lines = markdown.split(f"## {title}\n", 1)[1].strip("\n").split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out, metric = {}, None
    for line in lines[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        metric = row[0].split()[0] if row[0] else metric
        out[(metric, row[1])] = dict(zip(header[2:], row[2:], strict=True))
    return out
