"""The posteriors of all adapted layers at once: one draw per forward, one KL per step.

Drawn layer by layer, Me-LoRA's C = M + Omega * E costs a handful of tiny operations per adapted
layer (square H, draw E, add; and their backward), and its KL about forty: on a GPU each is a
kernel launch whatever its size, so at Llama2-13B (80 adapted layers) they add thousands of
launches to every step. Here the layers with the same method and shapes are stacked (L x r x r
for M and Omega, L x r x n for A) and each operation runs once for all of them:

- `PosteriorDraw`, installed on the model by `adapters.attach`, draws every layer's noise when
  the model's forward starts: Me-LoRA's C (L x r x r) and BLoB's noise on A, in one call each.
  Each layer then takes its slice (`LoraLinear.drawn_noise`). Only its r x r product stays per
  layer. The draw is kept for the backward, where activation checkpointing recomputes a layer.
- `kl_divergence(layers, prior_eps)`: the KL of each group from its stacked tensors
  (`layers.melora_kl`, `layers.gaussian_kl`: the same functions a single layer uses).
- Inside `adapters.kl_from_forward`, the KL of a stacked group is computed from the same stacks
  as the draw, so the gradients of M and H from both meet once per group.

The stacked draw reads the parameters outside the layers' own forward, and hands their gradients
over after every layer's backward: DeepSpeed ZeRO-3 supports neither (it partitions parameters
outside their module's forward, and reduces each gradient from a hook it expects within its
module's backward), so under ZeRO-3 only E is drawn at once and each layer makes its C and its KL
in its own forward (`layer_by_layer`), as does a group with a partitioned tensor.
`sample_granularity: "example"` (one C per sequence) draws in the layers. `kl_divergence` works
under ZeRO-3 on gathered (or persistent) tensors: the two-step KL uses it.

Numbers are unchanged: the same formulas. The random numbers E are drawn for all layers at once
in every case (stacked or not, ZeRO-3 or not), so a seed gives the same draws on every path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
from torch import Tensor, nn

from melora.layers import (
    BlobLinear,
    LoraLinear,
    MeLoraLinear,
    compute_dtype,
    gaussian_kl,
    melora_kl,
    upcast,
)


class LayerStack:
    """Adapted layers of one method with the same shapes, their tensors stacked on a new dim 0."""

    def __init__(self, layers: list[LoraLinear]) -> None:
        self.layers = layers
        self.config = layers[0].config

    def _stack(self, name: str) -> Tensor:
        return upcast(torch.stack([getattr(layer, name) for layer in self.layers]))

    @cached_property
    def A(self) -> Tensor:  # noqa: N802 - the paper's name
        """L x r x n: A of each layer (BLoB: the mean of A)."""
        return self._stack("lora_A")

    @cached_property
    def M(self) -> Tensor:  # noqa: N802 - the paper's name
        """L x r x r: Me-LoRA's posterior mean of C."""
        return self._stack("lora_M")

    @cached_property
    def omega(self) -> Tensor:
        """L x r x r: Me-LoRA's posterior std of C, Omega = H**2."""
        return self._stack("lora_H").square()

    @cached_property
    def a_std(self) -> Tensor:
        """L x r x n: BLoB's posterior std of A, R_A**2."""
        return self._stack("lora_A_rho").square()

    def kl(self, prior_eps: float | Tensor) -> Tensor | None:
        """The summed KL of the layers against N(0, (sigma_p + prior_eps)^2); None for LoRA."""
        s_p = self.config.sigma_p + prior_eps
        if isinstance(self.layers[0], MeLoraLinear):
            return melora_kl(self.A, self.M, self.omega, s_p, self.config.kl_variance)
        if isinstance(self.layers[0], BlobLinear):
            return gaussian_kl(self.A, self.a_std.square(), s_p)
        return None

    def draw(self) -> tuple[Tensor, ...] | None:
        """One draw of each layer's noise: Me-LoRA's C = M + Omega * E, BLoB's (R_A**2) * E."""
        E = self.standard_normal()
        if E is None:
            return None
        if isinstance(self.layers[0], MeLoraLinear):
            return torch.addcmul(self.M, self.omega, E).unbind(0)
        return (self.a_std * E).unbind(0)

    def standard_normal(self) -> Tensor | None:
        """E ~ N(0, I) for each layer, stacked (L x r x r for Me-LoRA, L x r x n for BLoB), read
        from no parameter (so also where ZeRO-3 partitions them); None for LoRA."""
        layer = self.layers[0]
        A = layer.lora_A
        if isinstance(layer, MeLoraLinear):
            shape = (layer.r, layer.r)
        elif isinstance(layer, BlobLinear):
            shape = tuple(getattr(A, "ds_shape", A.shape))
        else:
            return None
        return torch.randn((len(self.layers), *shape), device=A.device, dtype=compute_dtype(A))


def groups(layers: Iterable[LoraLinear]) -> list[list[LoraLinear]]:
    """The layers grouped by method, shapes, dtype and device, in module order within a group."""
    out: dict[tuple, list[LoraLinear]] = {}
    for layer in layers:
        A = layer.lora_A
        key = (type(layer), tuple(A.shape), A.dtype, A.device, id(layer.config))
        out.setdefault(key, []).append(layer)
    return list(out.values())


