"""melora.evaluation (class logits, the N-sample predictive, run evaluation) and melora.plots,
against independent computations on a stub model and on a tiny adapted Llama."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import melora
from melora import evaluation, metrics, plots, predictive
from melora.errors import MeLoraError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSWER_IDS = torch.tensor([5, 6, 7, 8])


# ----- models and batches --------------------------------------------------------------------
class StubLM(nn.Module):
    """Returns the logits it is given, whatever the input: (B, T, V) set by the test."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.fixed = logits

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == attention_mask.shape == self.fixed.shape[:2]
        return SimpleNamespace(logits=self.fixed)


def tiny_llama(seed: int, method: str = "melora", dropout: float = 0.0) -> nn.Module:
    """A 2-layer random Llama with adapters whose sampled outputs visibly differ."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    adapter = melora.AdapterConfig(method=method, r=4, dropout=dropout)
    model = melora.attach(LlamaForCausalLM(config), adapter)
    with torch.no_grad():  # B = 0 at init would make every sample equal to the mean
        for _, layer in melora.adapted_layers(model):
            layer.lora_B.normal_(0.0, 1.0)
            if method == "melora":
                layer.lora_H.fill_(0.7)
    return model


def make_batch(seed: int, lengths: list[int], labels: list[int], choice_mask=None) -> dict:
    """A left-padded batch in the collate contract (pad id 0, T = max length)."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    input_ids = torch.zeros(len(lengths), t, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, t - n :] = torch.randint(1, 64, (n,), generator=gen)
        attention_mask[i, t - n :] = 1
    k = len(ANSWER_IDS)
    mask = torch.ones(len(lengths), k, dtype=torch.bool) if choice_mask is None else choice_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor(labels),
        "answer_token_ids": ANSWER_IDS.clone(),
        "choice_mask": mask,
    }


@pytest.fixture(scope="module")
def loader() -> list[dict]:
    three_choices = torch.tensor([[True, True, True, False], [True] * 4, [True] * 4])
    return [
        make_batch(1, [5, 9, 7], [0, 3, 1], choice_mask=three_choices),
        make_batch(2, [6, 4], [2, 2]),
    ]


@pytest.fixture(scope="module")
def ood_loader() -> list[dict]:
    return [make_batch(3, [3, 8, 8, 2], [1, 0, 3, 2])]


def reference_probs(model: nn.Module, loader, n_samples: int) -> torch.Tensor:
    """The N-sample predictive written out directly: the average of n softmax vectors."""
    return reference_draws(model, loader, n_samples).mean(dim=0)


@pytest.mark.parametrize("method", ["blob", "melora", "mcd"])
def test_n_draws_come_from_the_posterior_alone(method: str, loader) -> None:
    """With the posterior's std at zero and dropout 0.1, N = 10 gives exactly the N = 0
    probabilities for BLoB and Me-LoRA (dropout is off at test); MC dropout samples dropout masks."""
    model = tiny_llama(0, method, dropout=0.1)
    with torch.no_grad():
        for _, layer in melora.adapted_layers(model):
            if method == "melora":
                layer.lora_H.zero_()
            if method == "blob":
                layer.lora_A_rho.zero_()
    mean_probs, _ = evaluation.predict(model, loader, 0)
    sampled_probs, _ = evaluation.predict(model, loader, 10)
    if method == "mcd":
        assert (sampled_probs - mean_probs).abs().max() > 1e-3
    else:
        torch.testing.assert_close(sampled_probs, mean_probs, rtol=0, atol=1e-7)


def reference_draws(model: nn.Module, loader, n_samples: int) -> torch.Tensor:
    """Every draw's softmax kept, (S, N_ex, K): what `predict_with_entropy` avoids keeping."""
    was_training = model.training
    model.eval()
    batches = []
    with torch.no_grad(), melora.sampling(model, "mean" if n_samples == 0 else "sample"):
        for batch in loader:
            draws = []
            for _ in range(max(n_samples, 1)):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                z = out.logits[:, -1, batch["answer_token_ids"]].float()
                z[~batch["choice_mask"]] = float("-inf")
                draws.append(torch.softmax(z, dim=1))
            batches.append(torch.stack(draws))
    model.train(was_training)
    return torch.cat(batches, dim=1)


def entropies_by_hand(draws: torch.Tensor) -> list[float]:
    """Per example, the mean over draws of -sum_k p log p (0 log 0 = 0), as a python loop."""
    s, n, k = draws.shape
    return [
        sum(-sum(float(p) * math.log(float(p)) for p in draws[t, i] if p > 0) for t in range(s)) / s
        for i in range(n)
    ]


