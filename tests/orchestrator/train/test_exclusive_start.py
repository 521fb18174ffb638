"""Starts that are exclusive and leave nothing half-done, without Ray: the sweep's lock (a second
driver refused while the first runs, the lock gone when it dies), a start killed between creating
its MLflow run and recording the id (the restart adopts that run), a rerun of a finished run
(refused with another config, "finished before" with the same one; FINISHED stays FINISHED), and
torn state files (a clear error naming the file). MLflow is a real SQLite store in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from melora.errors import MeLoraError
from orchestrator import tracking
from orchestrator.config import load_config, load_experiment
from orchestrator.sweep.plan import plan_sweep
from orchestrator.sweep.tune import run_sweep
from orchestrator.train import run_marker, trainer

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
SECTION = {"grid": {"seed": [1]}, "driver_cpus": 0.5}

HOLDER = """\
import json, sys, time
from pathlib import Path
from orchestrator.train import trainer
from orchestrator.config import load_experiment
from orchestrator.sweep.tune import run_sweep
from orchestrator.sweep.plan import plan_sweep

overrides, section, ready = sys.argv[1].split(";"), json.loads(sys.argv[2]), Path(sys.argv[3])

def hold(address=None):  # where the driver connects to the cluster: this start stays here
    ready.touch()
    time.sleep(600)

trainer.init_ray = hold
base, _ = load_experiment(sys.argv[4], overrides)
run_sweep(plan_sweep(base, section, name="locked"))
"""


def overrides(tmp_path: Path) -> list[str]:
    return [
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.storage_path={tmp_path / 'ray_results'}",
        "tracking.experiment=exclusive",
    ]


class Killed(BaseException):
    """The process dies here (no `except Exception` of the code under test may catch it)."""


def test_a_second_start_of_a_running_sweep_is_refused_until_the_first_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driver A (another process) holds the sweep while it connects to the cluster; B, in this
    process, is refused at once, fresh or --resume, naming the sweep, the lock file and A's pid,
    and gets nowhere near the cluster. Killed with SIGKILL, A leaves no stale lock."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a = subprocess.Popen(
        [sys.executable, str(script), ";".join(overrides(tmp_path)), json.dumps(SECTION), str(ready), str(DEMO)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert a.poll() is None, a.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "driver A did not reach the cluster step"
            time.sleep(0.1)

        def no_cluster(address=None):
            raise AssertionError("a second start of the sweep got past its lock")

        monkeypatch.setattr(trainer, "init_ray", no_cluster)
        base, _ = load_experiment(DEMO, overrides(tmp_path))
        plan = plan_sweep(base, SECTION, name="locked")
        lock = plan.sweep_dir / "sweep.lock"
        for resume in (False, True):
            started = time.monotonic()
            with pytest.raises(MeLoraError) as refused:
                run_sweep(plan, resume=resume)
            message = str(refused.value)
            assert time.monotonic() - started < 5  # at once, not after a wait
            assert f"sweep 'locked' is in use: its lock file {lock} is held by host" in message
            assert f"pid {a.pid}" in message and "use --name" in message
        client = MlflowClient(plan.tracking_uri)
        experiment = client.get_experiment_by_name("exclusive")
        parents = client.search_runs([experiment.experiment_id]) if experiment else []
        assert len(parents) <= 1  # A's own (the old code made one more per start)
    finally:
        a.send_signal(signal.SIGKILL)  # a crash: no cleanup runs in A
        a.wait(timeout=30)

    class Reached(Exception):
        pass

    def reached(address=None):
        raise Reached

    monkeypatch.setattr(trainer, "init_ray", reached)
    with pytest.raises(Reached):  # the lock died with A: this start goes on to the cluster step
        run_sweep(plan)
    assert not plan.sweep_dir.exists()  # stopped before its state: the folder is gone again


def test_the_lock_refuses_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    """POSIX locks belong to the process: a second `exclusive` of this process is refused too,
    and the lock file, alone in its folder, is removed with the folder when released."""
    from orchestrator.errors import LockedError
    from orchestrator.state_files import exclusive

    path = tmp_path / "state" / "x.lock"
    with exclusive(path, "thing 'x'", "wait"):
        with pytest.raises(LockedError, match=r"thing 'x' is in use by this process"):
            with exclusive(path, "thing 'x'", "wait"):
                pass
    assert not (tmp_path / "state").exists()
    with exclusive(path, "thing 'x'", "wait"):  # free again
        (path.parent / "kept").write_text("state")
    assert path.exists() and (path.parent / "kept").exists()  # not alone: both stay


def test_a_start_killed_between_creating_its_run_and_recording_it_is_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start dies right after MLflow created the training run, before anything else;
    the restart finds that run (same name, same parent) and records it: one run, not two."""
    run = load_config(DEMO, overrides(tmp_path))
    uri = tracking.resolve_tracking_uri(run.tracking)
    experiment_id = tracking.ensure_experiment(uri, "exclusive")
    parent = tracking.start_or_resume_run(uri, experiment_id, run_name="a-sweep")
    create = tracking.start_or_resume_run
    made = []

    def create_then_die(*args, **kwargs):
        run_id = create(*args, **kwargs)
        if kwargs.get("run_id") is None:  # a new run: the process dies before it can record it
            made.append(run_id)
            raise Killed
        return run_id

    for where in (tracking, tracking.runs):  # the facade's name and the one create_run_once calls
        monkeypatch.setattr(where, "start_or_resume_run", create_then_die)
    with pytest.raises(Killed):
        trainer.prepare_tracking(run, parent_run_id=parent, sweep="a-sweep")
    monkeypatch.undo()

    _, run_id = trainer.prepare_tracking(run, parent_run_id=parent, sweep="a-sweep")
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], f"tags.`mlflow.runName` = '{run.run_name}'")
    assert [r.info.run_id for r in runs] == made == [run_id]
    assert runs[0].info.status == "RUNNING" and runs[0].data.tags["mlflow.parentRunId"] == parent
    assert runs[0].data.params["adapter.sigma_p"] == "0.2"
    assert run_marker.recorded_run_id(run) == run_id
    assert trainer.prepare_tracking(run, parent, "a-sweep")[1] == run_id  # and again: no third


