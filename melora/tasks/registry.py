"""The task table: where each dataset lives, its schema, its answers and its prompt kind.

Every source row is turned into one normalised example with the fields of `Example`, so the
prompt templates, the split policies and the batching never look at a source schema again.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from melora.tasks import demo
from melora.tasks.errors import TaskError
from melora.tasks.prompts import LETTERS, render


class Example(TypedDict):
    """One normalised example; `label` indexes `choices` (and the task's answers)."""

    id: str
    question: str
    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """Everything `load_task` needs to know about one task.

    - `hub_path`, `hub_config`: the Hugging Face hub dataset id and config name.
    - `folder`, `files`: the sub-folder of `data_dir`, and the file stem (".jsonl" or ".parquet")
      of each hub split read there.
    - `answers`: the answer strings, in class-index order.
    - `kind`: which template: "choice" (question + lettered choices), "passage" (BoolQ), "demo".
    - `parse`: (source row, fallback id) -> normalised `Example`.
    - `labelled_test`: the hub's test split has labels (ARC, OBQA) or not (BoolQ, WinoGrande).
    - `test_only`: an evaluation-only OOD set (the MMLU subjects, `demo_ood`).
    - `capitalise_choices`: `laplace` style upper-cases each choice's first letter (ARC, OBQA).
    - `generate`: for tasks made in code, hub split -> rows (already normalised).
    """

    name: str
    hub_path: str
    hub_config: str | None
    folder: str
    files: Mapping[str, str]
    answers: tuple[str, ...]
    kind: str
    parse: Callable[[dict[str, Any], str], Example]
    labelled_test: bool = True
    test_only: bool = False
    capitalise_choices: bool = False
    generate: Callable[[str], list[dict[str, Any]]] | None = None

    def render(self, prompt_style: str, example: Mapping[str, Any]) -> str:
        """The prompt of one normalised example of this task in `prompt_style`."""
        return render(
            prompt_style,
            self.kind,
            example["question"],
            example["context"],
            example["choices"],
            capitalise=self.capitalise_choices,
        )


def _need(row: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if n not in row]
    if missing:
        raise TaskError(f"the row lacks the field(s) {missing}; it has {sorted(row)}")
    return [row[n] for n in names]


def _letter_index(answer_key: str, labels: list[str]) -> int:
    """Position of `answer_key` in `labels`; labels must run "A", "B", ... or "1", "2", ..."""
    if labels not in ([*LETTERS[: len(labels)]], [str(i + 1) for i in range(len(labels))]):
        raise TaskError(
            f"choice labels {labels} are neither 'A', 'B', ... nor '1', '2', ... in order"
        )
    if answer_key not in labels:
        raise TaskError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return labels.index(answer_key)


def _arc_like(question_field: str) -> Callable[[dict[str, Any], str], Example]:
    def parse(row: dict[str, Any], fallback_id: str) -> Example:
        question, choices, key = _need(row, question_field, "choices", "answerKey")
        texts, labels = list(choices["text"]), list(choices["label"])
        return Example(
            id=str(row.get("id") or fallback_id),
            question=question,
            context="",
            choices=texts,
            label=_letter_index(str(key), labels),
        )

    return parse


def _parse_boolq(row: dict[str, Any], fallback_id: str) -> Example:
    question, answer, passage = _need(row, "question", "answer", "passage")
    return Example(
        id=fallback_id,
        question=question,
        context=passage,
        choices=["False", "True"],
        label=int(bool(answer)),
    )


def _parse_winogrande(row: dict[str, Any], fallback_id: str) -> Example:
    sentence, option1, option2, answer = _need(row, "sentence", "option1", "option2", "answer")
    if str(answer) not in ("1", "2"):
        raise TaskError(
            f"WinoGrande answer {answer!r} is not '1' or '2' (the hub's test split is unlabelled)"
        )
    return Example(
        id=fallback_id,
        question=sentence,
        context="",
        choices=[option1, option2],
        label=int(answer) - 1,
    )


def _parse_mmlu(row: dict[str, Any], fallback_id: str) -> Example:
    question, choices, answer = _need(row, "question", "choices", "answer")
    if not 0 <= int(answer) < len(choices):
        raise TaskError(f"MMLU answer {answer!r} is not an index into its {len(choices)} choices")
    return Example(
        id=fallback_id, question=question, context="", choices=list(choices), label=int(answer)
    )


def _parse_demo(row: dict[str, Any], fallback_id: str) -> Example:
    return Example(**row)  # the demo generator already writes normalised examples


_SPLITS3 = {"train": "train", "validation": "validation", "test": "test"}


def _arc(name: str, config: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        hub_path="allenai/ai2_arc",
        hub_config=config,
        folder=name,
        files=_SPLITS3,
        answers=("A", "B", "C", "D", "E"),
        kind="choice",
        parse=_arc_like("question"),
        capitalise_choices=True,
    )


def _winogrande(size: str) -> TaskSpec:
    return TaskSpec(
        name=f"winogrande_{size}",
        hub_path="allenai/winogrande",
        hub_config=f"winogrande_{size}",
        folder="winogrande",  # every size shares the dev set: validation.jsonl
        files={"train": f"train_{size}", "validation": "validation"},
        answers=("A", "B"),
        kind="choice",
        parse=_parse_winogrande,
        labelled_test=False,
    )


def _mmlu(subject: str) -> TaskSpec:
    return TaskSpec(
        name=f"mmlu_{subject}",
        hub_path="cais/mmlu",
        hub_config=subject,
        folder=f"mmlu_{subject}",
        files={"test": "test"},
        answers=("A", "B", "C", "D"),
        kind="choice",
        parse=_parse_mmlu,
        test_only=True,
    )


def _demo(name: str, generate, answers=demo.ANSWERS, test_only: bool = False) -> TaskSpec:
    """A demo task: its rows come from `generate(hub_split)` (melora.tasks.demo)."""
    return TaskSpec(
        name=name,
        hub_path="",
        hub_config=None,
        folder="",
        files={"test": "test"} if test_only else _SPLITS3,
        answers=answers,
        kind="demo",
        parse=_parse_demo,
        test_only=test_only,
        generate=generate,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        _winogrande("s"),
        _winogrande("m"),
        _arc("arc_challenge", "ARC-Challenge"),
        _arc("arc_easy", "ARC-Easy"),
        TaskSpec(
            name="openbookqa",
            hub_path="allenai/openbookqa",
            hub_config="main",
            folder="openbookqa",
            files=_SPLITS3,
            answers=("A", "B", "C", "D"),
            kind="choice",
            parse=_arc_like("question_stem"),
            capitalise_choices=True,
        ),
        TaskSpec(
            name="boolq",
            hub_path="google/boolq",
            hub_config=None,
            folder="boolq",
            files={"train": "train", "validation": "validation"},
            answers=("False", "True"),  # label = int(answer)
            kind="passage",
            parse=_parse_boolq,
            labelled_test=False,
        ),
        _mmlu("college_chemistry"),
        _mmlu("college_physics"),
        _mmlu("college_mathematics"),
        # Generated in code (melora.tasks.demo), never read from disk or the hub.
        _demo("demo", demo.in_distribution),
        _demo("demo_ood", demo.out_of_distribution, answers=demo.OOD_ANSWERS, test_only=True),
        _demo("demo_small", demo.small_in_distribution),
        _demo("demo_shift", demo.shifted, test_only=True),
    ]
}


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`, or a `TaskError` that lists the known names."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TaskError(f"unknown task {name!r}{hint}; the tasks are {sorted(TASKS)}")
