"""One training run end to end: Ray Train workers, DeepSpeed ZeRO-2 and ZeRO-3, MLflow read back,
a worker killed mid-run, and a run whose loss turns NaN. Real Ray, DeepSpeed and MLflow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

import melora
from melora import metrics
from melora.evaluation import predict
from melora.tasks import demo_model_config, demo_tokenizer, load_task, make_loader
from orchestrator import tracking
from orchestrator.config import RunConfig, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


def demo_run(tmp_path: Path, **overrides) -> RunConfig:
    """The shipped demo config, shortened, with MLflow and Ray storage inside tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = {
        "optim.max_steps": 24,
        "eval.eval_every": 12,
        "eval.n_samples": [0, 3],
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.storage_path": str(tmp_path / "ray_results"),
        "tracking.experiment": "tests",
    }
    return load_config(REPO / "jobs/configs/demo.yaml").with_overrides({**base, **overrides})


def demo_model_with(adapter_dir: Path):
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(demo_model_config(tokenizer)).eval()
    melora.attach(model, melora.read_adapter_config(adapter_dir))
    melora.load_adapter(model, adapter_dir)
    return tokenizer, model


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def check_tracked_run(run: RunConfig, result, tmp_path: Path) -> MlflowClient:
    """The MLflow run read back: status, tags, params, metric histories, artifacts that load."""
    client = MlflowClient(result.tracking_uri)
    tracked = client.get_run(result.mlflow_run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["method"] == "melora" and tracked.data.tags["task"] == "demo"
    assert tracked.data.tags["seed"] == str(run.seed)
    # what MLflow's UI is built from: the experiment's kind, MLflow's own source tags (no custom
    # git_sha), the task's splits as dataset inputs, and the training node's system metrics
    kind = client.get_experiment(tracked.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "finetuning"
    assert tracked.data.tags["mlflow.source.name"] == tracking.entry_point()  # pytest, here
    assert tracked.data.tags["mlflow.source.type"] == "LOCAL" and "git_sha" not in tracked.data.tags
    if tracking.git_commit() is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", tracked.data.tags["mlflow.source.git.commit"])
        assert tracked.data.tags["mlflow.source.git.dirty"] in ("true", "false")
    inputs = tracking.logged_dataset_inputs(result.tracking_uri, result.mlflow_run_id)
    assert [(name, context) for name, context, _ in inputs] == [
        ("demo/train", "train"),
        ("demo/validation", "validation"),
        ("demo/test", "test"),
        ("demo_ood/test", "ood"),
    ]
    assert 0 <= tracked.data.metrics["system/cpu_utilization_percentage"] <= 100
    assert tracked.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert tracked.data.params["adapter.sigma_p"] == "0.2"
    assert tracked.data.params["scaling.zero_stage"] == str(run.scaling.zero_stage)
    assert len(tracked.data.params) == len(run.flat_params())
    nll_steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "train/nll")]
    assert (
        nll_steps == sorted(nll_steps)
        and nll_steps[-1] == run.optim.max_steps
        and len(nll_steps) >= 5
    )
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "val/nll")] == [12, 24]
    for key in (
        "test/demo/acc_n0",
        "test/demo/ece_n3",
        "ood/demo_ood/nll_n0",
        "ood/demo_ood/auroc_n3",
    ):
        assert key in tracked.data.metrics, key
        assert tracked.data.metrics[key] == pytest.approx(result.metrics[key])

    # selective prediction at every N; MI and OOD AUROC by MI where the predictive averages N >= 2
    # draws (Me-LoRA samples at test); finite, and read back equal to what the run reported
    for n in run.eval.n_samples:
        sets = (("test", "demo"), ("ood", "demo_ood"))
        keys = [f"{s}/{t}/{m}_n{n}" for s, t in sets for m in ("aurc", "acc_cov80")]
        sampled = [f"test/demo/mi_n{n}", f"ood/demo_ood/mi_n{n}", f"ood/demo_ood/auroc_mi_n{n}"]
        for key in keys + (sampled if n >= 2 else []):
            assert math.isfinite(tracked.data.metrics[key]), key
            assert tracked.data.metrics[key] == pytest.approx(result.metrics[key])
        assert n >= 2 or not set(sampled) & set(tracked.data.metrics), n
    for key in ("test/demo/mi_n10", "test/demo/aurc_n0"):
        assert key in tracked.data.metrics and math.isfinite(tracked.data.metrics[key]), key
    assert tracked.data.metrics["test/demo/mi_n10"] >= 0

    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"adapter", "peft_lora", "reliability", "selective", "config"} <= artifacts
    (curve,) = client.list_artifacts(result.mlflow_run_id, "selective")
    assert curve.path == "selective/test_demo.png" and curve.file_size > 1000
    resolved = download(client, result.mlflow_run_id, "config/resolved.yaml", tmp_path / "dl")
    assert RunConfig.from_dict(yaml.safe_load(resolved.read_text())) == run
    pngs = client.list_artifacts(result.mlflow_run_id, "reliability")
    assert len(pngs) == 2 * len(run.eval.n_samples) and all(p.file_size > 1000 for p in pngs)

    # the logged adapter, loaded into a fresh demo model, reproduces the logged test metrics
    adapter_dir = download(client, result.mlflow_run_id, "adapter", tmp_path / "dl")
    shapes = {
        k: tuple(v.shape)
        for k, v in load_file(str(adapter_dir / "melora_adapter.safetensors")).items()
    }
    assert shapes and all(s in {(8, 64), (64, 8), (8, 8)} for s in shapes.values()), shapes
    tokenizer, model = demo_model_with(adapter_dir)
    test = load_task("demo", splits=("test",))["test"]
    loader = make_loader(test, tokenizer, batch_size=64, max_length=run.task.max_length)
    probs, labels = predict(model, loader, n_samples=0)
    assert metrics.accuracy(probs, labels) == pytest.approx(
        result.metrics["test/demo/acc_n0"], abs=1e-9
    )
    assert metrics.nll(probs, labels) == pytest.approx(result.metrics["test/demo/nll_n0"], rel=1e-4)
    # (float noise between batchings may swap two near-tied confidences: a change of 1 / (n k))
    assert metrics.aurc(probs, labels) == pytest.approx(
        result.metrics["test/demo/aurc_n0"], abs=1e-3
    )

    # the PEFT export serves the same mean model
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    peft_dir = download(client, result.mlflow_run_id, "peft_lora", tmp_path / "dl")
    torch.manual_seed(0)
    base = LlamaForCausalLM(demo_model_config(tokenizer)).eval()
    peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    batch = next(iter(make_loader(test.select(range(8)), tokenizer, batch_size=8)))
    with torch.no_grad(), melora.sampling(model, "mean"):
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    with torch.no_grad():
        got = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return client


