"""The `sweep:` section of an experiment YAML: its fields (`SweepConfig`) and their validation.

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

Every key is optional; each field's `help` says what it does. A grid key is a config field
('adapter.r', 'seed'; list fields such as task.ood_tasks take a list of lists) or, when its value
is a mapping, a named axis (any other name: 'method', 'tasks'); within a named set, a list for a
scalar field is a sub-grid. `name`, `tracking.tracking_uri`, `tracking.experiment`,
`tracking.storage_path` and `tracking.tags` are not swept. `plan.py` expands the section into
trials; the helpers here (`field_type`, `flatten`, `choice_values`, ...) check what it names.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from melora.errors import ConfigError
from melora.fields import (
    at_least,
    check_field,
    check_keys,
    check_value,
    field_names,
    unknown_key_message,
)
from melora.keys import VAL_METRICS, parse_final_key, val_key
from orchestrator.config import MAX_SEED, SECTIONS, RunConfig, short_repr
from orchestrator.sweep.names import SWEEP_NAME

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
MODES = ("min", "max")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SWEEP_VAL_METRICS = tuple(val_key(m) for m in VAL_METRICS)  # 'val/acc', ...
SWEEP_FINAL_METRICS = ("acc", "nll", "ece", "brier", "auroc")  # of a final test/ or ood/ key
NOT_SWEPT = (  # one sweep: one set of run names, one MLflow experiment, one storage folder
    "name",
    "tracking.tracking_uri",
    "tracking.experiment",
    "tracking.storage_path",
    "tracking.tags",
)
ASHA_ENTRIES = {  # key of sweep.asha -> (default, metadata of the integer)
    "grace_period": (100, at_least(1)),
    "reduction_factor": (2, at_least(2)),
}


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
        default=1, metadata={"help": "random / optuna: points drawn from space.", **at_least(1)}
    )
    search_seed: int = field(
        default=0,
        metadata={
            "help": "random / optuna: seed of the draws (the same trials every time).",
            "ge": 0,
            "le": MAX_SEED,
        },
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
        metadata={
            "help": "'min' or 'max'; null: max for acc and auroc, else min.",
            "choices": MODES,
        },
    )
    max_concurrent_trials: int | str = field(
        default="auto",
        metadata={
            "help": "'auto': as many whole trials (driver + workers) as the cluster's CPUs and GPUs hold when the sweep starts; or a number (for autoscaling clusters).",
            **at_least(1),
        },
    )
    driver_cpus: float = field(
        default=1.0,
        metadata={
            "help": "CPUs reserved for each trial's driver (the process that runs fit_run).",
            "gt": 0,
            "out_of_range": "must be a number > 0 (Ray refuses a trial driver with 0 CPUs)",
            "keep_int": True,
        },
    )
    max_trials: int = field(
        default=10_000,
        metadata={
            "help": "A sweep of more trials is refused before any is built (a typo in a grid can "
            "mean a million; planning costs about 2 ms a trial); raise it to run a bigger one.",
            **at_least(1),
        },
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepConfig:
        """Validate the raw section (nested mappings under a section name become dotted keys)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"sweep={raw!r} must be a mapping of sweep fields")
        check_keys("sweep", raw, field_names(cls))
        cfg = cls(**{k: v for k, v in raw.items() if v is not None or k in ("name", "mode")})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field (in this order: the first problem found is the one reported); the
        dotted keys of fixed and space are flattened on the way."""
        if self.name is not None and not (
            isinstance(self.name, str) and SWEEP_NAME.fullmatch(self.name)
        ):
            raise ConfigError(
                f"sweep.name={short_repr(self.name)} is not allowed: use 1-60 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        for key in ("fixed", "grid", "space", "asha"):
            if not isinstance(getattr(self, key), Mapping):
                raise ConfigError(f"sweep.{key}={short_repr(getattr(self, key))} must be a mapping")
        self.fixed = flatten(self.fixed)
        for key in self.fixed:
            field_type(f"sweep.fixed.{key}", key)
        self.space = flatten(self.space, leaf=is_distribution)
        self._check_choices("search", "scheduler")
        self._check_numbers(int, "max_trials", "num_samples", "search_seed")
        self._check_search()
        self._check_asha()
        self._check_metric()
        self._check_choices("mode")
        if self.max_concurrent_trials != "auto":
            self._check_numbers(int, "max_concurrent_trials")
        self._check_numbers(float, "driver_cpus")

    @property
    def resolved_mode(self) -> str:
        """'min' or 'max' for `metric`."""
        if self.mode is not None:
            return self.mode
        name = self.metric.rsplit("/", 1)[-1]
        return "max" if name.startswith(("acc", "auroc")) else "min"

    def _check_choices(self, *names: str) -> None:
        """The fields `names` against the `choices` of their metadata (None: the default)."""
        for f in dataclasses.fields(self):
            if f.name in names:
                check_value(f"sweep.{f.name}", getattr(self, f.name), f.metadata)

    def _check_numbers(self, hint: type, *names: str) -> None:
        """The fields `names` as numbers of type `hint` within the bounds of their metadata."""
        for f in dataclasses.fields(self):
            if f.name in names:
                check_field(f"sweep.{f.name}", getattr(self, f.name), hint, f.metadata)

    def _check_search(self) -> None:
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
                check_distribution(f"sweep.space.{key}", key, dist)
        if self.search == "optuna":
            if self.grid:
                raise ConfigError(
                    "sweep.search='optuna' takes no sweep.grid (Optuna draws one point at a time): put fixed values in sweep.fixed, or use search 'random' with a grid"
                )
            try:
                import optuna  # noqa: F401  # why: optional package, only for search: optuna
            except ImportError:
                raise ConfigError(
                    "sweep.search='optuna' needs the optuna package, which is not installed: "
                    "`pip install optuna`, or use search: random"
                ) from None

    def _check_asha(self) -> None:
        check_keys("sweep.asha", self.asha, list(ASHA_ENTRIES))
        for key, (default, meta) in ASHA_ENTRIES.items():
            check_field(f"sweep.asha.{key}", self.asha.get(key, default), int, meta)

    def _check_metric(self) -> None:
        if not is_sweep_metric(self.metric):
            raise ConfigError(
                f"sweep.metric={short_repr(self.metric)} is not a metric a trial reports: use one of {list(SWEEP_VAL_METRICS)} "
                "or a final metric such as 'test/openbookqa/acc_n0'"
            )
        if self.scheduler == "asha" and not self.metric.startswith("val/"):
            raise ConfigError(
                f"sweep.scheduler='asha' compares trials while they train, so sweep.metric must be a validation metric {list(SWEEP_VAL_METRICS)}, not {self.metric!r}"
            )


def is_sweep_metric(metric: Any) -> bool:
    """Whether a trial reports `metric`: a validation metric, or a final test/ood metric of
    SWEEP_FINAL_METRICS on a task whose name is letters, digits and '_'."""
    if not isinstance(metric, str):
        return False
    if metric in SWEEP_VAL_METRICS:
        return True
    key = parse_final_key(metric)
    return (
        key is not None
        and key.metric in SWEEP_FINAL_METRICS
        and key.task.replace("_", "a").isalnum()  # the task word as the sweep always took it
    )


# ----- what the section names: config fields, values, distributions ----------------------------
def field_type(where: str, key: str) -> Any:
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
    names = [n for n in field_names(cls) if n not in SECTIONS]
    if name not in names:
        section = "" if cls is RunConfig else parts[0]
        raise ConfigError(f"{where}: {unknown_key_message(section, name, names, noun='field')}")
    if key in NOT_SWEPT:
        raise ConfigError(
            f"{where}: a sweep cannot vary {key!r}: the sweep names its runs and logs them to one MLflow "
            "experiment and one storage folder; set it in the base config"
        )
    return typing.get_type_hints(cls)[name]


def is_list_field(key: str) -> bool:
    """Whether the config field `key` holds a list (task.ood_tasks)."""
    hint = field_type(key, key)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args)


def choice_values(where: str, key: str, spec: Any) -> list[Any]:
    """The choices of a field axis: a non-empty list of distinct values (lists of lists for list fields)."""
    if not isinstance(spec, list) or not spec:
        raise ConfigError(
            f"{where}={short_repr(spec)} must be a non-empty list of values for {key}"
        )
    if is_list_field(key) and not all(isinstance(v, list) for v in spec):
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


def flatten(
    d: Mapping[str, Any], leaf: Callable[[str, Any], bool] | None = None, prefix: str = ""
) -> dict[str, Any]:
    """{'adapter': {'r': [4]}} -> {'adapter.r': [4]} (how `--set sweep.grid.adapter.r=...` arrives).

    Only a key that is a section name is descended into (or, given `leaf`, any key it rejects).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and (
            (leaf is None and key in SECTIONS) or (leaf is not None and not leaf(key, v))
        ):
            out.update(flatten(v, leaf, key + "."))
        else:
            out[key] = v
    return out


def is_distribution(key: str, value: Any) -> bool:
    """Whether `value` is one of space's distributions ({uniform: [lo, hi]}, {choice: [...]}, ...)."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def check_distribution(where: str, key: str, dist: Any) -> None:
    """A space entry: a known distribution over a config field, with valid bounds or choices."""
    field_type(where, key)
    if not is_distribution(key, dist):
        raise ConfigError(
            f"{where}={short_repr(dist)} must be one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}, {{choice: [values]}}"
        )
    ((kind, arg),) = dist.items()
    if kind == "choice":
        choice_values(where, key, arg)
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
