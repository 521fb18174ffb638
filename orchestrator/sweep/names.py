"""How a sweep names and shows things: run names made from a trial's values, values as the trial
list and tags print them, resources as the dry run prints them.

    value_word("adapter.sigma_p", 0.1)                    ->  "sigma_p0.1"
    trial_run_name("demo", ("melora", "seed1"))            ->  "demo-melora-seed1"
    format_value([1, 2])                                   ->  "[1, 2]"

Run names are stable (a resumed sweep finds each trial's runs again by them) and at most
MAX_RUN_NAME characters (a longer one is cut and ends in a hash of the whole).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import short_repr

MAX_RUN_NAME = 100
# a sweep's name and a named axis's names: MLflow parent run, folder and run-name prefix
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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
    return _UNSAFE.sub("_", text)


def trial_run_name(sweep: str, label: tuple[str, ...]) -> str:
    """'<sweep>-<label words>', cut to MAX_RUN_NAME characters (then ending in a hash)."""
    name = f"{sweep}-{'-'.join(label)}"
    if len(name) > MAX_RUN_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_RUN_NAME - 9]}-{digest}"
    return name


def file_stem(source: str) -> str:
    """The name a sweep gets from its YAML file: the file's stem, unsafe characters as '_'."""
    return _UNSAFE.sub("_", Path(source).stem)


def format_value(v: Any) -> str:
    """A value as the trial list and tags show it (JSON for lists, booleans and null)."""
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def short_value(v: Any, limit: int = 100) -> str:
    """`format_value` for a message, cut to about `limit` characters (never built whole)."""
    if isinstance(v, (list, dict)):
        return short_repr(v, limit)
    text = format_value(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_resources(r: Mapping[str, float]) -> str:
    """{'CPU': 1.0, 'GPU': 2.0} -> '{CPU: 1, GPU: 2}'."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(r.items())) + "}"
