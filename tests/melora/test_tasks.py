"""melora.tasks on the real shared data: split sizes per policy, exact prompts, answer tokens,
truncation, batches, the hub path (faked: nothing downloads) and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from melora.tasks import (
    TASKS,
    Collator,
    TaskError,
    answer_token_ids,
    demo_tokenizer,
    encode,
    fit_prompt,
    load_task,
    make_collator,
    make_loader,
)
from melora.tasks.demo import in_distribution, out_of_distribution

# Folder and hub-split file of each real task, written out here (not read from the registry).
FILES = {
    "winogrande_s": ("winogrande", {"train": "train_s", "validation": "validation"}),
    "winogrande_m": ("winogrande", {"train": "train_m", "validation": "validation"}),
    "arc_challenge": (
        "arc_challenge",
        {"train": "train", "validation": "validation", "test": "test"},
    ),
    "arc_easy": ("arc_easy", {"train": "train", "validation": "validation", "test": "test"}),
    "openbookqa": ("openbookqa", {"train": "train", "validation": "validation", "test": "test"}),
    "boolq": ("boolq", {"validation": "validation"}),  # no train file in ../shared/data
    "mmlu_college_chemistry": ("mmlu_college_chemistry", {"test": "test"}),
    "mmlu_college_physics": ("mmlu_college_physics", {"test": "test"}),
    "mmlu_college_mathematics": ("mmlu_college_mathematics", {"test": "test"}),
}
MMLU = {name for name in FILES if name.startswith("mmlu_")}


def test_registry_has_the_papers_tasks_and_the_demo() -> None:
    assert set(TASKS) == set(FILES) | {"demo", "demo_ood", "demo_small", "demo_shift"}


def _lines(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _expected_sizes(data_dir: Path, name: str, policy: str) -> dict[str, int]:
    """What each policy implies, from line counts (METHOD.md, 'Tasks and protocol')."""
    folder, files = FILES[name]
    n = {split: len(_lines(data_dir / folder / f"{stem}.jsonl")) for split, stem in files.items()}
    if name in MMLU:
        return {"test": n["test"]}
    if name == "boolq":  # evaluation splits only: the train file is absent
        return {
            "paper": {
                "validation": n["validation"] // 3,
                "test": n["validation"] - n["validation"] // 3,
            }
        }.get(policy, {"test": n["validation"]})
    if policy == "paper" and "test" in n:
        return {"train": n["train"], "validation": n["validation"], "test": n["test"]}
    if policy == "paper":
        third = n["validation"] // 3
        return {"train": n["train"], "validation": third, "test": n["validation"] - third}
    if policy == "laplace":
        n_val = -(-n["train"] // 5)  # 20 %, rounded up as datasets' train_test_split does
        return {"train": n["train"] - n_val, "validation": n_val, "test": n["validation"]}
    return {"train": n["train"], "test": n["validation"]}


@pytest.mark.parametrize("policy", ["paper", "laplace", "blob"])
@pytest.mark.parametrize("name", sorted(FILES))
def test_each_task_loads_with_the_sizes_its_policy_implies(
    data_dir: Path, name: str, policy: str
) -> None:
    expected = _expected_sizes(data_dir, name, policy)
    splits = list(expected) if name == "boolq" else None
    loaded = load_task(name, split_policy=policy, data_dir=data_dir, splits=splits)
    assert {split: len(ds) for split, ds in loaded.items()} == expected
    for ds in loaded.values():
        row = ds[0]
        assert row["task"] == name and row["prompt_style"] == "laplace"
        assert 0 <= row["label"] < row["n_choices"] == len(row["choices"])


def test_sizes_stated_in_the_issue(data_dir: Path) -> None:
    arc = load_task("arc_challenge", "paper", data_dir)
    assert [len(arc[s]) for s in ("train", "validation", "test")] == [1119, 299, 1172]
    boolq = load_task("boolq", "paper", data_dir, splits=("validation", "test"))
    assert (len(boolq["validation"]), len(boolq["test"])) == (1090, 2180)
    wino = load_task("winogrande_s", "paper", data_dir)
    assert [len(wino[s]) for s in ("train", "validation", "test")] == [640, 422, 845]
    arc_laplace = load_task("arc_challenge", "laplace", data_dir)
    assert [len(arc_laplace[s]) for s in ("train", "validation", "test")] == [895, 224, 299]


def test_policies_cut_in_file_order(data_dir: Path) -> None:
    raw = _lines(data_dir / "boolq" / "validation.jsonl")
    paper = load_task("boolq", "paper", data_dir, splits=("validation", "test"))
    assert paper["validation"][0]["question"] == raw[0]["question"]
    assert paper["validation"][-1]["question"] == raw[1089]["question"]
    assert paper["test"][0]["question"] == raw[1090]["question"]
    assert paper["test"][0]["label"] == int(raw[1090]["answer"])
    train = _lines(data_dir / "arc_challenge" / "train.jsonl")
    laplace = load_task("arc_challenge", "laplace", data_dir, splits=("train", "validation"))
    assert laplace["train"][-1]["id"] == train[894]["id"]
    assert laplace["validation"][0]["id"] == train[895]["id"]


def test_labels_follow_answer_keys_including_numeric_arc_labels(data_dir: Path) -> None:
    raw = _lines(data_dir / "arc_challenge" / "test.jsonl")
    test = load_task("arc_challenge", data_dir=data_dir, splits="test")["test"]
    numeric = [i for i, r in enumerate(raw) if r["choices"]["label"][0] == "1"]
    assert len(numeric) == 22  # SOURCES.md: 22 ARC-Challenge test items use "1".."4"
    for i in numeric:
        assert test[i]["label"] == int(raw[i]["answerKey"]) - 1
        assert test[i]["prompt"].split("Choices:")[1].startswith(" A. ")
    letters = [i for i in range(len(raw)) if i not in numeric]
    assert all(test[i]["label"] == "ABCDE".index(raw[i]["answerKey"]) for i in letters)


# The first row of one split per task, in each style: the exact prompt.
WINO = "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine."
PIRATES = (
    "In September 2017, producer Jerry Bruckheimer indicated that another Pirates of the Caribbean sequel is "
    "still possible if Dead Men Tell No Tales does well in its home release. In October 2017, Kaya Scodelario "
    "said that she was contracted to return for a sixth film. Shortly after, it was announced that Joachim "
    "Rønning is being eyed to direct the film."
)
LAPLACE = "Select one of the choices that answers the following question: "
BLOB = "Return the label of the correct answer for the question below.\n\nQuestion: "
PROMPTS = {
    ("winogrande_s", "laplace"): ("train", f"{LAPLACE}{WINO} Choices: A. Ian. B. Dennis. Answer:"),
    ("winogrande_s", "blob"): ("train", f"{BLOB}{WINO}\nChoices:\nA) Ian\nB) Dennis\nAnswer:"),
    ("winogrande_m", "laplace"): ("train", f"{LAPLACE}{WINO} Choices: A. Ian. B. Dennis. Answer:"),
    ("winogrande_m", "blob"): ("train", f"{BLOB}{WINO}\nChoices:\nA) Ian\nB) Dennis\nAnswer:"),
    ("arc_challenge", "laplace"): (
        "train",
        f"{LAPLACE}George wants to warm his hands quickly by rubbing them. Which skin surface will produce the "
        "most heat? Choices: A. Dry palms. B. Wet palms. C. Palms covered with oil. D. Palms covered with lotion. "
        "Answer:",
    ),
    ("arc_challenge", "blob"): (
        "train",
        f"{BLOB}George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most "
        "heat?\nChoices:\nA) dry palms\nB) wet palms\nC) palms covered with oil\nD) palms covered with lotion\n"
        "Answer:",
    ),
    ("arc_easy", "laplace"): (
        "train",
        f"{LAPLACE}Which factor will most likely cause a person to develop a fever? Choices: A. A leg muscle "
        "relaxing after exercise. B. A bacterial population in the bloodstream. C. Several viral particles on the "
        "skin. D. Carbohydrates being digested in the stomach. Answer:",
    ),
    ("arc_easy", "blob"): (
        "train",
        f"{BLOB}Which factor will most likely cause a person to develop a fever?\nChoices:\nA) a leg muscle "
        "relaxing after exercise\nB) a bacterial population in the bloodstream\nC) several viral particles on the "
        "skin\nD) carbohydrates being digested in the stomach\nAnswer:",
    ),
    ("openbookqa", "laplace"): (
        "train",
        f"{LAPLACE}The sun is responsible for Choices: A. Puppies learning new tricks. B. Children growing up and "
        "getting old. C. Flowers wilting in a vase. D. Plants sprouting, blooming and wilting. Answer:",
    ),
    ("openbookqa", "blob"): (
        "train",
        f"{BLOB}The sun is responsible for\nChoices:\nA) puppies learning new tricks\nB) children growing up and "
        "getting old\nC) flowers wilting in a vase\nD) plants sprouting, blooming and wilting\nAnswer:",
    ),
    ("boolq", "laplace"): (
        "test",
        "Answer the question with only True or False: will there be a pirates of the carribean 6 Context: "
        f"{PIRATES} Answer:",
    ),
    ("boolq", "blob"): (
        "test",
        "Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
        f"Passage: {PIRATES}\nQuestion: will there be a pirates of the carribean 6\nAnswer (true or false):",
    ),
    ("mmlu_college_chemistry", "laplace"): (
        "test",
        f"{LAPLACE}The rate, r, of a zero-order chemical reaction A → B can be expressed as which of the "
        "following? Choices: A. r = k ln[A]. B. r = k [A]^2. C. r = k [A]. D. r = k. Answer:",
    ),
    ("mmlu_college_chemistry", "blob"): (
        "test",
        f"{BLOB}The rate, r, of a zero-order chemical reaction A → B can be expressed as which of the "
        "following?\nChoices:\nA) r = k ln[A]\nB) r = k [A]^2\nC) r = k [A]\nD) r = k\nAnswer:",
    ),
    ("mmlu_college_physics", "laplace"): (
        "test",
        f"{LAPLACE}The quantum efficiency of a photon detector is 0.1. If 100 photons are sent into the detector, "
        "one after the other, the detector will detect photons Choices: A. an average of 10 times, with an rms "
        "deviation of about 4. B. an average of 10 times, with an rms deviation of about 3. C. an average of 10 "
        "times, with an rms deviation of about 1. D. an average of 10 times, with an rms deviation of about 0.1. "
        "Answer:",
    ),
    ("mmlu_college_physics", "blob"): (
        "test",
        f"{BLOB}The quantum efficiency of a photon detector is 0.1. If 100 photons are sent into the detector, "
        "one after the other, the detector will detect photons\nChoices:\nA) an average of 10 times, with an rms "
        "deviation of about 4\nB) an average of 10 times, with an rms deviation of about 3\nC) an average of 10 "
        "times, with an rms deviation of about 1\nD) an average of 10 times, with an rms deviation of about 0.1\n"
        "Answer:",
    ),
    ("mmlu_college_mathematics", "laplace"): (
        "test",
        f"{LAPLACE}Let k be the number of real solutions of the equation e^x + x - 2 = 0 in the interval [0, 1], "
        "and let n be the number of real solutions that are not in [0, 1]. Which of the following is true? "
        "Choices: A. k = 0 and n = 1. B. k = 1 and n = 0. C. k = n = 1. D. k > 1. Answer:",
    ),
    ("mmlu_college_mathematics", "blob"): (
        "test",
        f"{BLOB}Let k be the number of real solutions of the equation e^x + x - 2 = 0 in the interval [0, 1], "
        "and let n be the number of real solutions that are not in [0, 1]. Which of the following is true?\n"
        "Choices:\nA) k = 0 and n = 1\nB) k = 1 and n = 0\nC) k = n = 1\nD) k > 1\nAnswer:",
    ),
    ("demo", "laplace"): (
        "train",
        "Which number wins? Votes so far: 41344343223213 Choices: A. 1 B. 2 C. 3 D. 4 Answer:",
    ),
    ("demo", "blob"): (
        "train",
        "Question: Which number wins? Votes so far: 41344343223213\nChoices:\nA) 1\nB) 2\nC) 3\nD) 4\nAnswer:",
    ),
    ("demo_ood", "laplace"): (
        "test",
        "Which number wins? Votes so far: 235451514352245544222541 Choices: A. 1 B. 2 C. 3 D. 4 E. 5 Answer:",
    ),
    ("demo_ood", "blob"): (
        "test",
        "Question: Which number wins? Votes so far: 235451514352245544222541\nChoices:\nA) 1\nB) 2\nC) 3\nD) 4\n"
        "E) 5\nAnswer:",
    ),
    ("demo_small", "laplace"): (
        "train",
        "Which number wins? Votes so far: 41344343223213 Choices: A. 1 B. 2 C. 3 D. 4 Answer:",
    ),
    ("demo_small", "blob"): (
        "train",
        "Question: Which number wins? Votes so far: 41344343223213\nChoices:\nA) 1\nB) 2\nC) 3\nD) 4\nAnswer:",
    ),
    ("demo_shift", "laplace"): (
        "test",
        "Which number wins? Votes so far: 13221111232113322112 Choices: A. 1 B. 2 C. 3 Answer:",
    ),
    ("demo_shift", "blob"): (
        "test",
        "Question: Which number wins? Votes so far: 13221111232113322112\nChoices:\nA) 1\nB) 2\nC) 3\nAnswer:",
    ),
}


def test_every_task_and_style_has_an_expected_prompt() -> None:
    assert set(PROMPTS) == {(name, style) for name in TASKS for style in ("laplace", "blob")}


@pytest.mark.parametrize(("name", "style"), sorted(PROMPTS))
def test_rendered_prompt_is_exactly_the_expected_text(
    data_dir: Path, name: str, style: str
) -> None:
    split, expected = PROMPTS[(name, style)]
    loaded = load_task(name, "paper", data_dir, prompt_style=style, splits=(split,))
    assert loaded[split][0]["prompt"] == expected


# --- tokenizers built in memory --------------------------------------------------------------


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Words with a "▁" for the space before them, as SentencePiece (Llama) marks them."""
    words = [
        "<unk>",
        "<s>",
        "▁Answer:",
        "▁Answer",
        "(true",
        "or",
        "false):",
        "▁A",
        "▁B",
        "▁C",
        "▁D",
        "▁E",
    ]
    words += ["▁True", "▁False", "▁question", "▁with"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", name_or_path="sp-like"
    )