END_TO_END = {"eval.n_samples": [0, 3, 10]}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory: pytest.TempPathFactory, ray_local):
    """(run, result, folder) of one uninterrupted ZeRO-2 demo run, shared by the end-to-end check
    and, as the reference, by the killed-worker test (the eval settings do not touch training)."""
    from orchestrator.train.trainer import fit_run

    folder = tmp_path_factory.mktemp("zero2")
    run = demo_run(folder, **{"scaling.zero_stage": 2, **END_TO_END})
    return run, fit_run(run), folder


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_demo_run_end_to_end(zero_stage: int, tmp_path: Path, ray_local, request) -> None:
    from orchestrator.train.trainer import fit_run

    if zero_stage == 2:
        run, result, _ = request.getfixturevalue("zero2_run")
    else:
        run = demo_run(tmp_path, **{"scaling.zero_stage": zero_stage, **END_TO_END})
        result = fit_run(run)
    client = check_tracked_run(run, result, tmp_path)
    # the best checkpoint's validation metrics come back from the saved (gathered) adapter
    best_step = int(result.metrics["best_step"])
    val_nll = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "val/nll")}
    tokenizer, model = demo_model_with(
        download(client, result.mlflow_run_id, "adapter", tmp_path / "again")
    )
    validation = load_task("demo", splits=("validation",))["validation"]
    loader = make_loader(validation, tokenizer, batch_size=64, max_length=run.task.max_length)
    probs, labels = predict(model, loader, n_samples=0)
    assert metrics.nll(probs, labels) == pytest.approx(val_nll[best_step], rel=1e-4)


