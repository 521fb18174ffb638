"""MLflow as the cluster runs it: a real `mlflow server` on 127.0.0.1 (SQLite store, artifacts
served from --artifacts-destination), which the test stops in the middle of a training run and
starts again on the same port and store; then jobs/evaluate.py and jobs/report.py against it over
HTTP. One server and one training run serve the whole module (real Ray, DeepSpeed and MLflow).

The outage is placed by what happens, not by sleeping: the server is stopped once it holds three
train/nll points of the run, and started again once rank 0 has written six metric records that
it could not send (its spool, `orchestrator.tracking.MetricSpool`, in the Ray Train run's folder).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.errors import RunFailedError, TrackingError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
STOP_AFTER_POINTS = 3  # train/nll points the server holds before it is stopped
BUFFERED_RECORDS = 6  # records rank 0 must write while the server is down before it comes back
# rank 0's spool in the Ray Train run's folder (orchestrator.tracking.MetricSpool)
PENDING_FILE, SENT_FILE = "mlflow_pending.jsonl", "mlflow_sent.json"


class MlflowServer:
    """`mlflow server` on a free port of 127.0.0.1 in its own process group, with its SQLite store
    and artifact folder under `root`; `stop` and `start` keep the port and the store."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.uri = root, f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(self.artifacts),
                    "--workers",
                    "1",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        tail = self.log.read_text()[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"mlflow server on port {self.port} did not come up:\n{tail}")

    def stop(self, crash: bool = False) -> None:
        """SIGTERM to the server's process group (the CLI and its uvicorn), SIGKILL after 15 s;
        `crash`: SIGKILL at once."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        signals = (
            ((signal.SIGKILL, 5.0),) if crash else ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0))
        )
        for sig, grace in signals:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # uvicorn's worker may outlive the CLI for a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def history(self, run_id: str, key: str) -> list[dict]:
        query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key})
        url = f"{self.uri}/api/2.0/mlflow/metrics/get-history?{query}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read()).get("metrics", [])


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> MlflowServer:
    """Started here, ready when a test waits for it (it starts while Ray does); stopped after."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


def spool_state(folder: Path) -> tuple[int, int]:
    """(records written, records sent) of rank 0's spool in the Ray Train run's folder."""
    pending, marker = folder / PENDING_FILE, folder / SENT_FILE
    written = pending.read_bytes().count(b"\n") if pending.is_file() else 0
    sent = json.loads(marker.read_text())["sent"] if marker.is_file() else 0
    return written, sent


def recorded_id(folder: Path) -> str | None:
    """The MLflow run id that fit_run stored beside the Ray Train run (None until it is there)."""
    try:
        return json.loads((folder / "melora_run.json").read_text())["mlflow_run_id"]
    except (OSError, ValueError, KeyError):
        return None


def outage(srv: MlflowServer, folder: Path, seen: dict) -> None:
    """The watcher thread: stop the server during the run, start it again once rank 0 has buffered
    BUFFERED_RECORDS records; `seen` gets what it observed (or the error)."""
    try:
        run_id = wait_for(lambda: recorded_id(folder), 180, "the run's MLflow id")
        wait_for(
            lambda: len(srv.history(run_id, "train/nll")) >= STOP_AFTER_POINTS,
            180,
            f"{STOP_AFTER_POINTS} train/nll points on the server",
        )
        srv.stop(crash=True)
        seen["at_stop"] = spool_state(folder)
        try:
            wait_for(
                lambda: spool_state(folder)[0] - spool_state(folder)[1] >= BUFFERED_RECORDS,
                60,
                f"rank 0 to train on and buffer {BUFFERED_RECORDS} records while MLflow is down",
            )
        except TimeoutError as err:
            seen["error"] = str(err)
        seen["at_restart"] = spool_state(folder)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        seen.setdefault("error", repr(err))
    finally:
        if srv.proc is None:
            srv.start()
            srv.wait_ready()


@pytest.fixture(scope="module")
def outage_run(server: MlflowServer, ray_local, tmp_path_factory):
    """A LoRA demo run (24 steps, train metrics at every step) logged to the server, which is down
    for part of the run."""
    from orchestrator.train.run_marker import storage_path
    from orchestrator.train.trainer import fit_run

    tmp = tmp_path_factory.mktemp("outage-run")
    run = load_config(REPO / "jobs/configs/demo.yaml").with_overrides(
        {
            "adapter.method": "lora",
            "optim.max_steps": 24,
            "eval.eval_every": 12,
            "eval.n_samples": [0, 3],
            "tracking.tracking_uri": server.uri,
            "tracking.storage_path": str(tmp / "ray_results"),
            "tracking.experiment": "tests",
        }
    )
    server.wait_ready()
    folder = Path(storage_path(run)) / run.run_name
    seen: dict = {}
    watcher = threading.Thread(target=outage, args=(server, folder, seen), daemon=True)
    watcher.start()
    try:
        result = fit_run(run)
    finally:
        watcher.join(timeout=240)
    return SimpleNamespace(run=run, result=result, folder=folder, seen=seen)


