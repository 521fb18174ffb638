"""The `sweep:` section of an experiment YAML: its schema, the trials it expands to, the plan.

    base, section = load_experiment("jobs/configs/demo.yaml", overrides)
    plan = plan_sweep(base, section, name="demo")   # every trial built and validated; nothing starts
    print(describe(plan))                            # what `jobs/sweep.py --dry-run` prints

The section (every key optional; `SweepConfig` documents each field):

    sweep:
      name: demo                 # default: the YAML file's name
      fixed: {optim.max_steps: 60}               # every trial, over the file's base values
      grid:                      # the cartesian product of these axes, in this order
        method:                  # a named axis: name -> the values it sets (tag sweep.method)
          lora: {adapter.method: lora}
          melora: {adapter.method: melora, adapter.sigma_p: [0.1, 0.2]}   # a list: a sub-grid
        seed: [1, 2]             # a field axis: dotted key -> its values
      search: grid               # grid | random | optuna (random and optuna draw from `space`)
      space: {adapter.sigma_p: {loguniform: [0.05, 1.0]}, adapter.r: {choice: [4, 8, 16, 64]}}
      num_samples: 20            # random / optuna: points drawn from `space`
      search_seed: 0             # random / optuna: the same draws every time
      scheduler: none            # none | asha (stops trials early on `metric`)
      asha: {grace_period: 100, reduction_factor: 2}   # in training steps
      metric: val/nll            # the best trial (and what asha / optuna optimise)
      mode: min                  # default: max for acc and auroc, else min
      max_concurrent_trials: auto   # auto: as many whole trials as the cluster holds
      driver_cpus: 1             # CPUs of each trial's driver
      max_trials: 10000          # refuse a bigger sweep (a typo in a grid can mean a million)

Rules: a grid key is a config field ('adapter.r', 'seed'; list fields such as task.ood_tasks take
a list of lists) or, when its value is a mapping, a named axis (any other name: 'method',
'tasks'); within a named set, a list for a scalar field is a sub-grid. A key is set by one axis
only. ENS trials (adapter.method 'ens') are not trained: each is evaluated once the trained
trials are done, from the LoRA runs of its member seeds (3(s-1)+1 .. 3s for ENS seed s); a
planned trial with a member's config serves as it is, and a missing member becomes a trial of its
own ('<row>-member-seed<k>', tag sweep.role=ens_member, kept out of the tables' rows).
`name`, `tracking.tracking_uri`, `tracking.experiment`, `tracking.storage_path` and
`tracking.tags` are not swept. Run names are '<sweep>-<words of the trial's values>' (at most 100
characters), stable, so a resumed sweep finds each trial's runs again. Every trial's config is
validated here; an error names the sweep field, or the trial and its values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import random
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melora.errors import ConfigError
from orchestrator import tracking
from orchestrator.config import MAX_SEED, SECTIONS, RunConfig, parse_overrides, short_repr
from orchestrator.errors import SweepError
from orchestrator.tracking.conventions import ENS_MEMBER, ENSEMBLE, ROLE_TAG, TRAINED

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
MODES = ("min", "max")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
VAL_METRICS = ("val/acc", "val/nll", "val/ece", "val/brier")
FINAL_METRIC = re.compile(r"(test|ood)/\w+/(acc|nll|ece|brier|auroc)_n\d+")
NOT_SWEPT = (  # one sweep: one set of run names, one MLflow experiment, one storage folder
    "name",
    "tracking.tracking_uri",
    "tracking.experiment",
    "tracking.storage_path",
    "tracking.tags",
)

RUNS_DIR = "runs"
_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")
_MAX_RUN_NAME = 100


# ----- the section ------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """The `sweep:` section of an experiment YAML (the module docstring shows every field)."""

    name: str | None = field(
        default=None,
        metadata={
            "help": "Sweep name: MLflow parent run, storage folder and run-name prefix; null: the YAML file's name."
        },
    )
    fixed: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Dotted key -> value for every trial, over the base values."},
    )
    grid: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Axes crossed with each other: 'key: [values]' for a config field, or "
            "'axis: {name: {key: value or [values]}}' for named sets of values (a list is a sub-grid)."
        },
    )
    search: str = field(
        default="grid",
        metadata={
            "help": "'grid': the grid only; 'random': num_samples draws from space, each crossed with the grid; 'optuna': Optuna's TPE over space (needs the optuna package).",
            "choices": SEARCHES,
        },
    )
    space: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "random / optuna: dotted key -> {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (inclusive) or {choice: [values]}."
        },
    )
    num_samples: int = field(
        default=1, metadata={"help": "random / optuna: points drawn from space."}
    )
    search_seed: int = field(
        default=0,
        metadata={"help": "random / optuna: seed of the draws (the same trials every time)."},
    )
    scheduler: str = field(
        default="none",
        metadata={
            "help": "'none', or 'asha': stop trials whose validation metric lags at a rung (needs a val/ metric).",
            "choices": SCHEDULERS,
        },
    )
    asha: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "ASHA: grace_period (training steps before a trial can be stopped, default 100) and reduction_factor (default 2)."
        },
    )
    metric: str = field(
        default="val/nll",
        metadata={
            "help": "Picks the best trial (and drives asha / optuna): val/<acc|nll|ece|brier> at the selected checkpoint, or a final test/<task>/<metric>_n<N>."
        },
    )
    mode: str | None = field(
        default=None,
        metadata={"help": "'min' or 'max'; null: max for acc and auroc, else min."},
    )
    max_concurrent_trials: int | str = field(
        default="auto",
        metadata={
            "help": "'auto': as many whole trials (driver + workers) as the cluster's CPUs and GPUs hold when the sweep starts; or a number (for autoscaling clusters)."
        },
    )
    driver_cpus: float = field(
        default=1.0,
        metadata={"help": "CPUs reserved for each trial's driver (the process that runs fit_run)."},
    )
    max_trials: int = field(
        default=10_000,
        metadata={
            "help": "A sweep of more trials is refused before any is built (a typo in a grid can "
            "mean a million; planning costs about 2 ms a trial); raise it to run a bigger one."
        },
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepConfig:
        """Validate the raw section (nested mappings under a section name become dotted keys)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"sweep={raw!r} must be a mapping of sweep fields")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(str(key)[:100], names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"unknown key {short_repr(f'sweep.{key}')}{hint}; allowed keys: {names}"
                )
        cfg = cls(**{k: v for k, v in raw.items() if v is not None or k in ("name", "mode")})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.name is not None and not (
            isinstance(self.name, str) and _SWEEP_NAME.fullmatch(self.name)
        ):
            raise ConfigError(
                f"sweep.name={short_repr(self.name)} is not allowed: use 1-60 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        for key in ("fixed", "grid", "space", "asha"):
            if not isinstance(getattr(self, key), Mapping):
                raise ConfigError(f"sweep.{key}={short_repr(getattr(self, key))} must be a mapping")
        self.fixed = _flatten(self.fixed)
        for key in self.fixed:
            _field_type(f"sweep.fixed.{key}", key)
        self.space = _flatten(self.space, leaf=_is_distribution)
        _check_choice("sweep.search", self.search, SEARCHES)
        _check_choice("sweep.scheduler", self.scheduler, SCHEDULERS)
        _check_int("sweep.max_trials", self.max_trials, 1)
        _check_int("sweep.num_samples", self.num_samples, 1)
        _check_int("sweep.search_seed", self.search_seed, 0, MAX_SEED)
        if self.search != "grid" and self.num_samples > self.max_trials:
            raise ConfigError(
                f"sweep.num_samples={self.num_samples} is more than sweep.max_trials={self.max_trials}: "
                f"lower num_samples, or raise sweep.max_trials (--set sweep.max_trials={self.num_samples})"
            )
        if self.search == "grid" and self.space:
            raise ConfigError(
                "sweep.space is set but sweep.search='grid': set search to 'random' or 'optuna', or remove space"
            )
        if self.search != "grid":
            if not self.space:
                raise ConfigError(
                    f"sweep.search={self.search!r} needs sweep.space: dotted key -> {{uniform|loguniform|randint: [lo, hi]}} or {{choice: [values]}}"
                )
            for key, dist in self.space.items():
                _check_distribution(f"sweep.space.{key}", key, dist)
        if self.search == "optuna":
            if self.grid:
                raise ConfigError(
                    "sweep.search='optuna' takes no sweep.grid (Optuna draws one point at a time): put fixed values in sweep.fixed, or use search 'random' with a grid"
                )
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "sweep.search='optuna' needs the optuna package, which is not installed: "
                    "`pip install optuna`, or use search: random"
                ) from None
        unknown = sorted(set(self.asha) - {"grace_period", "reduction_factor"})
        if unknown:
            raise ConfigError(
                f"sweep.asha has unknown keys {short_repr(unknown)}: allowed are grace_period, reduction_factor"
            )
        _check_int("sweep.asha.grace_period", self.asha.get("grace_period", 100), 1)
        _check_int("sweep.asha.reduction_factor", self.asha.get("reduction_factor", 2), 2)
        if not isinstance(self.metric, str) or not (
            self.metric in VAL_METRICS or FINAL_METRIC.fullmatch(self.metric)
        ):
            raise ConfigError(
                f"sweep.metric={short_repr(self.metric)} is not a metric a trial reports: use one of {list(VAL_METRICS)} "
                "or a final metric such as 'test/openbookqa/acc_n0'"
            )
        if self.scheduler == "asha" and not self.metric.startswith("val/"):
            raise ConfigError(
                f"sweep.scheduler='asha' compares trials while they train, so sweep.metric must be a validation metric {list(VAL_METRICS)}, not {self.metric!r}"
            )
        if self.mode is not None:
            _check_choice("sweep.mode", self.mode, MODES)
        auto = self.max_concurrent_trials == "auto"
        if not auto:
            _check_int("sweep.max_concurrent_trials", self.max_concurrent_trials, 1)
        if (
            isinstance(self.driver_cpus, bool)
            or not isinstance(self.driver_cpus, (int, float))
            or not 0 < self.driver_cpus < math.inf
        ):
            raise ConfigError(
                f"sweep.driver_cpus={short_repr(self.driver_cpus)} must be a number > 0 (Ray refuses a trial driver with 0 CPUs)"
            )

    @property
    def resolved_mode(self) -> str:
        """'min' or 'max' for `metric`."""
        if self.mode is not None:
            return self.mode
        name = self.metric.rsplit("/", 1)[-1]
        return "max" if name.startswith(("acc", "auroc")) else "min"