def test_predict_answers_the_test_prompts_as_the_run_logged(
    tmp_path: Path, zero2_run, load_script
) -> None:
    """jobs/predict.py --run on the demo's test split (its rows are the demo's hub schema) gives
    the probabilities the run's logged test metrics came from: accuracy and NLL at N = 0 equal
    (N >= 1 draws depend on how the run sharded the set over its workers, so they are not
    compared). The run's adapter and config come from its MLflow store."""
    run, result, _ = zero2_run
    test = load_task("demo", run.task.split_policy, splits=("test",))["test"]
    fields = ("id", "question", "context", "choices", "label")
    questions = tmp_path / "test.jsonl"
    questions.write_text("".join(json.dumps({k: row[k] for k in fields}) + "\n" for row in test))
    out = tmp_path / "answers.jsonl"
    argv = ["--run", result.mlflow_run_id, "--tracking-uri", result.tracking_uri]
    argv += ["--input", str(questions), "--output", str(out), "--n-samples", "0"]
    assert load_script("jobs/predict.py").main(argv) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == test["id"] and len(answers) == 500
    probs = torch.tensor([a["probs"] + [0.0] * (4 - len(a["probs"])) for a in answers])
    labels = torch.tensor([a["label"] for a in answers])
    assert labels.tolist() == test["label"]
    logged = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics.accuracy(probs, labels) == pytest.approx(logged["test/demo/acc_n0"], abs=1e-9)
    assert metrics.nll(probs, labels) == pytest.approx(logged["test/demo/nll_n0"], rel=1e-5)
    assert all(a["mutual_information"] is None for a in answers)  # N = 0: nothing drawn


