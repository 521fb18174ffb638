"""The paper's own experiment file runs, not only plans: jobs/configs/table2_id_13b.yaml, one short
trial per trained method row, with only what this machine forces overridden (the stories260K
checkpoint from ../shared for Llama2-13B, a slice of WinoGrande-S from ../shared/data for the hub,
2 CPU workers for 4 GPUs). Kept as the paper's: ZeRO-3 (LAP: ZeRO-2), Me-LoRA's two-step SGD KL,
BLoB without flipout. Added: bf16 weights, grad_accum 2 and gradient checkpointing, which no other
test runs together with from_pretrained. (ENS trains nothing of its own: its members are MAP runs.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_experiment

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "table2_id_13b.yaml"
SLICE = {"train_s": 16, "validation": 24}  # WinoGrande-S: validation is cut 1:2 into val / test


def method_rows() -> dict[str, dict]:
    """The trained rows of the table's sweep grid, as the YAML writes them."""
    _, sweep = load_experiment(CONFIG)
    return {k: v for k, v in sweep["grid"]["method"].items() if v["adapter.method"] != "ens"}


def test_the_table_rows_are_the_papers() -> None:
    rows = method_rows()
    assert list(rows) == ["map", "mcd", "lap", "blob", "melora"]
    assert rows["blob"]["adapter.flipout"] is False
    assert rows["lap"]["scaling.zero_stage"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("row", ["map", "mcd", "lap", "blob", "melora"])
def test_a_table2_row_runs_in_bf16_with_grad_accum_2(
    row: str,
    load_script,
    ray_local,
    data_slice,
    cli_args,
    stories_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    data = data_slice(data_dir, tmp_path / "data", "winogrande", SLICE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {
        **method_rows()[row],
        # what the machine forces
        "model.name_or_path": stories_dir,
        "task.data_dir": data,
        "scaling.num_workers": 2,
        "scaling.use_gpu": False,
        "scaling.cpus_per_worker": 0.5,
        "tracking.tracking_uri": uri,
        "tracking.storage_path": tmp_path / "ray_results",
        "optim.max_steps": 2,
        "eval.eval_every": 2,
        # what the paper's 13B runs use and no other test combines
        "model.dtype": "bfloat16",
        "model.gradient_checkpointing": True,
        "optim.grad_accum": 2,
    }
    assert load_script("jobs/train.py").main(cli_args(CONFIG, overrides)) == 0

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("table2_id_13b").experiment_id])
    params = run.data.params
    assert run.info.status == "FINISHED"
    assert (params["model.dtype"], params["optim.grad_accum"]) == ("bfloat16", "2")
    assert params["scaling.zero_stage"] == ("2" if row == "lap" else "3")
    assert params["optim.kl_optimizer"] == "sgd"
    if row == "blob":
        assert params["adapter.flipout"] == "False"
    metrics = run.data.metrics
    for n in (0, 1, 10):
        for name in ("acc", "nll", "ece", "brier"):
            key = f"test/winogrande_s/{name}_n{n}"
            assert key in metrics and math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics.values()), metrics
