"""orchestrator.tracking.model without training: a run made by hand in a real sqlite store (the demo
config's params and dataset inputs, final metrics, an untrained demo adapter as its `adapter/`
artifact), logged as an MLflow pyfunc model, loaded back with `mlflow.pyfunc.load_model`, and
registered; a model that cannot be logged leaves a warning tag, not an error. The end-to-end
check on a trained run is tests/orchestrator/train/test_training_run.py."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import melora
from melora.errors import ConfigError
from melora.tasks import demo_model_config, demo_tokenizer
from orchestrator import tracking
from orchestrator.config import RunConfig, load_config
from orchestrator.errors import ModelError
from orchestrator.tracking import model as mlflow_model
from orchestrator.train.trainer import task_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[3]
ROWS = [
    {"question": "Which number wins? Votes so far: 3123311231", "choices": ["1", "2", "3"]},
    {"question": "Which number wins? Votes: 2121", "choices": ["1", "2"], "label": 1, "id": "b"},
]


def demo_config(uri: str, **overrides) -> RunConfig:
    base = {"optim.max_steps": 24, "eval.n_samples": [0, 3], "tracking.tracking_uri": uri}
    return load_config(REPO / "jobs/configs/demo.yaml").with_overrides({**base, **overrides})


def hand_made_run(uri: str, run: RunConfig, adapter: bool = True) -> str:
    """A run as fit_run leaves it before it ends: params, config, dataset inputs, validations at
    steps 12 and 24 (the best at 12), final metrics at step 24, and the adapter artifact."""
    experiment_id = tracking.ensure_experiment(uri, "model-tests")
    run_id = tracking.start_or_resume_run(uri, experiment_id, run_name=run.run_name)
    tracking.log_params(uri, run_id, run.flat_params())
    tracking.log_text(uri, run_id, run.to_yaml(), "config/resolved.yaml")
    tracking.log_dataset_inputs(uri, run_id, task_inputs(run))
    tracking.log_metrics(uri, run_id, {"val/nll": 1.0, "val/acc": 0.5}, step=12)
    tracking.log_metrics(uri, run_id, {"val/nll": 1.2, "val/acc": 0.4}, step=24)
    final = {"test/demo/acc_n0": 0.6, "ood/demo_ood/nll_n3": 1.5, "best_step": 12}
    tracking.log_metrics(uri, run_id, {**final, "train/nll": 0.3}, step=24)
    if adapter:
        tokenizer = demo_tokenizer()
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(demo_model_config(tokenizer))
        melora.attach(model, melora.AdapterConfig(method=run.adapter.method, r=8, alpha=16))
        with torch.no_grad():  # B drawn (B = 0: every draw the mean), a wide posterior
            for _, layer in melora.adapted_layers(model):
                layer.lora_B.normal_(0.0, 0.5)
                if run.adapter.method == "melora":
                    layer.lora_H.fill_(0.3)
        with tempfile.TemporaryDirectory() as tmp:
            melora.save_adapter(model, Path(tmp) / "adapter")
            tracking.log_artifacts(uri, run_id, Path(tmp) / "adapter", "adapter")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store for the module: a hand-made Me-LoRA run and its logged model."""
    folder = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run = demo_config(uri)
    run_id = hand_made_run(uri, run)
    return {
        "uri": uri,
        "run": run,
        "run_id": run_id,
        "model_id": mlflow_model.log_run_model(uri, run_id, run),
    }


