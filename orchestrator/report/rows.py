"""Which runs make which row of the report, and the N (posterior samples) each row reports.

A `Run` is one training run as the report reads it (from a `tracking.RunRecord`); its row is the
paper's method row (`method_row`), split by the config fields that differ between runs of one
task and seed (`assign_rows`): "Me-LoRA (sigma_p=0.1)". `row_n` picks the N of a row. The policy
is described in orchestrator/report/build.py's docstring.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from melora.keys import parse_final_key
from orchestrator import tracking
from orchestrator.tracking.conventions import FAILURE_REASON_TAG, METHOD_TAG, SEED_TAG, TASK_TAG

ROW_ORDER = ("MAP", "LoRA", "MAP+TS", "MCD", "ENS", "LAP", "BLoB", "Me-LoRA", "Me-LoRA w/o noise")
PAPER_ROW = {  # our row -> the paper's row name
    "MAP": "MAP",
    "MCD": "MCD",
    "ENS": "ENS",
    "LAP": "LAP",
    "BLoB": "BLoB",
    "Me-LoRA": "Ours",
    "Me-LoRA w/o noise": "w/o noise",
}
N_PREFERENCE = {  # n_samples="paper": per method, the first N the runs logged
    "blob": (1, 10, 0),
    "melora": (1, 10, 0),
    "mcd": (10, 1, 0),
    "lap": (10, 1, 0),
    "lora": (0, 1, 10),
    "ens": (0, 1, 10),
    "ts": (0, 1, 10),
}
NOT_A_ROW_FIELD = ("name", "seed")  # with task.* and tracking.*: never splits a row

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class Run:
    """One training run as the report reads it."""

    run_id: str
    name: str
    status: str
    method: str
    label: str  # the row's method label (MAP, BLoB, Me-LoRA, ...)
    task: str
    seed: str
    ood_sets: tuple[str, ...]
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    reason: str | None
    quals: tuple[tuple[str, str], ...] = ()  # the fields that split the label's rows, and values
    row: str = ""  # the label with its qualifiers: "Me-LoRA (sigma_p=0.1)"


def to_run(r: tracking.RunRecord) -> Run:
    """The report's view of a tracked run: its method row, task, seed and OOD sets (its
    `task.ood_tasks`, then any other set it logged a final metric on)."""
    method = r.tags.get(METHOD_TAG) or r.params.get("adapter.method") or "?"
    task = r.tags.get(TASK_TAG) or r.params.get("task.name") or "?"
    ood = list(json_list(r.params.get("task.ood_tasks")))
    for key in r.metrics:
        parsed = parse_final_key(key)
        if parsed and parsed.split == "ood" and parsed.task not in ood:
            ood.append(parsed.task)
    return Run(
        run_id=r.run_id,
        name=r.name,
        status=r.status,
        method=method,
        label=method_row(method, r.params),
        task=task,
        seed=r.tags.get(SEED_TAG) or r.params.get("seed") or "?",
        ood_sets=tuple(ood),
        params=dict(r.params),
        metrics=dict(r.metrics),
        reason=r.tags.get(FAILURE_REASON_TAG),
    )


def method_row(method: str, params: Mapping[str, str]) -> str:
    """The paper's method row of a run (build.py's docstring): MAP, LoRA, MCD, ENS, LAP, BLoB, Me-LoRA, ..."""
    if method == "lora":
        return "MAP" if (as_float(params.get("optim.weight_decay")) or 0.0) > 0 else "LoRA"
    if method == "melora":
        noise = is_true(params.get("adapter.prior_noise", "true"))
        return "Me-LoRA" if noise else "Me-LoRA w/o noise"
    labels = {"blob": "BLoB", "mcd": "MCD", "ens": "ENS", "lap": "LAP", "ts": "MAP+TS"}
    return labels.get(method, method)


def assign_rows(runs: list[Run]) -> list[Run]:
    """Split a label's runs into rows by the config fields that differ between runs of one task
    and one seed (so fields that follow the seed, like an ensemble's member seeds, do not)."""
    out = []
    for label, group in group_by(runs, lambda r: r.label).items():
        alike = group_by(group, lambda r: (r.task, r.seed))
        keys = sorted(
            {
                k
                for same in alike.values()
                for k in {k for r in same for k in r.params}
                if _splits_rows(k) and len({r.params.get(k) for r in same}) > 1
            }
        )
        for r in group:
            quals = tuple((k, r.params.get(k, "?")) for k in keys)
            out.append(dataclasses.replace(r, quals=quals, row=row_name(label, quals)))
    by_id = {r.run_id: r for r in out}
    return [by_id[r.run_id] for r in runs]


def row_name(label: str, quals: Iterable[tuple[str, str]]) -> str:
    """'Me-LoRA (r=4, sigma_p=0.1)': a label qualified by the fields that split its rows."""
    text = ", ".join(f"{short_name(k)}={v}" for k, v in quals)
    return f"{label} ({text})" if text else label


def rows_of(runs: Iterable[Run]) -> list[str]:
    """The distinct rows of `runs`, in the paper's method order, then by qualifier values."""

    def key(r: Run):
        rank = ROW_ORDER.index(r.label) if r.label in ROW_ORDER else len(ROW_ORDER)
        values = [(as_float(v) is None, as_float(v) or 0.0, v) for _, v in r.quals]
        return (rank, r.label, values)

    return list(dict.fromkeys(r.row for r in sorted(runs, key=key)))


def _splits_rows(key: str) -> bool:
    return key not in NOT_A_ROW_FIELD and not key.startswith(("task.", "tracking."))


def row_n(runs: list[Run], n_samples: str | int) -> int | None:
    """The N reported for a row: `n_samples` when an integer, else the method's preference
    (N_PREFERENCE) among the N the runs logged; None for a row without runs."""
    if not runs:
        return None
    if isinstance(n_samples, int):
        return n_samples
    logged = {parsed.n for r in runs for k in r.metrics if (parsed := parse_final_key(k))}
    for n in N_PREFERENCE.get(runs[0].method, (0, 1, 10)):
        if n in logged:
            return n
    return min(logged) if logged else 0


def blob_notes(runs: list[Run]) -> list[str]:
    """How the BLoB rows were run, read from their params: the paper's replication (no flipout,
    Me-LoRA's KL regularisation with prior noise) or the official BLoB (flipout, a fixed prior)."""
    kinds = {
        (False, True): "as the paper re-implemented it",
        (True, False): "as the official BLoB",
    }
    settings = {
        (
            is_true(r.params.get("adapter.flipout", "true")),
            is_true(r.params.get("adapter.prior_noise", "true")),
        )
        for r in runs
        if r.method == "blob"
    }
    notes = []
    for flipout, noise in sorted(settings):
        prior = "on (Me-LoRA's KL regularisation)" if noise else "off (a fixed prior)"
        notes.append(
            f"BLoB rows {kinds.get((flipout, noise), 'in a variant')}: "
            f"flipout {'on' if flipout else 'off'}, prior noise {prior}"
        )
    return notes


def base_label(row: str) -> str:
    """'Me-LoRA (sigma_p=0.1)' -> 'Me-LoRA'."""
    return row.split(" (", 1)[0]


def our_label(paper_row: str) -> str:
    """Our label of a paper row: 'Ours' -> 'Me-LoRA'."""
    return next(k for k, v in PAPER_ROW.items() if v == paper_row)


def status_counts(runs: Iterable[Run]) -> str:
    """'1 FAILED, 28 FINISHED' ('none' without runs)."""
    counts = collections.Counter(r.status for r in runs)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def short_name(key: str) -> str:
    """'adapter.sigma_p' -> 'sigma_p'."""
    return key.rsplit(".", 1)[-1]


def group_by(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    """`items` grouped by `key`, groups and items in their first order."""
    out: dict[K, list[T]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def as_float(text) -> float | None:
    """`text` as a float, or None when it is not one."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def is_true(value: str) -> bool:
    """A boolean param as MLflow stores it ('True', 'false', '1', ...)."""
    return str(value).lower() in ("true", "1", "yes")


def json_list(text: str | None) -> list[str]:
    """A JSON list param ('["arc_easy"]') as strings; [] when absent or not a list."""
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
