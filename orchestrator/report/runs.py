"""Reading the runs to report from MLflow (through orchestrator.tracking): a sweep's trials, or an
experiment's standalone runs, and which of them were trained only as ENS members.

`find_runs` picks the sweep (the parent run tagged `kind=sweep`) of an experiment, or a sweep of
that name anywhere in the store, or, for an experiment without a sweep, its standalone runs.
`ensemble_helpers` names the LoRA runs that are in the store only as an ensemble's members.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field

from orchestrator import tracking
from orchestrator.errors import ReportError
from orchestrator.tracking.conventions import (
    ENS_MEMBER,
    KIND_TAG,
    MEMBERS_TAG,
    ROLE_TAG,
    SWEEP_KIND,
    SWEEP_TAG,
)


@dataclass
class FoundRuns:
    """The runs of one sweep (its parent run and trials) or one experiment's standalone runs."""

    experiment: str
    sweep: str | None
    parent_run_id: str | None
    records: list[tracking.RunRecord]
    notes: list[str] = field(default_factory=list)


def find_runs(uri: str, experiment: str, sweep: str | None) -> FoundRuns:
    """The trials of the sweep `experiment` names (build.py's docstring), or its standalone runs."""
    exps = tracking.experiments(uri)
    where = tracking.redact_uri(uri)
    if experiment in exps:
        found = _sweeps_in(uri, exps[experiment], experiment, sweep, where)
        if not found:
            return _standalone(uri, exps[experiment], experiment, where)
    elif sweep is not None or "'" in experiment:
        raise ReportError(
            f"no MLflow experiment {experiment!r} at {where}; experiments there: {sorted(exps)}"
        )
    else:  # a sweep of this name in any experiment (a sweep started with --name)
        query = f"tags.{KIND_TAG} = '{SWEEP_KIND}' and tags.{SWEEP_TAG} = '{experiment}'"
        found = [(n, p) for n, eid in exps.items() for p in tracking.search_runs(uri, [eid], query)]
        if not found:
            raise ReportError(
                f"no MLflow experiment or sweep {experiment!r} at {where}; experiments there: {sorted(exps)}"
            )
    notes: list[str] = []
    exp_name, parent = found[-1]
    sweep_name = parent.tags.get(SWEEP_TAG)
    if len(found) > 1:
        notes.append(
            f"{len(found)} parent runs of sweep {sweep_name!r}: the latest ({parent.run_id}) is reported"
        )
    children = tracking.child_runs(uri, parent.run_id)
    if not children:
        raise ReportError(
            f"sweep {sweep_name!r} (MLflow run {parent.run_id}) at {where} has no trial runs"
        )
    if parent.status == "RUNNING":
        notes.append("the sweep is still running: the tables hold the trials finished so far")
    return FoundRuns(exp_name, sweep_name, parent.run_id, children, notes)


def _sweeps_in(
    uri: str, experiment_id: str, experiment: str, sweep: str | None, where: str
) -> list[tuple[str, tracking.RunRecord]]:
    """[(experiment, parent run)] of the sweep to report in one experiment: `sweep`, or the one
    named like the experiment when it holds several; [] when it holds none."""
    query = f"tags.{KIND_TAG} = '{SWEEP_KIND}'"
    found = [(experiment, p) for p in tracking.search_runs(uri, [experiment_id], query)]
    names = sorted({p.tags.get(SWEEP_TAG, "?") for _, p in found})
    if sweep is not None:
        found = [(e, p) for e, p in found if p.tags.get(SWEEP_TAG) == sweep]
        if not found:
            raise ReportError(
                f"experiment {experiment!r} at {where} has no sweep {sweep!r}; its sweeps: {names}"
            )
    elif len(names) > 1:
        found = [(e, p) for e, p in found if p.tags.get(SWEEP_TAG) == experiment]
        if not found:
            raise ReportError(
                f"experiment {experiment!r} at {where} holds several sweeps {names}: choose one with --sweep"
            )
    return found


def _standalone(uri: str, experiment_id: str, experiment: str, where: str) -> FoundRuns:
    """An experiment without a sweep: its runs, read as standalone `jobs/train.py` runs."""
    runs = [
        r for r in tracking.search_runs(uri, [experiment_id]) if r.tags.get(KIND_TAG) != SWEEP_KIND
    ]
    if not runs:
        raise ReportError(f"experiment {experiment!r} at {where} has no runs")
    note = (
        f"experiment {experiment!r} has no sweep: its {len(runs)} runs are read as standalone runs"
    )
    return FoundRuns(experiment, None, None, runs, [note])


def ensemble_helpers(uri: str, parent: str | None, records: list[tracking.RunRecord]) -> set[str]:
    """Ids of the LoRA runs trained only as ENS members (LoRA seeds 4-9 for ENS seeds 2 and 3):
    the sweep's member trials (tag sweep.role=ens_member), or members that `fit_ensemble` trained
    itself, which are not trials the sweep planned (its sweep/trials.json)."""
    tagged = {r.run_id for r in records if r.tags.get(ROLE_TAG) == ENS_MEMBER}
    members = {m for r in records for m in r.tags.get(MEMBERS_TAG, "").split(",") if m}
    if not members or parent is None:
        return tagged
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(uri, parent, "sweep/trials.json", tmp)
        planned = {t.get("name") for t in json.loads(path.read_text())} if path else set()
    if not planned:  # optuna and standalone runs plan nothing ahead: keep every run
        return tagged
    return tagged | {r.run_id for r in records if r.run_id in members and r.name not in planned}