@pytest.fixture
def tracking_uri(store: dict):
    """MLflow's process-wide tracking URI set to the store for a test (models:/ URIs need it),
    and restored exactly (unset stays unset) by MLflow's own context manager."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(store["uri"]):
        yield store["uri"]


def test_the_logged_model_is_the_runs(store: dict, tmp_path: Path) -> None:
    uri, run_id, model_id = store["uri"], store["run_id"], store["model_id"]
    client = MlflowClient(uri)
    tracked = client.get_run(run_id)
    model = client.get_logged_model(model_id)
    assert str(model.status) == "READY" and model.model_type == "melora-adapter"
    assert model.source_run_id == run_id and model.experiment_id == tracked.info.experiment_id
    assert model.name == "melora-demo-seed1" and model.tags["method"] == "melora"
    assert model.tags["mlflow.source.name"] == tracked.data.tags["mlflow.source.name"]
    assert model.params == tracked.data.params  # as MLflow's log_model copies them
    assert [o.model_id for o in tracked.outputs.model_outputs] == [model_id]
    # the final metrics at the last step, val/* at the selected step, each with its dataset
    linked = {m.key: m for m in model.metrics}
    assert sorted(linked) == [
        "best_step",
        "ood/demo_ood/nll_n3",
        "test/demo/acc_n0",
        "val/acc",
        "val/nll",
    ]
    assert (linked["val/nll"].value, linked["val/nll"].step) == (1.0, 12)
    assert (linked["test/demo/acc_n0"].value, linked["test/demo/acc_n0"].step) == (0.6, 24)
    digests = {d.dataset.name: d.dataset.digest for d in tracked.inputs.dataset_inputs}
    for key, dataset in (
        ("test/demo/acc_n0", "demo/test"),
        ("ood/demo_ood/nll_n3", "demo_ood/test"),
        ("val/nll", "demo/validation"),
    ):
        assert linked[key].dataset_name == dataset
        assert linked[key].dataset_digest == digests[dataset]
    # linking logged no point twice in the run's histories
    assert [m.step for m in client.get_metric_history(run_id, "test/demo/acc_n0")] == [24]
    assert [m.step for m in client.get_metric_history(run_id, "val/nll")] == [12, 24]
    # asked again (a backfill, a resumed sweep): the same model, not a second one
    assert mlflow_model.log_run_model(uri, run_id) == model_id
    assert len(client.get_run(run_id).outputs.model_outputs) == 1

    # the model's files: its code and the adapter; no pickle, no base model weights
    local, config = mlflow_model.download_model(uri, f"models:/{model_id}", tmp_path)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "adapter_pyfunc.py" in files and "MLmodel" in files
    assert "artifacts/adapter/melora_adapter.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt"))], files
    assert [f for f in files if f.endswith(".safetensors")] == [
        "artifacts/adapter/melora_adapter.safetensors"
    ]
    assert config == mlflow_model.model_config(store["run"])
    assert config["base_model"] == "demo" and config["n_samples"] == 3
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements)


def test_pyfunc_model_answers_as_load_predictor(store: dict, tracking_uri: str, tmp_path) -> None:
    """models:/<id> loaded with MLflow answers lists, one dict and DataFrames (a label column
    with a gap is float in pandas) with `load_predictor`'s probabilities on the same adapter, at
    the run's N (3) unless `n_samples` is given."""
    model = mlflow.pyfunc.load_model(f"models:/{store['model_id']}")
    adapter = MlflowClient(tracking_uri).download_artifacts(
        store["run_id"], "adapter", str(tmp_path)
    )
    predictor = melora.load_predictor(
        adapter, task="demo", base_model="demo", max_length=128, batch_size=64
    )  # the run's task.max_length and eval.batch_size
    expected = [a.to_dict() for a in predictor.answer(ROWS, n_samples=3)]
    got = model.predict(ROWS)
    assert got == expected
    assert all(a["mutual_information"] > 0 for a in got) and got[1]["label"] == 1
    assert model.predict(pd.DataFrame(ROWS)) == expected
    (one,) = model.predict(ROWS[1])  # alone in its batch: equal up to float noise
    assert one["id"] == "b" and one["probs"] == pytest.approx(expected[1]["probs"], abs=1e-5)
    mean = model.predict(ROWS, params={"n_samples": 0})
    assert mean == [a.to_dict() for a in predictor.answer(ROWS, n_samples=0)]
    assert all(a["mutual_information"] is None for a in mean)
    assert math.isclose(sum(got[0]["probs"]), 1.0, rel_tol=1e-6)