def test_a_run_survives_an_mlflow_outage_with_each_point_once(outage_run, server) -> None:
    """The run ends FINISHED with its whole metric history: every record rank 0 wrote is in MLflow
    exactly once, with its original step, value and timestamp, and nothing is left unsent."""
    o = outage_run
    assert "error" not in o.seen, o.seen
    written, sent = o.seen["at_restart"]
    assert written - sent >= BUFFERED_RECORDS  # training went on while MLflow was down
    assert (PENDING_FILE, SENT_FILE) == (tracking.PENDING_FILE, tracking.SENT_FILE)
    client = MlflowClient(server.uri)
    run_id = o.result.mlflow_run_id
    assert client.get_run(run_id).info.status == "FINISHED"

    records = [json.loads(line) for line in (o.folder / PENDING_FILE).read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert spool_state(o.folder) == (len(records), len(records))  # all sent
    logged: dict[str, list[tuple[int, float, int]]] = {}
    for r in records:
        for key, value in r["metrics"].items():
            logged.setdefault(key, []).append((r["step"], value, r["timestamp"]))
    for key, points in logged.items():
        history = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
        assert sorted(history) == sorted(points), key  # no gap, no duplicate
    steps = [m.step for m in client.get_metric_history(run_id, "train/nll")]
    assert sorted(steps) == list(range(1, 25))  # log_every is 1 here: every step, once
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/nll")) == [12, 24]
    assert client.get_run(run_id).data.metrics["test/demo/acc_n0"] == pytest.approx(
        o.result.metrics["test/demo/acc_n0"]
    )


def test_tracking_server_mode_runs_train_evaluate_and_report_over_http(
    outage_run, server, load_script, tmp_path: Path
) -> None:
    """Artifacts go up and come down through the server (mlflow-artifacts:/, files under
    --artifacts-destination): the training run's adapter and config; jobs/evaluate.py's run made
    from them (a one-member --ensemble: the cheapest path that downloads a run's config and
    adapter and uploads its own artifacts); jobs/report.py's tables and reliability figures."""
    client = MlflowClient(server.uri)
    run_id = outage_run.result.mlflow_run_id
    experiment = client.get_experiment_by_name("tests")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # never a local path
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    stored = server.artifacts / experiment.experiment_id / run_id / "artifacts"
    for path in ("adapter/melora_adapter.safetensors", "config/resolved.yaml", "reliability"):
        assert (stored / path).exists(), path

    evaluate = load_script("jobs/evaluate.py")
    argv = ["--ensemble", run_id, "--tracking-uri", server.uri, "--set", "task.ood_tasks=[]"]
    assert evaluate.main(argv) == 0
    (ens,) = client.search_runs([experiment.experiment_id], "tags.method = 'ens'")
    assert ens.info.status == "FINISHED" and ens.data.tags["ensemble_members"] == run_id
    ens_stored = server.artifacts / experiment.experiment_id / ens.info.run_id / "artifacts"
    for path in ("reliability/test_demo_n0.png", "ensemble/members.json", "config/resolved.yaml"):
        assert (ens_stored / path).is_file(), path
    # one member: the ensemble is the member's own prediction
    for key in ("test/demo/acc_n0", "test/demo/nll_n0"):
        assert ens.data.metrics[key] == pytest.approx(outage_run.result.metrics[key], rel=1e-5)

    out = tmp_path / "report"
    report = load_script("jobs/report.py")
    assert (
        report.main(["--experiment", "tests", "--tracking-uri", server.uri, "--out", str(out)]) == 0
    )
    text = (out / "report.md").read_text()
    assert "| LoRA" in text and "| ENS" in text, text
    assert "no reliability diagram" not in text  # both runs' diagrams came down from the server
    assert (out / "figures" / "reliability_demo.png").stat().st_size > 1000


def test_spool_keeps_unsent_records_across_restarts_and_run_ids(
    server, tmp_path: Path, monkeypatch
) -> None:
    """The spool on its own: a down server costs no MLflow retries; a torn last line is dropped;
    a new spool on the folder (a restarted worker) sends the rest once, with the original
    timestamps; records of another MLflow run are set aside, and `flush_pending` sends them; a
    run that ends while MLflow is down fails saying how to send what it kept."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    experiment_id = tracking.ensure_experiment(server.uri, "spool-tests")
    first, second = (
        tracking.start_or_resume_run(server.uri, experiment_id, run_name=n) for n in ("a", "b")
    )
    folder = tmp_path / "run"
    spool = tracking.MetricSpool(folder, down, first)
    t0 = time.monotonic()
    assert not spool.add({"train/nll": 0.5}, step=1) and spool.last_error is not None
    assert not spool.add({"train/nll": 0.25}, step=2)  # within the back-off: no call at all
    assert time.monotonic() - t0 < 5  # MLflow's own retries would take minutes
    stamps = [
        json.loads(line)["timestamp"] for line in (folder / PENDING_FILE).read_text().splitlines()
    ]
    with open(folder / PENDING_FILE, "a") as f:
        f.write('{"seq": 3, "step": 3, "timest')  # the writer died in the middle of a line

    again = tracking.MetricSpool(folder, server.uri, first)
    assert [r["step"] for r in again.pending] == [1, 2] and again.send()
    history = [
        (m.step, m.value, m.timestamp)
        for m in MlflowClient(server.uri).get_metric_history(first, "train/nll")
    ]
    assert history == [(1, 0.5, stamps[0]), (2, 0.25, stamps[1])]
    assert tracking.MetricSpool(folder, server.uri, first).pending == []  # nothing sent twice

    tracking.MetricSpool(folder, down, first).add({"val/nll": 0.1}, step=3)  # unsent
    other = tracking.MetricSpool(folder, server.uri, second)  # a new MLflow run, same folder
    assert other.pending == [] and (folder / f"mlflow_spool_{first}" / PENDING_FILE).is_file()
    assert tracking.flush_pending(folder / f"mlflow_spool_{first}", server.uri) == 1
    assert [m.step for m in MlflowClient(server.uri).get_metric_history(first, "val/nll")] == [3]

    from orchestrator.train.logger import RankZeroLogger

    monkeypatch.setenv(tracking.FLUSH_WAIT_ENV, "0")
    logger = RankZeroLogger(0, down, second, spool_dir=tmp_path / "ended")
    with pytest.raises(TrackingError, match=r"for 0 s at the end.*flush_pending"):
        logger.finish({"test/demo/acc_n0": 0.5}, tmp_path, step=24)
    assert tracking.flush_pending(tmp_path / "ended", server.uri) == 1
    assert MlflowClient(server.uri).get_run(second).data.metrics["test/demo/acc_n0"] == 0.5


def test_failure_paths_do_not_hide_the_error_when_mlflow_is_down(
    outage_run, server, monkeypatch, capsys
) -> None:
    """With the server gone, fit_run's failure path raises the training error (and says the run
    could not be marked FAILED), and the sweep's callback warns instead of raising."""
    from orchestrator.sweep import tune as sweep
    from orchestrator.train import trainer

    # today's MLflow client would retry for minutes before failing: fail fast either way
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for where in (tracking, tracking.retries):  # the facade's name and the one failing_run reads
        monkeypatch.setattr(where, "MARK_FAILED_WAIT_S", 1.0, raising=False)

    class TrainerThatLosesMlflow:  # stands in for the TorchTrainer: the server dies, then the run
        def fit(self):
            server.stop()
            raise RuntimeError("worker 0 died at step 7")

    monkeypatch.setattr(trainer, "build_trainer", lambda *a, **k: TrainerThatLosesMlflow())
    run = outage_run.run.with_overrides({"name": "fails-while-mlflow-is-down"})
    with pytest.raises(RunFailedError, match="worker 0 died at step 7") as failed:
        trainer.fit_run(run)
    assert "could not be marked FAILED" in str(failed.value)
    assert isinstance(failed.value.__cause__, RuntimeError)

    # Tune's callback, for a trial whose run is RUNNING on a server that is gone
    plan = {"tracking_uri": server.uri, "trials": {"t": run.to_dict()}}
    trial = SimpleNamespace(config={"trial": "t"}, trial_id="t_0001", last_result={}, path="/x")
    sweep.CloseStoppedRuns(plan).on_trial_error(0, [], trial)
    assert "could not be marked FAILED" in capsys.readouterr().out