# ----- class_logits --------------------------------------------------------------------------
def test_class_logits_take_the_last_position_and_the_answer_tokens() -> None:
    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
        "answer_token_ids": torch.tensor([7, 2, 4]),
        "choice_mask": torch.tensor([[True, True, True], [True, False, True]]),
    }
    got = evaluation.class_logits(StubLM(logits), batch)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    expected = logits[:, 2, [7, 2, 4]].float()
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1, [0, 2]], expected[1, [0, 2]])
    assert got[1, 1] == float("-inf")
    probs = torch.softmax(got, dim=1)
    assert probs[1, 1] == 0.0


def test_class_logits_ask_a_causal_lm_for_the_last_position_only(loader) -> None:
    """A Hugging Face causal LM computes only the last position's vocabulary logits (not batch x
    length x vocab), and the class logits equal those read from the full logits."""
    model = tiny_llama(0).eval()
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.shape))
    batch = loader[0]
    with torch.no_grad():
        got = evaluation.class_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hook.remove()
    assert seen[0] == (len(batch["labels"]), 1, 64)  # one position kept
    assert seen[1][1] == batch["input_ids"].shape[1]  # the plain call keeps every position
    expected = full[:, -1, batch["answer_token_ids"]].float()
    expected = expected.masked_fill(~batch["choice_mask"], float("-inf"))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_class_logits_without_choice_mask_keeps_every_choice() -> None:
    logits = torch.randn(1, 2, 10)
    batch = {
        "input_ids": torch.ones(1, 2, dtype=torch.long),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "labels": torch.tensor([0]),
        "answer_token_ids": torch.tensor([3, 9]),
    }
    torch.testing.assert_close(
        evaluation.class_logits(StubLM(logits), batch), logits[:, -1, [3, 9]]
    )


def test_class_logits_errors_say_what_is_wrong() -> None:
    stub = StubLM(torch.randn(1, 2, 10))
    good = {
        "input_ids": torch.ones(1, 2, dtype=torch.long),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "labels": torch.tensor([0]),
        "answer_token_ids": torch.tensor([3, 9]),
    }
    with pytest.raises(MeLoraError, match=r"the batch lacks \['answer_token_ids'\]"):
        evaluation.class_logits(stub, {k: v for k, v in good.items() if k != "answer_token_ids"})
    with pytest.raises(MeLoraError, match="choice_mask has shape"):
        evaluation.class_logits(stub, {**good, "choice_mask": torch.ones(1, 3, dtype=torch.bool)})
    with pytest.raises(MeLoraError, match="has no True entry"):
        evaluation.class_logits(stub, {**good, "choice_mask": torch.zeros(1, 2, dtype=torch.bool)})