def test_answer_tokens_take_the_leading_space_form_when_it_is_one_token() -> None:
    # ids by position in its word list: ▁A 7, ▁B 8, ▁C 9, ▁True 12, ▁False 13
    tok = sentencepiece_like()
    assert answer_token_ids(tok, ["A", "B", "C"]) == [7, 8, 9]
    assert answer_token_ids(tok, ["False", "True"]) == [13, 12]


def test_answer_tokens_of_a_character_tokenizer_are_the_bare_letters() -> None:
    tok = demo_tokenizer()
    assert answer_token_ids(tok, ["A", "B", "C", "D", "E"]) == tok.convert_tokens_to_ids(
        list("ABCDE")
    )


def test_an_answer_of_several_tokens_is_an_error_naming_tokenizer_and_answer() -> None:
    with pytest.raises(TaskError) as err:
        answer_token_ids(demo_tokenizer(), ["False", "True"])
    message = str(err.value)
    assert "'False'" in message and "melora-demo-chars" in message and "Tokenizer" in message
    assert "single" in message and "use a tokenizer" in message


def test_an_unknown_answer_token_is_an_error() -> None:
    with pytest.raises(TaskError, match=r"answer 'F' is not one token of tokenizer 'sp-like'"):
        answer_token_ids(sentencepiece_like(), ["A", "F"])


