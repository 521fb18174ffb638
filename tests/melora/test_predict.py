"""melora.predict (ask a trained adapter) on the real stories260K checkpoint with adapters that were
attached and saved without training: the probabilities, entropy and mutual information against a
computation by hand from the model's own forwards, N = 0 against the mean model, the N rules of
LoRA and MC dropout, prompt normalisation, and the abstention threshold on a hand-made example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import melora
from melora import abstention, base_model, user_prompts
from melora import predict as predict_module
from melora.abstention import Abstention, abstention_threshold
from melora.errors import ConfigError
from melora.predict import load_predictor
from melora.tasks import TaskError, answer_token_ids, get_task
from melora.user_prompts import read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "arc_easy"
ROWS = [
    {"question": "Which of these is a mammal?", "choices": ["shark", "whale", "trout"], "label": 1},
    {
        "question": "What do plants need to make food?",
        "choices": ["sunlight", "sand", "salt", "rock"],
    },
    {  # a row of ARC's hub schema
        "id": "hub-1",
        "question": "Water freezes at what temperature?",
        "choices": {"text": ["0 C", "50 C"], "label": ["A", "B"]},
        "answerKey": "A",
    },
]


def saved_adapter(stories_dir: Path, folder: Path, method: str, dropout: float = 0.0) -> Path:
    """An adapter on stories260K, saved untrained but with B drawn (B = 0 would make every draw
    equal to the mean) and, for Me-LoRA, a wide posterior."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    melora.attach(model, melora.AdapterConfig(method=method, r=4, dropout=dropout))
    with torch.no_grad():
        for _, layer in melora.adapted_layers(model):
            layer.lora_B.normal_(0.0, 1.0)
            if method == "melora":
                layer.lora_H.fill_(0.7)
    return melora.save_adapter(model, folder)


@pytest.fixture(scope="module")
def melora_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_adapter(stories_dir, tmp_path_factory.mktemp("melora") / "adapter", "melora")


@pytest.fixture(scope="module")
def predictor(melora_dir: Path):
    return load_predictor(melora_dir, task=TASK)  # the base model recorded in the folder


