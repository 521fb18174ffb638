"""Opening and closing a tracked run, the one owner of it: the experiment (created once, of kind
`finetuning`), a run started once or resumed, its config logged, and its end (FINISHED, or FAILED
with the reason, without hiding the error that failed it).

    uri, experiment_id = open_experiment(cfg.tracking)       # resolved, reachable, ensured
    run_id = start_or_resume_run(uri, experiment_id, run_name=..., tags={...})
    log_run_config(uri, run_id, cfg.flat_params(), cfg.to_yaml())
    with failing_run(uri, run_id, label=f"run {cfg.run_name}"):   # FAILED + RunFailedError
        ...
    set_terminated(uri, run_id, "FINISHED")

`tracked_run` is all of it for a run made and ended in one block (an evaluation of finished
runs); `create_run_once` makes a run that a start killed at any moment cannot leave orphaned or
duplicated (a training run's marker, a sweep's state file record its id).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

from orchestrator.config import TrackingConfig
from orchestrator.errors import RunConflictError, RunFailedError, TrackingError
from orchestrator.redaction import is_secret_key, redact_text, redact_uri
from orchestrator.tracking import retries, store
from orchestrator.tracking.conventions import (
    EXPERIMENT_KIND_TAG,
    FAILURE_REASON_TAG,
    FINETUNING,
    PARENT_RUN_TAG,
    RESOLVED_CONFIG,
    START_TAG,
)
from orchestrator.tracking.log import log_params, log_text
from orchestrator.tracking.query import read_run, search_runs
from orchestrator.tracking.source import source_tags
from orchestrator.tracking.store import MAX_TAG_LENGTH

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment `name`, created when missing, of kind `finetuning`.

    With a sqlite URI and no `artifact_location`, artifacts go to `<database folder>/mlruns`
    (absolute), next to the database, wherever the process runs. The experiment carries the tag
    `mlflow.experimentKind: finetuning`, so that MLflow's UI opens it on its training runs (not
    on the GenAI overview): a new one from its creation, an existing one without a kind when this
    project adds a run to it. A kind someone set is kept.
    """
    client = store.client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = store.sqlite_path(uri)
        if artifact_location is None and db is not None and db.name not in ("", ":memory:"):
            artifact_location = (db.resolve().parent / "mlruns").as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: FINETUNING}
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} at {redact_uri(uri)} is deleted: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another tracking.experiment"
        )
    if not experiment.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, FINETUNING)
    return experiment.experiment_id


def start_or_resume_run(
    uri: str,
    experiment_id: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create the run once (with `tags`, under `parent_run_id` if given), or resume `run_id`.

    A new run carries MLflow's source tags (`source_tags()`: this process's script, LOCAL or JOB,
    the git commit) unless `tags` gives them: a run made in a Ray worker on behalf of a job passes
    the job's own, read in its driver. Resuming never creates a second run and changes no tag but
    one: it checks that `run_id` exists in `experiment_id`, sets its status back to RUNNING and
    removes a `failure_reason` tag left by an earlier failure. Store the returned id with the Ray
    Train run and pass it on every restart.
    """
    client = store.client(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise TrackingError(
                f"MLflow run {run_id} not found at {redact_uri(uri)}: it cannot be resumed; start without a run id"
            ) from None
        if run.info.experiment_id != experiment_id:
            raise TrackingError(
                f"MLflow run {run_id} belongs to experiment {run.info.experiment_id}, not {experiment_id}"
            )
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if FAILURE_REASON_TAG in run.data.tags:  # a FAILED run retried: the old reason is history
            client.delete_tag(run_id, FAILURE_REASON_TAG)
        return run_id
    tags = dict(tags or {})
    if MLFLOW_SOURCE_NAME not in tags:
        tags = {**source_tags(), **tags}
    clean = {
        k: store.truncate(redact_text(str(v)), MAX_TAG_LENGTH)
        for k, v in tags.items()
        if not is_secret_key(k)
    }
    if parent_run_id:
        clean[PARENT_RUN_TAG] = parent_run_id
    return client.create_run(experiment_id, run_name=run_name, tags=clean).info.run_id


def set_terminated(
    uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None
) -> None:
    """End the run as FINISHED, FAILED or KILLED; `reason` goes to the tag `failure_reason`."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(
            f"status={status!r} is not a final MLflow status: choose one of {list(TERMINAL_STATUSES)}"
        )
    client = store.client(uri)
    if reason is not None:
        client.set_tag(
            run_id, FAILURE_REASON_TAG, store.truncate(redact_text(reason), MAX_TAG_LENGTH)
        )
    client.set_terminated(run_id, status=status)


def open_experiment(cfg: TrackingConfig) -> tuple[str, str]:
    """(tracking URI, experiment id) of a run's `tracking` section: the URI resolved
    (`resolve_tracking_uri`) and checked (`check_reachable`: fails fast, naming it), and the
    experiment `cfg.experiment` created when missing (`ensure_experiment`)."""
    uri = store.resolve_tracking_uri(cfg)
    store.check_reachable(uri)
    return uri, ensure_experiment(uri, cfg.experiment)