def test_a_boolq_loader_with_a_character_tokenizer_fails_on_the_answers(data_dir: Path) -> None:
    test = load_task("boolq", data_dir=data_dir, splits=("test",))["test"].select(range(4))
    with pytest.raises(TaskError, match="'False'"):
        make_loader(test, demo_tokenizer(), batch_size=2)


# --- truncation ------------------------------------------------------------------------------


def test_a_long_passage_is_cut_and_the_answer_cue_stays(data_dir: Path) -> None:
    tok = demo_tokenizer()
    for style, cue in (("laplace", " Answer:"), ("blob", "\nAnswer (true or false):")):
        row = load_task("boolq", data_dir=data_dir, prompt_style=style, splits=("validation",))[
            "validation"
        ][0]
        assert len(row["prompt"]) > 1000
        ids = fit_prompt(tok, row, max_length=300)
        text = tok.decode(ids, skip_special_tokens=True)
        assert len(ids) == 300 and ids[0] == tok.bos_token_id
        assert text.endswith(cue)
        assert row["question"] in text  # the shorter field stays whole
        passage_kept = (
            text.split("Context: ")[1] if style == "laplace" else text.split("Passage: ")[1]
        )
        passage_kept = passage_kept.split(" Answer:")[0].split("\nQuestion:")[0]
        assert 100 < len(passage_kept) < len(row["context"]) and row["context"].startswith(
            passage_kept
        )


