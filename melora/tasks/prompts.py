"""The two reference prompt styles, as one table of templates.

`laplace` follows Laplace-LoRA (Yang et al. 2024, `run_gpt.py`); `blob` follows BLoB
(Wang et al. 2024, `bayesian-peft/dataset/utils/dsets.py`, zero-shot preambles). Where the
reference code has an evident slip, the template here is the intended text, not the slip:

- BLoB's OpenBookQA preamble spells "Chioces"; here it is "Choices".
- BLoB's ARC / OpenBookQA choice lines zip (text, label) the wrong way round ("dry palms) A");
  here they read "A) dry palms".
- Laplace-LoRA's WinoGrande line is "A. {option1}. B {option2}."; here "B." has its period.
- Laplace-LoRA's BoolQ prompt has no answer cue (it appends an EOS token); here it ends with
  " Answer:" so every prompt of the style ends with the same cue.

Laplace-LoRA also ends each choice with a period ("A. Ian.") and, for ARC and OpenBookQA,
capitalises its first letter ("A. Dry palms."); the `laplace` style does the same (capitalising
only where the task asks for it: MMLU's "k = 0" must stay "k = 0"). Choice letters are always "A", "B", ... by position, whatever
labels the source file uses (some ARC items use "1".."4").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from melora.tasks.errors import TaskError

PROMPT_STYLES = ("laplace", "blob")
LETTERS = "ABCDE"


@dataclass(frozen=True)
class Template:
    """A prompt layout: `text` has the fields {question}, {context} and {choices}.

    `cue` is the text every rendered prompt ends with; the answer token follows it.
    """

    text: str
    choice_line: str  # one choice, with {letter} and {text}
    choice_sep: str
    cue: str
    choice_period: bool = False  # end each choice text with "." (Laplace-LoRA)


_LAPLACE_CHOICE = Template(
    text="Select one of the choices that answers the following question: {question} Choices: {choices} Answer:",
    choice_line="{letter}. {text}",
    choice_sep=" ",
    cue="Answer:",
    choice_period=True,
)
_BLOB_CHOICE = Template(
    text="Return the label of the correct answer for the question below.\n\nQuestion: {question}\nChoices:\n{choices}\nAnswer:",
    choice_line="{letter}) {text}",
    choice_sep="\n",
    cue="Answer:",
)

# The demo tasks keep each style's layout and cue but drop the instruction sentence: the demo
# model reads characters, and a 60-character preamble would double its sequence length.
TEMPLATES: dict[tuple[str, str], Template] = {
    ("laplace", "choice"): _LAPLACE_CHOICE,
    ("laplace", "passage"): Template(
        text="Answer the question with only True or False: {question} Context: {context} Answer:",
        choice_line="",
        choice_sep="",
        cue="Answer:",
    ),
    ("laplace", "demo"): Template(
        text="{question} Choices: {choices} Answer:",
        choice_line="{letter}. {text}",
        choice_sep=" ",
        cue="Answer:",
    ),
    ("blob", "choice"): _BLOB_CHOICE,
    ("blob", "passage"): Template(
        text="Read the passage below and answer the question with the words 'true' or 'false'.\n\nPassage: {context}\nQuestion: {question}\nAnswer (true or false):",
        choice_line="",
        choice_sep="",
        cue="Answer (true or false):",
    ),
    ("blob", "demo"): Template(
        text="Question: {question}\nChoices:\n{choices}\nAnswer:",
        choice_line="{letter}) {text}",
        choice_sep="\n",
        cue="Answer:",
    ),
}


def check_style(prompt_style: str) -> str:
    """Return `prompt_style` if it is known, else raise a `TaskError` listing the styles."""
    if prompt_style not in PROMPT_STYLES:
        raise TaskError(
            f"prompt_style={prompt_style!r} is not a prompt style; use one of {list(PROMPT_STYLES)}"
        )
    return prompt_style


def template(prompt_style: str, kind: str) -> Template:
    """The template of one style for one kind of task ("choice", "passage" or "demo")."""
    return TEMPLATES[(check_style(prompt_style), kind)]


def _choice_text(tpl: Template, text: str, capitalise: bool) -> str:
    if tpl.choice_period:
        text = text if text.endswith(".") else text + "."
        if capitalise:
            text = text[:1].upper() + text[1:]
    return text


def render(
    prompt_style: str,
    kind: str,
    question: str,
    context: str,
    choices: Sequence[str],
    *,
    capitalise: bool = False,
) -> str:
    """The prompt of one example: the style's template filled with the example's fields.

    `capitalise` upper-cases the first letter of each choice where the style normalises choice
    texts (`laplace`); the task table says which tasks want it.
    """
    tpl = template(prompt_style, kind)
    lines = [
        tpl.choice_line.format(letter=LETTERS[i], text=_choice_text(tpl, c, capitalise))
        for i, c in enumerate(choices)
    ]
    return tpl.text.format(question=question, context=context, choices=tpl.choice_sep.join(lines))