def create_run_once(
    uri: str,
    experiment_id: str,
    run_name: str,
    *,
    tags: Mapping[str, Any],
    parent_run_id: str | None,
    start_id: str | None,
    record: Callable[[dict[str, str]], None],
    state_file: Path,
) -> tuple[str, str, bool]:
    """Create an MLflow run that a kill at any moment cannot leave orphaned or duplicated:
    (run id, start id, adopted).

    The id of a new run can only be recorded after MLflow made it. So a fresh `start_id` is
    recorded first (`record({"start_id": ...})`, a whole write of `state_file`), and the run is
    created with it as the tag `melora.start_id`; the caller then records the run id beside it.
    A start killed in between leaves the start id alone in the state file: given that
    `start_id`, the run that carries it (same experiment, name and parent) is adopted, not
    created again. Several such runs (two starts at once, without the lock) are refused.
    """
    if start_id:
        found = [
            r
            for r in search_runs(uri, [experiment_id], f"tags.`{START_TAG}` = '{start_id}'")
            if r.name == run_name and r.tags.get(PARENT_RUN_TAG) == parent_run_id
        ]
        if len(found) > 1:
            ids = ", ".join(r.run_id for r in found)
            raise RunConflictError(
                f"{len(found)} MLflow runs named {run_name} ({ids}) carry the start id {start_id} "
                f"recorded in {state_file}: two starts ran at once. Keep one: delete the others "
                "(mlflow runs delete --run-id ID), then start again"
            )
        if found:
            print(
                f"[tracking] {run_name}: adopting MLflow run {found[0].run_id}, which an earlier "
                f"start created but did not record in {state_file}",
                flush=True,
            )
            return found[0].run_id, start_id, True
    else:
        start_id = uuid.uuid4().hex
        record({"start_id": start_id})
    run_id = start_or_resume_run(
        uri,
        experiment_id,
        run_name=run_name,
        tags={**tags, START_TAG: start_id},
        parent_run_id=parent_run_id,
    )
    return run_id, start_id, False


def log_run_config(uri: str, run_id: str, params: Mapping[str, Any], config_yaml: str) -> None:
    """A run's config: its flat `params` (`log_params`) and the resolved YAML as the artifact
    `config/resolved.yaml` (what post-hoc evaluations and `log_run_model` read back)."""
    log_params(uri, run_id, params)
    log_text(uri, run_id, config_yaml, RESOLVED_CONFIG)


def try_set_terminated(
    uri: str,
    run_id: str,
    status: str,
    reason: str | None,
    *,
    wait_s: float,
    if_running: bool = False,
) -> str | None:
    """`set_terminated`, tried for up to `wait_s` seconds with bounded calls (`call_until`; 0: one
    short try); None when MLflow took it, else what went wrong ('TypeName: message', redacted):
    a run that MLflow cannot mark must not hide the error that ended it. `if_running`: leave a
    run that has ended already as it is (a sweep's driver marks a trial that ASHA stopped KILLED
    while the trial's process is still dying of it: that process must not overwrite KILLED)."""

    def mark() -> None:
        if not if_running or read_run(uri, run_id)[0] == "RUNNING":
            set_terminated(uri, run_id, status, reason)

    try:
        retries.call_until(mark, wait_s)
    except Exception as err:
        return f"{type(err).__name__}: {redact_text(str(err))}"
    return None


@contextmanager
def failing_run(
    uri: str, run_id: str, *, label: str, wait_s: float | None = None
) -> Iterator[None]:
    """When the block raises, mark the run FAILED with the reason ('TypeName: message'; a run
    that has ended already, e.g. KILLED by a sweep's scheduler, stays as it is), trying
    for `wait_s` seconds (default `MARK_FAILED_WAIT_S`), and raise `RunFailedError('<label>
    failed (MLflow run <id>): <reason>')` from the error; when MLflow could not be told, the
    message says so and that the run may still say RUNNING."""
    try:
        yield
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        wait = retries.MARK_FAILED_WAIT_S if wait_s is None else wait_s
        problem = try_set_terminated(uri, run_id, "FAILED", reason, wait_s=wait, if_running=True)
        if problem is not None:
            reason += (
                "; and the MLflow run could not be marked FAILED, it may still say RUNNING ("
                f"{problem})"
            )
        raise RunFailedError(f"{label} failed (MLflow run {run_id}): {reason}") from err


@contextmanager
def tracked_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    config_yaml: str,
    parent_run_id: str | None = None,
) -> Iterator[tuple[str, str]]:
    """A run made and ended in one block: `open_experiment(cfg)`, a new run (`tags`, under
    `parent_run_id`), its config logged (`log_run_config`); yields (uri, run id). The run ends
    FINISHED, or FAILED with the reason when the block (or logging its config) raises, re-raised
    as `RunFailedError('<run_name> failed ...')` (`failing_run`)."""
    uri, experiment_id = open_experiment(cfg)
    run_id = start_or_resume_run(
        uri, experiment_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id
    )
    with failing_run(uri, run_id, label=run_name):
        log_run_config(uri, run_id, params, config_yaml)
        yield uri, run_id
    set_terminated(uri, run_id, "FINISHED")