def test_a_long_question_is_cut_when_there_is_no_passage(data_dir: Path) -> None:
    tok = demo_tokenizer()
    row = load_task("arc_challenge", data_dir=data_dir, splits=("train",))["train"][0]
    ids = fit_prompt(tok, row, max_length=220)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) == 220
    assert text.endswith(
        "Choices: A. Dry palms. B. Wet palms. C. Palms covered with oil. D. Palms covered with lotion. Answer:"
    )
    assert text.startswith(
        "Select one of the choices that answers the following question: George wants"
    )


def test_a_max_length_below_the_fixed_parts_is_an_error(data_dir: Path) -> None:
    row = load_task("arc_challenge", data_dir=data_dir, splits=("train",))["train"][0]
    with pytest.raises(TaskError, match="raise max_length"):
        fit_prompt(demo_tokenizer(), row, max_length=100)


def test_encode_leaves_short_prompts_whole_and_caps_long_ones(data_dir: Path) -> None:
    """Rows of 458, 920, 407 and 235 tokens (character tokenizer, BOS included): the short one
    whole, the long ones as BOS + the template before the passage + as much of the passage as fits
    + the answer cue, built here from the pieces of the prompt, not by `fit_prompt`. (Row 1 is left
    out: its kept passage holds characters the tokenizer does not know, which the cut drops.)"""
    tok = demo_tokenizer()
    test = load_task("boolq", data_dir=data_dir, splits=("test",))["test"].select([0, 2, 10, 11])
    encoded = encode(test, tok, max_length=400)
    whole = 0
    for row in encoded:
        full = tok(row["prompt"])["input_ids"]
        if len(full) <= 400:
            assert row["input_ids"] == full
            whole += 1
            continue
        before, after = row["prompt"].split(row["context"])
        a, c, b = (
            tok(t, add_special_tokens=False)["input_ids"] for t in (before, row["context"], after)
        )
        assert after == " Answer:" and row["question"] in before
        assert row["input_ids"] == [tok.bos_token_id, *a, *c[: 400 - 1 - len(a) - len(b)], *b]
    assert whole == 1  # one row of the four fits, three are cut


