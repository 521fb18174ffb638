"""`load_task`: read a task's hub splits (hub, local files or generator) and cut them by policy.

Split policies (METHOD.md, "Tasks and protocol"), all deterministic and unshuffled:

- `paper`: hub train trains. Where the hub test split has labels (ARC, OpenBookQA) hub validation
  validates and hub test tests; where it has none (BoolQ, WinoGrande) hub validation is cut 1 : 2,
  its first `n // 3` rows validate and the rest test.
- `laplace`: the first `n - ceil(n / 5)` rows of hub train train and the last `ceil(n / 5)` validate
  (the sizes of `datasets`' `train_test_split(test_size=0.2, shuffle=False)`); hub validation tests.
- `blob`: hub train trains, hub validation tests; there is no validation split.

Evaluation-only sets (the MMLU subjects, `demo_ood`) have only `test` (their hub test split) under
every policy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets

from melora.tasks.errors import TaskError
from melora.tasks.prompts import check_style
from melora.tasks.registry import Example, TaskSpec, get_task

SPLIT_POLICIES = ("paper", "laplace", "blob")
SPLIT_NAMES = ("train", "validation", "test")

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "context": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "n_choices": datasets.Value("int64"),
        "task": datasets.Value("string"),
        "prompt_style": datasets.Value("string"),
        "prompt": datasets.Value("string"),
    }
)


def split_plan(spec: TaskSpec, split_policy: str) -> dict[str, tuple[str, str]]:
    """Map each split the policy gives to `(hub split, part)`, part being "all", "head" or "tail".

    "head" / "tail" are the two pieces of the policy's cut of that hub split.
    """
    if split_policy not in SPLIT_POLICIES:
        raise TaskError(
            f"split_policy={split_policy!r} is not a split policy; use one of {list(SPLIT_POLICIES)}"
        )
    if spec.test_only:
        return {"test": ("test", "all")}
    if split_policy == "paper":
        if spec.labelled_test:
            return {
                "train": ("train", "all"),
                "validation": ("validation", "all"),
                "test": ("test", "all"),
            }
        return {
            "train": ("train", "all"),
            "validation": ("validation", "head"),
            "test": ("validation", "tail"),
        }
    if split_policy == "laplace":
        return {
            "train": ("train", "head"),
            "validation": ("train", "tail"),
            "test": ("validation", "all"),
        }
    return {"train": ("train", "all"), "test": ("validation", "all")}


def cut_point(n: int, split_policy: str) -> int:
    """Rows before the cut in a hub split of `n` rows: the policy's "head" piece."""
    if split_policy == "paper":
        return n // 3  # 1 : 2, validation first
    return n - -(-n // 5)  # laplace: 80 / 20, the 20 rounded up as in `train_test_split`


def load_task(
    name: str,
    split_policy: str = "paper",
    data_dir: str | os.PathLike | None = None,
    prompt_style: str = "laplace",
    splits: Sequence[str] | None = None,
) -> dict[str, datasets.Dataset]:
    """Load task `name` as `{"train" | "validation" | "test": Dataset}` under `split_policy`.

    With `data_dir=None` the hub splits come from the Hugging Face hub (`datasets.load_dataset`);
    otherwise from `<data_dir>/<folder>/<split>.jsonl` (or `.parquet`) in the hub's schema.
    The demo tasks are generated in code and ignore `data_dir`. `splits` (a name or a sequence
    of names) picks some of the policy's splits, so that, say, evaluation needs no training file;
    only the hub splits those need are read.

    Each row has `id, question, context, choices, label, n_choices, task, prompt_style` and the
    rendered `prompt` (the fields let `fit_prompt` re-render a prompt it must shorten).
    """
    spec = get_task(name)
    check_style(prompt_style)
    plan = split_plan(spec, split_policy)
    wanted = _wanted_splits(plan, splits, name, split_policy)
    hub_rows: dict[str, list[Example]] = {}
    for hub_split in dict.fromkeys(plan[s][0] for s in wanted):
        hub_rows[hub_split] = _read_hub_split(spec, hub_split, data_dir)
    out = {}
    for split in wanted:
        hub_split, part = plan[split]
        rows = hub_rows[hub_split]
        cut = cut_point(len(rows), split_policy)
        rows = {"all": rows, "head": rows[:cut], "tail": rows[cut:]}[part]
        out[split] = prompts_dataset(rows, spec, prompt_style)
    return out


def _wanted_splits(
    plan: dict[str, Any], splits: Sequence[str] | None, name: str, split_policy: str
) -> list[str]:
    if splits is None:
        return list(plan)
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in plan]
    if unknown:
        raise TaskError(
            f"splits={list(splits)}: task {name!r} under split_policy={split_policy!r} has no "
            f"split {unknown}; its splits are {list(plan)}"
        )
    return [s for s in SPLIT_NAMES if s in splits]


