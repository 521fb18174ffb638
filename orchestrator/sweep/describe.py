"""The text `jobs/sweep.py --dry-run` prints (and every start prints first): the sweep, where it
writes, each trial with its values and the resources it asks for. `describe(plan)`."""

from __future__ import annotations

import json

from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.sweep.names import format_resources, format_value
from orchestrator.sweep.plan import SweepPlan, Trial
from orchestrator.tracking.conventions import ENS_MEMBER, ENSEMBLE


def describe(plan: SweepPlan) -> str:
    """The --dry-run text: the sweep, where it writes, each trial and the resources it asks for."""
    s = plan.sweep
    runs = plan.runs()
    lines = [
        f"sweep {plan.name}: {plan.num_trials} trials (search {s.search}, scheduler {s.scheduler}); "
        f"best trial by {s.metric} ({plan.mode})",
        f"  config: {plan.source or '(given)'}   config hash: {plan.config_hash()}",
        f"  MLflow: {tracking.redact_uri(plan.tracking_uri)}, experiment {plan.base.tracking.experiment!r}",
        f"  state: {plan.sweep_dir}",
    ]
    shapes = {_shape(plan, r) for r in runs}
    if len(shapes) == 1:
        lines.append(f"  each trial asks for: {shapes.pop()}")
    concurrency = s.max_concurrent_trials
    lines.append(
        f"  max concurrent trials: {concurrency}"
        + (
            " (whole trials, driver + workers, that the cluster's CPUs and GPUs hold when it starts)"
            if concurrency == "auto"
            else ""
        )
    )
    if s.scheduler == "asha":
        lines.append(f"  ASHA on {s.metric} over training steps: {plan.asha_args()}")
    if s.search == "optuna":
        lines.append(f"  Optuna (TPE, seed {s.search_seed}) draws {s.num_samples} points from:")
        lines += [f"    {k}: {json.dumps(v)}" for k, v in s.space.items()]
        lines.append(f"  base run: {plan.base.run_name} ({_shape(plan, plan.base)})")
        return "\n".join(lines)
    return "\n".join(lines + _trial_lines(plan))


def _trial_lines(plan: SweepPlan) -> list[str]:
    """One line per trial: number, run name, values, its resources when trials differ, its role."""
    width = max(len(t.name) for t in plan.trials)
    per_trial = len({_shape(plan, t.run) for t in plan.trials}) > 1
    lines = []
    for i, t in enumerate(plan.trials, 1):
        values = " ".join(f"{k}={format_value(v)}" for k, v in t.values.items())
        extra = f"  [{_shape(plan, t.run)}]" if per_trial else ""
        lines.append(f"  {i:3d}  {t.name:<{width}}  {values}{extra}{_role_note(t)}")
    return lines


def _role_note(t: Trial) -> str:
    if t.role == ENSEMBLE:
        return f"  (evaluated after the trained trials, from {', '.join(t.members)})"
    if t.role == ENS_MEMBER:
        return "  (trained as an ENS member only; not a table row)"
    return ""


def _shape(plan: SweepPlan, run: RunConfig) -> str:
    """'driver {CPU: 0.5} + 2 workers x {CPU: 0.25} = {CPU: 1}'."""
    s = run.scaling
    per = format_resources(s.resources_per_worker())
    return (
        f"driver {{CPU: {plan.sweep.driver_cpus:g}}} + {s.num_workers} workers x {per} "
        f"= {format_resources(plan.trial_resources(run))}"
    )
