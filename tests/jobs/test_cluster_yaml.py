"""cluster.yaml: a config Ray's cluster launcher accepts, servers on 127.0.0.1 only, MLflow reached
from the GPU nodes through SSH tunnels, no secrets, the shared storage the paper YAMLs use, and an
MLflow server that is safe to run there: its SQLite store on the head's own disk with one writer
(SQLite's locks are not reliable over NFS), basic authentication, a backup on EFS.

Nothing here starts a cluster (no cloud here): the file is checked against Ray's own schema, and
the shell commands that make and run the MLflow tunnel and server are run for real in a temporary
$HOME, with a temporary folder for /mnt/efs (the head's key commands with ssh-keygen and a stand-in
for `ip`, the workers' tunnel loop with a stand-in for ssh, the head's MLflow commands as they are).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
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
    # MLflow's password too: the file MLflow's client reads by itself, copied from the user's
    # machine; the server's admin is made from it on the head, never from a value in this file
    assert cluster["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert not re.search(
        r"(?i)(tracking_password|admin_password|secret_key)\s*[=:]\s*['\"\w]", text
    )
    assert "admin_password = {password" in text  # the ini is written from the file


def test_mlflow_store_is_on_the_head_disk_with_one_writer_and_basic_auth(cluster: dict) -> None:
    """SQLite over NFS (EFS) is not safe: the store lives on the head's disk, written by one server
    process; artifacts stay on EFS, served through the server; every request needs a login."""
    (server,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    (store,) = re.findall(r"--backend-store-uri (\S+)", server)
    assert store == "sqlite:///$HOME/mlflow/mlflow.db" and "/mnt/efs" not in store
    assert re.findall(r"--workers (\S+)", server) == ["1"]
    assert re.findall(r"--artifacts-destination (\S+)", server) == [
        "/mnt/efs/melora/mlflow/artifacts"
    ]
    assert "--app-name basic-auth" in server and "MLFLOW_AUTH_CONFIG_PATH=$HOME/mlflow/" in server


def test_paper_runs_keep_their_state_on_the_shared_storage_every_node_mounts(cluster: dict) -> None:
    setup = "\n".join(cluster["setup_commands"])
    assert "/mnt/efs" in setup and "mkdir -p /mnt/efs/melora/ray_results" in setup
    for path in sorted((REPO / "jobs" / "configs").glob("*_13b.yaml")):
        base, _ = load_experiment(path)
        assert base.tracking.storage_path.startswith("/mnt/efs/melora/"), path.name
        assert base.tracking.tracking_uri is None  # $MLFLOW_TRACKING_URI, set on every node


FAKE_IP = """#!/bin/sh
case "$*" in
  "-o -4 route show default") echo "default via 10.0.16.1 dev ens5 proto dhcp src 10.0.21.7 metric 100" ;;
  "-o -4 addr show dev ens5 scope global") echo "2: ens5    inet 10.0.21.7/20 metric 100 brd 10.0.31.255 scope global dynamic ens5" ;;
  *) echo "unexpected: ip $*" >&2; exit 1 ;;