def _read_hub_split(
    spec: TaskSpec, hub_split: str, data_dir: str | os.PathLike | None
) -> list[Example]:
    raw: Iterable[dict[str, Any]]
    if spec.generate is not None:
        raw, where = spec.generate(hub_split), f"the {spec.name} generator"
    elif data_dir is None:
        raw, where = _from_hub(spec, hub_split), f"{spec.hub_path} split {hub_split!r}"
    else:
        path = _local_file(spec, hub_split, Path(data_dir))
        raw, where = _read_file(path), str(path)
    rows = []
    for i, row in enumerate(raw):
        try:
            rows.append(spec.parse(row, f"{hub_split}-{i}"))
        except (TaskError, KeyError, TypeError, ValueError) as err:
            raise TaskError(
                f"{where}, row {i}: {err}; rows must follow the hub schema of {spec.hub_path}"
            ) from err
    return rows


def _from_hub(spec: TaskSpec, hub_split: str) -> list[dict[str, Any]]:
    try:
        return list(datasets.load_dataset(spec.hub_path, spec.hub_config, split=hub_split))
    except Exception as err:  # network, auth, missing config: all need the same advice
        raise TaskError(
            f"could not load {spec.hub_path} ({spec.hub_config}) split {hub_split!r} from the "
            f"Hugging Face hub: {err}. Without internet, pass data_dir=<folder> holding "
            f"{spec.folder}/{spec.files[hub_split]}.jsonl"
        ) from err


def _local_file(spec: TaskSpec, hub_split: str, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise TaskError(
            f"data_dir={str(data_dir)!r} is not a folder: pass the folder that holds one sub-folder "
            f"per dataset (e.g. {spec.folder}/), or data_dir=None to download from the Hugging Face hub"
        )
    folder = data_dir / spec.folder
    if not folder.is_dir():
        raise TaskError(
            f"data_dir={str(data_dir)!r} has no sub-folder {spec.folder!r} for task {spec.name!r}: "
            f"put {spec.folder}/{spec.files[hub_split]}.jsonl there (hub schema of {spec.hub_path}), "
            f"or pass the right data_dir"
        )
    stem = spec.files[hub_split]
    for suffix in (".jsonl", ".parquet"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    present = sorted(p.name for p in folder.iterdir())
    raise TaskError(
        f"{folder / stem}.jsonl (or .parquet) is missing: task {spec.name!r} needs its hub split "
        f"{hub_split!r} there (the folder has {present}); add the file, or pass splits=... to load "
        f"only the splits you have"
    )


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # why: only a .parquet split needs pyarrow

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{path}, line {line_no}: not valid JSON ({err})") from err
    return rows


def prompts_dataset(rows: list[Example], spec: TaskSpec, prompt_style: str) -> datasets.Dataset:
    """Normalised rows of task `spec` as a `Dataset` of `FEATURES`, each with its number of
    choices, its task, its prompt style and its `prompt` rendered in that style: the last step
    of `load_task`, and how `melora.predict` turns a user's prompts into a split."""
    records = [
        {
            **row,
            "n_choices": len(row["choices"]),
            "task": spec.name,
            "prompt_style": prompt_style,
            "prompt": spec.render(prompt_style, row),
        }
        for row in rows
    ]
    return datasets.Dataset.from_list(records, features=FEATURES)
