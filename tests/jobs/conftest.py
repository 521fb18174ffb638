"""Fixtures of the sweep tests: a tiny sweep YAML, and stopping exactly the Ray processes a test started."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sweep_job(load_script):
    """jobs/sweep.py as a module: its `main(argv)` is the command line, run in-process."""
    return load_script("jobs/sweep.py")


@pytest.fixture
def tiny_sweep(tmp_path: Path) -> Callable[..., Path]:
    """Write demo.yaml's base with a small sweep section (a few trials of a dozen steps) to tmp_path."""

    def write(name: str, grid: dict, mlflow_in_file: bool = True, **sweep) -> Path:
        raw = yaml.safe_load((REPO / "jobs/configs/demo.yaml").read_text())
        raw["tracking"] = {
            "experiment": "sweep-tests",
            "storage_path": str(tmp_path / "ray_results"),
        }
        if mlflow_in_file:  # else $MLFLOW_TRACKING_URI decides
            raw["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        raw["sweep"] = {
            "name": name,
            "fixed": {
                "optim.max_steps": 12,
                "eval.eval_every": 6,
                "eval.n_samples": [0],
                "scaling.cpus_per_worker": 0.25,
            },
            "grid": grid,
            "driver_cpus": 0.5,
            **sweep,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def stop_process_group(pgid: int, grace: float = 5.0) -> None:
    """Stop the processes of one process group (a sweep driver with its local Ray, or a `ray start`
    head started in a new session), then the Ray workers of its raylet, which Ray puts in process
    groups of their own. Nothing else on the machine is touched (`ray stop` would stop every Ray).
    SIGTERM first and SIGKILL after `grace` seconds; `grace=0`: SIGKILL at once (a crash)."""
    raylets = [pid for pid, cmd in _processes() if _pgid(pid) == pgid and "raylet/raylet" in cmd]
    workers = {pid for raylet in raylets for pid in _with_env(f"RAY_RAYLET_PID={raylet}")}
    if grace > 0:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)
    time.sleep(1.0)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _processes() -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = (Path("/proc") / entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            out.append((int(entry), cmd.decode(errors="replace")))
    return out


def _with_env(assignment: str) -> list[int]:
    found = []
    for pid, _ in _processes():
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if assignment.encode() in environ:
            found.append(pid)
    return found


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def stop_group() -> Callable[..., None]:
    """`stop_process_group` (see its docstring), as a fixture."""
    return stop_process_group
