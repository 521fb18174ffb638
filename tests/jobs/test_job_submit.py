"""`ray job submit --working-dir . -- python jobs/sweep.py ...` against a Ray head this test starts
on 127.0.0.1 (token authentication on, as on a cluster) and stops again, alone: the head runs in
its own session and a temporary Ray folder of its own, so other Ray instances on the machine are
neither joined nor stopped. The head and the CLI read the session's token from a temporary file
(`ray_auth_token` in tests/conftest.py), never from ~/.ray. Two short trials under ASHA; about
1.5 minutes on 2 cores (4 with an empty HOME: DeepSpeed compiles its CPU op again)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path: Path, stop_group, ray_auth_token: Path):
    """A Ray head on 127.0.0.1 with 2 CPUs; yields (dashboard address, environment for the CLI).

    The head gets MLFLOW_TRACKING_URI in its environment, as cluster.yaml's head does: jobs
    inherit it. Its temporary folder is short (Unix socket paths) and its own, so `ray.init()`
    elsewhere on the machine does not find this head through /tmp/ray/ray_current_cluster.
    """
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    dashboard = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # the CLI finds the token only with this set (STACK.md)
        "RAY_AUTH_TOKEN_PATH": str(ray_auth_token),  # a temporary file, not ~/.ray/auth_token
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--num-cpus=2",
            f"--port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,  # every process of this head shares this process group
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = head.communicate(timeout=180)
    try:
        assert head.returncode == 0, out[-3000:]
        cli_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
        yield f"http://127.0.0.1:{dashboard}", cli_env
    finally:
        stop_group(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_with_asha(tmp_path: Path, tiny_sweep, ray_head) -> None:
    """Two trials one after the other under ASHA (rung at step 6): the second, at a learning rate
    too small to learn anything, is stopped at its first validation and KILLED in MLflow."""
    address, env = ray_head
    config = tiny_sweep(
        "submitted",
        {"optim.lr": [0.002, 0.000001]},
        mlflow_in_file=False,  # MLflow comes from the head's MLFLOW_TRACKING_URI, as on a cluster
        scheduler="asha",
        asha={"grace_period": 6, "reduction_factor": 2},
        max_concurrent_trials=1,
    )
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            ".",  # uploaded without .venv, mlflow.db, ray_results: Ray honours .gitignore
            "--",
            "python",
            "jobs/sweep.py",
            "--config",
            str(config),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert submit.returncode == 0 and "succeeded" in submit.stdout, (
        submit.stdout[-4000:] + submit.stderr[-2000:]
    )
    assert "results of sweep submitted" in submit.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-tests")
    runs = client.search_runs([experiment.experiment_id], "tags.sweep = 'submitted'")
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("kind") != "sweep"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["best_trial"] == "submitted-lr0.002"
    assert parents[0].data.tags["trials_stopped"] == "1"
    learned, stopped = children.pop("submitted-lr0.002"), children.pop("submitted-lr1e-06")
    assert not children
    assert learned.info.status == "FINISHED" and "test/demo/acc_n0" in learned.data.metrics
    assert stopped.info.status == "KILLED" and "test/demo/acc_n0" not in stopped.data.metrics
    assert stopped.data.tags["failure_reason"] == "stopped early by the asha scheduler at step 6"
    for r in (learned, stopped):
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.params["tracking.tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # validations reached Ray Tune while the trial trained (the last one only in the final report)
    sweep_dir = tmp_path / "ray_results" / "submitted"
    results = [
        json.loads(line)
        for line in (sweep_dir / "submitted-lr0.002" / "result.json").read_text().splitlines()
    ]
    assert sorted(r["step"] for r in results if "checkpoint_path" in r) == [6]
    assert all("val/nll" in r for r in results)
    assert any("test/demo/acc_n0" in r and "mlflow_run_id" in r for r in results)