esac
"""


def test_head_makes_one_tunnel_key_accepted_only_for_the_mlflow_forward(
    cluster: dict, tmp_path: Path, require
) -> None:
    """The head's key commands with ssh-keygen and a stand-in for `ip` (the head at 10.0.21.7/20):
    the key is accepted only from that subnet, only to open 127.0.0.1:5000, with no -R listener and
    no shell, and `ray up` again rewrites the line (an older line without those limits goes)."""
    require(shutil.which("ssh-keygen"), "ssh-keygen is not installed here")
    home = _home(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ip").write_text(FAKE_IP)
    (tmp_path / "bin" / "ip").chmod(0o755)
    old = 'restrict,port-forwarding,permitopen="127.0.0.1:5000",command="/bin/false" ssh-ed25519 AAAAold mlflow-tunnel'
    (home / ".ssh" / "authorized_keys").write_text(
        f"ssh-ed25519 AAAAexisting ray-autoscaler\n{old}\n"
    )
    env = {**os.environ, "HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    commands = [c for c in cluster["head_setup_commands"] if "mlflow_tunnel" in c]
    for command in commands * 2:  # setup commands run again on every `ray up`: idempotent
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    lines = (home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAexisting ray-autoscaler" and len(lines) == 2
    public = (home / ".ssh" / "mlflow_tunnel.pub").read_text().strip()
    options = (
        'restrict,port-forwarding,permitopen="127.0.0.1:5000",permitlisten="127.0.0.1:1",'
        'from="10.0.16.0/20",command="/bin/false"'
    )
    assert lines[1] == f"{options} {public}"
    _check_sshd_key_options(options)
    # and no -R listener for any key, Unix sockets included (a key's permitlisten cannot say so)
    (dropin,) = [c for c in cluster["head_setup_commands"] if "sshd_config.d" in c]
    assert "PermitListen none" in dropin and "AllowStreamLocalForwarding no" in dropin
    assert "sshd -t &&" in dropin  # a config sshd would refuse is never loaded


def _check_sshd_key_options(options: str) -> None:
    """The rules sshd applies to an authorized_keys line's options (OpenSSH's auth-options.c,
    sshauthopt_parse and handle_permit), for the options used here. One broken option makes sshd
    reject the whole line, and with it the tunnel: permitopen/permitlisten take host:port with a
    port of 1-65535 or * (so permitlisten="none" is refused: "invalid permission port"), from= a
    pattern list. Checked by hand against sshd 9.2 (Debian bookworm) on 127.0.0.1: this line
    allows -L to 127.0.0.1:5000 only and refuses -R; permitlisten="none" refuses the key."""
    option = r'[A-Za-z-]+(?:="[^"]*")?'
    assert re.fullmatch(rf"{option}(?:,{option})*", options), "not a comma-separated option list"
    seen: dict[str, list[str | None]] = {}
    for name, value in re.findall(r'([A-Za-z-]+)(?:="([^"]*)")?', options):
        seen.setdefault(name, []).append(value or None)
    flags = {"restrict", "port-forwarding", "no-pty", "no-agent-forwarding", "no-x11-forwarding"}
    assert set(seen) <= flags | {"permitopen", "permitlisten", "from", "command"}, seen
    for name in ("permitopen", "permitlisten"):
        for value in seen[name]:
            if name == "permitlisten" and ":" not in value:
                value = f"*:{value}"  # a bare port listens on any address
            host, _, port = value.rpartition(":")
            valid = port == "*" or (port.isdigit() and 0 < int(port) < 65536)
            assert host and valid, f'{name}="{value}": sshd wants host:port'
    assert seen["permitopen"] == ["127.0.0.1:5000"]
    # -R: the only listen permissions are ports below 1024, which sshd refuses a non-root user
    assert all(int(v.rpartition(":")[2]) < 1024 for v in seen["permitlisten"])
    (patterns,) = seen["from"]
    for pattern in patterns.split(","):
        ipaddress.ip_network(pattern)  # strict: sshd refuses a CIDR with host bits set too
    assert seen["command"] == ["/bin/false"] and "restrict" in seen


def _home(tmp_path: Path) -> Path:
    """A temporary $HOME with ~/.ssh and ~/venv (this checkout's virtual environment)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / "venv").symlink_to(Path(sys.prefix))
    return home


def test_head_mlflow_server_needs_the_login_and_backs_its_store_up_to_efs(
    cluster: dict, tmp_path: Path, monkeypatch
) -> None:
    """The head's MLflow commands as written (setup, start, backup, stop, restore), in a temporary
    $HOME, with a temporary folder for /mnt/efs and a free port for 5000: without the login of
    ~/.mlflow/credentials a request gets 401, with it 200; MLflow's client logs with it from the
    file alone, its artifacts land on "EFS"; the backup there is a whole database; a head with an
    empty disk starts from it; no log holds the password."""
    home, efs = _home(tmp_path), tmp_path / "efs"
    (efs / "melora" / "mlflow").mkdir(parents=True)
    password = secrets.token_urlsafe(18)
    (home / ".mlflow").mkdir()
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = {password}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), PATH=f"{home / 'venv' / 'bin'}:{env['PATH']}")

    def run(command: str, **kwargs) -> subprocess.CompletedProcess:
        command = command.replace("/mnt/efs", str(efs)).replace("--port 5000", f"--port {port}")
        return subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60, **kwargs)

    setup = [c for c in cluster["head_setup_commands"] if "~/mlflow" in c]
    start = [c for c in cluster["head_start_ray_commands"] if "mlflow" in c and "backup;" not in c]
    for command in setup:
        run(command)
    assert (home / "mlflow" / "basic_auth.ini").stat().st_mode & 0o077 == 0
    # a process group of this session for the server (`nohup ... &` stays in its shell's group)
    shell = subprocess.Popen(["sleep", "600"], preexec_fn=os.setpgrp)
    try:
        for command in start:
            run(command, preexec_fn=lambda: os.setpgid(0, shell.pid))
        uri = f"http://127.0.0.1:{port}"
        _wait_ready(uri, home)
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401 and _status(f"{uri}/") == 401  # the API and the UI
        assert _status(search, ("admin", password + "x")) == 401
        assert _status(search, ("admin", password)) == 200

        from mlflow import MlflowClient

        monkeypatch.setenv("HOME", str(home))  # the client finds ~/.mlflow/credentials itself
        for name in (
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        ):
            monkeypatch.delenv(name, raising=False)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("cluster-check")).info.run_id
        client.log_metric(run_id, "loss", 0.5)
        client.log_text(run_id, "hello", "note.txt")
        assert list((efs / "melora" / "mlflow" / "artifacts").rglob("note.txt"))

        run(str(home / "mlflow" / "backup"))
        backup = efs / "melora" / "mlflow" / "mlflow.db.backup"
        assert _experiments(backup) >= {"cluster-check"}
        (stop,) = [c for c in start if "pid=$(cat ~/mlflow.pid)" in c]
        run(stop)
        for _ in range(150):
            if not _group_alive_but(shell.pid):
                break
            time.sleep(0.1)
        assert not _group_alive_but(shell.pid), "the server outlived its stop command"
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    logs = [p.read_text() for p in (home / "mlflow.log", home / "mlflow" / "basic_auth.ini")]
    assert password not in logs[0] and password in logs[1]  # only the 0600 config holds it
    (home / "mlflow" / "mlflow.db").unlink()  # a new head: an empty disk
    (restore,) = [c for c in start if "cp " in c]
    run(restore)
    assert _experiments(home / "mlflow" / "mlflow.db") >= {"cluster-check"}


def _wait_ready(uri: str, home: Path, timeout: float = 90.0) -> None:
    """Until /health answers; fails at once, with the log's end, when the server has exited."""
    pid = int((home / "mlflow.pid").read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if subprocess.run(
                ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
            ).stdout.strip()[:1] in ("", "Z"):
                break
            time.sleep(0.2)
    raise AssertionError(
        f"mlflow server did not come up:\n{(home / 'mlflow.log').read_text()[-2000:]}"
    )


def _status(url: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        token = b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def _experiments(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {row[0] for row in con.execute("select name from experiments")}


def _group_alive_but(pgid: int) -> bool:
    """Whether a live process other than the group's leader (the `sleep` holding it) is left."""
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True
    )
    return any(
        int(pid) != pgid and not stat.startswith("Z")
        for pid, stat in (line.split() for line in out.stdout.splitlines())
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