def by_hand_batch(predictor, rows: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Each prompt rendered by the task, tokenised and left-padded here, with the answer token
    ids and the choice mask: (model inputs, answer ids, choice mask)."""
    spec, tokenizer = get_task(TASK), predictor.tokenizer
    ids = [tokenizer(spec.render("laplace", {"context": "", **row}))["input_ids"] for row in rows]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row_ids in enumerate(ids):
        input_ids[r, width - len(row_ids) :] = torch.tensor(row_ids)
        attention_mask[r, width - len(row_ids) :] = 1
    answers = torch.tensor(answer_token_ids(tokenizer, spec.answers))
    mask = torch.tensor([[k < len(row["choices"]) for k in range(5)] for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}, answers, mask


def softmax_over_choices(last_logits: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor):
    logits = last_logits[:, answers].double().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).numpy()


def entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


def recorded_forwards(model):
    """A list that receives the last-position logits of every forward of `model`, and its hook."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, a, out: seen.append(out.logits[:, -1].detach()))
    return seen, hook


def normalised(rows: list[dict]) -> list[dict]:
    """The rows as the plain form the task renders (the hub row turned by hand)."""
    return rows[:2] + [{"question": rows[2]["question"], "choices": ["0 C", "50 C"], "label": 0}]


def test_n0_is_the_mean_model(predictor) -> None:
    answers = predictor.answer(ROWS, n_samples=0)
    inputs, ids, mask = by_hand_batch(predictor, normalised(ROWS))
    with torch.no_grad(), melora.sampling(predictor.model, "mean"):
        expected = softmax_over_choices(predictor.model(**inputs).logits[:, -1], ids, mask)
    for answer, row, p in zip(answers, normalised(ROWS), expected, strict=True):
        n = len(row["choices"])
        np.testing.assert_allclose(answer.probs, p[:n], rtol=0, atol=2e-6)
        assert sum(answer.probs) == pytest.approx(1.0, abs=1e-6)
        assert answer.answer == "ABCDE"[int(np.argmax(p))] and answer.answer_index == np.argmax(p)
        assert answer.entropy == pytest.approx(entropy(p), abs=1e-6)
        assert answer.mutual_information is None and answer.abstain is None
    assert [a.id for a in answers] == ["0", "1", "hub-1"]
    assert [a.label for a in answers] == [1, None, 0]
    assert "label" not in answers[1].to_dict() and answers[0].to_dict()["label"] == 1


def test_sampled_probabilities_entropy_and_mi_by_hand(predictor) -> None:
    """N = 4: the answer is the mean of the 4 forwards' softmaxes; entropy and MI by hand."""
    rng_before = torch.get_rng_state()
    seen, hook = recorded_forwards(predictor.model)
    try:
        answers = predictor.answer(ROWS, n_samples=4, seed=3)
    finally:
        hook.remove()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert len(seen) == 4  # one batch, four draws
    _, ids, mask = by_hand_batch(predictor, normalised(ROWS))
    draws = np.stack([softmax_over_choices(logits, ids, mask) for logits in seen])
    assert not np.allclose(draws[0], draws[1], atol=1e-3)  # the posterior was sampled
    mean = draws.mean(axis=0)
    mi = entropy(mean) - entropy(draws).mean(axis=0)
    for i, answer in enumerate(answers):
        n = len(normalised(ROWS)[i]["choices"])
        np.testing.assert_allclose(answer.probs, mean[i, :n], rtol=0, atol=2e-6)
        assert sum(answer.probs) == pytest.approx(1.0, abs=1e-6)
        assert answer.entropy == pytest.approx(entropy(mean[i]), abs=1e-5)
        assert answer.mutual_information == pytest.approx(mi[i], abs=1e-5)
        assert answer.mutual_information > 1e-3
    again = predictor.answer(ROWS, n_samples=4, seed=3)
    assert [a.probs for a in again] == [a.probs for a in answers]  # the seed fixes the draws
    assert [a.probs for a in predictor.answer(ROWS, n_samples=4, seed=4)] != [
        a.probs for a in answers
    ]


def test_lora_ignores_n_and_mcd_samples_dropout(stories_dir: Path, tmp_path: Path) -> None:
    lora = load_predictor(saved_adapter(stories_dir, tmp_path / "lora", "lora"), task=TASK)
    seen, hook = recorded_forwards(lora.model)
    at_0, at_5 = lora.answer(ROWS, n_samples=0), lora.answer(ROWS, n_samples=5)
    hook.remove()
    assert len(seen) == 2  # one forward each: LoRA's predictive is its mean at every N
    assert [a.probs for a in at_0] == [a.probs for a in at_5]
    assert all(a.mutual_information is None for a in at_5)

    mcd = load_predictor(
        saved_adapter(stories_dir, tmp_path / "mcd", "mcd", dropout=0.5), task=TASK
    )
    seen, hook = recorded_forwards(mcd.model)
    sampled = mcd.answer(ROWS, n_samples=3)
    hook.remove()
    assert len(seen) == 3 and not torch.allclose(seen[0], seen[1])  # dropout masks differ
    assert all(a.mutual_information > 0 for a in sampled)
    assert [a.probs for a in sampled] != [a.probs for a in mcd.answer(ROWS, n_samples=0)]


def test_hub_rows_and_plain_rows_give_the_same_prompt(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(ROWS[2]) + "\n\n" + json.dumps(normalised(ROWS)[2]) + "\n")
    hub, plain = read_prompts(path, TASK)
    assert hub["id"] == "hub-1" and plain["id"] == "line-3"
    assert {**hub, "id": ""} == {**plain, "id": ""}
    assert hub["choices"] == ["0 C", "50 C"] and hub["label"] == 0 and hub["context"] == ""


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"choices": ["a", "b"]}, "['question'] are missing"),
        ({"question": "q", "choices": "a b"}, "'choices' must be a list of strings"),
        ({"question": "q", "choices": ["a", 2]}, "'choices' must be a list of strings"),
        ({"question": "q", "choices": list("abcdef")}, "'choices' has 6 entries"),
        ({"question": "q", "choices": ["a"]}, "'choices' has 1 entries"),
        ({"question": "q", "choices": ["a", "b"], "label": 2}, "'label' must be the index"),
        ({"question": "q", "choices": ["a", "b"], "label": True}, "'label' must be the index"),
        ({"question": 3, "choices": ["a", "b"]}, "'question' must be a string"),
        (["q", ["a", "b"]], "a prompt is a JSON object"),
    ],
)
def test_a_bad_prompt_names_its_line_and_field(tmp_path: Path, row, needle: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskError, match="line 2") as err:
        read_prompts(path, TASK)
    assert needle in str(err.value)


def test_boolq_plain_prompts_take_a_passage_and_its_answers(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "is it so", "context": "It is so."}) + "\n")
    (prompt,) = read_prompts(path, "boolq")
    assert prompt["choices"] == ["False", "True"] and prompt["context"] == "It is so."
    path.write_text(json.dumps({"question": "is it", "choices": ["no", "yes"]}) + "\n")
    with pytest.raises(TaskError, match="'choices' must be left out or be"):
        read_prompts(path, "boolq")