# ----- predict -------------------------------------------------------------------------------
def test_predict_n0_is_the_deterministic_mean_adapter(loader) -> None:
    model = tiny_llama(0)
    model.train()
    probs, labels = evaluation.predict(model, loader, n_samples=0)
    again, _ = evaluation.predict(model, loader, n_samples=0)
    assert probs.shape == (5, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(labels, torch.tensor([0, 3, 1, 2, 2]))
    torch.testing.assert_close(probs, again, rtol=0, atol=0)
    torch.testing.assert_close(probs, reference_probs(model, loader, 0))
    assert probs[0, 3] == 0.0  # the masked fourth choice of the first row
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    # train() and the layers' "auto" mode come back.
    assert model.training
    assert {layer.sampling_mode for _, layer in melora.adapted_layers(model)} == {"auto"}


def test_predict_with_n_samples_averages_n_softmaxes(loader) -> None:
    model = tiny_llama(0).eval()
    torch.manual_seed(123)
    probs, _ = evaluation.predict(model, loader, n_samples=3)
    torch.manual_seed(123)
    torch.testing.assert_close(probs, reference_probs(model, loader, 3))
    # The draws really differ, so the comparison above can fail: N = 1 under two seeds differ,
    # and neither equals the mean adapter.
    torch.manual_seed(1)
    one, _ = evaluation.predict(model, loader, n_samples=1)
    torch.manual_seed(2)
    other, _ = evaluation.predict(model, loader, n_samples=1)
    mean, _ = evaluation.predict(model, loader, n_samples=0)
    assert (one - other).abs().max() > 1e-3
    assert (one - mean).abs().max() > 1e-3
    assert not model.training  # eval() before, eval() after


def test_predict_ensemble_averages_the_members(loader) -> None:
    members = [tiny_llama(1), tiny_llama(2)]
    probs, labels = evaluation.predict_ensemble(members, loader)
    expected = (reference_probs(members[0], loader, 0) + reference_probs(members[1], loader, 0)) / 2
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(labels, torch.tensor([0, 3, 1, 2, 2]))
    assert (reference_probs(members[0], loader, 0) - expected).abs().max() > 1e-3
    # With samples: member 0's n draws for every batch, then member 1's, from one RNG stream.
    torch.manual_seed(7)
    sampled, _ = evaluation.predict_ensemble(members, loader, n_samples=2)
    torch.manual_seed(7)
    first = reference_probs(members[0], loader, 2)
    second = reference_probs(members[1], loader, 2)
    torch.testing.assert_close(sampled, (first + second) / 2)


def test_predict_ensemble_refuses_a_shuffling_loader(loader) -> None:
    class Shuffling:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(loader if self.passes == 1 else loader[::-1])

    with pytest.raises(MeLoraError, match="turn shuffling off"):
        evaluation.predict_ensemble([tiny_llama(1), tiny_llama(2)], Shuffling())


def test_predict_without_adapters_allows_only_n0(loader) -> None:
    torch.manual_seed(0)
    plain = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    probs, _ = evaluation.predict(plain, loader, n_samples=0)
    assert probs.shape == (5, 4)
    with pytest.raises(MeLoraError, match="needs a model with adapters"):
        evaluation.predict(plain, loader, n_samples=1)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_predict_rejects_bad_n_samples(loader, bad) -> None:
    with pytest.raises(MeLoraError, match="n_samples"):
        evaluation.predict(tiny_llama(0), loader, n_samples=bad)


def test_predict_rejects_an_empty_loader() -> None:
    with pytest.raises(MeLoraError, match="no batches"):
        evaluation.predict(tiny_llama(0), [], n_samples=0)


# ----- evaluate ------------------------------------------------------------------------------
def test_evaluate_keys_and_values(loader, ood_loader) -> None:
    model = tiny_llama(0)
    out = evaluation.evaluate(model, {"demo": loader, "demo_ood": ood_loader}, n_samples=(0, 2))
    expected_keys = {
        f"test/{task}/{metric}_n{n}"
        for task in ("demo", "demo_ood")
        for metric in ("acc", "nll", "ece", "brier")
        for n in (0, 2)
    }
    assert set(out) == expected_keys
    assert all(type(v) is float for v in out.values())
    ref = metrics.compute_all(reference_probs(model, loader, 0), torch.tensor([0, 3, 1, 2, 2]))
    for name, value in ref.items():
        assert out[f"test/demo/{name}_n0"] == pytest.approx(value, abs=1e-6)


def test_evaluate_run_adds_ood_sets_and_auroc(loader, ood_loader, tmp_path: Path) -> None:
    model = tiny_llama(0)
    result = evaluation.evaluate_run(
        model, {"demo": loader}, {"demo_ood": ood_loader}, n_samples=(0, 1)
    )
    for n in (0, 1):
        for metric in ("acc", "nll", "ece", "brier"):
            assert f"test/demo/{metric}_n{n}" in result.metrics
            assert f"ood/demo_ood/{metric}_n{n}" in result.metrics
        assert f"ood/demo_ood/auroc_n{n}" in result.metrics
    assert len(result.metrics) == 2 * 2 * 6 + 2  # acc nll ece brier aurc acc_cov80; no MI below N=2
    assert set(result.predictions) == {
        "test/demo/n0",
        "test/demo/n1",
        "ood/demo_ood/n0",
        "ood/demo_ood/n1",
    }
    id_probs = reference_probs(model, loader, 0)
    ood_probs = reference_probs(model, ood_loader, 0)
    expected = metrics.ood_auroc(id_probs, ood_probs)
    assert result.metrics["ood/demo_ood/auroc_n0"] == pytest.approx(expected, abs=1e-12)
    paths = result.reliability_diagrams(tmp_path / "diagrams")
    assert sorted(p.name for p in paths) == sorted(
        ["test_demo_n0.png", "test_demo_n1.png", "ood_demo_ood_n0.png", "ood_demo_ood_n1.png"]
    )
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in paths)