def test_the_run_is_an_mlflow_model(tmp_path: Path, zero2_run) -> None:
    """What MLflow's model views are built from, read through MlflowClient: the run's logged
    model (READY, in the run's experiment, the run as its source, listed as the run's output) with
    the run's final metrics linked; and `mlflow.pyfunc.load_model("models:/<id>")` answers demo
    test prompts with the probabilities of `melora.load_predictor` on the run's adapter, at the
    run's N (the largest of eval.n_samples), with the mutual information of its draws."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    run, result, _ = zero2_run
    client = MlflowClient(result.tracking_uri)
    tracked = client.get_run(result.mlflow_run_id)
    assert result.model_id is not None and "melora.model_error" not in tracked.data.tags
    assert [o.model_id for o in tracked.outputs.model_outputs] == [result.model_id]
    model = client.get_logged_model(result.model_id)
    assert str(model.status) == "READY" and model.source_run_id == result.mlflow_run_id
    assert model.experiment_id == tracked.info.experiment_id
    listed = client.search_logged_models(
        [tracked.info.experiment_id]
    )  # the experiment's Models tab
    assert [m.model_id for m in listed] == [result.model_id]
    linked = {m.key: m.value for m in model.metrics}
    final = {k: v for k, v in tracked.data.metrics.items() if k.startswith(("test/", "ood/"))}
    assert "test/demo/acc_n10" in final and {k: linked.get(k) for k in final} == final
    assert linked["best_step"] == result.metrics["best_step"]

    test = load_task("demo", run.task.split_policy, splits=("test",))["test"].select(range(16))
    rows = [{k: row[k] for k in ("id", "question", "context", "choices", "label")} for row in test]
    with _use_tracking_uri(result.tracking_uri):  # models:/ is resolved by the process-wide URI
        pyfunc = mlflow.pyfunc.load_model(f"models:/{result.model_id}")
    adapter = download(client, result.mlflow_run_id, "adapter", tmp_path / "dl")
    predictor = melora.load_predictor(
        adapter,
        task="demo",
        base_model="demo",
        max_length=run.task.max_length,
        batch_size=run.eval.batch_size,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: with 2 threads beside MLflow 8 s, with 1 0.15 s
    try:
        got = pyfunc.predict(rows)
        expected = [a.to_dict() for a in predictor.answer(rows, n_samples=max(run.eval.n_samples))]
    finally:
        torch.set_num_threads(threads)
    assert [a["probs"] for a in got] == [a["probs"] for a in expected]
    assert got == expected and [a["label"] for a in got] == test["label"]
    assert all(a["mutual_information"] >= 0 for a in got)


def test_killed_worker_resumes_to_the_same_adapter(tmp_path: Path, zero2_run) -> None:
    """Kill worker 1 at step 16 (after the step-12 checkpoint): the run restarts from step 12 and
    ends with the adapter of an uninterrupted run of the same seed, in one MLflow run."""
    from orchestrator.train.trainer import fit_run

    _, reference, _ = zero2_run  # the same run, uninterrupted (max_failures changes no step)
    run = demo_run(tmp_path / "b", **{"scaling.max_failures": 1, "eval.n_samples": [0]})
    result = fit_run(run, fault={"rank": 1, "step": 16})

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    # the restart replayed steps 13-16: their train/nll was logged twice, with the same values
    history = client.get_metric_history(result.mlflow_run_id, "train/nll")
    by_step: dict[int, set[float]] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(round(m.value, 5))
    assert any(len([m for m in history if m.step == s]) == 2 for s in range(13, 17))
    assert all(len(values) == 1 for values in by_step.values())
    # the restarted rank 0's system metrics follow the first one's: no step twice
    system = client.get_metric_history(result.mlflow_run_id, "system/cpu_utilization_percentage")
    assert system and len({m.step for m in system}) == len(system)

    def last_adapter(path: str) -> dict[str, torch.Tensor]:
        last = sorted(p for p in Path(path).glob("checkpoint_*") if p.is_dir())[-1]
        assert json.loads((last / "state.json").read_text())["step"] == 24
        return load_file(str(last / "adapter" / "melora_adapter.safetensors"))

    expected, got = last_adapter(reference.path), last_adapter(result.path)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert result.metrics["test/demo/acc_n0"] == pytest.approx(
        reference.metrics["test/demo/acc_n0"]
    )


def test_non_finite_loss_fails_the_run_with_its_reason(tmp_path: Path, ray_local) -> None:
    from orchestrator.errors import RunFailedError
    from orchestrator.train.trainer import fit_run

    # H ~ U(1e30 / sqrt 2, 1e30): Omega = H**2 overflows to inf, so the first sampled loss is NaN
    run = demo_run(tmp_path, **{"adapter.init_std": 1e30, "scaling.max_failures": 2})
    with pytest.raises(RunFailedError, match="non-finite loss at step 1"):
        fit_run(run)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert tracked.info.status == "FAILED"
    assert "non-finite loss at step 1" in tracked.data.tags["failure_reason"]
    checkpoints = [
        p for p in (tmp_path / "ray_results" / run.run_name).glob("checkpoint_*") if p.is_dir()
    ]
    assert not checkpoints  # the run stopped at step 1: no retry went on to train


def test_user_error_in_the_workers_fails_the_run_once(tmp_path: Path, ray_local) -> None:
    """An error a retry cannot fix (here: adapter targets that match no layer of the model, found
    only once the workers have the model) ends the run FAILED on its first try: fit() returns
    instead of raising after Ray Train's two retries, and MLflow has the reason."""
    from orchestrator.errors import RunFailedError
    from orchestrator.train.trainer import fit_run

    run = demo_run(tmp_path, **{"adapter.target_modules": ["nope_proj"], "scaling.max_failures": 2})
    with pytest.raises(RunFailedError, match=r"rank 0: TargetModuleError.*nope_proj") as caught:
        fit_run(run)
    assert caught.value.__cause__ is None  # not Ray's TrainingFailedError after retries
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert tracked.info.status == "FAILED"
    assert "TargetModuleError" in tracked.data.tags["failure_reason"]
