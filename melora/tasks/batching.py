"""From rendered prompts to model batches: answer tokens, length-capped token ids, left padding.

The batch contract (what `melora.evaluation` reads), for B rows, T positions, K answers:

- `input_ids` (B, T) long, left-padded, so position -1 is every row's last prompt token;
- `attention_mask` (B, T) long, 0 on padding;
- `labels` (B,) long, the class index of each row (an index into the task's answers);
- `answer_token_ids` (K,) long, the token id of each of the task's answers, the same for all rows;
- `choice_mask` (B, K) bool, True where the row has that choice (an ARC row with 3 choices has
  A, B, C but not D, E).

The class logits are `model(input_ids, attention_mask).logits[:, -1, answer_token_ids]` with
-inf where `choice_mask` is False. (With left padding the real tokens of a row sit at shifted
positions; rotary position embeddings depend only on relative positions, so this changes nothing.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from melora.tasks.errors import TaskError
from melora.tasks.prompts import template
from melora.tasks.registry import get_task

MAX_LENGTH = 300  # the paper's max length (Table 7)


def _describe(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "<unnamed>"
    return f"{name!r} ({type(tokenizer).__name__})"


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_token_ids(tokenizer: Any, answers: Sequence[str], cue: str = "Answer:") -> list[int]:
    """The one token id of each answer string, as the model would read it right after `cue`.

    Each answer is tried as `" " + answer` (what follows "Answer:" in running text, and what both
    reference codes use: SentencePiece "▁A", byte-level BPE "ĠA"), then as `answer` itself (a
    character-level tokenizer, where the space is a token of its own). A form counts when encoding
    `cue + form` gives the tokens of `cue` plus exactly one more, not the unknown token. The first
    form that works for every answer, with distinct ids, is used for all of them.
    """
    cue_ids = _plain_ids(tokenizer, cue)
    unk = getattr(tokenizer, "unk_token_id", None)

    def after_cue(text: str) -> list[int]:
        ids = _plain_ids(tokenizer, cue + text)
        return ids[len(cue_ids) :] if ids[: len(cue_ids)] == cue_ids else ids

    def one_token(ids: list[int]) -> bool:
        return len(ids) == 1 and ids[0] != unk

    forms = {sep: [after_cue(sep + answer) for answer in answers] for sep in (" ", "")}
    for encoded in forms.values():
        ids = [t[0] for t in encoded if one_token(t)]
        if len(ids) == len(answers) and len(set(ids)) == len(ids):
            return ids
    # Name the first answer that has no single-token form (else the first: the ids collide).
    bad = [i for i in range(len(answers)) if not any(one_token(f[i]) for f in forms.values())]
    i = bad[0] if bad else 0
    space, bare = (tokenizer.convert_ids_to_tokens(forms[sep][i]) for sep in (" ", ""))
    raise TaskError(
        f"answer {answers[i]!r} is not one token of tokenizer {_describe(tokenizer)}: after {cue!r}, "
        f"{' ' + answers[i]!r} encodes as {space} and {answers[i]!r} as {bare}; the answers "
        f"{list(answers)} must each be a single, distinct, known token (in the same form): use a "
        f"tokenizer (model) whose vocabulary has them"
    )


def fit_prompt(tokenizer: Any, example: dict[str, Any], max_length: int = MAX_LENGTH) -> list[int]:
    """Token ids of the example's prompt, at most `max_length` (special tokens included).

    A prompt that is too long is re-rendered with its longest free-text field (the passage, or
    the question) cut token-wise at the end, keeping as many of its tokens as fit (a binary
    search); only if emptying that field is not enough is the other one cut too. The template,
    the choices and the answer cue always stay whole.
    """
    ids = list(tokenizer(example["prompt"])["input_ids"])
    if len(ids) <= max_length:
        return ids
    spec = get_task(example["task"])
    fields = {"question": example["question"], "context": example["context"]}

    def prompt_ids(values: dict[str, str]) -> list[int]:
        prompt = spec.render(example["prompt_style"], {**example, **values})
        return list(tokenizer(prompt)["input_ids"])

    field_ids = {name: _plain_ids(tokenizer, text) for name, text in fields.items()}

    def cut(values: dict[str, str], name: str, keep: int) -> dict[str, str]:
        return {**values, name: tokenizer.decode(field_ids[name][:keep], skip_special_tokens=True)}

    for name in sorted(fields, key=lambda n: -len(field_ids[n])):
        if len(prompt_ids(cut(fields, name, 0))) > max_length:
            # Emptying this field is not enough on its own: empty it and cut the next one too.
            fields = cut(fields, name, 0)
            continue
        fits, too_long = 0, len(field_ids[name])
        while too_long - fits > 1:
            mid = (fits + too_long) // 2
            if len(prompt_ids(cut(fields, name, mid))) <= max_length:
                fits = mid
            else:
                too_long = mid
        return prompt_ids(cut(fields, name, fits))
    raise TaskError(
        f"example {example['id']!r} of {example['task']!r}: without its question and passage the "
        f"prompt still takes {len(prompt_ids(fields))} tokens > max_length={max_length}; "
        f"raise max_length"
    )


def token_ids(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int = MAX_LENGTH
) -> list[list[int]]:
    """Each prompt's token ids, cut to `max_length` by `fit_prompt` where needed."""
    all_ids = tokenizer(list(dataset["prompt"]))["input_ids"]
    return [
        list(ids) if len(ids) <= max_length else fit_prompt(tokenizer, dataset[i], max_length)
        for i, ids in enumerate(all_ids)
    ]


