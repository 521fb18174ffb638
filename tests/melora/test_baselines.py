"""The baselines against independent computations: MC dropout's N-sample average by hand, the
ensemble's mean of members computed one by one, and Laplace-LoRA's KFAC curvature and GLM
predictive against the exact Gauss-Newton matrix of a one-token example."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import melora
from melora import metrics
from melora.baselines import (
    LaplaceConfig,
    LaplaceLoRA,
    average_predictions,
    ensemble_seeds,
    evaluate_ensemble,
    kfac_memory,
    predict_members,
)
from melora.evaluation import class_logits, predict, predict_ensemble
from melora.layers import LAYER_CLASSES, LoraLinear
from melora.tasks import demo_model_config, demo_tokenizer, load_task, make_loader

TOKENIZER = demo_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def demo_model(config: melora.AdapterConfig, adapter_seed: int = 1) -> nn.Module:
    """The demo's tiny Llama (the same base weights every time) with a fresh adapter."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(demo_model_config(TOKENIZER)).eval()
    torch.manual_seed(adapter_seed)
    return melora.attach(model, config)


def randomize(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in melora.adapter_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def loader_of(split: str, n: int, batch_size: int = 16, task: str = "demo"):
    data = load_task(task, splits=(split,))[split]
    return make_loader(data.select(range(n)), TOKENIZER, batch_size, max_length=128)


# ----- MCD --------------------------------------------------------------------------------------
def test_method_names_map_to_lora_layers_and_mcd_needs_dropout() -> None:
    for method in ("mcd", "ens", "lap"):
        assert LAYER_CLASSES[method] is LoraLinear
    with pytest.raises(melora.ConfigError, match=r"'mcd' with adapter.dropout=0.0.*dropout > 0"):
        melora.AdapterConfig(method="mcd", dropout=0.0)
    assert melora.AdapterConfig(method="mcd").dropout == 0.1
    sampling = {
        m: melora.AdapterConfig(method=m).samples_at_test
        for m in ("lora", "blob", "melora", "mcd", "ens", "lap")
    }
    assert sampling == {
        "lora": False,
        "blob": True,
        "melora": True,
        "mcd": True,
        "ens": False,
        "lap": False,
    }
    model = demo_model(melora.AdapterConfig(method="mcd", r=4))
    assert {type(layer) for _, layer in melora.adapted_layers(model)} == {LoraLinear}


def test_mcd_keeps_dropout_on_only_when_sampling_and_averages_n_draws() -> None:
    model = demo_model(melora.AdapterConfig(method="mcd", r=4, dropout=0.1))
    randomize(model, seed=3)
    loader = loader_of("test", 32)
    mean_probs, labels = predict(model, loader, n_samples=0)
    again, _ = predict(model, loader, n_samples=0)
    torch.testing.assert_close(again, mean_probs, rtol=0, atol=0)
    # N = 0 is the dropout-free function: a copy whose layers have no dropout, sampled once
    no_dropout = copy.deepcopy(model)
    for _, layer in melora.adapted_layers(no_dropout):
        layer.dropout = 0.0
    torch.testing.assert_close(predict(no_dropout, loader, 1)[0], mean_probs, rtol=0, atol=1e-6)

    torch.manual_seed(11)
    mc, mc_labels = predict(model, loader, n_samples=10)
    assert torch.equal(mc_labels, labels)
    assert (mc - mean_probs).abs().max() > 1e-3  # dropout was on
    # the N-sample predictive by hand: per batch, the mean of 10 softmaxes, draws in loader order
    torch.manual_seed(11)
    rows = []
    with torch.no_grad(), melora.sampling(model, "sample"):
        for batch in loader:
            draws = [torch.softmax(class_logits(model, batch), -1) for _ in range(10)]
            rows.append(torch.stack(draws).mean(0))
    torch.testing.assert_close(mc, torch.cat(rows), rtol=1e-6, atol=1e-7)
    assert not model.training  # predict restored eval(); the layers are back in "auto"
    assert {layer.sampling_mode for _, layer in melora.adapted_layers(model)} == {"auto"}


# ----- ENS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def member_dirs(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("members")
    dirs = []
    for seed in ensemble_seeds(1):
        model = demo_model(melora.AdapterConfig(method="lora", r=4, dropout=0.1), adapter_seed=seed)
        randomize(model, seed=seed)
        dirs.append(melora.save_adapter(model, root / f"seed{seed}"))
    return dirs


def test_ensemble_seeds_are_disjoint_sets() -> None:
    assert ensemble_seeds(1) == (1, 2, 3)
    assert ensemble_seeds(2) == (4, 5, 6) and ensemble_seeds(3, size=2) == (5, 6)
    with pytest.raises(melora.MeLoraError, match="seed 0 must be an integer >= 1"):
        ensemble_seeds(0)


def test_ensemble_probabilities_are_the_mean_of_the_members(member_dirs) -> None:
    test, ood = loader_of("test", 40), loader_of("test", 24, task="demo_ood")
    members = []  # each member in its own model, predicted on its own
    for directory in member_dirs:
        model = demo_model(melora.read_adapter_config(directory))
        members.append(melora.load_adapter(model, directory))
    by_hand = [predict(m, test, 0) for m in members]
    expected = torch.stack([p for p, _ in by_hand]).double().mean(0).float()
    assert min((by_hand[0][0] - p).abs().max() for p, _ in by_hand[1:]) > 1e-3  # members differ

    shared = demo_model(melora.read_adapter_config(member_dirs[0]), adapter_seed=99)
    got = predict_members(shared, member_dirs, {"demo": test}, n_samples=(0, 3))
    assert set(got) == {"test/demo/n0", "test/demo/n3"}
    torch.testing.assert_close(got["test/demo/n0"][0], expected, rtol=0, atol=1e-6)
    # LoRA members are deterministic: N = 3 is the same prediction (dropout stays off)
    torch.testing.assert_close(got["test/demo/n3"][0], expected, rtol=0, atol=0)
    assert torch.equal(got["test/demo/n0"][1], by_hand[0][1])
    torch.testing.assert_close(predict_ensemble(members, test, 0)[0], expected, rtol=0, atol=1e-6)

    evaluation = evaluate_ensemble(
        shared, member_dirs, {"demo": test}, {"demo_ood": ood}, n_samples=(0, 10)
    )
    ood_expected = torch.stack([predict(m, ood, 0)[0] for m in members]).double().mean(0).float()
    for key, value in metrics.compute_all(expected, by_hand[0][1]).items():
        assert evaluation.metrics[f"test/demo/{key}_n10"] == pytest.approx(
            value, rel=1e-5, abs=1e-7
        )
    auroc = metrics.ood_auroc(expected, ood_expected)
    assert evaluation.metrics["ood/demo_ood/auroc_n0"] == pytest.approx(auroc, rel=1e-6)
    assert sorted(evaluation.predictions) == [
        "ood/demo_ood/n0",
        "ood/demo_ood/n10",
        "test/demo/n0",
        "test/demo/n10",
    ]


def test_average_predictions_refuses_members_that_saw_other_examples() -> None:
    a = {"test/x/n0": (torch.tensor([[0.2, 0.8]]), torch.tensor([1]))}
    b = {"test/x/n0": (torch.tensor([[0.6, 0.4]]), torch.tensor([0]))}
    with pytest.raises(melora.MeLoraError, match="member 1 predicted other examples"):
        average_predictions([a, b])
    c = {"test/x/n0": (torch.tensor([[0.6, 0.4]]), torch.tensor([1]))}
    torch.testing.assert_close(
        average_predictions([a, c])["test/x/n0"][0], torch.tensor([[0.4, 0.6]])
    )


# ----- LAP --------------------------------------------------------------------------------------
class OneBatch:
    """A loader of one fixed batch, with the `.dataset` whose length laplace-torch reads as N."""

    def __init__(self, batch: dict) -> None:
        self.batch, self.dataset = batch, [None] * len(batch["labels"])

    def __iter__(self):
        yield self.batch


def one_token_batch() -> dict:
    answers = torch.tensor([TOKENIZER.convert_tokens_to_ids(c) for c in "ABC"])
    return {
        "input_ids": torch.tensor([[TOKENIZER.convert_tokens_to_ids("7")]]),
        "attention_mask": torch.ones(1, 1, dtype=torch.long),
        "labels": torch.tensor([1]),
        "answer_token_ids": answers,
    }


def test_kfac_and_glm_predictive_equal_the_exact_gauss_newton_on_one_token() -> None:
    """One example of one token: KFAC is exact for each LoRA factor (one input vector, one
    output), so each Kronecker block equals the exact GGN block J^T (diag p - p p^T) J, and the
    GLM covariance equals J (GGN_blocks + lambda I)^-1 J^T computed densely by hand."""
    model = demo_model(melora.AdapterConfig(method="lap", r=2, dropout=0.0))
    randomize(model, seed=5, scale=0.5)
    batch, lam = one_token_batch(), 0.7
    with LaplaceLoRA(
        model, LaplaceConfig(prior_tuning="none", prior_precision=lam, link_approx="probit")
    ) as lap:
        lap.fit(OneBatch(batch))
        params = [p for p in lap.wrapper.parameters() if p.requires_grad]
        f = lap.wrapper(batch)[0]
        J = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(f[k], params, retain_graph=True)]
                )
                for k in range(3)
            ]
        )
        p = torch.softmax(f.detach().double(), -1)
        ggn = J.double().T @ (torch.diag(p) - torch.outer(p, p)) @ J.double()  # float64 by hand
        blocks, start = [], 0
        for _name, F0, F1 in lap.kron_factors():
            size = F0.shape[0] * F1.shape[0]
            exact = ggn[start : start + size, start : start + size]
            kfac = torch.kron(F0.double(), F1.double())
            torch.testing.assert_close(kfac, exact, rtol=0, atol=1e-5 * ggn.abs().max().item())
            blocks.append(kfac + lam * torch.eye(size, dtype=torch.float64))
            start += size
        assert start == J.shape[1] and any(F0.abs().max() > 0 for _, F0, _ in lap.kron_factors())
        covariance = J.double() @ torch.linalg.inv(torch.block_diag(*blocks)) @ J.double().T
        Js, f_mu = lap._jacobians(batch)
        torch.testing.assert_close(Js[0], J.detach(), rtol=0, atol=1e-5 * J.abs().max().item())
        torch.testing.assert_close(
            lap.la.functional_variance(Js)[0].double(), covariance, rtol=1e-3, atol=1e-7
        )
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * covariance.diagonal())
        probit = torch.softmax(kappa * f_mu[0].double(), -1).float()
        torch.testing.assert_close(
            lap.predict(OneBatch(batch), (0, 5))[5][0][0], probit, rtol=1e-4, atol=1e-6
        )
    assert all(type(layer) is LoraLinear for _, layer in melora.adapted_layers(model))


