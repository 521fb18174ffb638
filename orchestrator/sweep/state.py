"""What a sweep keeps between starts: `<storage>/<sweep>/sweep.json` (the MLflow parent run id,
the config hash, the start id) and the MLflow parent run itself: opening it once, logging the
plan on it, ending it FAILED when the driver stops.

The parent run is made once, like a training run's (tracking.create_run_once): a start id in
sweep.json first, then the run id, so a start killed in between adopts the run it made.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator import state_files, tracking
from orchestrator.redaction import redact
from orchestrator.sweep.plan import SweepPlan
from orchestrator.tracking.conventions import CONFIG_HASH_TAG, KIND_TAG, SWEEP_KIND, SWEEP_TAG

STATE_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"


def read_state(plan: SweepPlan) -> dict[str, Any] | None:
    """sweep.json, or None before the sweep's first start; a damaged one is a StateFileError
    naming the file and what to do."""
    path = plan.sweep_dir / STATE_FILE
    if not path.is_file():
        return None
    return state_files.read_json(
        path,
        f"the sweep's state is damaged. Its MLflow parent run is the run named {plan.name} with "
        f"tag kind=sweep; move the folder {plan.sweep_dir} away to start the sweep again, or "
        "start it under another --name",
    )


def write_state(plan: SweepPlan, parent_run_id: str | None, start_id: str | None = None) -> None:
    """sweep.json, whole or not at all; `parent_run_id` None: the start id alone, written just
    before the parent run is made (tracking.create_run_once)."""
    state = {
        "name": plan.name,
        "parent_run_id": parent_run_id,
        "start_id": start_id,
        "config_hash": plan.config_hash(),
        "tracking_uri": tracking.redact_uri(plan.tracking_uri),
        "source": plan.source,
    }
    state_files.write_json(plan.sweep_dir / STATE_FILE, state)


def open_parent(plan: SweepPlan, state: Mapping[str, Any], experiment_id: str) -> str:
    """The sweep's MLflow parent run: the recorded one resumed (RUNNING again), else made once
    (tracking.create_run_once: a start id in sweep.json first, then the run id)."""
    uri = plan.tracking_uri
    if state.get("parent_run_id"):
        return tracking.start_or_resume_run(uri, experiment_id, run_id=state["parent_run_id"])
    parent, start_id, _ = tracking.create_run_once(
        uri,
        experiment_id,
        plan.name,
        tags={SWEEP_TAG: plan.name, KIND_TAG: SWEEP_KIND, CONFIG_HASH_TAG: plan.config_hash()},
        parent_run_id=None,
        start_id=state.get("start_id"),
        record=lambda pending: write_state(plan, None, pending["start_id"]),
        state_file=plan.sweep_dir / STATE_FILE,
    )
    tracking.start_or_resume_run(uri, experiment_id, run_id=parent)  # an adopted one: RUNNING
    write_state(plan, parent, start_id)
    return parent


def log_plan(plan: SweepPlan, parent_run_id: str) -> None:
    """The parent run's params (the sweep section) and artifacts (base config, trial list)."""
    uri, s = plan.tracking_uri, plan.sweep
    tracking.log_params(
        uri,
        parent_run_id,
        {
            "sweep.search": s.search,
            "sweep.scheduler": s.scheduler,
            "sweep.metric": s.metric,
            "sweep.mode": plan.mode,
            "sweep.num_trials": plan.num_trials,
            "sweep.grid": json.dumps(redact(s.grid), sort_keys=True, default=str),
            "sweep.fixed": json.dumps(redact(s.fixed), sort_keys=True, default=str),
            "sweep.space": json.dumps(redact(s.space), sort_keys=True, default=str),
        },
    )
    tracking.log_text(uri, parent_run_id, plan.base.to_yaml(), "sweep/base.yaml")  # redacted
    section = yaml.safe_dump(redact(dataclasses.asdict(s)), sort_keys=False)
    tracking.log_text(uri, parent_run_id, section, "sweep/sweep.yaml")
    trials = [{"name": t.name, "values": t.values, "tags": t.tags} for t in plan.trials]
    tracking.log_text(
        uri, parent_run_id, json.dumps(redact(trials), indent=1, default=str), "sweep/trials.json"
    )


def fail_parent(plan: SweepPlan, parent: str, err: BaseException) -> None:
    """End the parent run FAILED (KILLED on Ctrl-C) with the reason and how to go on, without
    hiding `err` when MLflow is what failed."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    reason = (
        f"the sweep driver stopped: {type(err).__name__}: {err}; fix the cause, then continue "
        f"with jobs/sweep.py --name {plan.name} --resume (same --config and --set values)"
    )
    try:
        with tracking.short_calls():
            tracking.set_terminated(plan.tracking_uri, parent, status, reason)
    except Exception as mlflow_err:
        print(
            f"[sweep] warning: the MLflow parent run {parent} could not be marked {status} "
            f"({type(mlflow_err).__name__}: {tracking.redact_text(str(mlflow_err))})",
            file=sys.stderr,
            flush=True,
        )