def test_a_sweep_start_killed_before_recording_its_parent_run_adopts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.sweep import state as sweep_state

    base, _ = load_experiment(DEMO, overrides(tmp_path))
    plan = plan_sweep(base, SECTION, name="orphan")
    experiment_id = tracking.ensure_experiment(plan.tracking_uri, "exclusive")
    create, made = tracking.start_or_resume_run, []

    def create_then_die(*args, **kwargs):
        made.append(create(*args, **kwargs))
        raise Killed

    for where in (tracking, tracking.runs):  # the facade's name and the one create_run_once calls
        monkeypatch.setattr(where, "start_or_resume_run", create_then_die)
    with pytest.raises(Killed):
        sweep_state.open_parent(plan, {}, experiment_id)
    monkeypatch.undo()
    state = sweep_state.read_state(plan)
    assert state["parent_run_id"] is None and state["start_id"]  # not started: no --resume needed
    parent = sweep_state.open_parent(plan, state, experiment_id)
    runs = MlflowClient(plan.tracking_uri).search_runs([experiment_id], "tags.kind = 'sweep'")
    assert [r.info.run_id for r in runs] == made == [parent]
    assert sweep_state.read_state(plan)["parent_run_id"] == parent


def test_a_rerun_of_a_finished_run_never_changes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, load_script
) -> None:
    """jobs/train.py on a run that FINISHED: with another adapter.sigma_p it is refused (exit 2)
    naming the run, its status and the changed param; with the same config it says so (exit 0).
    Neither starts Ray or changes the run. A FAILED run with another config is refused before it
    is set RUNNING again."""
    train = load_script("jobs/train.py")
    argv = ["--config", str(DEMO)] + [a for o in overrides(tmp_path) for a in ("--set", o)]
    run = load_config(DEMO, overrides(tmp_path))
    uri, run_id = trainer.prepare_tracking(run)  # as fit_run makes it; then it finished
    tracking.log_metrics(uri, run_id, {"test/demo/acc_n0": 0.75}, step=600)
    tracking.set_terminated(uri, run_id, "FINISHED")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that must not train")

    monkeypatch.setattr(trainer, "init_ray", no_ray)
    client = MlflowClient(uri)
    before = client.get_run(run_id)

    assert train.main([*argv, "--set", "adapter.sigma_p=0.5"]) == 2
    err = capsys.readouterr().err
    assert f"run {run.run_name} (MLflow run {run_id}, FINISHED) was made with another config" in err
    assert "adapter.sigma_p: 0.2 (the run) -> 0.5 (now)" in err
    assert "--set name=" in err and str(tmp_path / "ray_results" / run.run_name) in err
    assert "Traceback" not in err

    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert f"run {run.run_name} finished before (MLflow run {run_id}): not trained again" in out
    assert "test/demo/acc_n0" in out and "0.7500" in out

    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.params == before.data.params
    assert len(client.search_runs([after.info.experiment_id])) == 1

    failed = load_config(DEMO, [*overrides(tmp_path), "name=failed"])
    _, failed_id = trainer.prepare_tracking(failed)
    tracking.set_terminated(uri, failed_id, "FAILED", "a NaN loss")
    assert train.main([*argv, "--set", "name=failed", "--set", "adapter.sigma_p=0.5"]) == 2
    assert f"(MLflow run {failed_id}, FAILED) was made with another config" in (
        capsys.readouterr().err
    )
    assert client.get_run(failed_id).info.status == "FAILED"


def test_torn_state_files_are_named_with_what_to_do(tmp_path: Path) -> None:
    """sweep.json and melora_run.json cut short: an error naming the file and the way out, not a
    JSONDecodeError; an interrupted write keeps the old file whole and leaves no temp file."""
    from orchestrator.errors import StateFileError
    from orchestrator.state_files import write_json

    base, _ = load_experiment(DEMO, overrides(tmp_path))
    plan = plan_sweep(base, SECTION, name="torn")
    state = plan.sweep_dir / "sweep.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"parent_run_id": "ab')
    with pytest.raises(StateFileError) as err:
        run_sweep(plan, resume=True)
    assert f"state file {state} cannot be read (JSONDecodeError" in str(err.value)
    assert f"move the folder {plan.sweep_dir} away" in str(err.value)

    run = plan.trials[0].run
    marker = run_marker.marker_path(run)
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    for call in (lambda: run_marker.recorded_run_id(run), lambda: trainer.prepare_tracking(run)):
        with pytest.raises(StateFileError) as err:
            call()
        assert f"state file {marker} cannot be read (JSONDecodeError" in str(err.value)
        assert "delete it (the next start makes a new MLflow run" in str(err.value)

    write_json(marker, {"mlflow_run_id": "abc"})
    with pytest.raises(TypeError):  # fails midway through writing
        write_json(marker, {"mlflow_run_id": object()})
    assert json.loads(marker.read_text()) == {"mlflow_run_id": "abc"}
    assert sorted(p.name for p in marker.parent.iterdir()) == [marker.name]
