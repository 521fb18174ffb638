"""Runs read back: one run's status, tags and metrics, a metric's history, an artifact file, a
training run's resolved config and adapter, and the runs of experiments found by MLflow's filter
strings (what the sweep's results, the reports and the post-hoc evaluations read)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import yaml

from melora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from orchestrator.config import RunConfig
from orchestrator.tracking import store
from orchestrator.tracking.conventions import PARENT_RUN_TAG, RESOLVED_CONFIG


def read_run(uri: str, run_id: str) -> tuple[str, dict[str, str], dict[str, float]]:
    """(status, tags, latest metric values) of a run, as the tracking server has them."""
    run = store.client(uri).get_run(run_id)
    return run.info.status, dict(run.data.tags), dict(run.data.metrics)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric of a run, in logging order."""
    return [(m.step, m.value) for m in store.client(uri).get_metric_history(run_id, key)]


@dataclass
class RunRecord:
    """A run as read back: what a sweep's results table and the reports need."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]


def child_runs(uri: str, parent_run_id: str) -> list[RunRecord]:
    """Every run whose parent is `parent_run_id` (a sweep's trials), oldest first."""
    experiment_id = store.client(uri).get_run(parent_run_id).info.experiment_id
    return search_runs(uri, [experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")


def experiments(uri: str) -> dict[str, str]:
    """{name: id} of every active (not deleted) experiment at `uri`."""
    client, out, token = store.client(uri), {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            return out


def search_runs(
    uri: str, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None
) -> list[RunRecord]:
    """Every run of `experiment_ids` matching MLflow's `filter_string` (all pages), oldest first by default.

    For example `search_runs(uri, [eid], "tags.kind = 'sweep' and tags.sweep = 'demo'")`.
    """
    client, records, token = store.client(uri), [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by or ["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        records += [
            RunRecord(
                run_id=r.info.run_id,
                name=r.info.run_name,
                status=r.info.status,
                tags=dict(r.data.tags),
                metrics=dict(r.data.metrics),
                params=dict(r.data.params),
            )
            for r in page
        ]
        token = page.token
        if not token:
            return records


def download_artifact(uri: str, run_id: str, path: str, dst_dir: str | os.PathLike) -> Path | None:
    """Download the artifact file `path` (e.g. 'reliability/test_demo_n0.png') of a run into
    `dst_dir`; returns the local file, or None when the run has no such artifact."""
    client = store.client(uri)
    folder = posixpath.dirname(path) or None
    if path not in {f.path for f in client.list_artifacts(run_id, folder) if not f.is_dir}:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst_dir)))


def run_config(uri: str, run_id: str, dst: str | os.PathLike, error: type[Exception]) -> RunConfig:
    """The run's resolved config (its `config/resolved.yaml` artifact, downloaded into `dst`);
    `error` (the caller's type) when the run has none."""
    path = download_artifact(uri, run_id, RESOLVED_CONFIG, dst)
    if path is None:
        raise error(
            f"MLflow run {run_id} has no {RESOLVED_CONFIG} artifact: was it made by fit_run?"
        )
    return RunConfig.from_dict(yaml.safe_load(path.read_text()))


def download_adapter(
    uri: str, run_id: str, folder: str | os.PathLike, error: type[Exception]
) -> Path:
    """The run's `adapter/` artifact (safetensors weights + config) as the local `folder`;
    `error` (the caller's type) when a file is missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if download_artifact(uri, run_id, f"adapter/{name}", folder) is None:
            raise error(
                f"MLflow run {run_id} has no adapter/{name} artifact: is it a training run "
                "whose workers finished?"
            )
    return folder
