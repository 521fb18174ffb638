"""Shared fixtures: where `../shared` (real data and a real tiny checkpoint) lies (a skip without
it, a failure under CI=true), and Ray's environment: a token in a temporary folder, no exported
RAY_ADDRESS, and os.environ as it was after every test (ray.init writes RAY_AUTH_MODE into it)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MELORA_SHARED", REPO_ROOT.parent / "shared")).resolve()
# Ray variables a developer may have exported: tests start their own local Ray on 127.0.0.1.
RAY_OUTSIDE_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def require(condition: object, reason: str) -> None:
    """Skip the calling test when a prerequisite is missing (`condition` a Path that does not
    exist, or falsy), or fail it under CI=true: in CI a green suite means every test ran."""
    ok = condition.exists() if isinstance(condition, Path) else bool(condition)
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="require", scope="session")
def require_fixture():
    """`require(condition, reason)` for test bodies: a skip, or under CI=true a failure."""
    return require


def _need(path: Path, what: str) -> Path:
    require(
        path,
        f"{what} not found at {path}: these tests read ../shared beside the repo (or $MELORA_SHARED)",
    )
    return path


@contextlib.contextmanager
def restored_environ() -> Iterator[None]:
    """os.environ exactly as before the block, whatever the block (or Ray inside it) set."""
    saved = dict(os.environ)
    try:
        yield
    finally:  # only what changed: other threads (Ray's) may read the environment meanwhile
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def ray_auth_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ray 2.60 turns token authentication on for every local cluster. Without a token, `ray.init()`
    writes a new one to ~/.ray/auth_token and `ray start --head` with RAY_AUTH_MODE=token fails.
    Every Ray of the test session (in-process, subprocesses, the `ray start` head) reads this
    session's token from a temporary file through RAY_AUTH_TOKEN_PATH instead, never ~/.ray; the
    developer's RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN are not honoured. os.environ is
    restored and the token removed at the end."""
    folder = tmp_path_factory.mktemp("ray-auth")  # pytest's private temp folder, pruned by pytest
    token = folder / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    with restored_environ():
        for name in RAY_OUTSIDE_VARIABLES:
            os.environ.pop(name, None)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        try:
            yield token
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_environ() -> Iterator[None]:
    """What a test (or the Ray it starts in-process) sets in os.environ ends with the test."""
    with restored_environ():
        yield


@pytest.fixture(scope="module")
def ray_local(ray_auth_token: Path) -> Iterator[None]:
    """A local Ray (2 CPUs, 127.0.0.1) started in-process by `init_ray` for one test module, shut
    down after it, and os.environ as before (ray.init sets RAY_AUTH_MODE and others in it)."""
    import ray

    from orchestrator.train.trainer import init_ray

    with restored_environ():
        init_ray(num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()


def load_script(relative: str):
    """A script of the repository (jobs/*.py, benchmarks/*.py: folders of scripts, not packages)
    imported as a module, so that a test runs its `main(argv)` in-process."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="load_script", scope="session")
def load_script_fixture():
    """`load_script("jobs/train.py")` for tests (see `load_script`)."""
    return load_script


def data_slice(data_dir: Path, out: Path, folder: str, counts: dict[str, int]) -> Path:
    """A data folder at `out` with the first `counts[file]` rows of `data_dir/folder/<file>.jsonl`
    (the hub's schema, as `task.data_dir` reads it): a real task, small enough for a test run."""
    (out / folder).mkdir(parents=True)
    for name, n in counts.items():
        lines = (data_dir / folder / f"{name}.jsonl").read_text().splitlines()[:n]
        (out / folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def cli_args(config: Path, overrides: dict) -> list[str]:
    """`--config config --set key=value ...`: a job script's command line."""
    argv = ["--config", str(config)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


@pytest.fixture(name="data_slice", scope="session")
def data_slice_fixture():
    """`data_slice(data_dir, out, folder, counts)` for tests (see `data_slice`)."""
    return data_slice


@pytest.fixture(name="cli_args", scope="session")
def cli_args_fixture():
    """`cli_args(config, overrides)` for tests (see `cli_args`)."""
    return cli_args


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` folder beside the repository."""
    return _need(SHARED_DIR, "../shared")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real copies of the paper's datasets, in the Hugging Face hub's schema."""
    return _need(SHARED_DIR / "data", "the shared datasets folder")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """A real pretrained tiny Llama-2 (stories260K) in Hugging Face format."""
    return _need(SHARED_DIR / "models" / "stories260k" / "hf_llama", "the stories260K checkpoint")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: as fast alone, and far faster when other
    processes share the cores. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