def test_base_model_override_and_its_error(store: dict, tmp_path: Path) -> None:
    """The base model is referenced, never copied: one that cannot be found is melora's
    ConfigError from loading, naming it."""
    local, _ = mlflow_model.download_model(store["uri"], f"models:/{store['model_id']}", tmp_path)
    with pytest.raises(ConfigError, match="base model '/nowhere/llama' not found"):
        mlflow_model.load_model(local, {"base_model": "/nowhere/llama"})


def test_missing_models_are_a_model_error(store: dict, tmp_path: Path) -> None:
    for uri in ("models:/m-0000", "models:/no-such-sweep/1"):
        with pytest.raises(ModelError, match="not found"):
            mlflow_model.download_model(store["uri"], uri, tmp_path)
    with pytest.raises(ModelError, match="models:/<name>/<version>"):
        mlflow_model.download_model(store["uri"], "runs:/abc/model", tmp_path)


def test_a_model_that_cannot_be_logged_is_a_warning_tag(store: dict, capsys) -> None:
    """No adapter artifact: None, a warning, the tag melora.model_error (fit_run then ends the
    run FINISHED: its metrics are whole). ENS and LAP runs get no model and no tag."""
    uri = store["uri"]
    run = demo_config(uri, name="no-adapter")
    run_id = hand_made_run(uri, run, adapter=False)
    assert mlflow_model.log_run_model_or_warn(uri, run_id, run) is None
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert "has no adapter/melora_config.json artifact" in tags[mlflow_model.MODEL_ERROR_TAG]
    assert "could not be logged as an MLflow model" in capsys.readouterr().out
    assert mlflow_model.run_model_id(uri, run_id) is None
    lap = demo_config(uri, **{"name": "lap", "adapter.method": "lap"})
    lap_id = hand_made_run(uri, lap, adapter=False)
    assert mlflow_model.log_run_model_or_warn(uri, lap_id, lap) is None
    assert mlflow_model.MODEL_ERROR_TAG not in MlflowClient(uri).get_run(lap_id).data.tags
    with pytest.raises(ModelError, match="not one adapter's"):
        mlflow_model.log_run_model(uri, lap_id, lap)


def test_register_best_one_version_per_sweep_run(store: dict) -> None:
    uri, model_id, run_id = store["uri"], store["model_id"], store["run_id"]
    tags = {mlflow_model.SWEEP_RUN_TAG: "parent-1", mlflow_model.SWEEP_METRIC_TAG: "val/nll"}
    assert mlflow_model.register_best(uri, "unit-sweep", model_id, run_id, tags) == ("1", True)
    assert mlflow_model.register_best(uri, "unit-sweep", model_id, run_id, tags) == ("1", False)
    again = {**tags, mlflow_model.SWEEP_RUN_TAG: "parent-2"}
    assert mlflow_model.register_best(uri, "unit-sweep", model_id, run_id, again) == ("2", True)
    client = MlflowClient(uri)
    version = client.get_model_version("unit-sweep", "1")
    assert version.run_id == run_id and version.source == f"models:/{model_id}"
    assert version.tags == tags
    # the logged model lists its versions, as mlflow.register_model keeps them (the UI reads it)
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": "unit-sweep", "version": "1"},
        {"name": "unit-sweep", "version": "2"},
    ]


def test_predict_job_answers_with_a_registered_version(
    store: dict, tracking_uri: str, tmp_path: Path, load_script
) -> None:
    """jobs/predict.py --model models:/<name>/<version> (and models:/<model id>) loads the model
    with mlflow.pyfunc and writes what the model's own predict returns."""
    uri, model_id = store["uri"], store["model_id"]
    mlflow_model.register_best(uri, "cli-sweep", model_id, store["run_id"], {})
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(
        ROWS, params={"n_samples": 2, "seed": 1}
    )
    job = load_script("jobs/predict.py")
    for model_uri in ("models:/cli-sweep/1", f"models:/{model_id}"):
        out = tmp_path / "answers.jsonl"
        argv = ["--model", model_uri, "--tracking-uri", uri, "--input", str(questions)]
        argv += ["--output", str(out), "--n-samples", "2", "--seed", "1"]
        assert job.main(argv) == 0
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [a["probs"] for a in got] == [a["probs"] for a in expected]
        assert [a["id"] for a in got] == ["line-1", "b"]
