"""All layers' posteriors at once (melora/posterior.py) against the layer-by-layer computation:
the stacked KL and its gradients, the stacked draw (the same numbers as the layer-by-layer one
that ZeRO-3 uses, for the same seed), activation checkpointing, layers called on their own, and
partitioned (ZeRO-3) tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import melora
from melora import posterior

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def adapted(method: str, targets=("q_proj", "v_proj"), **config) -> LlamaForCausalLM:
    """A tiny Llama with adapters moved off their initial values (M off the identity, B != 0)."""
    model = melora.attach(
        tiny_llama(), melora.AdapterConfig(method=method, r=4, target_modules=targets, **config)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in melora.adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def params(model) -> list[torch.Tensor]:
    return [p for _, p in melora.adapter_parameters(model)]


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("melora", {"kl_variance": "paper"}),
        ("melora", {"kl_variance": "exact"}),
        ("blob", {}),
    ],
    ids=["melora-paper", "melora-exact", "blob"],
)
def test_stacked_kl_equals_the_sum_of_the_layers_kls(method: str, config: dict) -> None:
    # q/v (in 32) and down_proj (in 48): two groups of different shapes
    model = adapted(method, targets=("q_proj", "v_proj", "down_proj"), **config)
    layers = [layer for _, layer in melora.adapted_layers(model)]
    assert len(posterior.groups(layers)) == 2
    stacked = melora.kl_divergence(model, prior_eps=0.3)
    by_layer = torch.stack([layer.kl(0.3) for layer in layers]).sum()
    torch.testing.assert_close(stacked, by_layer, rtol=1e-6, atol=0)
    for g1, g2 in zip(
        torch.autograd.grad(stacked, params(model), allow_unused=True),
        torch.autograd.grad(by_layer, params(model), allow_unused=True),
        strict=True,
    ):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["melora", "blob"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_stacked_and_layer_by_layer_draws_give_the_same_numbers_for_the_same_seed(
    method: str, training: bool
) -> None:
    # E is drawn for all layers at once on both paths (dropout masks come after it on both);
    # stacked, C (or BLoB's noise) is made for all layers at once, layer by layer (ZeRO-3) in
    # each layer's forward
    model = adapted(method, dropout=0.1, flipout=True).train(training)
    with melora.sampling(model, "sample"), torch.no_grad():
        torch.manual_seed(3)
        stacked = model(IDS).logits
        assert all(layer.drawn is not None for _, layer in melora.adapted_layers(model))
        posterior.layer_by_layer(model)
        torch.manual_seed(3)
        alone = model(IDS).logits
        assert all(layer.drawn is None for _, layer in melora.adapted_layers(model))
        torch.manual_seed(4)
        other = model(IDS).logits
    with melora.sampling(model, "mean"), torch.no_grad():
        mean = model(IDS).logits
    torch.testing.assert_close(stacked, alone, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(stacked, mean) and not torch.allclose(alone, other)  # it sampled


@pytest.mark.parametrize("method", ["melora", "blob"])
def test_activation_checkpointing_recomputes_with_the_forwards_draw(method: str) -> None:
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = adapted(method, dropout=0.0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        torch.manual_seed(4)
        with melora.kl_from_forward(model, 0.2) as kl:
            loss = model(IDS, labels=IDS).loss
        (loss + 1e-3 * kl.total()).backward()
        return [p.grad for p in params(model)]

    for g1, g2 in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_a_layer_called_on_its_own_draws_its_own_noise() -> None:
    model = adapted("melora").eval()
    layer = next(layer for _, layer in melora.adapted_layers(model))
    with melora.sampling(model, "sample"), torch.no_grad():
        model(IDS)
        assert layer.drawn is not None and layer.drawn_noise() is None  # outside the forward
        x = torch.randn(3, layer.in_features)
        y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)


def test_partitioned_tensors_fall_back_to_the_layers_own_draw_and_kl() -> None:
    # ZeRO-3 marks a partitioned parameter with its full shape (ds_shape) beside an empty local one
    model = adapted("melora")
    layers = [layer for _, layer in melora.adapted_layers(model)]
    expected = torch.stack([layer.kl(0.1) for layer in layers]).sum()
    layers[0].lora_H.ds_shape = (99,)  # as if partitioned: the group cannot be stacked
    assert not posterior.is_whole(layers[0])
    torch.testing.assert_close(melora.kl_divergence(model, 0.1), expected, rtol=1e-6, atol=0)
    with melora.sampling(model, "sample"), torch.no_grad():
        with melora.kl_from_forward(model, 0.1) as kl:
            model(IDS)
    assert all(layer.drawn is None for layer in layers)  # each layer drew its own C
    torch.testing.assert_close(kl.total(), expected, rtol=1e-6, atol=0)
