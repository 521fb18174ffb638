"""jobs/predict.py in-process with --adapter on the real stories260K checkpoint and ARC-Easy: the
JSONL it writes, --abstain-at on a validation split, and every bad input refused with exit status
2, a message naming what is wrong, and nothing written. (--run against a real training run's
MLflow store: tests/orchestrator/train/test_training_run.py; --model: test_mlflow_model.py beside it.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import melora
from melora.abstention import abstention_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question": "Which of these is a mammal?", "choices": ["shark", "whale", "trout"], "label": 1},
    {"question": "What do plants need to make food?", "choices": ["sunlight", "sand", "salt"]},
]
OLD = "an earlier output\n"


@pytest.fixture(scope="module")
def predict_py(load_script):
    return load_script("jobs/predict.py")


@pytest.fixture(scope="module")
def adapter(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Me-LoRA adapter on stories260K, untrained, B drawn so that the draws differ."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    melora.attach(model, melora.AdapterConfig(method="melora", r=4, dropout=0.0))
    with torch.no_grad():
        for _, layer in melora.adapted_layers(model):
            layer.lora_B.normal_(0.0, 1.0)
            layer.lora_H.fill_(0.7)
    return melora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(predict_py, capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `predict.py args`; argparse's own refusals exit through SystemExit."""
    try:
        rc = predict_py.main(list(args))
    except SystemExit as stop:
        rc = stop.code
    return rc, capsys.readouterr().err


def test_answers_as_jsonl(predict_py, adapter: Path, tmp_path: Path, capsys) -> None:
    questions = jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out" / "answers.jsonl"
    rc, err = run(
        predict_py, capsys, "--adapter", str(adapter), "--set", "task.name=arc_easy",
        "--input", str(questions), "--output", str(out), "--n-samples", "3",
    )  # fmt: skip
    assert rc == 0, err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["line-1", "line-2"]
    for answer, question in zip(answers, QUESTIONS, strict=True):
        p = np.array(answer["probs"])
        assert len(p) == len(question["choices"]) and p.sum() == pytest.approx(1.0, abs=1e-6)
        assert answer["answer"] == "ABC"[int(p.argmax())] == "ABC"[answer["answer_index"]]
        assert answer["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)
        assert 0 < answer["mutual_information"] <= answer["entropy"] + 1e-9
        assert answer["abstain"] is None
    assert answers[0]["label"] == 1 and "label" not in answers[1]
    assert "answered 2 prompts with adapter" in err and "N = 3" in err
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it


def test_abstain_at_picks_the_threshold_on_the_validation_split(
    predict_py, adapter: Path, data_dir: Path, data_slice, tmp_path: Path, capsys
) -> None:
    """The validation split (40 ARC-Easy rows, in the hub's schema) answered by the same script
    (same N, same seed) gives the predictive the threshold was picked on: the flags and the
    printed coverage follow `abstention_threshold` of it, and its coverage and accuracy by hand."""
    data = data_slice(data_dir, tmp_path / "data", "arc_easy", {"validation": 40})
    common = ["--adapter", str(adapter), "--set", "task.name=arc_easy", "--n-samples", "2"]
    common += ["--set", f"task.data_dir={data}"]
    val_out = tmp_path / "val.jsonl"
    rc, err = run(
        predict_py, capsys, *common, "--input", str(data / "arc_easy/validation.jsonl"),
        "--output", str(val_out),
    )  # fmt: skip
    assert rc == 0, err
    val = [json.loads(line) for line in val_out.read_text().splitlines()]
    assert len(val) == 40 and all("label" in a for a in val)  # hub rows carry their answerKey
    probs = torch.tensor([a["probs"] + [0.0] * (5 - len(a["probs"])) for a in val])
    rule = abstention_threshold(probs, torch.tensor([a["label"] for a in val]), 0.3)
    answered = [a for a in val if a["entropy"] <= rule.threshold]
    assert rule.coverage == len(answered) / 40 < 1  # the target leaves some unanswered
    assert np.mean([a["answer_index"] == a["label"] for a in answered]) >= 0.3

    out = tmp_path / "answers.jsonl"
    questions = jsonl(tmp_path / "q.jsonl", QUESTIONS)
    rc, err = run(
        predict_py, capsys, *common, "--input", str(questions), "--output", str(out),
        "--abstain-at", "0.3",
    )  # fmt: skip
    assert rc == 0, err
    assert f"entropy {rule.threshold:.4f} nats" in err, err
    assert f"accuracy {rule.accuracy:.4f} at coverage {rule.coverage:.4f}" in err, err
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["abstain"] for a in answers] == [a["entropy"] > rule.threshold for a in answers]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URI of an MLflow store that has no runs."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the database
    return uri