# ----- the trials -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """One point of one axis: the words it adds to the run name, the values it sets, its tags."""

    label: tuple[str, ...]
    values: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)
    seed_part: str | None = None  # the label word that names the seed (left out of table rows)


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


def grid_axes(
    grid: Mapping[str, Any], max_trials: int | None = None
) -> list[tuple[str, list[Choice]]]:
    """The grid's axes in order, each as its list of choices (validated, with errors naming the field).

    With `max_trials`, a grid of more points is refused before its axes are crossed (an axis's
    sub-grids too): planning a refused sweep costs the size of its YAML, not of its product.
    """
    axes = []
    total = 1
    for axis, spec in _flatten(grid, leaf=lambda k, v: k not in SECTIONS).items():
        where = f"sweep.grid.{axis}"
        if isinstance(spec, Mapping):
            if axis.split(".")[0] in SECTIONS or axis == "seed":
                raise ConfigError(
                    f"{where}: {axis!r} names a config field, so its value must be a list of "
                    "values, not a mapping; a named axis needs a name that is not a config section "
                    f"or field (such as 'method' or 'tasks'), not {axis.split('.')[0]!r}"
                )
            if not spec:
                raise ConfigError(
                    f"{where} is empty: a named axis maps names to the values they set"
                )
            choices = []
            for name, values in spec.items():
                if not isinstance(name, str) or not _SWEEP_NAME.fullmatch(name):
                    raise ConfigError(
                        f"{where}: the name {short_repr(name)} is not allowed: use letters, digits, '.', '_' or '-'"
                    )
                if not isinstance(values, Mapping):
                    raise ConfigError(
                        f"{where}.{name}={short_repr(values)} must be a mapping of dotted keys to values, e.g. {{adapter.method: lora}}"
                    )
                subgrid = _subgrid(f"{where}.{name}", _flatten(values), max_trials)
                for label, vals, seed_part in subgrid:
                    choices.append(Choice((name, *label), vals, {f"sweep.{axis}": name}, seed_part))
        else:
            _field_type(where, axis)
            choices = [
                Choice((word,), {axis: v}, seed_part=word if axis == "seed" else None)
                for v, word in ((v, value_word(axis, v)) for v in _values(where, axis, spec))
            ]
        axes.append((axis, choices))
        total *= len(choices)
        if max_trials is not None and total > max_trials:
            _too_many(total, [len(c) for _, c in axes], max_trials)
    _check_disjoint(axes)
    return axes