def encode(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int = MAX_LENGTH
) -> datasets.Dataset:
    """`dataset` (from `load_task`) with an `input_ids` column: the prompts' ids, capped."""
    ids = token_ids(dataset, tokenizer, max_length)
    if "input_ids" in dataset.column_names:
        dataset = dataset.remove_columns("input_ids")
    return dataset.add_column("input_ids", ids)


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else BOS (masked out either way)."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise TaskError(
        f"tokenizer {_describe(tokenizer)} has no pad, EOS or BOS token to pad with; "
        f"set tokenizer.pad_token"
    )


@dataclass(frozen=True)
class Collator:
    """Turns rows with `input_ids`, `label`, `n_choices` into a left-padded batch (module doc)."""

    answer_token_ids: tuple[int, ...]
    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        k = len(self.answer_token_ids)
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, width - n :] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, width - n :] = 1
        n_choices = torch.tensor([r["n_choices"] for r in rows], dtype=torch.long)
        if int(n_choices.max()) > k:
            raise TaskError(
                f"a row has {int(n_choices.max())} choices but the task has only {k} answers"
            )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
            "answer_token_ids": torch.tensor(self.answer_token_ids, dtype=torch.long),
            "choice_mask": torch.arange(k)[None, :] < n_choices[:, None],
        }


def make_collator(dataset: datasets.Dataset, tokenizer: Any) -> Collator:
    """The `Collator` for a dataset from `load_task`: its task's answers, as tokens of `tokenizer`."""
    tasks, styles = set(dataset.unique("task")), set(dataset.unique("prompt_style"))
    if len(tasks) != 1 or len(styles) != 1:
        raise TaskError(
            f"a loader serves one task in one prompt style; this dataset mixes tasks "
            f"{sorted(tasks)} and styles {sorted(styles)}: make one loader per task"
        )
    spec = get_task(tasks.pop())
    cue = template(styles.pop(), spec.kind).cue
    return Collator(tuple(answer_token_ids(tokenizer, spec.answers, cue)), pad_token_id(tokenizer))


def make_loader(
    dataset: datasets.Dataset,
    tokenizer: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int = MAX_LENGTH,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A `DataLoader` of batches (module doc) over a dataset from `load_task`.

    Tokenises (`token_ids`) unless the dataset already has `input_ids`. `shuffle` draws the order
    from a generator seeded with `seed`; to shard the data pass `sampler` (say a
    `DistributedSampler`, which shuffles by itself) instead.
    """
    if shuffle and sampler is not None:
        raise TaskError("pass shuffle=True or a sampler, not both: the sampler decides the order")
    collator = make_collator(dataset, tokenizer)
    if "input_ids" in dataset.column_names:
        ids = dataset["input_ids"]
    else:
        ids = token_ids(dataset, tokenizer, max_length)
    rows = [
        {"input_ids": i, "label": label, "n_choices": n}
        for i, label, n in zip(ids, dataset["label"], dataset["n_choices"], strict=True)
    ]
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last,
        collate_fn=collator,
    )
