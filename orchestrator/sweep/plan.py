"""A sweep's plan: every trial's config built and validated before anything starts.

    base, section = load_experiment("jobs/configs/demo.yaml", overrides)
    plan = plan_sweep(base, section, name="demo")   # every trial built and validated; nothing starts
    print(describe(plan))                            # describe.py: what `--dry-run` prints

The grid's axes (grid.py) are crossed in order, each point crossed with the random draws of
search 'random'; Optuna's trials are drawn while the sweep runs (the plan holds none). ENS trials
(adapter.method 'ens') are not trained: each is evaluated once the trained trials are done, from
the LoRA runs of its member seeds (3(s-1)+1 .. 3s for ENS seed s); a planned trial with a
member's config serves as it is, and a missing member becomes a trial of its own
('<row>-member-seed<k>', tag sweep.role=ens_member, kept out of the tables' rows). Run names are
'<sweep>-<words of the trial's values>' (names.py), stable, so a resumed sweep finds each trial's
runs again. An error names the sweep field, or the trial and its values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melora.baselines.ensemble import ensemble_seeds
from melora.errors import ConfigError
from orchestrator import tracking
from orchestrator.config import SECTIONS, RunConfig, parse_overrides, short_repr
from orchestrator.errors import SweepError
from orchestrator.sweep.grid import Choice, draw_space, grid_axes, refuse_too_many
from orchestrator.sweep.names import (
    SWEEP_NAME,
    file_stem,
    format_resources,
    short_value,
    trial_run_name,
    value_word,
)
from orchestrator.sweep.schema import SweepConfig, flatten
from orchestrator.tracking.conventions import ENS_MEMBER, ENSEMBLE, ROLE_TAG, TRAINED

RUNS_DIR = "runs"


@dataclass
class Trial:
    """One run of the sweep: its run name, what the sweep set, and the whole validated config."""

    name: str
    values: dict[str, Any]
    tags: dict[str, str]
    row: str  # the results table's row: the name without the sweep and the seed
    run: RunConfig
    role: str = TRAINED  # TRAINED | ENS_MEMBER | ENSEMBLE (module docstring)
    members: tuple[str, ...] = ()  # ENSEMBLE: its member trials' names, in seed order

    @property
    def tuned(self) -> bool:
        """Whether Ray Tune runs it (an ENS trial is evaluated after Tune, from its members' runs)."""
        return self.role != ENSEMBLE


@dataclass
class SweepPlan:
    """A validated sweep: every trial's config built (Optuna's are drawn while it runs)."""

    name: str
    sweep: SweepConfig
    base: RunConfig  # sweep.fixed applied; MLflow URI and trial storage resolved
    trials: list[Trial]
    tracking_uri: str
    storage: str  # the folder that holds <name>/
    source: str | None = None

    @property
    def sweep_dir(self) -> Path:
        """<storage>/<name>: Tune's experiment, sweep.json, runs/."""
        return Path(self.storage) / self.name

    @property
    def mode(self) -> str:
        return self.sweep.resolved_mode

    @property
    def num_trials(self) -> int:
        return self.sweep.num_samples if self.sweep.search == "optuna" else len(self.trials)

    def runs(self) -> list[RunConfig]:
        """Every trial's config (Optuna: the base config, standing in for its draws)."""
        return [t.run for t in self.trials] or [self.base]

    def trial_resources(self, run: RunConfig) -> dict[str, float]:
        """What one trial holds while it runs: its driver plus its Ray Train workers."""
        total = {"CPU": float(self.sweep.driver_cpus)}
        for key, value in run.scaling.resources_per_worker().items():
            total[key] = total.get(key, 0.0) + value * run.scaling.num_workers
        return total

    def max_concurrent(self, cluster: Mapping[str, float]) -> int:
        """How many trials may run at once: sweep.max_concurrent_trials, or as many whole trials as `cluster` holds."""
        if self.sweep.max_concurrent_trials != "auto":
            return int(self.sweep.max_concurrent_trials)
        need: dict[str, float] = {}
        for run in self.runs():
            for key, value in self.trial_resources(run).items():
                need[key] = max(need.get(key, 0.0), value)
        fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
        k = min(fits) if fits else 1
        if k < 1:
            have = {key: cluster.get(key, 0.0) for key in need}
            raise SweepError(
                f"one trial needs {format_resources(need)} (driver + workers) but the cluster has {format_resources(have)}: "
                "lower scaling.num_workers / cpus_per_worker or sweep.driver_cpus, add nodes, or set "
                "sweep.max_concurrent_trials to a number if an autoscaler adds the nodes later"
            )
        return max(1, min(k, self.num_trials))

    def asha_args(self) -> dict[str, Any]:
        """ASHAScheduler's arguments: rungs in training steps, up to the longest trial."""
        return {
            "time_attr": "step",
            "max_t": max(r.optim.max_steps for r in self.runs()),
            "grace_period": int(self.sweep.asha.get("grace_period", 100)),
            "reduction_factor": int(self.sweep.asha.get("reduction_factor", 2)),
        }

    def config_hash(self) -> str:
        """A hash of what the trials are (not of how many run at once): --resume refuses a changed sweep."""
        s = self.sweep
        what = {
            "base": self.base.to_dict(),
            "trials": [[t.name, t.run.to_dict()] for t in self.trials],
            "search": [s.search, s.space, s.num_samples, s.search_seed],
            "scheduler": [s.scheduler, s.asha, s.metric, self.mode],
        }
        text = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_sweep(
    base: RunConfig,
    section: Mapping[str, Any],
    name: str | None = None,
    source: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> SweepPlan:
    """Validate the section and build every trial's config; raises ConfigError naming the field or trial.

    `name` (the --name flag) wins over `sweep.name`, which wins over the file name in `source`.
    `overrides` are the `--set` arguments already applied to `base`: one that the sweep's own
    fixed, grid or space values would silently replace is refused, naming both.
    Nothing is started or written.
    """
    cfg = SweepConfig.from_dict(section)
    name = _sweep_name(cfg, name, source)
    storage = base.tracking.resolved_storage_path()
    if "://" in storage:
        raise ConfigError(
            f"tracking.storage_path={base.tracking.storage_path!r}: a sweep keeps its state (Tune's experiment, "
            "MLflow run ids) in a folder; on a cluster mount shared storage (EFS, NFS) at one path on every node and give that path"
        )
    uri = tracking.resolve_tracking_uri(base.tracking)
    try:
        base = base.with_overrides(
            {
                **cfg.fixed,
                "tracking.tracking_uri": uri,
                "tracking.storage_path": str(Path(storage) / name / RUNS_DIR),
            }
        )
    except ConfigError as err:
        raise ConfigError(f"sweep.fixed: {err}") from None
    trials = _expand(name, base, cfg)
    if len(trials) > cfg.max_trials:  # ENS members added to the grid's trials
        refuse_too_many(len(trials), [len(trials)], cfg.max_trials, more=False)
    _check_trials(cfg, trials or [Trial(name, {}, {}, "", base)])
    _check_overrides(cfg, trials, overrides)
    if cfg.search == "optuna":
        _check_space_corners(name, base, cfg.space)
    plan = SweepPlan(name, cfg, base, trials, uri, storage, source)
    if cfg.scheduler == "asha":
        args = plan.asha_args()
        if args["grace_period"] > args["max_t"]:
            raise ConfigError(
                f"sweep.asha.grace_period={args['grace_period']} is more than the longest trial's "
                f"optim.max_steps={args['max_t']}: ASHA could never stop a trial. Set "
                "sweep.asha.grace_period to at most that (a few validations in), or train longer"
            )
    return plan


def _sweep_name(cfg: SweepConfig, flag: str | None, source: str | None) -> str:
    """--name, else sweep.name, else the file name; ConfigError naming the one that is not allowed."""
    name = flag if flag is not None else cfg.name or (file_stem(source) if source else None)
    if not name or not SWEEP_NAME.fullmatch(name):
        given = "--name" if flag is not None else "sweep.name" if cfg.name else "the file name"
        raise ConfigError(
            f"sweep name {short_repr(name)} ({given}) is not allowed: use 1-60 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (--name or sweep.name)"
        )
    return name


# ----- expansion --------------------------------------------------------------------------------
def _expand(name: str, base: RunConfig, cfg: SweepConfig) -> list[Trial]:
    if cfg.search == "optuna":
        return []
    axes = grid_axes(cfg.grid, cfg.max_trials)
    sizes = [len(c) for _, c in axes] + ([cfg.num_samples] if cfg.search == "random" else [])
    if math.prod(sizes) > cfg.max_trials:  # counted before anything is drawn or crossed
        refuse_too_many(math.prod(sizes), sizes, cfg.max_trials, more=False)
    combos: list[tuple[Choice, ...]] = list(itertools.product(*(c for _, c in axes)))
    draws: list[dict[str, Any] | None] = [None]
    if cfg.search == "random":
        draws = draw_space(cfg.space, cfg.num_samples, cfg.search_seed)
        for key in cfg.space:
            for axis, choices in axes:
                if any(key in c.values for c in choices):
                    raise ConfigError(
                        f"sweep.space.{key} is also set by sweep.grid.{axis}: set each key in one place"
                    )
    trials, seen = [], {}
    for combo in combos:
        for i, draw in enumerate(draws):
            trials.append(_trial(name, base, combo, draw, index=i, seen=seen))
    return _plan_ensembles(name, trials)


def _trial(
    name: str,
    base: RunConfig,
    combo: tuple[Choice, ...],
    draw: dict[str, Any] | None,
    *,
    index: int,
    seen: dict[str, dict[str, Any]],
) -> Trial:
    """The trial of one grid point (`combo`), with the random draw number `index` when given;
    `seen` (run name -> values, of the trials before) gets this one's."""
    label = [w for c in combo for w in c.label]
    values = {k: v for c in combo for k, v in c.values.items()}
    tags = {k: v for c in combo for k, v in c.tags.items()}
    seed_words = {c.seed_part for c in combo if c.seed_part}
    row_words = [w for w in label if w not in seed_words]
    if draw is not None:
        words = [f"s{index + 1}"] + [value_word(k, v) for k, v in draw.items()]
        label += words
        row_words += words
        values.update(draw)
    default = (base.adapter.method, base.task.name, f"seed{base.seed}")  # no grid
    run_name = trial_run_name(name, tuple(label) or default)
    if run_name in seen:
        raise ConfigError(
            f"sweep trials {seen[run_name]} and {values} get the same run name {run_name!r}: "
            "two grid values print alike; make them distinct"
        )
    seen[run_name] = values
    try:
        run = base.with_overrides(
            {**values, "name": run_name, "tracking.tags": {**base.tracking.tags, **tags}}
        )
    except ConfigError as err:
        shown = ", ".join(f"{k}={short_value(v)}" for k, v in values.items())
        raise ConfigError(f"sweep trial {run_name} ({shown}): {err}") from None
    return Trial(run_name, values, tags, "-".join(row_words), run)


def _plan_ensembles(name: str, trials: list[Trial]) -> list[Trial]:
    """Give each ENS trial (adapter.method 'ens', seed s) its LoRA members, seeds
    ensemble_seeds(s): a planned trial with exactly the member's config serves as it is (the
    LoRA / MAP rows' seeds 1-3 for ENS seed 1); each missing one becomes a trial of its own,
    `<row>-member-seed<k>`, tagged sweep.role=ens_member and left out of the tables' rows."""
    planned = {_config_key(t.run): t.name for t in trials}
    added: list[Trial] = []
    for t in trials:
        if t.run.adapter.method != "ens":
            continue
        if t.run.seed < 1:
            raise ConfigError(
                f"sweep trial {t.name}: an ENS seed must be >= 1 (ENS seed s averages the LoRA "
                f"runs of seeds 3(s-1)+1 .. 3s), got seed={t.run.seed}"
            )
        t.role = ENSEMBLE
        members = []
        for seed in ensemble_seeds(t.run.seed):
            member = t.run.ensemble_member(seed)
            key = _config_key(member)
            if key not in planned:
                run_name = trial_run_name(name, (t.row or "ens", "member", f"seed{seed}"))
                values = {**t.values, "adapter.method": "lora", "seed": seed}
                tags = {**t.tags, ROLE_TAG: ENS_MEMBER}
                run = member.with_overrides(
                    {"name": run_name, "tracking.tags": {**member.tracking.tags, **tags}}
                )
                added.append(Trial(run_name, values, tags, "", run, role=ENS_MEMBER))
                planned[key] = run_name
            members.append(planned[key])
        t.members = tuple(members)
    return trials + added


def _config_key(run: RunConfig) -> str:
    """What makes two runs the same training run: the config less its name and tags."""
    d = run.to_dict()
    d.pop("name")
    d["tracking"].pop("tags")
    return json.dumps(d, sort_keys=True, default=str)


# ----- checks across the trials -----------------------------------------------------------------
def _check_overrides(cfg: SweepConfig, trials: list[Trial], overrides: Any) -> None:
    """Refuse a `--set` of a base field that the sweep's fixed, grid or space values replace."""
    owners = {key: f"sweep.fixed.{key}={short_value(v)}" for key, v in cfg.fixed.items()}
    owners.update({key: f"sweep.space.{key}" for key in cfg.space})
    for axis, spec in flatten(cfg.grid, leaf=lambda k, v: k not in SECTIONS).items():
        sets = [axis]
        if isinstance(spec, Mapping):
            sets = [k for values in spec.values() for k in flatten(values)]
        owners.update({key: f"sweep.grid.{axis}" for key in sets if key not in owners})
    swept = {k for t in trials for k in t.values}
    for key, value in parse_overrides(list(overrides)):
        if key.split(".")[0] == "sweep":
            continue
        items = [(key, value)]
        if key in SECTIONS and isinstance(value, Mapping):  # --set optim={max_steps: 5}
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        for dotted, v in items:
            owner = owners.get(dotted)
            if owner is None and dotted in swept:
                owner = "the sweep"
            if owner is not None:
                raise ConfigError(
                    f"--set {dotted}={short_value(v)} would have no effect: {owner} sets "
                    f"{dotted} for the trials, over the base value. Change the value there "
                    "(a --set of that sweep field works too), or drop this --set"
                )


def _check_trials(cfg: SweepConfig, trials: list[Trial]) -> None:
    """Checks across the whole trial: a validation split for val/ metrics, distinct configs,
    and a validation (checkpoint) before the last step."""
    for t in trials:
        run = t.run
        if run.eval.eval_every > run.optim.max_steps:
            raise ConfigError(
                f"sweep trial {t.name}: eval.eval_every={run.eval.eval_every} is more than "
                f"optim.max_steps={run.optim.max_steps}: the trial would validate and checkpoint "
                "only at its last step, so a restart begins at step 0 and ASHA has nothing to "
                "compare. Lower eval.eval_every (sweep.fixed.eval.eval_every for every trial)"
            )
    if cfg.metric.startswith("val/"):
        for t in trials:
            if t.run.task.split_policy == "blob":
                raise ConfigError(
                    f"sweep.metric={cfg.metric!r} needs a validation split, but trial {t.name} has "
                    "task.split_policy='blob' (no validation): use a test/ metric or another split policy"
                )
    seen: dict[str, str] = {}
    for t in trials:
        key = _config_key(t.run)
        if key in seen:
            raise ConfigError(
                f"sweep trials {seen[key]} and {t.name} have the same config: one of them is redundant"
            )
        seen[key] = t.name


def _check_space_corners(name: str, base: RunConfig, space: Mapping[str, Any]) -> None:
    """Optuna's draws are unknown before it runs: check each key at its bounds (or every choice)."""
    for key, dist in space.items():
        ((kind, arg),) = dist.items()
        if key == "adapter.method" and kind == "choice" and "ens" in arg:
            raise ConfigError(
                "sweep.space.adapter.method: 'ens' is evaluated from its members' runs, not drawn "
                "by Optuna: put ENS in a grid sweep (search grid or random)"
            )
        for value in arg if kind == "choice" else (arg[0], arg[-1]):
            try:
                base.with_overrides({key: value, "name": trial_run_name(name, ("optuna",))})
            except ConfigError as err:
                raise ConfigError(f"sweep.space.{key}={value!r}: {err}") from None
