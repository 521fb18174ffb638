"""benchmarks/gpu_check.py's command line: what it accepts, refuses and defaults to (no run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gpu_check(load_script):
    return load_script("benchmarks/gpu_check.py")


def test_cpu_tiny_defaults(gpu_check, tmp_path: Path) -> None:
    args = gpu_check.parse_args(
        ["--device", "cpu", "--tiny", "--model-dir", str(tmp_path), "--data-dir", str(tmp_path)]
    )
    assert (args.steps, args.rounds, args.results) == (4, 3, None)  # on CPU: print only


def test_cpu_without_tiny_is_refused(gpu_check, capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])
    assert "--device cpu needs --tiny" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(gpu_check, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])  # --device cuda is the default
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_cuda_defaults_write_results(gpu_check, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = gpu_check.parse_args(["--model-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    assert (args.device, args.steps, args.rounds) == ("cuda", 30, 12)
    assert args.results == REPO / "benchmarks" / "RESULTS.md"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "1"], "--steps must be at least 2"),
        (["--model-dir", "/no/such/model"], "--model-dir /no/such/model: no such folder"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_arguments(gpu_check, argv, message, tmp_path: Path, capsys) -> None:
    base = ["--device", "cpu", "--tiny", "--data-dir", str(tmp_path)]
    if "--model-dir" not in argv:
        base += ["--model-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(base + argv)
    assert message in capsys.readouterr().err


def test_results_section_is_replaced_not_repeated(gpu_check, tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nkept\n")
    gpu_check.write_section(path, "first")
    gpu_check.write_section(path, "second")
    text = path.read_text()
    assert text.count(gpu_check.SECTION_START) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nkept\n")