# --- batches ---------------------------------------------------------------------------------


def test_collate_left_pads_and_masks_missing_choices(data_dir: Path) -> None:
    tok = demo_tokenizer()
    train = load_task("arc_challenge", data_dir=data_dir, splits=("train",))["train"]
    three = next(i for i in range(len(train)) if train[i]["n_choices"] == 3)
    rows = train.select([0, three])
    batch = next(iter(make_loader(rows, tok, batch_size=2, max_length=1000)))
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "answer_token_ids",
        "choice_mask",
    }
    lengths = [len(tok(p)["input_ids"]) for p in rows["prompt"]]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert (
        batch["input_ids"].dtype
        == batch["attention_mask"].dtype
        == batch["labels"].dtype
        == torch.long
    )
    for i, n in enumerate(
        lengths
    ):  # left padding: pads first, then the prompt, ending at the last column
        assert batch["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert batch["input_ids"][i, width - n :].tolist() == tok(rows[i]["prompt"])["input_ids"]
        assert set(batch["input_ids"][i, : width - n].tolist()) <= {tok.pad_token_id}
    assert batch["labels"].tolist() == rows["label"]
    assert batch["answer_token_ids"].tolist() == tok.convert_tokens_to_ids(list("ABCDE"))
    assert batch["choice_mask"].dtype == torch.bool
    assert batch["choice_mask"].tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]


def test_class_logits_from_a_batch_pick_the_answer_tokens() -> None:
    """A collated batch through `melora.evaluation.class_logits`: the logits of vocabulary
    entries 7 and 9 at the last position (where left padding puts every prompt's end)."""
    from types import SimpleNamespace

    from melora.evaluation import class_logits

    collate = Collator(answer_token_ids=(7, 9), pad_token_id=0)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "label": 1, "n_choices": 2},
            {"input_ids": [8], "label": 0, "n_choices": 2},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    vocab = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)  # entry = 36b + 12t + v

    class FixedLM(torch.nn.Module):  # a causal LM's interface, with known logits
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=vocab)

    got = class_logits(FixedLM(), batch)
    assert got.tolist() == [[24 + 7, 24 + 9], [36 + 24 + 7, 36 + 24 + 9]]  # t = 2, v = 7 and 9


