"""jobs/configs/stories260k.yaml end to end: the Llama2-13B run's path in miniature.

A real checkpoint (`from_pretrained` of the stories260K folder, partitioned under ZeRO-3), a real
task (ARC-Easy from ../shared/data, laplace prompts; a slice of it, to keep the run short),
2 Ray Train workers, the SGD step on the KL, evaluation at N = 0, 1, 10, MLflow read back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "stories260k.yaml"
SLICE = {"train": 32, "validation": 16, "test": 16}  # examples kept per split


@pytest.fixture(scope="module")
def train_job(load_script):
    """jobs/train.py as a module: its `main(argv)` is the command line, run in-process."""
    return load_script("jobs/train.py")


def test_missing_model_folder_fails_before_anything_starts(train_job, tmp_path, capsys) -> None:
    code = train_job.main(
        [
            "--config", str(CONFIG),
            "--set", f"model.name_or_path={tmp_path / 'no_such_model'}",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )  # fmt: skip
    assert code == 2
    assert "model.name_or_path=" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no MLflow database, no Ray results


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3, 2])
def test_stories260k_runs_end_to_end(
    zero_stage: int,
    train_job,
    ray_local,
    data_slice,
    cli_args,
    stories_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    data = data_slice(data_dir, tmp_path / "data", "arc_easy", SLICE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {
        "model.name_or_path": stories_dir,
        "task.data_dir": data,
        "scaling.zero_stage": zero_stage,
        "optim.max_steps": 4,
        "eval.eval_every": 2,
        "tracking.tracking_uri": uri,
        "tracking.storage_path": tmp_path / "ray_results",
    }
    assert train_job.main(cli_args(CONFIG, overrides)) == 0

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stories260k").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.zero_stage"] == str(zero_stage)
    assert run.data.params["optim.kl_optimizer"] == "sgd"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/nll")] == [2, 4]
    metrics = run.data.metrics
    for n in (0, 1, 10):
        for name in ("acc", "nll", "ece", "brier"):
            key = f"test/arc_easy/{name}_n{n}"
            assert key in metrics and math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics.values()), metrics

    # the adapter, saved whole: 5 layers x (q_proj, v_proj) x (A, B, M, H)
    folder = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "dl")))
    shapes = {
        k: tuple(v.shape) for k, v in load_file(str(folder / "melora_adapter.safetensors")).items()
    }
    config = json.loads((stories_dir / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    assert len(shapes) == layers * 2 * 4
    for name, shape in shapes.items():
        out = kv if ".v_proj." in name else d
        expected = {"lora_A": (8, d), "lora_B": (out, 8), "lora_M": (8, 8), "lora_H": (8, 8)}
        assert shape == expected[name.rsplit(".", 1)[-1]], name
