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
    assert (sweep_dir / "sweep.lock").is_file()  # the killed driver's lock: it died with it
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
    # MLflow's source is the script the person ran, also for trials made in Ray's processes;
    # the resumed trial kept the dataset inputs of its first start, once each
    for r in [parent, *children]:
        assert r.data.tags["mlflow.source.name"] == "jobs/sweep.py", r.info.run_name
        assert r.data.tags["mlflow.source.type"] == "LOCAL"
    for r in children:
        contexts = [i.tags[0].value for i in r.inputs.dataset_inputs]
        assert sorted(contexts) == ["ood", "test", "train", "validation"], r.info.run_name
        assert "system/cpu_utilization_percentage" in r.data.metrics
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "finetuning"
    # the first trial was not trained again: same run, same history, same checkpoints
    assert first_run.info.run_id in {r.info.run_id for r in children}
    assert len(client.get_metric_history(first_run.info.run_id, "train/nll")) == first_history
    assert (
        sorted(p.name for p in (sweep_dir / "runs" / first).glob("checkpoint_*"))
        == first_checkpoints
    )
    assert "results of sweep killed" in again.stdout and "did not finish" not in again.stderr

    # every trial's adapter is an MLflow model, and the best one is a version of the registered
    # model named after the sweep, tagged with the parent run and the metric (Model Registry)
    models = {r.info.run_id: [o.model_id for o in r.outputs.model_outputs] for r in children}
    assert all(len(ids) == 1 for ids in models.values()), models
    (version,) = client.search_model_versions("name = 'killed'")
    best_run = parent.data.tags["best_run_id"]
    assert version.run_id == best_run and version.source == f"models:/{models[best_run][0]}"
    assert version.tags["melora.sweep_run_id"] == parent.info.run_id
    assert version.tags["melora.sweep_metric"] == "val/nll"
    assert float(version.tags["melora.sweep_metric_value"]) == pytest.approx(
        parent.data.metrics["best/val/nll"]
    )
    assert parent.data.tags["best_model"] == f"models:/killed/{version.version}"
    print(f"resume took {resume_s:.0f} s")  # shown with -s; the budget note is in the README

    # jobs/report.py's table, rendered from these runs, shows the runs' own metrics
    from orchestrator.report.build import build_report

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


def test_ens_trial_is_evaluated_from_its_members_after_the_trained_trials(
    tmp_path: Path, tiny_sweep, stop_group
) -> None:
    """ENS seed 1 beside a LoRA row of seed 1: the sweep trains LoRA seed 1 and the member-only
    seeds 2 and 3, then evaluates the ensemble as a child run naming its three members; the
    report keeps the members out of the LoRA row; a second --resume changes nothing."""
    grid = {
        "method": {
            "lora": {"adapter.method": "lora", "seed": [1]},
            "ens": {"adapter.method": "ens", "seed": [1]},
        }
    }
    config = tiny_sweep("ens", grid, max_concurrent_trials=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for args in ([], ["--resume"]):
        proc = subprocess.Popen(
            [*SWEEP, "--config", str(config), *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            stop_group(proc.pid)
        assert proc.returncode == 0, out[-4000:]
    client = MlflowClient(uri)
    parents, children = sweep_runs(client, "ens")
    assert len(parents) == 1 and parents[0].data.tags["trials_finished"] == "4"
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == [  # nothing duplicated by the second --resume
        "ens-ens-member-seed2",
        "ens-ens-member-seed3",
        "ens-ens-seed1",
        "ens-lora-seed1",
    ]
    assert all(r.info.status == "FINISHED" for r in children)
    ens = by_name["ens-ens-seed1"]
    members = [
        by_name[n] for n in ("ens-lora-seed1", "ens-ens-member-seed2", "ens-ens-member-seed3")
    ]
    assert ens.data.tags["ensemble_members"] == ",".join(m.info.run_id for m in members)
    assert ens.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert ens.data.tags["method"] == "ens" and "test/demo/acc_n0" in ens.data.metrics
    assert ens.data.tags["mlflow.source.name"] == "jobs/sweep.py"  # evaluated in a Ray task
    assert [m.data.tags.get("sweep.role") for m in members] == [None, "ens_member", "ens_member"]
    assert [m.data.tags["seed"] for m in members] == ["1", "2", "3"]
    # the registered model is the best trial that has one (an ENS is no single adapter), once:
    # the second --resume added no version
    (version,) = client.search_model_versions("name = 'ens'")
    assert version.run_id == by_name["ens-lora-seed1"].info.run_id
    assert version.tags["melora.sweep_run_id"] == parents[0].info.run_id

    from orchestrator.report.build import build_report

    report = build_report(uri, "sweep-tests", sweep="ens")
    rows = {(r.row, r.name) for r in report.runs}
    assert rows == {("LoRA", "ens-lora-seed1"), ("ENS", "ens-ens-seed1")}
    md = report.markdown()
    assert "2 LoRA runs trained only as ENS members are not in the tables" in md
    assert "ENS: one ensemble per column, so no std over seeds" in md
    cells = markdown_cells(md, "Trained on demo: in-distribution and OOD sets")
    acc = 100 * ens.data.metrics["test/demo/acc_n0"]
    assert (
        cells[("ACC", "ENS")]["demo"].strip("*").replace("<ins>", "").replace("</ins>", "")
        == f"{acc:.2f}"
    )