def is_whole(layer: LoraLinear) -> bool:
    """Whether every adapter tensor of the layer is whole here (not a ZeRO-3 partition)."""
    return all(
        tuple(p.shape) == tuple(getattr(p, "ds_shape", p.shape))
        for p in layer.parameters(recurse=False)
    )


def kl_divergence(layers: list[LoraLinear], prior_eps: float | Tensor = 0.0) -> Tensor:
    """Sum of the layers' KLs, each group of same-shaped layers computed at once (`LayerStack`)."""
    terms = []
    for group in groups(layers):
        if all(map(is_whole, group)):
            term = LayerStack(group).kl(prior_eps)
            terms.extend([] if term is None else [term])
        else:  # partitioned (ZeRO-3): only the layer's own forward may read it
            terms.extend(layer.kl(prior_eps) for layer in group)
    if not terms:
        return torch.zeros((), device=next(iter(layers)).lora_A.device)
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


class PosteriorDraw:
    """Draws the posterior noise of all of a model's adapted layers when its forward starts.

    Installed by `adapters.attach` as a forward pre-hook (and a forward hook) of the model. Each
    group of same-shaped layers that samples in this forward (`LoraLinear.is_sampling`, with
    `sample_granularity: "batch"`) gets one stacked draw; each layer reads its slice through
    `drawn_noise`. When `kl_collector` is set (`adapters.kl_from_forward`), the group's KL is
    computed here too, from the same stacked tensors, and handed to the collector.
    """

    def __init__(self, layers: list[LoraLinear]) -> None:
        self.groups = groups(layers)
        self.in_forward = False
        self.kl_collector = None
        # False (under ZeRO-3: `layer_by_layer`): only E is drawn at once; each layer makes its
        # noise from it, and computes its KL, in its own forward
        self.stack_parameters = True
        for layer in layers:
            layer.posterior_draw = self

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self.before_forward)
        model.register_forward_hook(self.after_forward, always_call=True)

    def valid(self) -> bool:
        """A draw is used inside the model's forward, and in the backward that follows it."""
        # torch's own checkpoint code tells a backward apart this way (-1 outside any backward)
        return self.in_forward or torch._C._current_graph_task_id() != -1

    def before_forward(self, module: nn.Module, args: tuple) -> None:
        self.in_forward = True
        if self.stack_parameters and any(map(_under_zero3, self.groups)):
            self.stack_parameters = False  # see `layer_by_layer`
        for group in self.groups:
            for layer in group:
                layer.drawn = layer.drawn_normal = None
            stack, sampling = LayerStack(group), all(map(_draws_per_forward, group))
            if self.stack_parameters and all(map(is_whole, group)):
                if sampling:
                    for layer, noise in zip(group, stack.draw() or (), strict=False):
                        layer.drawn = noise
                if self.kl_collector is not None:
                    self.kl_collector.add_group(group, stack.kl(self.kl_collector.prior_eps))
            elif sampling and (E := stack.standard_normal()) is not None:
                for layer, E_layer in zip(group, E.unbind(0), strict=True):
                    layer.drawn_normal = E_layer  # each layer makes its noise (and KL) itself

    def after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self.in_forward = False


def layer_by_layer(model: nn.Module) -> None:
    """Have every adapted layer of `model` make its noise (C = M + Omega * E) and compute its KL in
    its own forward; only E is still drawn for all layers at once, so the numbers are the same.

    A model under DeepSpeed ZeRO-3 is switched to it by itself at its first forward: ZeRO-3 reduces
    each parameter's gradient from a hook it expects to fire within its module's backward, and a
    stacked draw at the model's root hands M's and H's gradients over after every module's
    backward (measured: ZeRO-3's gradient accumulation fails with a shape error). There, the KL of
    all layers at once still serves the two-step KL (`kl_divergence` outside the forward).
    """
    for draw in draws_of(m for m in model.modules() if isinstance(m, LoraLinear)):
        draw.stack_parameters = False


def _under_zero3(group: list[LoraLinear]) -> bool:
    """Whether DeepSpeed ZeRO-3 manages the group's tensors (it gives each one a `ds_id`)."""
    return any(hasattr(p, "ds_id") for layer in group for p in layer.parameters(recurse=False))


def _draws_per_forward(layer: LoraLinear) -> bool:
    """Whether the layer samples in this forward with one draw for the whole batch."""
    return layer.is_sampling() and layer.config.sample_granularity == "batch"


def draws_of(layers: Iterable[LoraLinear]) -> Iterator[PosteriorDraw]:
    """The distinct `PosteriorDraw`s the layers belong to."""
    seen: dict[int, PosteriorDraw] = {}
    for layer in layers:
        draw = layer.posterior_draw
        if isinstance(draw, PosteriorDraw) and id(draw) not in seen:
            seen[id(draw)] = draw
            yield draw


@contextmanager
def collecting_kl(layers: list[LoraLinear], collector) -> Iterator[None]:
    """Inside: each draw hands its groups' KL to `collector` (see `adapters.kl_from_forward`)."""
    draws = list(draws_of(layers))
    for draw in draws:
        draw.kl_collector = collector
    try:
        yield
    finally:
        for draw in draws:
            draw.kl_collector = None
