"""The prompts a user asks a trained adapter: a row of the task's hub schema or the plain form
`{"question": ..., "choices": [...], "context": ..., "label": ..., "id": ...}`, checked against the
task and normalised to an `Example` (`normalise_prompt`), one by one or from a JSONL file
(`read_prompts`). Every error names the prompt (its index, or its file and line) and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from melora.tasks import TaskError, TaskSpec, get_task
from melora.tasks.registry import Example

_PARSE_ERRORS = (TaskError, KeyError, TypeError, ValueError, AttributeError)
_EXAMPLE_FIELDS = {"question", "context", "choices", "label"}  # what a parsed hub row gives


def normalise_prompt(row: Any, spec: TaskSpec, where: str, fallback_id: str) -> Example:
    """One prompt as a normalised `Example` of task `spec`; `label` is None when it has none.

    `row` is a row of the task's hub schema (parsed by the task's own parser) or the plain form
    (module doc). A `TaskError` naming `where` and the field says what is wrong.
    """
    if not isinstance(row, Mapping):
        raise TaskError(
            f"{where}: a prompt is a JSON object such as "
            f'{{"question": "...", "choices": ["...", "..."]}}, got {type(row).__name__}'
        )
    try:
        parsed: dict[str, Any] | None = dict(spec.parse(dict(row), fallback_id))
        hub_error = None
    except _PARSE_ERRORS as err:
        parsed, hub_error = None, err
    if parsed is None or not _EXAMPLE_FIELDS <= parsed.keys():  # not a labelled hub row
        parsed = _plain_prompt(row, spec, where, hub_error)
    if parsed.get("id") is None:
        parsed["id"] = fallback_id
    parsed.setdefault("context", "")
    return _checked(parsed, spec, where)


def _plain_prompt(
    row: Mapping[str, Any], spec: TaskSpec, where: str, hub_error: BaseException | None
) -> dict[str, Any]:
    passage = spec.kind == "passage"
    needed = ("question",) if passage else ("question", "choices")
    missing = [name for name in needed if name not in row]
    if missing:
        hub = f" ({hub_error})" if hub_error is not None else ""
        raise TaskError(
            f"{where}: the field(s) {missing} are missing: a prompt needs 'question' and "
            f"'choices' (a list of strings), or a row in the hub schema of task {spec.name!r}{hub}"
        )
    choices = row.get("choices", list(spec.answers))
    if passage and choices != list(spec.answers):
        raise TaskError(
            f"{where}: 'choices' must be left out or be {list(spec.answers)}: task {spec.name!r} "
            "answers a question about a passage ('context') with those answers"
        )
    return {
        "id": row.get("id"),
        "question": row["question"],
        "context": row.get("context", ""),
        "choices": choices,
        "label": row.get("label"),
    }


def _checked(parsed: Mapping[str, Any], spec: TaskSpec, where: str) -> Example:
    """A clean `Example` with the fields checked against the task (types, number of choices)."""
    for name in ("question", "context"):
        if not isinstance(parsed[name], str):
            raise TaskError(
                f"{where}: '{name}' must be a string, got {type(parsed[name]).__name__}"
            )
    choices = parsed["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a list of strings, got {choices!r:.200}")
    k = len(spec.answers)
    if not 2 <= len(choices) <= k:
        raise TaskError(
            f"{where}: 'choices' has {len(choices)} entries; task {spec.name!r} answers with "
            f"{list(spec.answers)}, so a prompt has 2 to {k} choices"
        )
    label = parsed.get("label")
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices)
    ):
        raise TaskError(
            f"{where}: 'label' must be the index of the right choice, an integer in "
            f"[0, {len(choices)}), or left out; got {label!r:.100}"
        )
    return Example(
        id=str(parsed["id"]),
        question=parsed["question"],
        context=parsed["context"],
        choices=list(choices),
        label=label,  # type: ignore[typeddict-item]  # None: no label given
    )


def read_prompts(path: str | os.PathLike, task: str) -> list[Example]:
    """The prompts of a JSONL file (one JSON object a line; blank lines are skipped), checked
    against task `task` (`normalise_prompt`); errors name the file and the line."""
    spec = get_task(task)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read the prompts file {path}: {err}") from None
    prompts = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err})") from None
        prompts.append(normalise_prompt(row, spec, where, fallback_id=f"line-{line_no}"))
    if not prompts:
        raise TaskError(f"{path} holds no prompts: write one JSON object per line")
    return prompts