def test_evaluate_run_accepts_an_ensemble(loader) -> None:
    members = [tiny_llama(1), tiny_llama(2)]
    result = evaluation.evaluate_run(members, {"demo": loader}, n_samples=(0,))
    probs, labels = evaluation.predict_ensemble(members, loader)
    assert result.metrics["test/demo/nll_n0"] == pytest.approx(metrics.nll(probs, labels))


def test_evaluate_run_needs_a_known_id_task_for_ood(loader, ood_loader) -> None:
    model = tiny_llama(0)
    two = {"a": loader, "b": loader}
    with pytest.raises(MeLoraError, match=r"id_task is needed .* \['a', 'b'\]"):
        evaluation.evaluate_run(model, two, {"o": ood_loader}, n_samples=(0,))
    with pytest.raises(MeLoraError, match=r"id_task='c' is not a test set"):
        evaluation.evaluate_run(model, two, {"o": ood_loader}, id_task="c", n_samples=(0,))
    result = evaluation.evaluate_run(model, two, {"o": ood_loader}, id_task="b", n_samples=(0,))
    assert "ood/o/auroc_n0" in result.metrics


# ----- plots ---------------------------------------------------------------------------------
def _some_predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.5, 0.5, 0.5, 0.5], size=200)
    labels = rng.integers(0, 4, size=200)
    return probs, labels


def test_reliability_diagram_writes_a_png(tmp_path: Path) -> None:
    probs, labels = _some_predictions()
    target = tmp_path / "sub" / "diagram.png"
    path = plots.reliability_diagram(probs, labels, target, n_bins=10, title="demo")
    assert path == target
    data = target.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert [p.name for p in target.parent.iterdir()] == ["diagram.png"]  # no temp file left


@pytest.mark.parametrize(
    "write",
    [
        lambda probs, labels, path: plots.reliability_diagram(probs, labels, path),
        lambda probs, labels, path: plots.accuracy_coverage_plot({"N=0": (probs, labels)}, path),
    ],
    ids=["reliability_diagram", "accuracy_coverage_plot"],
)
def test_a_plot_is_written_all_or_nothing(write, tmp_path: Path, monkeypatch) -> None:
    probs, labels = _some_predictions()

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write(probs, labels, tmp_path / "figure.png")
    assert list(tmp_path.iterdir()) == []


# ----- the uncertainty decomposition and selective prediction ---------------------------------
def test_predict_with_entropy_keeps_the_mean_entropy_of_the_draws(loader) -> None:
    model = tiny_llama(0)
    torch.manual_seed(11)
    result = evaluation.predict_with_entropy(model, loader, n_samples=3)
    torch.manual_seed(11)
    draws = reference_draws(model, loader, 3)
    torch.manual_seed(11)
    probs, labels = evaluation.predict(model, loader, n_samples=3)
    assert result.draws == 3 and result.expected_entropy.dtype == torch.float64
    torch.testing.assert_close(result.probs, probs, rtol=0, atol=0)  # predict: the same draws
    torch.testing.assert_close(result.labels, labels)
    torch.testing.assert_close(result.probs, draws.mean(dim=0))
    expected = torch.tensor(entropies_by_hand(draws), dtype=torch.float64)
    torch.testing.assert_close(result.expected_entropy, expected, rtol=0, atol=1e-6)
    # the draws differ, so MI is positive, and equals H(mean) - mean H computed by hand
    mean = draws.mean(dim=0)
    by_hand = [
        -sum(float(p) * math.log(float(p)) for p in mean[i] if p > 0) - expected[i].item()
        for i in range(len(mean))
    ]
    mi = result.mutual_information()
    torch.testing.assert_close(mi, torch.tensor(by_hand, dtype=torch.float64), rtol=0, atol=1e-5)
    assert mi.min() >= 0 and mi.max() > 1e-3


def test_predict_with_entropy_at_one_draw_has_zero_mutual_information(loader) -> None:
    model = tiny_llama(0)
    for n in (0, 1):
        result = evaluation.predict_with_entropy(model, loader, n_samples=n)
        assert result.draws == 1
        torch.testing.assert_close(
            result.expected_entropy,
            torch.tensor(entropies_by_hand(result.probs[None]), dtype=torch.float64),
        )
        assert result.mutual_information().abs().max() < 1e-6


