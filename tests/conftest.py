"""Shared fixtures: where `../shared` (real data and a real tiny checkpoint) lies, or a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MELORA_SHARED", REPO_ROOT.parent / "shared")).resolve()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(
            f"{what} not found at {path}: these tests read ../shared beside the repo (or $MELORA_SHARED)"
        )
    return path


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
