"""The points a sweep section spans: the grid's axes (`grid_axes`, each a list of `Choice`s) and
random draws from its space (`draw_space`). `plan.py` crosses them into trials.

A grid key is a config field ('adapter.r', 'seed'), whose value is a list of values, or a named
axis ('method', 'tasks'), whose value maps names to the values each sets; within a named set, a
list for a scalar field (a list of lists for a list field) is a sub-grid. A key is set by one
axis only. A grid bigger than sweep.max_trials is refused before its axes are crossed.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from melora.errors import ConfigError
from orchestrator.config import SECTIONS, short_repr
from orchestrator.sweep.names import SWEEP_NAME, value_word
from orchestrator.sweep.schema import choice_values, field_type, flatten, is_list_field
from orchestrator.tracking.conventions import SWEEP_AXIS_PREFIX


@dataclass(frozen=True)
class Choice:
    """One point of one axis: the words it adds to the run name, the values it sets, its tags."""

    label: tuple[str, ...]
    values: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)
    seed_part: str | None = None  # the label word that names the seed (left out of table rows)


def grid_axes(
    grid: Mapping[str, Any], max_trials: int | None = None
) -> list[tuple[str, list[Choice]]]:
    """The grid's axes in order, each as its list of choices (validated, with errors naming the field).

    With `max_trials`, a grid of more points is refused before its axes are crossed (an axis's
    sub-grids too): planning a refused sweep costs the size of its YAML, not of its product.
    """
    axes = []
    total = 1
    for axis, spec in flatten(grid, leaf=lambda k, v: k not in SECTIONS).items():
        where = f"sweep.grid.{axis}"
        if isinstance(spec, Mapping):
            choices = _named_axis(where, axis, spec, max_trials)
        else:
            field_type(where, axis)
            choices = [
                Choice((word,), {axis: v}, seed_part=word if axis == "seed" else None)
                for v, word in ((v, value_word(axis, v)) for v in choice_values(where, axis, spec))
            ]
        axes.append((axis, choices))
        total *= len(choices)
        if max_trials is not None and total > max_trials:
            refuse_too_many(total, [len(c) for _, c in axes], max_trials)
    _check_disjoint(axes)
    return axes


def _named_axis(
    where: str, axis: str, spec: Mapping[str, Any], max_trials: int | None
) -> list[Choice]:
    """A named axis's choices: each name's set of values, its sub-grid expanded."""
    if axis.split(".")[0] in SECTIONS or axis == "seed":
        raise ConfigError(
            f"{where}: {axis!r} names a config field, so its value must be a list of "
            "values, not a mapping; a named axis needs a name that is not a config section "
            f"or field (such as 'method' or 'tasks'), not {axis.split('.')[0]!r}"
        )
    if not spec:
        raise ConfigError(f"{where} is empty: a named axis maps names to the values they set")
    choices = []
    for name, values in spec.items():
        if not isinstance(name, str) or not SWEEP_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: the name {short_repr(name)} is not allowed: use letters, digits, '.', '_' or '-'"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{where}.{name}={short_repr(values)} must be a mapping of dotted keys to values, e.g. {{adapter.method: lora}}"
            )
        subgrid = _subgrid(f"{where}.{name}", flatten(values), max_trials)
        for label, vals, seed_part in subgrid:
            choices.append(
                Choice((name, *label), vals, {f"{SWEEP_AXIS_PREFIX}{axis}": name}, seed_part)
            )
    return choices


def refuse_too_many(n: int, sizes: list[int], max_trials: int, more: bool = True) -> None:
    """Raise the ConfigError of a sweep of `n` trials (axes of `sizes`) over sweep.max_trials."""
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


def _subgrid(
    where: str, values: Mapping[str, Any], max_trials: int | None = None
) -> list[tuple[tuple[str, ...], dict[str, Any], str | None]]:
    """A named set's values: a list for a scalar field (a list of lists for a list field) is a sub-grid."""
    fixed, axes = {}, []
    for key, v in values.items():
        field_type(f"{where}.{key}", key)
        is_grid = isinstance(v, list) and (
            not is_list_field(key) or (v and all(isinstance(x, list) for x in v))
        )
        if is_grid:
            axes.append((key, choice_values(f"{where}.{key}", key, v)))
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


def _round(x: float) -> float:
    return float(f"{x:.4g}")