def test_a_row_with_more_choices_than_answers_is_an_error() -> None:
    with pytest.raises(TaskError, match="5 choices but the task has only 4 answers"):
        Collator((1, 2, 3, 4), 0)([{"input_ids": [1], "label": 0, "n_choices": 5}])


def test_shuffled_loaders_repeat_with_the_same_seed(data_dir: Path) -> None:
    tok = demo_tokenizer()
    val = load_task("winogrande_s", data_dir=data_dir, splits=("validation",))["validation"].select(
        range(40)
    )
    encoded = encode(val, tok)

    def order(seed: int) -> list[list[int]]:
        return [
            b["labels"].tolist() + b["input_ids"][:, -5].tolist()
            for b in make_loader(encoded, tok, 8, shuffle=True, seed=seed)
        ]

    assert order(1) == order(1) and order(1) != order(2)
    unshuffled = [b["labels"].tolist() for b in make_loader(encoded, tok, 8)]
    assert sum(unshuffled, []) == val["label"]
    rows = []  # each row once, in another order than the file's
    for b in make_loader(encoded, tok, 8, shuffle=True, seed=1):
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True):
            rows.append(tuple(t for t, m in zip(ids, mask, strict=True) if m))
    assert sorted(rows) == sorted(tuple(r) for r in encoded["input_ids"])
    assert rows != [tuple(r) for r in encoded["input_ids"]]


def test_a_collator_serves_one_task_only(data_dir: Path) -> None:
    a = load_task("mmlu_college_physics", data_dir=data_dir)["test"].select(range(2))
    b = load_task("mmlu_college_chemistry", data_dir=data_dir)["test"].select(range(2))
    with pytest.raises(TaskError, match="one task in one prompt style"):
        make_collator(datasets.concatenate_datasets([a, b]), demo_tokenizer())


# --- the hub path (faked) and local formats --------------------------------------------------