@pytest.fixture(scope="module")
def trained_map() -> nn.Module:
    """A LoRA adapter (method lap) trained 40 steps on the demo task, in process."""
    model = demo_model(melora.AdapterConfig(method="lap", r=8, alpha=16, dropout=0.0))
    train = load_task("demo", splits=("train",))["train"]
    loader = make_loader(train, TOKENIZER, 32, shuffle=True, seed=0, max_length=128)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for batch in itertools.islice(itertools.cycle(loader), 40):
        loss = F.cross_entropy(class_logits(model, batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("link_approx", ["mc", "probit"])
def test_huge_prior_precision_gives_the_map_and_a_small_one_lowers_confidence(
    trained_map, link_approx: str
) -> None:
    few = loader_of("test", 12, batch_size=4)
    map_probs, labels = predict(trained_map, few, 0)
    with LaplaceLoRA(
        trained_map, LaplaceConfig(prior_tuning="none", link_approx=link_approx)
    ) as lap:
        lap.fit(loader_of("train", 64, batch_size=8))
        confidence = {}
        for lam in (1e12, 1.0, 1e-3):
            lap.prior_precision = lam
            probs, got_labels = lap.predict(few, (100,), torch.Generator().manual_seed(0))[100]
            assert torch.equal(got_labels, labels)
            confidence[lam] = probs.max(1).values.mean().item()
            if lam == 1e12:  # the posterior is a point: the GLM predictive is the MAP's
                torch.testing.assert_close(probs, map_probs, rtol=0, atol=1e-5)
    map_confidence = map_probs.max(1).values.mean().item()
    assert map_confidence > 0.6
    assert confidence[1.0] < map_confidence - 1e-3
    assert confidence[1e-3] < map_confidence - 0.1
    if link_approx == "probit":  # closed form: confidence falls as the logit variance grows
        assert confidence[1e-3] < confidence[1.0]


def test_lap_end_to_end_on_the_demo_task(trained_map) -> None:
    state = {k: v.clone() for k, v in melora.adapter_state_dict(trained_map).items()}
    factor_bytes = kfac_memory_by_hand(trained_map)
    assert kfac_memory(trained_map)["factors"] == factor_bytes
    test, ood = loader_of("test", 60, batch_size=2), loader_of("test", 40, 2, task="demo_ood")
    with LaplaceLoRA(trained_map, LaplaceConfig(prior_tuning="marglik")) as lap:
        lap.fit(loader_of("train", 400, batch_size=16))
        prior = lap.tune_prior_precision()
        assert prior.numel() == 1 and prior.item() > 0 and prior.item() != 1.0
        assert math.isfinite(lap.log_marginal_likelihood())
        memory = lap.memory_bytes()
        assert memory["factors"] == factor_bytes
        assert memory["eigendecomposition"] > memory["factors"]
        preds = lap.predict_sets(
            {"demo": test}, (0, 10), generator=torch.Generator().manual_seed(0)
        )
        preds.update(lap.predict_sets({"demo_ood": ood}, (0, 10), "ood"))
        # the gridsearch on a validation set picks the lambda of lowest validation NLL
        lap.config.prior_tuning, lap.config.grid_size = "gridsearch", 5
        lap.tune_prior_precision(
            loader_of("validation", 20, batch_size=2), generator=torch.Generator().manual_seed(0)
        )
        grid = dict(lap.grid)
        assert len(grid) == 5 and lap.prior_precision.item() == min(grid, key=grid.get)
    # the model is back as it was: LoRA layers, the same parameters, the MAP predictions
    assert all(type(layer) is LoraLinear for _, layer in melora.adapted_layers(trained_map))
    for k, v in melora.adapter_state_dict(trained_map).items():
        assert torch.equal(v, state[k])
    map_probs, labels = predict(trained_map, test, 0)
    torch.testing.assert_close(preds["test/demo/n0"][0], map_probs, rtol=0, atol=1e-5)
    assert torch.equal(preds["test/demo/n10"][1], labels)
    ood_probs = preds["ood/demo_ood/n10"][0]
    assert ood_probs.shape == (40, 5) and torch.allclose(ood_probs.sum(1), torch.ones(40))
    three = [
        i
        for i, b in enumerate(
            load_task("demo", splits=("test",))["test"].select(range(60))["n_choices"]
        )
        if b == 3
    ]
    assert (
        three and preds["test/demo/n10"][0][three, 3].abs().max() == 0
    )  # a missing choice stays at 0
    lap_confidence = preds["test/demo/n10"][0].max(1).values.mean()
    assert lap_confidence < map_probs.max(1).values.mean()
    values = metrics.compute_all(preds["test/demo/n10"][0], labels)
    assert all(math.isfinite(v) for v in values.values())


def test_lap_runs_on_a_model_trained_with_activation_checkpointing(trained_map) -> None:
    """Hugging Face's gradient checkpointing hooks the input embeddings with `requires_grad_`, which
    laplace-torch's Jacobians (torch.func) refuse: LAP pauses it, gives the same predictions as
    without it, and restores it on exit."""
    test = loader_of("test", 8, batch_size=4)

    def lap_probs() -> torch.Tensor:
        with LaplaceLoRA(trained_map, LaplaceConfig(prior_tuning="none", link_approx="mc")) as lap:
            lap.fit(loader_of("train", 32, batch_size=8))
            preds = lap.predict_sets(
                {"demo": test}, (10,), generator=torch.Generator().manual_seed(0)
            )
        return preds["test/demo/n10"][0]

    plain = lap_probs()
    trained_map.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    try:
        hooks = list(trained_map._require_grads_hooks)
        assert hooks and trained_map.is_activation_checkpointing
        torch.testing.assert_close(lap_probs(), plain, rtol=0, atol=1e-6)
        assert trained_map.is_activation_checkpointing and trained_map._require_grads_hooks
    finally:
        trained_map.activation_checkpointing_disable()
        trained_map.disable_input_require_grads()
    assert not trained_map.is_activation_checkpointing


def kfac_memory_by_hand(model: nn.Module) -> int:
    """r^2 + n^2 + m^2 + r^2 float32 values per LoRA layer, counted by hand."""
    total = 0
    for _, layer in melora.adapted_layers(model):
        (r, n), (m, _) = layer.lora_A.shape, layer.lora_B.shape
        total += 4 * (2 * r * r + n * n + m * m)
    return total


def test_kfac_memory_of_llama2_13b_q_v_is_16_8_gb() -> None:
    config = LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    melora.attach(model, melora.AdapterConfig(method="lap", r=8))
    memory = kfac_memory(model)
    assert memory["factors"] == 80 * 4 * (2 * 8 * 8 + 2 * 5120 * 5120) == 16_777_256_960
    assert 33.5e9 < memory["with_eigendecomposition"] < 33.6e9


def test_lap_refuses_bayesian_layers_and_bad_config() -> None:
    model = demo_model(melora.AdapterConfig(method="melora", r=2))
    with pytest.raises(melora.MeLoraError, match=r"around a LoRA \(MAP\) adapter.*MeLoraLinear"):
        LaplaceLoRA(model)
    assert all(type(layer).__name__ == "MeLoraLinear" for _, layer in melora.adapted_layers(model))
    for kwargs, message in (
        ({"link_approx": "bridge"}, "laplace.link_approx='bridge' is not allowed"),
        ({"prior_precision": 0}, "laplace.prior_precision=0.0 must be > 0"),
        ({"grid_min": 2, "grid_max": 1}, "laplace.grid_max=1.0 must be > laplace.grid_min=2.0"),
        ({"predict_batch_size": 0}, "laplace.predict_batch_size=0 must be an integer >= 1"),
        ({"prior_structure": "layerwise", "prior_tuning": "gridsearch"}, "only tuned by 'marglik'"),
    ):
        with pytest.raises(melora.ConfigError, match=message):
            LaplaceConfig(**kwargs)