def test_evaluate_run_logs_mi_and_selective_metrics(loader, ood_loader) -> None:
    model = tiny_llama(0)
    torch.manual_seed(5)
    result = evaluation.evaluate_run(model, {"demo": loader}, {"o": ood_loader}, n_samples=(0, 2))
    torch.manual_seed(5)  # the same draws, in evaluate_run's order: test sets, then OOD sets
    test = {n: evaluation.predict_with_entropy(model, loader, n) for n in (0, 2)}
    ood = {n: evaluation.predict_with_entropy(model, ood_loader, n) for n in (0, 2)}
    got = result.metrics
    for n in (0, 2):
        for prefix, task, pred in (("test", "demo", test[n]), ("ood", "o", ood[n])):
            for name, value in metrics.selective(pred.probs, pred.labels).items():
                assert got[f"{prefix}/{task}/{name}_n{n}"] == pytest.approx(value, abs=1e-12)
    assert "test/demo/mi_n0" not in got and "ood/o/auroc_mi_n0" not in got
    assert got["test/demo/mi_n2"] == pytest.approx(
        metrics.mean_mutual_information(test[2].probs, test[2].expected_entropy), abs=1e-12
    )
    assert got["ood/o/mi_n2"] > 0
    assert got["ood/o/auroc_mi_n2"] == pytest.approx(
        metrics.ood_auroc_mi(
            test[2].probs, test[2].expected_entropy, ood[2].probs, ood[2].expected_entropy
        ),
        abs=1e-12,
    )
    assert len(got) == 2 * 2 * 6 + 2 + 2 + 1  # + auroc at each N, mi (test, ood), auroc_mi
    assert all(len(v) == 2 for v in result.predictions.values())  # (probs, labels) pairs


def test_no_mi_for_a_method_that_does_not_sample_at_test(loader, ood_loader) -> None:
    lora = tiny_llama(0, method="lora")
    result = evaluation.evaluate_run(lora, {"demo": loader}, {"o": ood_loader}, n_samples=(0, 2))
    assert not [k for k in result.metrics if "/mi_" in k or "auroc_mi" in k]
    assert "test/demo/aurc_n2" in result.metrics and "ood/o/acc_cov80_n2" in result.metrics
    # an ensemble's (probs, labels) pairs get the selective metrics only
    pairs = evaluation.predict_sets([tiny_llama(1), tiny_llama(2)], {"demo": loader}, (2,))
    assert set(evaluation.uncertainty_metrics_of(pairs)) == {
        "test/demo/aurc_n2",
        "test/demo/acc_cov80_n2",
    }


def test_accuracy_coverage_plot_writes_a_png(tmp_path: Path) -> None:
    probs, labels = _some_predictions()
    target = tmp_path / "selective" / "test_demo.png"
    curves = {"N=0": (probs, labels), "N=10": (probs[::-1].copy(), labels)}
    assert plots.accuracy_coverage_plot(curves, target, title="demo") == target
    assert target.read_bytes().startswith(PNG_SIGNATURE) and target.stat().st_size > 1000
    assert [p.name for p in target.parent.iterdir()] == ["test_demo.png"]
    with pytest.raises(ValueError, match="at least one"):
        plots.accuracy_coverage_plot({}, tmp_path / "empty.png")


def test_the_predictive_names_stay_importable_from_evaluation() -> None:
    """melora.predictive owns the predictive; its callers' `from melora.evaluation import ...`
    lines keep working."""
    for name in ("Batch", "Predictive", "class_logits", "predict", "predict_ensemble"):
        assert getattr(evaluation, name) is getattr(predictive, name)
    assert evaluation.predict_with_entropy is predictive.predict_with_entropy


def test_id_task_predictions_are_looked_up_by_their_key() -> None:
    """The OOD AUROC compares with the in-distribution entry `test/<id_task>/n<N>` of the same N,
    and names what is available when there is none."""
    id_set = {
        "test/demo/n0": (torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1])),
        "test/demo/n3": (torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([0, 1])),
    }
    ood = {"ood/o/n0": (torch.tensor([[0.6, 0.4], [0.5, 0.5]]), torch.tensor([0, 0]))}
    got = evaluation.metrics_of(ood, id_predictions=id_set, id_task="demo")
    expected = metrics.ood_auroc(id_set["test/demo/n0"][0], ood["ood/o/n0"][0])
    assert got["ood/o/auroc_n0"] == pytest.approx(expected, abs=1e-12)
    assert {k.rsplit("_", 1)[1] for k in got} == {"n0"}
    with pytest.raises(MeLoraError, match=r"task 'other' at n0: available are \['test/demo/n0'"):
        evaluation.metrics_of(ood, id_predictions=id_set, id_task="other")