def test_without_data_dir_the_hub_is_asked_for_the_right_dataset(
    data_dir: Path, monkeypatch
) -> None:
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(_lines(data_dir / "arc_challenge" / f"{split}.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_task("arc_challenge", "laplace")
    assert calls == [
        ("allenai/ai2_arc", "ARC-Challenge", "train"),
        ("allenai/ai2_arc", "ARC-Challenge", "validation"),
    ]
    local = load_task("arc_challenge", "laplace", data_dir)
    assert all(from_hub[s].to_list() == local[s].to_list() for s in local)

    calls.clear()
    for name in ("winogrande_m", "boolq", "openbookqa", "mmlu_college_physics"):
        try:
            load_task(name, splits=("test",))
        except TaskError:
            pass  # the fake serves ARC rows; only the requests matter here
    assert calls == [
        ("allenai/winogrande", "winogrande_m", "validation"),
        ("google/boolq", None, "validation"),
        ("allenai/openbookqa", "main", "test"),
        ("cais/mmlu", "college_physics", "test"),
    ]


def test_a_hub_failure_says_how_to_work_offline(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        TaskError, match=r"no network.*pass data_dir=<folder> holding openbookqa/test.jsonl"
    ):
        load_task("openbookqa", splits=("test",))


def test_parquet_files_load_like_jsonl(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mmlu_college_physics").mkdir()
    rows = _lines(data_dir / "mmlu_college_physics" / "test.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "mmlu_college_physics" / "test.parquet")
    from_parquet = load_task("mmlu_college_physics", data_dir=tmp_path)["test"]
    assert (
        from_parquet.to_list()
        == load_task("mmlu_college_physics", data_dir=data_dir)["test"].to_list()
    )


# --- errors that say what to change ----------------------------------------------------------


def test_a_data_dir_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(
        TaskError,
        match=r"is not a folder: pass the folder that holds one sub-folder per dataset.*data_dir=None",
    ):
        load_task("arc_easy", data_dir=tmp_path / "nowhere")


def test_a_data_dir_without_the_task_folder(tmp_path: Path) -> None:
    with pytest.raises(
        TaskError, match=r"has no sub-folder 'winogrande'.*put winogrande/train_s.jsonl there"
    ):
        load_task("winogrande_s", data_dir=tmp_path)


def test_a_missing_split_file_suggests_loading_fewer_splits(tmp_path: Path) -> None:
    (tmp_path / "boolq").mkdir()  # as in ../shared/data: BoolQ's validation file only
    (tmp_path / "boolq" / "validation.jsonl").write_text("")
    with pytest.raises(TaskError) as err:
        load_task("boolq", data_dir=tmp_path)
    message = str(err.value)
    assert "boolq/train.jsonl (or .parquet) is missing" in message
    assert "['validation.jsonl']" in message and "pass splits=" in message


def test_an_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(
        TaskError, match=r"unknown task 'arc_challange' \(did you mean 'arc_challenge'\?\).*'boolq'"
    ):
        load_task("arc_challange")


def test_unknown_policy_style_and_split(tmp_path: Path) -> None:
    with pytest.raises(
        TaskError,
        match=r"split_policy='lora' is not a split policy; use one of \['paper', 'laplace', 'blob'\]",
    ):
        load_task("demo", split_policy="lora")
    with pytest.raises(
        TaskError,
        match=r"prompt_style='alpaca' is not a prompt style; use one of \['laplace', 'blob'\]",
    ):
        load_task("demo", prompt_style="alpaca")
    with pytest.raises(
        TaskError,
        match=r"under split_policy='blob' has no split \['validation'\]; its splits are \['train', 'test'\]",
    ):
        load_task("demo", split_policy="blob", splits=("validation", "test"))
    with pytest.raises(TaskError, match=r"its splits are \['test'\]"):
        load_task("mmlu_college_chemistry", data_dir=tmp_path, splits=("train",))


def test_a_row_off_the_schema_names_file_row_and_field(tmp_path: Path) -> None:
    (tmp_path / "openbookqa").mkdir()
    row = {
        "id": "x",
        "question": "Q?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    (tmp_path / "openbookqa" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        TaskError,
        match=r"openbookqa/test.jsonl, row 0: the row lacks the field\(s\) \['question_stem'\]",
    ):
        load_task("openbookqa", data_dir=tmp_path, splits=("test",))


def test_an_answer_key_outside_the_choices_is_named(tmp_path: Path) -> None:
    (tmp_path / "arc_easy").mkdir()
    row = {
        "id": "x",
        "question": "Q?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "C",
    }
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        TaskError, match=r"answerKey 'C' is not one of the choice labels \['A', 'B'\]"
    ):
        load_task("arc_easy", data_dir=tmp_path, splits=("test",))


# --- the demo data -----------------------------------------------------------------------------


def test_demo_data_is_deterministic_and_well_formed() -> None:
    # pinned, so that another process (or another Python hash seed) makes the same data
    firsts = {
        "train": ("41344343223213", 2, 1000),
        "validation": ("121222321121", 1, 300),
        "test": ("312323323232", 2, 500),
    }
    for split, (votes, label, n) in firsts.items():
        rows = in_distribution(split)
        assert rows[0]["question"].endswith(f": {votes}") and rows[0]["label"] == label, split
        assert len(rows) == n, split
    ood = out_of_distribution()
    assert ood[0]["question"].endswith(": 235451514352245544222541") and ood[0]["label"] == 4
    assert len(ood) == 500
    variants = [  # rows, numbers of choices, shown votes, hidden votes, largest shown lead
        (in_distribution("test"), {3, 4}, range(8, 15), 1, 3),
        (out_of_distribution(), {5}, range(16, 25), 3, 2),
    ]
    for rows, ks, votes, hidden, max_lead in variants:
        assert {len(r["choices"]) for r in rows} == ks
        for r in rows:
            shown = r["question"].rsplit(" ", 1)[1]
            assert len(shown) in votes and set(shown) <= {
                str(c + 1) for c in range(len(r["choices"]))
            }
            counts = sorted(
                (shown.count(str(c + 1)) for c in range(len(r["choices"]))), reverse=True
            )
            assert counts[0] - counts[1] <= max_lead
            if counts[0] - counts[1] > hidden:  # too far ahead for the hidden votes to matter
                assert shown.count(str(r["label"] + 1)) == counts[0]
            # the winner can be at most `hidden` votes behind the shown leader
            assert shown.count(str(r["label"] + 1)) >= counts[0] - hidden
