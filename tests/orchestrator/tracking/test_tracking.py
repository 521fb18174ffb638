"""MLflow through orchestrator.tracking, against a real sqlite backend in a temporary folder."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import SourceType

from orchestrator import tracking
from orchestrator.config import RunConfig, TrackingConfig, load_config, load_experiment
from orchestrator.errors import RunFailedError, TrackingError
from orchestrator.sweep.plan import plan_sweep

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite database for the module (creating the schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def experiment(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh experiment per test; the working folder is a temporary one, so nothing lands in the repo."""
    monkeypatch.chdir(tmp_path)
    return tracking.ensure_experiment(uri, f"exp-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


def test_resolve_tracking_uri_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        tracking.resolve_tracking_uri(TrackingConfig())
        == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert (
        tracking.resolve_tracking_uri(TrackingConfig(tracking_uri="http://head:5000"))
        == "http://head:5000"
    )
    relative = TrackingConfig(tracking_uri="sqlite:///runs/m.db")
    assert (
        tracking.resolve_tracking_uri(relative)
        == f"sqlite:///{tmp_path.resolve() / 'runs' / 'm.db'}"
    )
    assert not any(tmp_path.iterdir())


def test_unreachable_server_fails_fast_with_the_uri(no_proxy: None) -> None:
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:9 cannot be reached"):
        tracking.check_reachable("http://127.0.0.1:9", timeout=3)
    assert time.monotonic() - start < 5


@pytest.fixture
def http_server() -> Iterator[str]:
    """A local HTTP server that answers /health with 200 and anything else with 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_reachable_server_passes(http_server: str, no_proxy: None) -> None:
    tracking.check_reachable(http_server)
    tracking.check_reachable(http_server + "/prefix")  # a 404 is still an answer


def test_sqlite_needs_an_existing_folder(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="does not exist") as info:
        tracking.check_reachable(missing)
    assert missing in str(info.value)
    tracking.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not any(tmp_path.iterdir())


def test_redact_uri() -> None:
    assert tracking.redact_uri("https://me:pw@host:5000/x") == "https://***@host:5000/x"
    assert tracking.redact_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"


def test_experiment_is_created_once_with_artifacts_next_to_the_db(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = tracking.ensure_experiment(uri, "exp-once")
    assert tracking.ensure_experiment(uri, "exp-once") == first
    location = MlflowClient(tracking_uri=uri).get_experiment(first).artifact_location
    db_dir = Path(uri.removeprefix("sqlite:///")).parent
    assert location == (db_dir / "mlruns").as_uri()


def test_deleted_experiment_says_how_to_restore(uri: str) -> None:
    experiment_id = tracking.ensure_experiment(uri, "exp-deleted")
    MlflowClient(tracking_uri=uri).delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match="is deleted: restore it"):
        tracking.ensure_experiment(uri, "exp-deleted")


def test_run_is_created_once_and_resumed(uri: str, experiment: str) -> None:
    tags = {"method": "melora", "task": "demo", "seed": 1, "hf_token": "hf_secret"}
    run_id = tracking.start_or_resume_run(uri, experiment, run_name="r1", tags=tags)
    tracking.set_terminated(uri, run_id, "FAILED", reason="worker died")
    assert (
        tracking.start_or_resume_run(uri, experiment, run_id=run_id, run_name="r1", tags=tags)
        == run_id
    )
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "RUNNING" and run.info.run_name == "r1"
    assert {k: run.data.tags[k] for k in ("method", "task", "seed")} == {
        "method": "melora",
        "task": "demo",
        "seed": "1",
    }
    assert "hf_token" not in run.data.tags


def test_a_failing_block_marks_its_run_failed_unless_it_ended_already(
    uri: str, experiment: str
) -> None:
    """A trial that ASHA stopped is marked KILLED by the sweep's driver while the trial's process
    is still dying of it; that process's error must not turn KILLED into FAILED."""
    running = tracking.start_or_resume_run(uri, experiment, run_name="dies")
    killed = tracking.start_or_resume_run(uri, experiment, run_name="stopped")
    tracking.set_terminated(uri, killed, "KILLED", reason="stopped early by the asha scheduler")
    for run_id in (running, killed):
        with pytest.raises(
            RunFailedError, match=f"trial failed \\(MLflow run {run_id}\\): OSError: gone"
        ):
            with tracking.failing_run(uri, run_id, label="trial", wait_s=0):
                raise OSError("gone")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(running).info.status == "FAILED"
    assert client.get_run(running).data.tags["failure_reason"] == "OSError: gone"
    assert client.get_run(killed).info.status == "KILLED"
    assert (
        client.get_run(killed).data.tags["failure_reason"] == "stopped early by the asha scheduler"
    )


def test_resume_of_an_unknown_run_fails(uri: str, experiment: str) -> None:
    with pytest.raises(TrackingError, match="not found"):
        tracking.start_or_resume_run(uri, experiment, run_id=uuid.uuid4().hex)


def test_child_run_points_to_its_parent(uri: str, experiment: str) -> None:
    parent = tracking.start_or_resume_run(uri, experiment, run_name="sweep")
    child = tracking.start_or_resume_run(uri, experiment, run_name="trial", parent_run_id=parent)
    assert MlflowClient(tracking_uri=uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_params_batched_truncated_and_secrets_dropped(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    params = {f"p.{i:03d}": i for i in range(150)}  # more than one batch of 100
    params.update(
        {
            "optim.kl_weighting": "blundell",
            "max_tokens": 5,
            "long": "x" * 10_000,
            "hf_token": "hf_abc",
            "tracking.password": "pw",
            "apiKey": "k1",
            "aws.secret_access_key": "k2",
        }
    )
    dropped = tracking.log_params(uri, run_id, params)
    assert sorted(dropped) == ["apiKey", "aws.secret_access_key", "hf_token", "tracking.password"]
    assert (
        tracking.log_params(uri, run_id, params) == dropped
    )  # a resumed run logs the same values again
    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert len(logged) == 150 + 3
    assert (
        logged["p.149"] == "149"
        and logged["optim.kl_weighting"] == "blundell"
        and logged["max_tokens"] == "5"
    )
    assert len(logged["long"]) == tracking.MAX_PARAM_LENGTH and logged["long"].endswith(
        tracking.TRUNCATED
    )
    assert not {"hf_abc", "pw", "k1", "k2"} & set(logged.values())


def test_run_config_params_log_in_full(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    flat = RunConfig().flat_params()
    assert tracking.log_params(uri, run_id, flat) == []
    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert logged == {k: str(v) for k, v in flat.items()}


@pytest.mark.parametrize(
    "key, secret",
    [
        ("hf_token", True),
        ("HF_TOKEN", True),
        ("hfToken", True),
        ("db.password", True),
        ("api_key", True),
        ("client_secret", True),
        ("optim.kl_weighting", False),
        ("max_tokens", False),
        ("tokenizer", False),
        ("monkey", False),
        ("task.key_column", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert tracking.is_secret_key(key) is secret


def test_metrics_read_back_by_step(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    for step in (1, 2, 3):
        tracking.log_metrics(
            uri, run_id, {"train/nll": 1.0 / step, "train/kl": 10.0 * step}, step=step
        )
    key = tracking.eval_metric_key("test", "openbookqa", "ece", 10)
    assert key == "test/openbookqa/ece_n10"
    tracking.log_metrics(uri, run_id, {key: 0.05}, step=3)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/nll")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1.0 / 3),
    ]
    assert client.get_metric_history(run_id, key)[0].value == 0.05


@pytest.mark.parametrize("bad", ["acc@10", "a//b", "/lead", "a/../b", "tab\tkey", "x" * 251])
def test_bad_metric_names_log_nothing(uri: str, experiment: str, bad: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    with pytest.raises(ValueError, match="is not allowed"):
        tracking.log_metrics(uri, run_id, {"val/acc": 0.5, bad: 1.0}, step=1)
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics == {}


def test_artifacts_are_listed_and_download(uri: str, experiment: str, tmp_path: Path) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    local = tmp_path / "adapter"
    (local / "sub").mkdir(parents=True)
    (local / "melora_config.json").write_text('{"r": 8}')
    (local / "sub" / "w.bin").write_bytes(b"\x00\x01\x02")
    tracking.log_artifacts(uri, run_id, local, "adapter")
    tracking.log_text(uri, run_id, "seed: 1\n", "config/resolved.yaml")
    client = MlflowClient(tracking_uri=uri)
    assert sorted(f.path for f in client.list_artifacts(run_id, "adapter")) == [
        "adapter/melora_config.json",
        "adapter/sub",
    ]
    out = Path(client.download_artifacts(run_id, "adapter", str(tmp_path / "down")))
    assert (out / "melora_config.json").read_text() == '{"r": 8}'
    assert (out / "sub" / "w.bin").read_bytes() == b"\x00\x01\x02"
    assert (
        Path(
            client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path / "down"))
        ).read_text()
        == "seed: 1\n"
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tracking.log_artifacts(uri, run_id, tmp_path / "missing")


def test_failed_status_with_reason(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    tracking.set_terminated(uri, run_id, "FAILED", reason="train/nll is nan at step 37")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "train/nll is nan at step 37"
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.set_terminated(uri, run_id, "DONE")


def test_finished_without_reason(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    tracking.set_terminated(uri, run_id)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags


def test_git_commit(tmp_path: Path, require) -> None:
    require(shutil.which("git"), "git is not installed")
    assert tracking.git_commit(tmp_path) is None  # not a repository
    git = [
        "git",
        "-C",
        str(tmp_path),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert tracking.git_commit(tmp_path) is None  # no commit yet
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tracking.git_commit(tmp_path) == (head, False)
    (tmp_path / "untracked.txt").write_text("u")
    assert tracking.git_commit(tmp_path) == (head, False)  # untracked files do not count
    (tmp_path / "f.txt").write_text("b")
    assert tracking.git_commit(tmp_path) == (head, True)


# ----- what MLflow's UI is built from: experiment kind, source tags, datasets, system metrics ------
def test_experiments_are_of_kind_finetuning(uri: str) -> None:
    client = MlflowClient(tracking_uri=uri)
    new = tracking.ensure_experiment(uri, f"kind-new-{uuid.uuid4().hex[:8]}")
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    # made elsewhere without a kind: it gets one when this project uses it
    bare = client.create_experiment(f"kind-bare-{uuid.uuid4().hex[:8]}")
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(bare).tags
    assert tracking.ensure_experiment(uri, client.get_experiment(bare).name) == bare
    assert client.get_experiment(bare).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    # a kind someone chose stays
    chosen = client.create_experiment(
        f"kind-chosen-{uuid.uuid4().hex[:8]}",
        tags={tracking.EXPERIMENT_KIND_TAG: "custom_model_development"},
    )
    tracking.ensure_experiment(uri, client.get_experiment(chosen).name)
    assert (
        client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG]
        == "custom_model_development"
    )


def test_entry_point_is_the_script_relative_to_the_checkout(tmp_path: Path) -> None:
    assert tracking.entry_point(REPO / "jobs" / "sweep.py") == "jobs/sweep.py"
    assert tracking.entry_point(str(REPO / "jobs" / ".." / "jobs" / "train.py")) == "jobs/train.py"
    outside = tmp_path / "notebook_runner.py"
    assert tracking.entry_point(outside) == str(outside)
    assert tracking.entry_point("") == "<console>"
    assert tracking.entry_point("-c") == "<console>"


def test_runs_carry_mlflow_source_tags(
    uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri=uri)
    monkeypatch.delenv(tracking.RAY_JOB_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [str(REPO / "jobs" / "train.py"), "--config", "x.yaml"])
    tags = client.get_run(tracking.start_or_resume_run(uri, experiment)).data.tags
    assert tags["mlflow.source.name"] == "jobs/train.py"
    assert tags["mlflow.source.type"] == "LOCAL" == SourceType.to_string(SourceType.LOCAL)
    assert "git_sha" not in tags
    commit = tracking.git_commit()
    if commit is None:  # no git, or a copy without .git (ray job submit's working folder)
        assert "mlflow.source.git.commit" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == commit[0]
        assert re.fullmatch(r"[0-9a-f]{40}", commit[0])
        assert tags["mlflow.source.git.dirty"] == str(commit[1]).lower()
    # under `ray job submit` the source is a JOB; a run made for a job in a Ray worker takes the
    # job's tags, read in its driver, over the worker's own
    monkeypatch.setenv(tracking.RAY_JOB_ENV, "{}")
    job = tracking.source_tags(REPO / "jobs" / "sweep.py")
    assert job["mlflow.source.type"] == "JOB" and job["mlflow.source.name"] == "jobs/sweep.py"
    monkeypatch.setattr(sys, "argv", ["/opt/ray/default_worker.py"])
    tags = client.get_run(tracking.start_or_resume_run(uri, experiment, tags=job)).data.tags
    assert {k: tags[k] for k in job} == job
    # resuming changes no tag
    run_id = tracking.start_or_resume_run(uri, experiment, tags=job)
    tracking.start_or_resume_run(uri, experiment, run_id=run_id)
    assert {k: client.get_run(run_id).data.tags[k] for k in job} == job


def _rows(n: int, offset: int = 0):
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": f"Q{i}?", "label": i % 2} for i in range(offset, offset + n)]
    )


def test_splits_are_logged_as_dataset_inputs(uri: str, experiment: str, tmp_path: Path) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    data = tmp_path / "data" / "arc" / "validation.jsonl"
    splits = [
        tracking.SplitInput("arc_easy/train", "train", _rows(8), "train", hub_path="allenai/ai2_arc", hub_config="ARC-Easy"),
        tracking.SplitInput("arc_easy/validation", "validation", _rows(3), "validation[:3]", file=str(data)),
        tracking.SplitInput("arc_easy/test", "test", _rows(5, 3), "validation[3:]", file=str(data)),
        tracking.SplitInput("demo_ood/test", "ood", _rows(4), "test", generator="melora.tasks.demo.out_of_distribution"),
    ]  # fmt: skip
    assert tracking.logged_dataset_inputs(uri, run_id) == []
    tracking.log_dataset_inputs(uri, run_id, splits)
    logged = tracking.logged_dataset_inputs(uri, run_id)
    assert [(name, context) for name, context, _ in logged] == [
        ("arc_easy/train", "train"),
        ("arc_easy/validation", "validation"),
        ("arc_easy/test", "test"),
        ("demo_ood/test", "ood"),
    ]
    digests = [digest for _, _, digest in logged]
    assert len(set(digests)) == 4 and all(re.fullmatch(r"[0-9a-f]{8}", d) for d in digests)
    inputs = MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i.dataset for i in inputs}
    hub = by_name["arc_easy/train"]
    assert hub.source_type == "hugging_face"
    source = json.loads(hub.source)
    assert (source["path"], source["config_name"], source["split"]) == (
        "allenai/ai2_arc",
        "ARC-Easy",
        "train",
    )
    assert json.loads(hub.profile)["num_rows"] == 8
    assert {c["name"] for c in json.loads(hub.schema)["mlflow_colspec"]} == {"prompt", "label"}
    local = by_name["arc_easy/test"]
    assert (local.source_type, json.loads(local.source)) == ("local", {"uri": str(data)})
    code = by_name["demo_ood/test"]
    assert code.source_type == "code" and json.loads(code.source)["tags"] == {
        "generator": "melora.tasks.demo.out_of_distribution",
        "split": "test",
    }
    # the same rows give the same digest (in another run too); logging again adds nothing
    tracking.log_dataset_inputs(uri, run_id, splits)
    assert tracking.logged_dataset_inputs(uri, run_id) == logged
    other = tracking.start_or_resume_run(uri, experiment)
    tracking.log_dataset_inputs(uri, other, splits[:1])
    assert tracking.logged_dataset_inputs(uri, other) == logged[:1]
    with pytest.raises(ValueError, match="context 'eval' is not one of"):
        tracking.log_dataset_inputs(
            uri, other, [tracking.SplitInput("x", "eval", _rows(1), "test")]
        )


def test_task_inputs_name_the_rows_of_each_split() -> None:
    from orchestrator.train.trainer import task_inputs

    run = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    got = [(s.name, s.context, s.hub_split, len(s.rows)) for s in task_inputs(run)]
    assert got == [
        ("demo/train", "train", "train", 1000),
        ("demo/validation", "validation", "validation", 300),
        ("demo/test", "test", "test", 500),
        ("demo_ood/test", "ood", "test", 500),
    ]
    assert task_inputs(run)[0].generator == "melora.tasks.demo.in_distribution"
    # the laplace policy cuts hub train 80 / 20: the validation split is the tail of the same rows
    laplace = run.with_overrides({"task.split_policy": "laplace", "task.ood_tasks": []})
    cuts = [(s.name, s.hub_split, len(s.rows)) for s in task_inputs(laplace)]
    assert cuts == [
        ("demo/train", "train[:800]", 800),
        ("demo/validation", "train[800:]", 200),
        ("demo/test", "validation", 300),
    ]


def test_dataset_inputs_survive_a_concurrent_insert(
    uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two trials of a sweep logging the same new dataset at once: MLflow's SQL store refuses the
    later insert on the datasets' unique key; logging again links the dataset that is there now.
    Any other refusal is raised at once."""
    from mlflow.exceptions import MlflowException

    first, second = (tracking.start_or_resume_run(uri, experiment) for _ in range(2))
    split = tracking.SplitInput(
        "demo_ood/test", "ood", _rows(4), "test", generator="melora.tasks.demo.out_of_distribution"
    )
    client = tracking.store.client(uri)
    real, calls = client.log_inputs, []

    def racing(run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:  # the other trial's insert lands first
            real(first, datasets=datasets)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        return real(run_id, datasets=datasets, models=models)

    monkeypatch.setattr(client, "log_inputs", racing)
    tracking.log_dataset_inputs(uri, second, [split])
    assert calls == [second, second]
    logged = tracking.logged_dataset_inputs(uri, second)
    assert [name for name, _, _ in logged] == ["demo_ood/test"]
    assert logged == tracking.logged_dataset_inputs(uri, first)

    def refused(run_id, datasets=None, models=None):
        calls.append(run_id)
        raise MlflowException("Run is not active")

    monkeypatch.setattr(client, "log_inputs", refused)
    with pytest.raises(MlflowException, match="not active"):
        tracking.log_dataset_inputs(uri, second, [split])
    assert len(calls) == 3


def test_dataset_inputs_are_logged_once_per_run(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare_tracking (the driver, before training): the kind, the source tags and the task's
    splits on a new run; a resumed run keeps its inputs and does not load the task again."""
    from orchestrator.train import trainer

    monkeypatch.chdir(tmp_path)
    run = load_config(REPO / "jobs" / "configs" / "demo.yaml").with_overrides(
        {
            "tracking.tracking_uri": uri,
            "tracking.storage_path": str(tmp_path / "ray_results"),
            "tracking.experiment": f"prepare-{uuid.uuid4().hex[:8]}",
        }
    )
    assert trainer.prepare_tracking(run, source={"mlflow.source.name": "jobs/sweep.py"})[0] == uri
    run_id = trainer.recorded_run_id(run)
    client = MlflowClient(tracking_uri=uri)
    tracked = client.get_run(run_id)
    assert client.get_experiment(tracked.info.experiment_id).tags["mlflow.experimentKind"] == (
        "finetuning"
    )
    assert tracked.data.tags["mlflow.source.name"] == "jobs/sweep.py"
    first = tracking.logged_dataset_inputs(uri, run_id)
    assert [c for _, c, _ in first] == ["train", "validation", "test", "ood"]

    def loaded_again(run):
        raise AssertionError("a resumed run loads its task again to log its datasets")

    monkeypatch.setattr(trainer, "task_inputs", loaded_again)
    assert trainer.prepare_tracking(run) == (uri, run_id)  # the marker: the same run, resumed
    assert tracking.logged_dataset_inputs(uri, run_id) == first


def test_system_metrics_are_sampled_into_the_run(uri: str, experiment: str) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    monitor = tracking.SystemMetrics(uri, run_id, sampling_interval_s=0.2).start()
    time.sleep(0.9)
    assert monitor.stop() and monitor.last_error is None
    client = MlflowClient(tracking_uri=uri)
    metrics = client.get_run(run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 3
    # a resumed run's points follow the earlier ones; a short run still logs its one point
    again = tracking.SystemMetrics(uri, run_id, sampling_interval_s=60).start()
    assert again.stop()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [*steps, len(steps)]


def test_system_metrics_can_be_turned_off(
    uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_id = tracking.start_or_resume_run(uri, experiment)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert tracking.start_system_metrics(uri, run_id) is None
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    monitor = tracking.start_system_metrics(uri, run_id)
    assert monitor is not None and monitor.interval_s == 30
    assert monitor.stop()
    # a setting MLflow cannot read costs the run its system metrics, not the run
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "often")
    assert tracking.start_system_metrics(uri, run_id) is None
    assert "no system metrics" in capsys.readouterr().err


def test_system_metrics_survive_an_outage_and_never_block(
    no_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server: points are dropped and sampling goes on. A server that never answers: stop()
    returns after its wait, leaving the daemon thread in its call."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    down = tracking.SystemMetrics("http://127.0.0.1:9", "0" * 32, sampling_interval_s=0.1).start()
    time.sleep(0.5)
    assert down.running and tracking.is_transient(down.last_error)
    assert down.stop()

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with socket.socket() as silent:  # accepts connections (the backlog), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        hung = tracking.SystemMetrics(uri, "0" * 32, sampling_interval_s=0.1).start()
        started = time.monotonic()
        assert hung.stop(wait_s=0.5) is False
        assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "config", ["sigma_rank_sweep.yaml", "demo.yaml", "ablation_noise_13b.yaml"]
)
def test_varying_sweep_params_keep_their_type(config: str) -> None:
    """The params a sweep varies read back as MLflow's charts need them: numbers that parse as
    numbers (a numeric axis: ints without '.0', floats unpadded), booleans as 'True' / 'False'
    (a category), and other text as it is."""
    base, section = load_experiment(REPO / "jobs" / "configs" / config)
    plan = plan_sweep(base, section, source=config)
    values: dict[str, set] = {}
    for trial in plan.trials:
        for key, value in trial.run.flat_params().items():
            values.setdefault(key, set()).add(value)
    varying = {k: v for k, v in values.items() if len(v) > 1 and k != "tracking.tags"}
    assert varying, config
    for key, vs in varying.items():
        texts = {tracking.param_text(v) for v in vs}
        kinds = {type(v) for v in vs}
        if kinds == {bool}:
            assert texts == {"True", "False"}, key
        elif kinds <= {int, float}:
            for v in vs:
                text = tracking.param_text(v)
                assert text == text.strip() and float(text) == v, (key, text)
                assert isinstance(v, float) or re.fullmatch(r"-?\d+", text), (key, text)
        else:
            assert kinds == {str}, (key, kinds)
    if config == "sigma_rank_sweep.yaml":
        assert {tracking.param_text(v) for v in varying["adapter.r"]} == {"4", "8", "16", "64"}
        assert "0.05" in {tracking.param_text(v) for v in varying["adapter.sigma_p"]}