def _too_many(n: int, sizes: list[int], max_trials: int, more: bool = True) -> None:
    shape = " x ".join(str(s) for s in sizes) + (" x ..." if more else "")
    raise ConfigError(
        f"sweep: {n} trials ({shape}) is more than sweep.max_trials={max_trials}: "
        f"check the grid for a typo, or raise sweep.max_trials (--set sweep.max_trials={n})"
    )


def draw_space(space: Mapping[str, Mapping[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` points drawn from `space` with a seeded generator (floats to 4 significant digits)."""
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        point = {}
        for key, dist in space.items():
            ((kind, arg),) = dist.items()
            if kind == "choice":
                value = rng.choice(list(arg))
            elif kind == "randint":
                value = rng.randint(int(arg[0]), int(arg[1]))
            elif kind == "uniform":
                value = _round(rng.uniform(float(arg[0]), float(arg[1])))
            else:  # loguniform
                value = _round(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
            point[key] = value
        points.append(point)
    return points


# ----- the plan ---------------------------------------------------------------------------------
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
                f"one trial needs {_fmt_resources(need)} (driver + workers) but the cluster has {_fmt_resources(have)}: "
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
    flag = name is not None
    name = name if flag else cfg.name or (_stem(source) if source else None)
    if not name or not _SWEEP_NAME.fullmatch(name):
        given = "--name" if flag else "sweep.name" if cfg.name else "the file name"
        raise ConfigError(
            f"sweep name {short_repr(name)} ({given}) is not allowed: use 1-60 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (--name or sweep.name)"
        )
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
        _too_many(len(trials), [len(trials)], cfg.max_trials, more=False)
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
    shapes = {_fmt_shape(plan, r) for r in runs}
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
        lines.append(f"  base run: {plan.base.run_name} ({_fmt_shape(plan, plan.base)})")
        return "\n".join(lines)
    width = max(len(t.name) for t in plan.trials)
    per_trial = len({_fmt_shape(plan, t.run) for t in plan.trials}) > 1
    for i, t in enumerate(plan.trials, 1):
        values = " ".join(f"{k}={format_value(v)}" for k, v in t.values.items())
        extra = f"  [{_fmt_shape(plan, t.run)}]" if per_trial else ""
        lines.append(f"  {i:3d}  {t.name:<{width}}  {values}{extra}{_role_note(t)}")
    return "\n".join(lines)


def _role_note(t: Trial) -> str:
    if t.role == ENSEMBLE:
        return f"  (evaluated after the trained trials, from {', '.join(t.members)})"
    if t.role == ENS_MEMBER:
        return "  (trained as an ENS member only; not a table row)"
    return ""


# ----- helpers: expansion and validation ----------------------------------------------------------
def _expand(name: str, base: RunConfig, cfg: SweepConfig) -> list[Trial]:
    if cfg.search == "optuna":
        return []
    axes = grid_axes(cfg.grid, cfg.max_trials)
    sizes = [len(c) for _, c in axes] + ([cfg.num_samples] if cfg.search == "random" else [])
    if math.prod(sizes) > cfg.max_trials:  # counted before anything is drawn or crossed
        _too_many(math.prod(sizes), sizes, cfg.max_trials, more=False)
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
            label = [w for c in combo for w in c.label]
            values = {k: v for c in combo for k, v in c.values.items()}
            tags = {k: v for c in combo for k, v in c.tags.items()}
            seed_words = {c.seed_part for c in combo if c.seed_part}
            row_words = [w for w in label if w not in seed_words]
            if draw is not None:
                words = [f"s{i + 1}"] + [value_word(k, v) for k, v in draw.items()]
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
                    {
                        **values,
                        "name": run_name,
                        "tracking.tags": {**base.tracking.tags, **tags},
                    }
                )
            except ConfigError as err:
                shown = ", ".join(f"{k}={_short_value(v)}" for k, v in values.items())
                raise ConfigError(f"sweep trial {run_name} ({shown}): {err}") from None
            trials.append(Trial(run_name, values, tags, "-".join(row_words), run))
    return _plan_ensembles(name, trials)


def _plan_ensembles(name: str, trials: list[Trial]) -> list[Trial]:
    """Give each ENS trial (adapter.method 'ens', seed s) its LoRA members, seeds
    ensemble_seeds(s): a planned trial with exactly the member's config serves as it is (the
    LoRA / MAP rows' seeds 1-3 for ENS seed 1); each missing one becomes a trial of its own,
    `<row>-member-seed<k>`, tagged sweep.role=ens_member and left out of the tables' rows."""
    from melora.baselines.ensemble import ensemble_seeds

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


def _short_value(v: Any, limit: int = 100) -> str:
    """`format_value` for a message, cut to about `limit` characters (never built whole)."""
    if isinstance(v, (list, dict)):
        return short_repr(v, limit)
    text = format_value(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_key(run: RunConfig) -> str:
    """What makes two runs the same training run: the config less its name and tags."""
    d = run.to_dict()
    d.pop("name")
    d["tracking"].pop("tags")
    return json.dumps(d, sort_keys=True, default=str)


def _check_overrides(cfg: SweepConfig, trials: list[Trial], overrides: Any) -> None:
    """Refuse a `--set` of a base field that the sweep's fixed, grid or space values replace."""
    owners = {key: f"sweep.fixed.{key}={_short_value(v)}" for key, v in cfg.fixed.items()}
    owners.update({key: f"sweep.space.{key}" for key in cfg.space})
    for axis, spec in _flatten(cfg.grid, leaf=lambda k, v: k not in SECTIONS).items():
        sets = [axis]
        if isinstance(spec, Mapping):
            sets = [k for values in spec.values() for k in _flatten(values)]
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
                    f"--set {dotted}={_short_value(v)} would have no effect: {owner} sets "
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


def _field_type(where: str, key: str) -> Any:
    """The type hint of the config field `key` ('adapter.sigma_p', 'seed'); ConfigError naming `where`."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in SECTIONS:
        cls, name = RunConfig, parts[0]
    elif len(parts) == 2 and parts[0] in SECTIONS:
        cls, name = SECTIONS[parts[0]], parts[1]
    else:
        raise ConfigError(
            f"{where}: {key!r} is not a config field: use 'section.field' such as 'adapter.sigma_p', or 'seed'"
        )
    names = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown field {key!r}{hint}; allowed: {names}")
    if key in NOT_SWEPT:
        raise ConfigError(
            f"{where}: a sweep cannot vary {key!r}: the sweep names its runs and logs them to one MLflow "
            "experiment and one storage folder; set it in the base config"
        )
    return typing.get_type_hints(cls)[name]


def _is_list_field(key: str) -> bool:
    hint = _field_type(key, key)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args)


def _values(where: str, key: str, spec: Any) -> list[Any]:
    """The choices of a field axis: a non-empty list of distinct values (lists of lists for list fields)."""
    if not isinstance(spec, list) or not spec:
        raise ConfigError(
            f"{where}={short_repr(spec)} must be a non-empty list of values for {key}"
        )
    if _is_list_field(key) and not all(isinstance(v, list) for v in spec):
        raise ConfigError(
            f"{where}: {key} holds a list, so its choices are a list of lists, e.g. [[arc_easy], [arc_easy, arc_challenge]]"
        )
    seen = set()
    for v in spec:
        text = json.dumps(v, sort_keys=True, default=str)
        if text in seen:
            raise ConfigError(f"{where} lists {short_repr(v)} twice")
        seen.add(text)
    return list(spec)


def _subgrid(
    where: str, values: Mapping[str, Any], max_trials: int | None = None
) -> list[tuple[tuple[str, ...], dict[str, Any], str | None]]:
    """A named set's values: a list for a scalar field (a list of lists for a list field) is a sub-grid."""
    fixed, axes = {}, []
    for key, v in values.items():
        _field_type(f"{where}.{key}", key)
        is_grid = isinstance(v, list) and (
            not _is_list_field(key) or (v and all(isinstance(x, list) for x in v))
        )
        if is_grid:
            axes.append((key, _values(f"{where}.{key}", key, v)))
        else:
            fixed[key] = v
    n = math.prod(len(vals) for _, vals in axes)
    if max_trials is not None and n > max_trials:
        raise ConfigError(
            f"{where}: its sub-grid has {n} combinations, more than sweep.max_trials={max_trials}: "
            f"check it for a typo, or raise sweep.max_trials (--set sweep.max_trials={n})"
        )
    out = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        chosen = dict(zip([k for k, _ in axes], combo, strict=True))
        words = tuple(value_word(k, v) for k, v in chosen.items())
        seed_part = value_word("seed", chosen["seed"]) if "seed" in chosen else None
        out.append((words, {**fixed, **chosen}, seed_part))
    return out


def _check_disjoint(axes: list[tuple[str, list[Choice]]]) -> None:
    owners: dict[str, str] = {}
    for axis, choices in axes:
        keys = {k for c in choices for k in c.values}
        for key in keys:
            if key in owners:
                raise ConfigError(
                    f"sweep.grid.{axis} and sweep.grid.{owners[key]} both set {key!r}: set each key in one axis"
                )
            owners[key] = axis


def _flatten(d: Mapping[str, Any], leaf=None, prefix: str = "") -> dict[str, Any]:
    """{'adapter': {'r': [4]}} -> {'adapter.r': [4]} (how `--set sweep.grid.adapter.r=...` arrives).

    Only a key that is a section name is descended into (or, given `leaf`, any key it rejects).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and (
            (leaf is None and key in SECTIONS) or (leaf is not None and not leaf(key, v))
        ):
            out.update(_flatten(v, leaf, key + "."))
        else:
            out[key] = v
    return out


def _is_distribution(key: str, value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _check_distribution(where: str, key: str, dist: Any) -> None:
    _field_type(where, key)
    if not _is_distribution(key, dist):
        raise ConfigError(
            f"{where}={short_repr(dist)} must be one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}, {{choice: [values]}}"
        )
    ((kind, arg),) = dist.items()
    if kind == "choice":
        _values(where, key, arg)
        return
    ok = (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)
        and all(-1e300 < x < 1e300 for x in arg)  # finite, not nan (a comparison with nan is false)
    )
    if kind == "randint":
        ok = ok and all(isinstance(x, int) for x in arg) and arg[0] <= arg[1]
    else:
        ok = ok and arg[0] < arg[1] and (kind == "uniform" or arg[0] > 0)
    if not ok:
        need = {
            "uniform": "[lo, hi] with lo < hi",
            "loguniform": "[lo, hi] with 0 < lo < hi",
            "randint": "[lo, hi], integers with lo <= hi",
        }[kind]
        raise ConfigError(f"{where}: {kind}={short_repr(arg)} must be {need}")


def _check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{where}={short_repr(value)} is not allowed: choose one of {list(allowed)}"
        )


def _check_int(where: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}={short_repr(value)} must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}={short_repr(value)} is out of range: allowed is <= {maximum}")


def value_word(key: str, value: Any) -> str:
    """How a value appears in a run name: 'melora', 'seed1', 'sigma_p0.1', 'prior_noise-off'."""
    last = key.rsplit(".", 1)[-1]
    if key in ("adapter.method", "task.name"):
        text = str(value)
    elif key == "model.name_or_path":
        text = str(value).rstrip("/").rsplit("/", 1)[-1]
    elif key == "seed":
        text = f"seed{value}"
    elif isinstance(value, bool):
        text = f"{last}-{'on' if value else 'off'}"
    elif isinstance(value, float):
        text = f"{last}{value:.6g}"
    elif isinstance(value, (int, str)):
        text = f"{last}{value}"
    else:
        text = f"{last}-" + hashlib.sha256(json.dumps(value).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def trial_run_name(sweep: str, label: tuple[str, ...]) -> str:
    name = f"{sweep}-{'-'.join(label)}"
    if len(name) > _MAX_RUN_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_RUN_NAME - 9]}-{digest}"
    return name


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _stem(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(source).stem)


def format_value(v: Any) -> str:
    """A value as the trial list and tags show it (JSON for lists, booleans and null)."""
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def _fmt_resources(r: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(r.items())) + "}"


def _fmt_shape(plan: SweepPlan, run: RunConfig) -> str:
    s = run.scaling
    per = _fmt_resources(s.resources_per_worker())
    return (
        f"driver {{CPU: {plan.sweep.driver_cpus:g}}} + {s.num_workers} workers x {per} "
        f"= {_fmt_resources(plan.trial_resources(run))}"
    )
