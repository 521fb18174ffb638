"""cluster.yaml: a config Ray's cluster launcher accepts, servers on 127.0.0.1 only, MLflow reached
from the GPU nodes through SSH tunnels, no secrets, the shared storage the paper YAMLs use.

Nothing here starts a cluster (no cloud here): the file is checked against Ray's own schema, and
the shell commands that make and run the MLflow tunnel are run for real in a temporary $HOME (the
head's key commands with ssh-keygen, the workers' tunnel loop with a stand-in for ssh).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_experiment

REPO = Path(__file__).resolve().parents[2]
MLFLOW_URI = "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000;"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_launcher_schema_accepts_it_and_rejects_a_typo(cluster: dict) -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(cluster))  # what `ray up` checks before it starts anything
    with pytest.raises(Exception, match="Additional properties"):
        validate_config(fillout_defaults({**cluster, "head_setup_command": []}))


def test_every_server_listens_on_127_0_0_1_and_every_node_logs_there(cluster: dict) -> None:
    text = (REPO / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    head = cluster["head_start_ray_commands"]
    (server,) = [c for c in head if "mlflow server" in c]
    assert re.findall(r"--host (\S+)", server) == ["127.0.0.1"]
    (ray_head,) = [c for c in head if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in ray_head and ray_head.startswith(MLFLOW_URI)
    workers = cluster["worker_start_ray_commands"]
    tunnel = next(i for i, c in enumerate(workers) if "ssh -N" in c)
    start = next(i for i, c in enumerate(workers) if "ray start" in c)
    assert tunnel < start and workers[start].startswith(MLFLOW_URI)
    assert "-L 127.0.0.1:5000:127.0.0.1:5000 ubuntu@$RAY_HEAD_IP" in workers[tunnel]
    assert cluster["cluster_synced_files"] == ["~/.ssh/mlflow_tunnel"]


def test_no_secret_is_written_in_the_file(cluster: dict) -> None:
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY", text)
    # tokens come as files from the user's machine; the env points the hub client at the file
    assert cluster["file_mounts"]["~/.hf_token"] == "~/.cache/huggingface/token"
    assert "HF_TOKEN_PATH=$HOME/.hf_token" in "\n".join(cluster["setup_commands"])


def test_paper_runs_keep_their_state_on_the_shared_storage_every_node_mounts(cluster: dict) -> None:
    setup = "\n".join(cluster["setup_commands"])
    assert "/mnt/efs" in setup and "mkdir -p /mnt/efs/melora/ray_results" in setup
    for path in sorted((REPO / "jobs" / "configs").glob("*_13b.yaml")):
        base, _ = load_experiment(path)
        assert base.tracking.storage_path.startswith("/mnt/efs/melora/"), path.name
        assert base.tracking.tracking_uri is None  # $MLFLOW_TRACKING_URI, set on every node


def test_head_makes_one_tunnel_key_accepted_only_for_the_mlflow_forward(
    cluster: dict, tmp_path: Path, require
) -> None:
    require(shutil.which("ssh-keygen"), "ssh-keygen is not installed here")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAexisting ray-autoscaler\n")
    env = {**os.environ, "HOME": str(home)}
    commands = [c for c in cluster["head_setup_commands"] if "mlflow_tunnel" in c]
    for command in commands * 2:  # setup commands run again on every `ray up`: idempotent
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    lines = (home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAexisting ray-autoscaler" and len(lines) == 2
    public = (home / ".ssh" / "mlflow_tunnel.pub").read_text().strip()
    assert lines[1] == (
        f'restrict,port-forwarding,permitopen="127.0.0.1:5000",command="/bin/false" {public}'
    )


def test_worker_tunnel_loop_starts_and_stops_with_its_ssh(cluster: dict, tmp_path: Path) -> None:
    """The worker's tunnel commands with `ssh` replaced by a script that records its arguments and
    waits: the loop runs in its own process group named by the pid file, and the stop command
    (run first by the next `ray up`) ends the loop and its ssh."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/ssh_args\nexec sleep 300\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_HEAD_IP": "10.0.0.5",
    }
    workers = cluster["worker_start_ray_commands"]
    stop = next(c for c in workers if "mlflow_tunnel.pid" in c and "kill" in c)
    start = next(c for c in workers if "ssh -N" in c)
    subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
    pid_file = home / "mlflow_tunnel.pid"
    for _ in range(100):
        if pid_file.is_file() and (tmp_path / "ssh_args").is_file():
            break
        time.sleep(0.1)
    group = int(pid_file.read_text())
    try:
        assert os.getpgid(group) == group  # its own process group: stop kills loop and ssh together
        args = (tmp_path / "ssh_args").read_text().split()
        assert args[:3] == ["-N", "-i", f"{home}/.ssh/mlflow_tunnel"]
        assert args[-3:] == ["-L", "127.0.0.1:5000:127.0.0.1:5000", "ubuntu@10.0.0.5"]
        assert "ExitOnForwardFailure=yes" in args
        subprocess.run(["bash", "-c", stop], env=env, check=True, timeout=30)
        for _ in range(100):
            if not _group_alive(group):
                break
            time.sleep(0.1)
        assert not _group_alive(group) and not pid_file.exists()
    finally:
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group."""
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not s.startswith("Z") for s in out.stdout.split())
