"""What MLflow's UI pages are built from, read over HTTP from a real `mlflow server` with plain
urllib (its REST API, /api/2.0; the UI's pages call the same handlers under /ajax-api/2.0), and
compared with what MlflowClient reads from the same store directly: the experiment's kind tag,
the run's source tags and dataset inputs, its logged model with the linked final metrics, and the
registered model version.

The store is made without training, by the project's own code, as test_mlflow_model.py makes
its `store` (a module fixture there: a fixture of another module cannot be shared, and the
trained runs of test_training_run.py are module fixtures too): a run as `fit_run` leaves it
(orchestrator.tracking: experiment, source tags, params, dataset inputs of `task_inputs`,
validations at steps 12 and 24, final metrics, an untrained demo adapter; then `log_run_model`
and FINISHED), registered as a sweep registers its best (`register_best` with the sweep's version
tags). The server starts on that SQLite store once its tables exist, while the run is written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from mlflow.data.digest_utils import compute_pandas_digest

from melora.adapters import attach, save_adapter
from melora.config import AdapterConfig
from melora.tasks import demo_model_config, demo_tokenizer
from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.tracking import model as mlflow_model
from orchestrator.train.trainer import task_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[3]
EXPERIMENT, SWEEP = "rest-tests", "rest-sweep"
VALIDATIONS = {12: {"val/nll": 1.0, "val/acc": 0.5}, 24: {"val/nll": 1.2, "val/acc": 0.4}}
FINAL = {"test/demo/acc_n0": 0.6, "test/demo/nll_n3": 0.9, "ood/demo_ood/nll_n3": 1.5}
BEST_STEP = 12  # the selected checkpoint: val/* are linked to the model at this step


def made_run(uri: str, experiment_id: str, run) -> tuple[str, dict[str, str]]:
    """(run id, the source tags it was expected to get) of a run made as fit_run makes one."""
    expected_source = tracking.source_tags()
    run_id = tracking.start_or_resume_run(uri, experiment_id, run_name=run.run_name)
    tracking.log_params(uri, run_id, run.flat_params())
    tracking.log_text(uri, run_id, run.to_yaml(), "config/resolved.yaml")
    tracking.log_dataset_inputs(uri, run_id, task_inputs(run))
    for step, values in VALIDATIONS.items():
        tracking.log_metrics(uri, run_id, values, step=step)
    tracking.log_metrics(uri, run_id, {**FINAL, "best_step": BEST_STEP, "train/nll": 0.3}, step=24)
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(demo_model_config(tokenizer))
    attach(model, AdapterConfig(method=run.adapter.method, r=8, alpha=16))
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        tracking.log_artifacts(uri, run_id, Path(tmp) / "adapter", "adapter")
    return run_id, expected_source


def start_server(folder: Path, uri: str) -> tuple[subprocess.Popen, str, Path]:
    """(process, base URL, log file) of `mlflow server` on `uri`, on a free port of 127.0.0.1,
    in a process group of its own (the CLI and its uvicorn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", uri, "--artifacts-destination", str(folder / "served")]
    command += ["--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 90.0) -> None:
    """Until GET /health answers 200; the server's log in the error if it exits or times out."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server at {base} did not come up:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL to the server's process group, at once: it only answered reads, and its store is
    thrown away (a SIGTERM costs 2 s of uvicorn's shutdown)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The store (its sqlite URI, for MlflowClient) and `mlflow server` on it at `base`."""
    folder = tmp_path_factory.mktemp("mlflow-rest")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run = load_config(REPO / "jobs/configs/demo.yaml").with_overrides(
        {"optim.max_steps": 24, "eval.n_samples": [0, 3], "tracking.tracking_uri": uri}
    )
    experiment_id = tracking.ensure_experiment(uri, EXPERIMENT)  # the store's tables made here
    # the server comes up (seconds) while the run is written: it only reads the store as it starts
    proc, base, log = start_server(folder, uri)
    try:
        run_id, expected_source = made_run(uri, experiment_id, run)
        model_id = mlflow_model.log_run_model(uri, run_id, run)
        tracking.set_terminated(uri, run_id, "FINISHED")
        version_tags = {
            mlflow_model.SWEEP_RUN_TAG: "parent-run-0",
            mlflow_model.SWEEP_METRIC_TAG: "val/nll",
            mlflow_model.SWEEP_VALUE_TAG: "1.0",
            mlflow_model.SWEEP_TRIAL_TAG: run.run_name,
        }
        version, created = mlflow_model.register_best(uri, SWEEP, model_id, run_id, version_tags)
        assert (version, created) == ("1", True)
        wait_ready(proc, base, log)
        yield SimpleNamespace(
            uri=uri,
            base=base,
            run=run,
            run_id=run_id,
            model_id=model_id,
            version=version,
            version_tags=version_tags,
            expected_source=expected_source,
        )
    finally:
        stop(proc)


def rest(
    served: SimpleNamespace, path: str, body: dict | None = None, api: str = "api", **query
) -> dict:
    """The JSON answer of the server's REST API to GET /api/2.0/mlflow/<path>?<query>, or to a
    POST of `body` (the search endpoints, which the UI's tables POST); `api="ajax-api"`: the
    path the UI's pages call."""
    url = f"{served.base}/{api}/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as answer:
        assert answer.status == 200, url
        return json.loads(answer.read())


def tags_of(items: list[dict]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in items}


def test_experiment_kind_and_run_source_tags(served: SimpleNamespace) -> None:
    """The experiment opens on its training runs (kind finetuning), and the run page's source
    ("Source", git commit) is MLflow's own source tags, as orchestrator.tracking sets them."""
    client = MlflowClient(served.uri)
    experiment = rest(served, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert tags_of(experiment["tags"])["mlflow.experimentKind"] == "finetuning"
    assert tags_of(experiment["tags"]) == client.get_experiment_by_name(EXPERIMENT).tags
    assert (tracking.EXPERIMENT_KIND_TAG, tracking.FINETUNING) == (
        "mlflow.experimentKind",
        "finetuning",
    )

    run = rest(served, "runs/get", run_id=served.run_id)["run"]
    assert rest(served, "runs/get", api="ajax-api", run_id=served.run_id)["run"] == run
    assert run["info"]["experiment_id"] == experiment["experiment_id"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == served.run.run_name
    tags = tags_of(run["data"]["tags"])
    source = {k: v for k, v in tags.items() if k.startswith("mlflow.source.")}
    assert source == served.expected_source  # name, type, and git commit and dirty where git is
    assert source == {
        k: v for k, v in client.get_run(served.run_id).data.tags.items() if k in source
    }
    assert tags["mlflow.source.name"] == tracking.entry_point()  # pytest's script, here
    assert tags["mlflow.source.name"] not in ("", "<console>")
    assert tags["mlflow.source.type"] == "LOCAL"
    if "mlflow.source.git.commit" in served.expected_source:
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        assert tags["mlflow.source.git.dirty"] in ("true", "false")
    assert "git_sha" not in tags
    # the runs table (its Source column) is a POST to runs/search: the same tags there
    (found,) = rest(
        served, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 10}
    )["runs"]
    assert found["info"]["run_id"] == served.run_id
    assert tags_of(found["data"]["tags"]) == tags


def test_dataset_inputs_per_split(served: SimpleNamespace) -> None:
    """The Dataset column and the run page's Datasets: one input per split of the task, named,
    with the digest of its rows, its role as the input tag mlflow.data.context, and its source
    (the generator of the demo's rows)."""
    splits = task_inputs(served.run)
    run = rest(served, "runs/get", run_id=served.run_id)["run"]
    got = [
        (
            d["dataset"]["name"],
            tags_of(d.get("tags", []))["mlflow.data.context"],
            d["dataset"]["digest"],
        )
        for d in run["inputs"]["dataset_inputs"]
    ]
    assert [(name, context) for name, context, _ in got] == [
        ("demo/train", "train"),
        ("demo/validation", "validation"),
        ("demo/test", "test"),
        ("demo_ood/test", "ood"),
    ]
    assert [(s.name, s.context) for s in splits] == [(n, c) for n, c, _ in got]
    # the digest is MLflow's hash of the split's rows (its first 10,000): each split its own
    for split, (_, _, digest) in zip(splits, got, strict=True):
        assert digest == compute_pandas_digest(split.rows.to_pandas().head(10_000)), split.name
    assert len({digest for _, _, digest in got}) == len(got)
    assert got == [tuple(i) for i in tracking.logged_dataset_inputs(served.uri, served.run_id)]
    for split, d in zip(splits, run["inputs"]["dataset_inputs"], strict=True):
        assert d["dataset"]["source_type"] == "code"
        assert json.loads(d["dataset"]["source"])["tags"]["generator"] == split.generator
        assert split.generator.startswith("melora.tasks.")


def test_logged_model_and_its_linked_metrics(served: SimpleNamespace) -> None:
    """The run page's "Logged models" and the model's page: READY, of the run's experiment, the
    run as its source, with the run's final metrics linked (the last point of test/*, ood/* and
    best_step, val/* at the selected step), each with its dataset's name and digest."""
    client = MlflowClient(served.uri)
    run = rest(served, "runs/get", run_id=served.run_id)["run"]
    outputs = run["outputs"]["model_outputs"]
    assert [(o["model_id"], int(o["step"])) for o in outputs] == [(served.model_id, 24)]

    model = rest(served, f"logged-models/{served.model_id}")["model"]
    info, linked = model["info"], {m["key"]: m for m in model["data"]["metrics"]}
    assert info["model_id"] == served.model_id and info["status"] == "LOGGED_MODEL_READY"
    assert info["source_run_id"] == served.run_id
    assert info["experiment_id"] == run["info"]["experiment_id"]
    assert info["model_type"] == mlflow_model.MODEL_TYPE == "melora-adapter"
    assert info["name"] == client.get_logged_model(served.model_id).name == "melora-demo-seed1"
    model_tags = tags_of(info["tags"])
    assert {k: v for k, v in model_tags.items() if k.startswith("mlflow.source.")} == (
        served.expected_source
    )  # the model's "Logged from": the run's source
    assert tags_of(model["data"]["params"]) == tags_of(run["data"]["params"])
    assert len(model["data"]["params"]) == len(served.run.flat_params())

    latest = {m["key"]: m for m in run["data"]["metrics"]}
    assert sorted(linked) == sorted([*FINAL, "best_step", "val/acc", "val/nll"])
    for key in [*FINAL, "best_step"]:  # the run's final values, at its last step
        assert (linked[key]["value"], int(linked[key]["step"])) == (latest[key]["value"], 24), key
        assert linked[key]["timestamp"] == latest[key]["timestamp"], key
    assert linked["test/demo/acc_n0"]["value"] == FINAL["test/demo/acc_n0"]
    history = rest(served, "metrics/get-history", run_id=served.run_id, metric_key="val/nll")
    at = {int(m["step"]): m["value"] for m in history["metrics"]}
    assert at == {12: 1.0, 24: 1.2}  # linking added no point to the run's history
    for key in ("val/nll", "val/acc"):  # the selected step's, not the run's latest
        assert (linked[key]["value"], int(linked[key]["step"])) == (
            VALIDATIONS[BEST_STEP][key],
            BEST_STEP,
        ), key
        assert linked[key]["value"] != latest[key]["value"]
    digests = {
        d["dataset"]["name"]: d["dataset"]["digest"] for d in run["inputs"]["dataset_inputs"]
    }
    for key, dataset in (
        ("test/demo/acc_n0", "demo/test"),
        ("ood/demo_ood/nll_n3", "demo_ood/test"),
        ("val/nll", "demo/validation"),
    ):
        assert linked[key]["dataset_name"] == dataset, key
        assert linked[key]["dataset_digest"] == digests[dataset], key
    assert "dataset_name" not in linked["best_step"]
    assert {m["model_id"] for m in linked.values()} == {served.model_id}
    assert {m["run_id"] for m in linked.values()} == {served.run_id}
    # the same as MlflowClient reads from the store itself
    direct = client.get_logged_model(served.model_id)
    assert str(direct.status) == "READY" and direct.source_run_id == info["source_run_id"]
    assert {m.key: (m.value, m.step, m.dataset_name, m.dataset_digest) for m in direct.metrics} == {
        k: (m["value"], int(m["step"]), m.get("dataset_name"), m.get("dataset_digest"))
        for k, m in linked.items()
    }
    # the experiment's Models tab: a POST to logged-models/search
    listed = rest(
        served, "logged-models/search", {"experiment_ids": [run["info"]["experiment_id"]]}
    )["models"]
    assert [m["info"]["model_id"] for m in listed] == [served.model_id]
    # the model's Artifacts tab, served from the run's artifact store
    files = rest(served, f"logged-models/{served.model_id}/artifacts/directories")["files"]
    assert {"MLmodel", "adapter_pyfunc.py", "artifacts"} <= {f["path"] for f in files}


def test_registered_version_points_to_the_logged_model(served: SimpleNamespace) -> None:
    """The Models page and the version's page: the sweep's registered model, its version made
    from the run's logged model (source models:/<model id>, the run, the logged model's files),
    with the sweep's version tags; and the logged model lists the version ("Registered models")."""
    client = MlflowClient(served.uri)
    registered = rest(served, "registered-models/get", name=SWEEP)["registered_model"]
    assert registered["name"] == SWEEP
    assert [(v["version"], v["run_id"], v["source"]) for v in registered["latest_versions"]] == [
        ("1", served.run_id, f"models:/{served.model_id}")
    ]
    assert registered["description"] == client.get_registered_model(SWEEP).description

    version = rest(served, "model-versions/get", name=SWEEP, version=served.version)[
        "model_version"
    ]
    assert version["version"] == "1" and version["status"] == "READY"
    assert version["source"] == f"models:/{served.model_id}"
    assert version["run_id"] == served.run_id
    # MLflow 3.17 keeps no model id on a version (in REST or in the store): `source` is the link,
    # and the version's files are the logged model's
    assert version.get("model_id", served.model_id) == served.model_id
    download = rest(served, "model-versions/get-download-uri", name=SWEEP, version="1")
    model = rest(served, f"logged-models/{served.model_id}")["model"]
    assert download["artifact_uri"] == model["info"]["artifact_uri"]
    assert download["artifact_uri"].endswith(f"/models/{served.model_id}/artifacts")
    direct = client.get_model_version(SWEEP, "1")
    assert (direct.source, direct.run_id, direct.tags) == (
        version["source"],
        version["run_id"],
        tags_of(version["tags"]),
    )
    assert json.loads(tags_of(model["info"]["tags"])["mlflow.modelVersions"]) == [
        {"name": SWEEP, "version": "1"}
    ]
    with pytest.raises(urllib.error.HTTPError) as missing:  # the API says so, as the page does
        rest(served, "model-versions/get", name=SWEEP, version="2")
    assert missing.value.code == 404