# ----- abstention -----------------------------------------------------------------------------
def row_with_entropy(top: float, label_right: bool) -> tuple[list[float], int]:
    """A 3-class row (top, rest/2, rest/2) whose label is the top class or not."""
    rest = (1.0 - top) / 2
    return [top, rest, rest], 0 if label_right else 1


def hand_made() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Six examples, by rising entropy: right, right, (right, wrong: equal entropy), right, wrong.

    Answered (u <= t) at each tie-group end: 1/1, 2/2, 3/4 = 0.75, 4/5 = 0.8, 4/6.
    """
    spec = [(0.97, True), (0.9, True), (0.8, True), (0.8, False), (0.6, True), (0.4, False)]
    rows = [row_with_entropy(top, right) for top, right in spec]
    order = [2, 0, 5, 3, 4, 1]  # shuffled, the tie's right example before its wrong one
    probs = torch.tensor([rows[i][0] for i in order], dtype=torch.float32)
    labels = torch.tensor([rows[i][1] for i in order])
    sorted_entropy = np.sort(entropy(probs.double().numpy()))
    return probs, labels, sorted_entropy


@pytest.mark.parametrize(
    ("target", "k", "accuracy"),
    [
        (0.6, 6, 4 / 6),  # everything answered
        (0.8, 5, 0.8),  # exactly reached: 4/5 == 0.8
        (0.76, 5, 0.8),  # 3/4 falls short, 4/5 does not: not monotone in the threshold
        (0.9, 2, 1.0),  # the tie group (right, wrong) cannot be split: 3/3 is not a threshold
        (1.0, 2, 1.0),
    ],
)
def test_abstention_threshold_on_a_hand_made_example(target: float, k: int, accuracy) -> None:
    probs, labels, u = hand_made()
    rule = abstention_threshold(probs, labels, target)
    assert rule.threshold == u[k - 1] and rule.coverage == k / 6
    assert rule.accuracy == pytest.approx(accuracy, abs=1e-12) and rule.target == target
    assert not rule.abstains(u[k - 1]) and (k == 6 or rule.abstains(u[k]))


def test_abstention_that_no_threshold_reaches_is_an_error() -> None:
    probs, labels, _ = hand_made()
    wrong = torch.ones_like(labels)  # every argmax (class 0) is wrong: the best accuracy is 0
    with pytest.raises(ConfigError, match="no entropy threshold reaches accuracy 0.5"):
        abstention_threshold(probs, wrong, 0.5)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ConfigError, match="must be an accuracy in"):
            abstention_threshold(probs, labels, bad)


def test_abstention_flags_in_answers(predictor) -> None:
    plain = predictor.answer(ROWS, n_samples=0)
    middle = sorted(a.entropy for a in plain)[1]
    rule = Abstention(threshold=middle, target=0.9, accuracy=1.0, coverage=0.5)
    flagged = predictor.answer(ROWS, n_samples=0, abstention=rule)
    assert [a.abstain for a in flagged] == [a.entropy > middle for a in plain]
    assert sum(a.abstain for a in flagged) == 1


def test_load_predictor_refuses_before_any_forward(melora_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base model '/no/such/model' not found"):
        load_predictor(melora_dir, task=TASK, base_model="/no/such/model")
    with pytest.raises(TaskError, match="answer 'False' is not one token"):
        load_predictor(melora_dir, task="boolq")
    with pytest.raises(TaskError, match="unknown task"):
        load_predictor(melora_dir, task="arc_eazy")
    with pytest.raises(melora.AdapterStateError, match="not found"):
        load_predictor(tmp_path, task=TASK)
    with pytest.raises(ConfigError, match="temperature"):
        load_predictor(melora_dir, task=TASK, temperature=2.0)


def test_the_predict_names_stay_importable_where_callers_import_them() -> None:
    """The split of melora.predict moved no public name out of reach: `melora`'s lazy exports
    and `melora.predict` give the objects of the modules that own them."""
    owners = {
        "Abstention": abstention,
        "abstention_threshold": abstention,
        "load_base_model": base_model,
        "read_prompts": user_prompts,
        "load_predictor": predict_module,
        "Predictor": predict_module,
        "Answer": predict_module,
    }
    for name, owner in owners.items():
        assert getattr(melora, name) is getattr(owner, name)
        assert getattr(predict_module, name) is getattr(owner, name)
    assert predict_module.recorded_base_model is base_model.recorded_base_model
    assert predict_module.normalise_prompt is user_prompts.normalise_prompt
