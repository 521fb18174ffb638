"""A training run's record beside its Ray Train folder, and the checks that keep one MLflow run
per run name.

The marker `melora_run.json` (in <storage_path>/<run name>) records the run's MLflow run id, so
that a restarted job resumes the same MLflow run (`recorded_run_id`, `open_marked_run`; a kill
between creating the MLflow run and recording its id is harmless: `tracking.create_run_once`);
`check_rerun` refuses to resume a run with other params; `run_lock` (`melora_run.lock`) refuses
a second start of a run that trains. With remote storage (s3://) there is no marker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator import state_files, tracking
from orchestrator.config import RunConfig
from orchestrator.errors import RunConflictError, StateFileError
from orchestrator.redaction import is_secret_key

RUN_MARKER = "melora_run.json"
RUN_LOCK = "melora_run.lock"  # beside the marker: held by jobs/train.py while the run trains
_RUN_ID = re.compile(r"[\w-]{1,64}")  # what a recorded MLflow run id or start id may be


def storage_path(run: RunConfig) -> str:
    """Ray Train's storage: tracking.storage_path, else <cwd>/ray_results (absolute; URIs kept)."""
    path = run.tracking.storage_path or "ray_results"
    return path if "://" in path else str(Path(path).expanduser().resolve())


def marker_path(run: RunConfig) -> Path | None:
    """Where the MLflow run id is stored beside the Ray Train run (None for remote storage)."""
    root = storage_path(run)
    return None if "://" in root else Path(root) / run.run_name / RUN_MARKER


def recorded_run_id(run: RunConfig) -> str | None:
    """The MLflow run id stored beside the run's Ray Train folder by an earlier start, or None."""
    marker = marker_path(run)
    if marker is None or not marker.is_file():
        return None
    return read_marker(marker).get("mlflow_run_id")


def read_marker(marker: Path) -> dict[str, str]:
    """The marker's {"mlflow_run_id", "start_id", "tracking_uri"} (the first two may be missing:
    a start that died, or a marker of an older version); StateFileError, naming the file and
    what to do, when it cannot be read."""
    fix = (
        "delete it (the next start makes a new MLflow run for this run name; the run it named, "
        "if any, stays in MLflow), or restore it as "
        '{"mlflow_run_id": "<the run id, from the MLflow UI>"}'
    )
    data = state_files.read_json(marker, fix)
    for key in ("mlflow_run_id", "start_id"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and _RUN_ID.fullmatch(value)):
            raise StateFileError(
                f"state file {marker} cannot be read ({key}={str(value)[:80]!r} is not an id): {fix}"
            )
    return data


def open_marked_run(
    run: RunConfig,
    marker: Path,
    uri: str,
    experiment_id: str,
    *,
    tags: Mapping[str, Any],
    parent_run_id: str | None,
) -> str:
    """The MLflow run id of `run`, whose marker is `marker`: the recorded run, checked and resumed,
    else one made once (`tracking.create_run_once`) and recorded. A recorded run made with other params is
    refused, and a FINISHED run is never resumed (RunConflictError; its status stays FINISHED)."""
    recorded = read_marker(marker) if marker.is_file() else {}
    run_id, adopted = recorded.get("mlflow_run_id"), True
    if run_id is None:

        def record(state: dict[str, str]) -> None:  # "mlflow_run_id": null until it is known
            state_files.write_json(
                marker,
                {"mlflow_run_id": None, **state, "tracking_uri": tracking.redact_uri(uri)},
            )

        run_id, start_id, adopted = tracking.create_run_once(
            uri, experiment_id, run.run_name, tags=tags, parent_run_id=parent_run_id,
            start_id=recorded.get("start_id"), record=record, state_file=marker,
        )  # fmt: skip
        record({"mlflow_run_id": run_id, "start_id": start_id})
    if adopted:  # an existing run: checked before its status changes
        existing = check_rerun(run, uri, experiment_id, run_id)
        if existing is not None and existing.status == "FINISHED":
            raise RunConflictError(
                f"run {run.run_name} (MLflow run {run_id}) is FINISHED: it is not trained "
                "again and its status stays FINISHED. To train it again as a new MLflow run, "
                f"delete its Ray Train folder {marker.parent}, or give it another name "
                "(--set name=...)"
            )
        tracking.start_or_resume_run(uri, experiment_id, run_id=run_id)
    return run_id


def check_rerun(
    run: RunConfig, uri: str, experiment_id: str, run_id: str
) -> tracking.RunRecord | None:
    """The recorded MLflow run `run_id` of `run` as MLflow has it (None when it is not in the
    experiment: `start_or_resume_run` then says so); RunConflictError, before anything changes,
    when its params differ from `run`'s (MLflow refuses a changed param, and a run would mix two
    configs), naming the changed params and what to do."""
    found = tracking.search_runs(uri, [experiment_id], f"attributes.run_id = '{run_id}'")
    if not found:
        return None
    record = found[0]
    changed = changed_params(record.params, run.flat_params())
    if not changed:
        return record
    shown = "; ".join(
        f"{k}: {_short(old)} (the run) -> {_short(new)} (now)" for k, (old, new) in changed.items()
    )
    folder = marker_path(run).parent
    if record.status == "FINISHED":
        todo = (
            "A finished run never changes: give this config another name (--set name=...), or "
            f"delete the Ray Train folder {folder} to train it as a new MLflow run of the same "
            "name (the finished one stays in MLflow)"
        )
    else:
        todo = (
            "Resuming it would mix two configs in one run: run it with the config it was "
            "started with to continue it, give this config another name (--set name=...), or "
            f"delete the Ray Train folder {folder} to start it again as a new MLflow run"
        )
    raise RunConflictError(
        f"run {run.run_name} (MLflow run {run_id}, {record.status}) was made with another config: "
        f"{shown}. {todo}"
    )


def changed_params(
    logged: Mapping[str, str], params: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """{key: (logged value, value now)} of the params that `tracking.log_params(params)` would
    change: values as it writes them (URI credentials redacted, cut to MLflow's length, secret
    keys left out); keys not logged yet are not changes."""
    now = {k: tracking.param_text(v) for k, v in params.items() if not is_secret_key(k)}
    return {k: (logged[k], v) for k, v in now.items() if k in logged and logged[k] != v}


@contextmanager
def run_lock(run: RunConfig) -> Iterator[None]:
    """Hold the run's lock (`melora_run.lock` beside its marker) for the block: a second start of
    the same run while this one trains (another jobs/train.py) is refused at once
    (LockedError). No lock with remote storage (s3://)."""
    marker = marker_path(run)
    if marker is None:
        yield
        return
    hint = (
        "Wait for it to end or stop it: two processes would train the same run into one MLflow "
        "run. To train another run beside it, give it another name (--set name=...)"
    )
    with state_files.exclusive(marker.with_name(RUN_LOCK), f"run {run.run_name}", hint):
        yield


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