@pytest.fixture(scope="module")
def moved_base(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter, with the base model it records moved away."""
    moved = tmp_path_factory.mktemp("moved")
    for name in ("melora_adapter.safetensors", "melora_config.json"):
        moved.joinpath(name).write_bytes(adapter.joinpath(name).read_bytes())
    meta = json.loads((moved / "melora_config.json").read_text())
    (moved / "melora_config.json").write_text(json.dumps({**meta, "base_model": "/gone/llama"}))
    return moved


def refused(
    tmp_path: Path, adapter: Path, moved: Path, store: str, data_dir: Path
) -> dict[str, tuple[list[str], str]]:
    """Each bad input: (arguments, a piece of the message)."""
    good = str(jsonl(tmp_path / "good.jsonl", QUESTIONS))
    arc = ["--adapter", str(adapter), "--set", "task.name=arc_easy"]

    def file(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    return {
        "no store": (
            [
                "--run",
                "0123abcd",
                "--tracking-uri",
                f"sqlite:///{tmp_path}/none.db",
                "--input",
                good,
            ],
            "no MLflow database at",
        ),
        "no run": (
            ["--run", "0123abcd", "--tracking-uri", store, "--input", good],
            "MLflow run 0123abcd not found",
        ),
        "no model": (
            ["--model", "models:/no-such-sweep/1", "--tracking-uri", store, "--input", good],
            "MLflow model models:/no-such-sweep/1 not found",
        ),
        "not a model URI": (
            ["--model", "runs:/0123abcd/model", "--tracking-uri", store, "--input", good],
            "give an MLflow model URI, models:/<name>/<version>",
        ),
        "no adapter": (
            [
                "--adapter",
                str(tmp_path / "nothing"),
                "--set",
                "task.name=arc_easy",
                "--input",
                good,
            ],
            "melora_config.json not found",
        ),
        "no task": (["--adapter", str(adapter), "--input", good], "--set task.name=<task>"),
        "base folder named": (
            [*arc, "--set", "model.name_or_path=/gone/llama", "--input", good],
            "model.name_or_path='/gone/llama': no such folder",
        ),
        "base folder recorded": (
            ["--adapter", str(moved), "--set", "task.name=arc_easy", "--input", good],
            "base model '/gone/llama' not found",
        ),
        "base not on the hub": (
            [*arc, "--set", "model.name_or_path=no-such-org/no-such-model", "--input", good],
            "base model 'no-such-org/no-such-model' could not be loaded",
        ),
        "answer not one token": (
            [
                "--adapter",
                str(adapter),
                "--set",
                "task.name=boolq",
                "--input",
                file("b.jsonl", '{"question": "is it", "context": "it is"}\n'),
            ],
            "answer 'False' is not one token",
        ),  # fmt: skip
        "empty file": ([*arc, "--input", file("empty.jsonl", "")], "holds no prompts"),
        "blank lines": ([*arc, "--input", file("blank.jsonl", "\n  \n")], "holds no prompts"),
        "no file": ([*arc, "--input", str(tmp_path / "absent.jsonl")], "cannot read the prompts"),
        "malformed JSON": (
            [*arc, "--input", file("bad.jsonl", json.dumps(QUESTIONS[0]) + "\n{'question': 1\n")],
            "bad.jsonl, line 2: not valid JSON",
        ),
        "missing field": (
            [*arc, "--input", file("f.jsonl", '{"question": "q", "choice": ["a", "b"]}\n')],
            "f.jsonl, line 1: the field(s) ['choices'] are missing",
        ),
        "too many choices": (
            [
                *arc,
                "--input",
                file("c.jsonl", json.dumps({"question": "q", "choices": list("abcdef")})),
            ],
            "c.jsonl, line 1: 'choices' has 6 entries",
        ),
        "label out of range": (
            [
                *arc,
                "--input",
                file("l.jsonl", '{"question": "q", "choices": ["a", "b"], "label": 5}'),
            ],
            "l.jsonl, line 1: 'label' must be the index of the right choice",
        ),
        "no validation split": (
            [
                *arc,
                "--set",
                "task.split_policy=blob",
                "--set",
                f"task.data_dir={data_dir}",
                "--abstain-at",
                "0.9",
                "--input",
                good,
            ],
            "has no split ['validation']",
        ),  # fmt: skip
        "abstain-at out of range": ([*arc, "--abstain-at", "1.5", "--input", good], "(0, 1]"),
        "negative n-samples": ([*arc, "--n-samples", "-1", "--input", good], "N >= 1"),
    }


CASES = [
    "no store", "no run", "no model", "not a model URI", "no adapter", "no task", "base folder named", "base folder recorded",
    "base not on the hub", "answer not one token", "empty file", "blank lines", "no file",
    "malformed JSON", "missing field", "too many choices", "label out of range",
    "no validation split", "abstain-at out of range", "negative n-samples",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_and_writes_nothing(
    case: str,
    predict_py,
    adapter: Path,
    moved_base: Path,
    empty_store: str,
    data_dir: Path,
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    import huggingface_hub.constants as hub

    # a hub id is looked up offline in an empty cache (not the home folder's, not the network)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hub, "HF_TOKEN_PATH", str(tmp_path / "hf_token"))
    args, needle = refused(tmp_path, adapter, moved_base, empty_store, data_dir)[case]
    out = tmp_path / "answers.jsonl"
    out.write_text(OLD)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = run(predict_py, capsys, *args, "--output", str(out))
    assert rc == 2
    assert needle in err, err
    assert "Traceback" not in err
    assert out.read_text() == OLD  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray file
