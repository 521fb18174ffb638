"""MLflow through orchestrator.tracking, against a real sqlite backend in a temporary folder."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import tracking
from orchestrator.config import RunConfig, TrackingConfig


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
    with pytest.raises(tracking.TrackingError, match=r"http://127\.0\.0\.1:9 cannot be reached"):
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
    with pytest.raises(tracking.TrackingError, match="does not exist") as info:
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
    with pytest.raises(tracking.TrackingError, match="is deleted: restore it"):
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


def test_resume_of_an_unknown_run_fails(uri: str, experiment: str) -> None:
    with pytest.raises(tracking.TrackingError, match="not found"):
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


def test_git_sha(tmp_path: Path, require) -> None:
    require(shutil.which("git"), "git is not installed")
    assert tracking.git_sha(tmp_path) == "unknown"  # not a repository
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
    assert tracking.git_sha(tmp_path) == "unknown"  # no commit yet
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tracking.git_sha(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert tracking.git_sha(tmp_path) == head + "+dirty"
