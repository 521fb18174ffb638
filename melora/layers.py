"""The adapted linear layers: LoRA, BLoB and Me-LoRA around a frozen `nn.Linear`.

All three compute `y = W0 x + s * delta(x)` with `s = alpha / r`; they differ in `delta`:

- LoRA:    delta(x) = B A d(x)                         (d = dropout)
- BLoB:    delta(x) = B A~ d(x),  A~ = M_A + (R_A**2) * E,  E ~ N(0, I) of shape r x n
- Me-LoRA: delta(x) = B C A d(x), C  = M + (H**2) * E,      E ~ N(0, I) of shape r x r

Each layer has a sampling mode (see `SAMPLING_MODES`): "sample" draws the random parts, "mean" is
deterministic (C = M, A~ = M_A, no dropout), and "auto" (the default) samples in `train()` and is
deterministic in `eval()`, like a plain PEFT LoRA layer. Dropout belongs to training (METHOD.md):
in `eval()` a BLoB or Me-LoRA layer draws from its posterior alone, and only a LoRA layer keeps
dropout on when sampling, since there dropout is the sampler (MC dropout, method `mcd`).

The KL of the posterior against the prior N(0, s_p^2) is a method of each layer (`kl`). Under
DeepSpeed ZeRO-3 the adapter parameters are gathered only inside a module's forward, so a layer
can also compute its KL inside its forward and hand it to a collector (`adapters.kl_from_forward`).

The injection is written here rather than through PEFT's custom-module hooks: the three layers
are about 200 lines, the state-dict names stay ours across PEFT releases, and interoperability
comes from `adapters.export_mean_lora`, which writes a standard PEFT LoRA for the mean model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melora.config import AdapterConfig

SAMPLING_MODES = ("auto", "mean", "sample")


class PosteriorDrawLike(Protocol):
    """What a layer asks of the draw made for its model's forward (`posterior.PosteriorDraw`)."""

    def valid(self) -> bool: ...


LOG_FLOOR = 1e-6
"""Added to a posterior std inside the KL's log (as BLoB's code does). An optimiser step can take
an entry of H (or BLoB's R_A) to 0, where -log Omega and its gradient -2/H are unbounded; with the
floor the KL stays finite and its gradient in H is at most 1 / sqrt(LOG_FLOOR) = 1000, while at the
initial std (about 2e-3) the value moves by under 0.1%."""


class LoraLinear(nn.Module):
    """LoRA around a frozen linear layer: `y = W0 x + s B A dropout(x)`.

    A (r x n) starts Kaiming-uniform like PEFT's, B (m x r) starts at zero, so the adapted layer
    starts equal to the base layer. The adapter path computes in float32 whatever the base dtype
    (as PEFT's `autocast_adapter_dtype`): the input and the adapter parameters are upcast (DeepSpeed's
    bf16 mode casts every parameter, the adapter's included, to bf16), and the update is cast back
    to the base layer's dtype. For Me-LoRA this keeps the posterior noise: near M = I bf16's spacing
    (0.004-0.008) exceeds Omega (about 0.002), so C = M + Omega * E in bf16 rounds most of it away.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.r = config.r
        self.scaling = config.scaling
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout = config.dropout
        self.sampling_mode = "auto"
        # Set by `adapters.kl_from_forward`: called with the layer itself inside its forward.
        self.kl_hook: Callable[[LoraLinear], None] | None = None
        # Set by `posterior.PosteriorDraw` (installed by `adapters.attach`): the posterior noise of
        # all the model's layers is drawn at once when the model's forward starts (`drawn_noise`,
        # or only its standard normal part: `standard_normal`).
        self.posterior_draw: PosteriorDrawLike | None = None
        self.drawn: Tensor | None = None
        self.drawn_normal: Tensor | None = None
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=device))
        self.add_posterior_parameters(device)
        self.reset_adapter_parameters()

    def add_posterior_parameters(self, device: torch.device) -> None:
        """Create the method's extra parameters (none for LoRA)."""

    def reset_adapter_parameters(self) -> None:
        """A as PEFT's `kaiming_uniform_(a=sqrt(5))`, B = 0 (nothing to do on the meta device)."""
        if self.lora_A.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # ----- sampling --------------------------------------------------------------------------
    # A LoRA layer has no posterior: when it samples at test, dropout is its sampler (MC dropout).
    # BLoB and Me-LoRA draw from their posterior and apply dropout in training only.
    dropout_at_test = True

    def is_sampling(self) -> bool:
        """Whether this forward draws noise (the posterior's, or dropout masks for LoRA)."""
        if self.sampling_mode == "auto":
            return self.training
        return self.sampling_mode == "sample"

    def drawn_noise(self) -> Tensor | None:
        """This forward's posterior noise, drawn for all layers at once, or None: make your own.

        Valid inside the forward of the model it was drawn for, and in the backward after it
        (where activation checkpointing recomputes the layer: it must see the same draw). A layer
        called on its own, outside its model's forward, draws its own noise.
        """
        return self._this_forwards(self.drawn)

    def standard_normal(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """E ~ N(0, I) of `shape`: this forward's, drawn for all layers at once where it was
        (the same numbers as `drawn_noise` is made from), else a fresh draw."""
        E = self._this_forwards(self.drawn_normal)
        return torch.randn(shape, device=like.device, dtype=like.dtype) if E is None else E

    def _this_forwards(self, t: Tensor | None) -> Tensor | None:
        draw = self.posterior_draw
        return None if t is None or draw is None or not draw.valid() else t

    def applies_dropout(self, sample: bool) -> bool:
        """Dropout while sampling: in `train()` for every method, in `eval()` for LoRA only (MCD)."""
        return sample and self.dropout > 0 and (self.training or self.dropout_at_test)

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        sample = self.is_sampling()
        x = x.to(compute_dtype(self.lora_A))
        if self.applies_dropout(sample):
            # training=True: a LoRA layer in "sample" mode keeps dropout on in eval() (MC dropout)
            x = F.dropout(x, self.dropout, training=True)
        delta = self.delta(x, sample)
        if self.kl_hook is not None:
            self.kl_hook(self)
        return result + (self.scaling * delta).to(result.dtype)

    def delta(self, x: Tensor, sample: bool) -> Tensor:
        """The low-rank update before scaling: `B A x`."""
        return F.linear(F.linear(x, upcast(self.lora_A)), upcast(self.lora_B))

    def kl(self, prior_eps: float | Tensor = 0.0) -> Tensor:
        """LoRA has no posterior: its KL is 0."""
        return self.lora_A.new_zeros(())

    def mean_lora_factors(self) -> tuple[Tensor, Tensor]:
        """(A', B') with `B' A'` equal to the mean update, for a plain LoRA export."""
        return self.lora_A.detach(), self.lora_B.detach()

    def factors(self) -> dict[str, Tensor]:
        """The live factor tensors by their names in METHOD.md."""
        return {"A": self.lora_A, "B": self.lora_B}

    def extra_repr(self) -> str:
        return (
            f"method={self.config.method}, in={self.in_features}, out={self.out_features}, "
            f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}, sampling={self.sampling_mode}"
        )


class MeLoraLinear(LoraLinear):
    """Me-LoRA: `y = W0 x + s B C A dropout(x)` with `C = M + Omega * E`, `Omega = H**2`.

    M starts at the identity (the mean adapter starts equal to LoRA's B A) and H at
    U(eps0 / sqrt(2), eps0) (METHOD.md). Per output i, with u = A x, the sampled update has

        mean  s (B M u)_i,   variance  s^2 sum_kl B_ik^2 Omega_kl^2 u_l^2.

    `sample_granularity = "batch"` draws one E per forward; `"example"` one E per leading index
    of the input (one per sequence), applied as a batched r x r product.
    """

    dropout_at_test = False  # at test the N draws come from the posterior alone

    def add_posterior_parameters(self, device: torch.device) -> None:
        self.lora_M = nn.Parameter(torch.empty(self.r, self.r, device=device))
        self.lora_H = nn.Parameter(torch.empty(self.r, self.r, device=device))

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        eps0 = self.config.init_std
        if self.lora_M.is_meta:
            return
        with torch.no_grad():
            self.lora_M.copy_(torch.eye(self.r))
            self.lora_H.uniform_(eps0 / math.sqrt(2), eps0)

    @property
    def omega(self) -> Tensor:
        """Omega = H**2, the posterior std of C (elementwise, never negative; at least float32)."""
        return upcast(self.lora_H) ** 2

    def delta(self, x: Tensor, sample: bool) -> Tensor:
        M = upcast(self.lora_M)  # C, E and the products in float32 (see LoraLinear)
        u = F.linear(x, upcast(self.lora_A))  # (..., r)
        if not sample:
            v = F.linear(u, M)
        elif self.config.sample_granularity == "batch" or u.dim() == 1:
            C = self.drawn_noise()  # drawn with the other layers' (PosteriorDraw)
            if C is None:
                C = torch.addcmul(M, self.omega, self.standard_normal(M.shape, M))
            v = F.linear(u, C)
        else:  # one C per example: u is (b, ..., r), C is (b, r, r)
            b = u.shape[0]
            E = torch.randn(b, self.r, self.r, device=u.device, dtype=u.dtype)
            C = torch.addcmul(M, self.omega, E)
            v = torch.einsum("b...l,bkl->b...k", u, C)
        return F.linear(v, upcast(self.lora_B))

    def kl(self, prior_eps: float | Tensor = 0.0) -> Tensor:
        """KL(q(C) A || N(0, s_p^2)) with s_p = sigma_p + prior_eps: `melora_kl` of this layer."""
        s_p = self.config.sigma_p + prior_eps
        A, M = upcast(self.lora_A), upcast(self.lora_M)
        return melora_kl(A, M, self.omega, s_p, self.config.kl_variance)

    def mean_lora_factors(self) -> tuple[Tensor, Tensor]:
        """A' = M A, so that B A' = B M A is the mean update."""
        return (self.lora_M @ self.lora_A).detach(), self.lora_B.detach()

    def factors(self) -> dict[str, Tensor]:
        return {
            "A": self.lora_A,
            "B": self.lora_B,
            "M": self.lora_M,
            "H": self.lora_H,
            "Omega": self.omega,
        }


class BlobLinear(LoraLinear):
    """BLoB (Wang et al. 2024): only A is Bayesian, `A~ = M_A + (R_A**2) * E`, B deterministic.

    `lora_A` holds the mean M_A and `lora_A_rho` holds R_A, which starts U(eps0 / sqrt(2), eps0).
    With flipout (the default, as BLoB's code) one E per forward is decorrelated across tokens by
    random signs r (input side) and s (rank side): noise(x) = s * ((R_A**2 * E) (r * x)), which has
    the same per-token distribution as a fresh E per token.
    """

    dropout_at_test = False  # at test the N draws come from the posterior alone

    def add_posterior_parameters(self, device: torch.device) -> None:
        self.lora_A_rho = nn.Parameter(torch.empty(self.r, self.in_features, device=device))

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        eps0 = self.config.init_std
        if not self.lora_A_rho.is_meta:
            with torch.no_grad():
                self.lora_A_rho.uniform_(eps0 / math.sqrt(2), eps0)

    @property
    def a_std(self) -> Tensor:
        """The posterior std of A, R_A**2 (at least float32)."""
        return upcast(self.lora_A_rho) ** 2

    def delta(self, x: Tensor, sample: bool) -> Tensor:
        u = F.linear(x, upcast(self.lora_A))
        if sample:
            u = u + self._noise(x)
        return F.linear(u, upcast(self.lora_B))

    def _noise(self, x: Tensor) -> Tensor:
        """(A~ - M_A) x for one draw (per forward or per example), with flipout if enabled."""
        per_example = self.config.sample_granularity == "example" and x.dim() > 1
        shape = (x.shape[0], *self.lora_A.shape) if per_example else self.lora_A.shape
        noise_A = None if per_example else self.drawn_noise()  # drawn with the other layers'
        if noise_A is None:
            E = torch.randn(shape, device=x.device, dtype=x.dtype) if per_example else None
            noise_A = self.a_std * (self.standard_normal(shape, x) if E is None else E)
        n = x.shape[-1]
        if self.config.flipout:  # the signs of the input (n) and of the output (r), in one draw
            flips = torch.randint(0, 2, (*x.shape[:-1], n + self.r), device=x.device, dtype=x.dtype)
            x = _flip(x, flips[..., :n])
        if per_example:
            out = torch.einsum("b...n,brn->b...r", x, noise_A)
        else:
            out = F.linear(x, noise_A)
        if self.config.flipout:
            out = _flip(out, flips[..., n:])
        return out

    def kl(self, prior_eps: float | Tensor = 0.0) -> Tensor:
        """Closed-form KL(N(M_A, (R_A**2)^2) || N(0, s_p^2)) summed over the entries of A."""
        s_p = self.config.sigma_p + prior_eps
        return gaussian_kl(upcast(self.lora_A), self.a_std.pow(2), s_p)

    def factors(self) -> dict[str, Tensor]:
        return {"A": self.lora_A, "B": self.lora_B, "A_std": self.a_std}


def melora_kl(A: Tensor, M: Tensor, omega: Tensor, s_p: float | Tensor, kl_variance: str) -> Tensor:
    """KL(q(C) A || N(0, s_p^2)) of Me-LoRA (METHOD.md, paper Eq. 7-8), summed over its entries.

    For one layer (A: r x n; M, Omega: r x r) or a stack of layers with the same shapes
    (L x r x n and L x r x r: the sum over the layers, computed with batched products).

    paper: 1/(2 s_p^2) (||M A||_F^2 + ||Omega |A| ||_F^2) - sum_kl log(Omega_kl + LOG_FLOOR)
           (constants dropped)
    exact: sum_ij [log(s_p / std_ij) + (std_ij^2 + (M A)_ij^2) / (2 s_p^2) - 1/2],
           std_ij^2 = ((Omega**2) @ (A**2))_ij, the exact marginal variance of (C A)_ij
           (its log floored as in `gaussian_kl`).
    """
    if A.dim() == 2:  # one layer: a stack of one
        A, M, omega = A[None], M[None], omega[None]
    if kl_variance == "paper":
        # ||M A||^2 + ||Omega |A| ||^2 as one batched product: [M; Omega] @ [A; |A|] (2L x r x n)
        products = torch.cat([M, omega]) @ torch.cat([A, A.abs()])
        log_omega = torch.log(omega + LOG_FLOOR).sum()
        return _sum_of_squares(products) / (2 * s_p**2) - log_omega
    return gaussian_kl(M @ A, omega.square() @ A.square(), s_p)


def gaussian_kl(mean: Tensor, var: Tensor, s_p: float | Tensor) -> Tensor:
    """sum_ij KL(N(mean_ij, var_ij) || N(0, s_p^2)) = sum [log(s_p/std) + (var + mean^2)/(2 s_p^2) - 1/2].

    log std is taken as 1/2 log(var + LOG_FLOOR^2): finite at var = 0, and its gradient bounded
    (about 1000 in BLoB's R_A), while a std of 1e-4 or more moves it by under 1e-4.
    Computed as N (log s_p - 1/2) - 1/2 sum log(var + LOG_FLOOR^2) + (sum var + sum mean^2) / (2 s_p^2),
    N = mean.numel(): the same sum in fewer operations.
    """
    n = mean.numel()
    log_s_p = torch.log(s_p) if isinstance(s_p, Tensor) else math.log(s_p)
    log_var = torch.log(var + LOG_FLOOR**2).sum()
    return n * (log_s_p - 0.5) - 0.5 * log_var + (var.sum() + _sum_of_squares(mean)) / (2 * s_p**2)


def _sum_of_squares(t: Tensor) -> Tensor:
    """sum(t**2) in one operation (a dot product of the flattened tensor with itself)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the adapter path computes in for a parameter `t`: at least float32."""
    return torch.promote_types(t.dtype, torch.float32)


def upcast(t: Tensor) -> Tensor:
    """`t` in `compute_dtype` (bf16 / fp16 -> float32; float32 itself, no copy)."""
    return t.to(compute_dtype(t))


def _flip(t: Tensor, flips: Tensor) -> Tensor:
    """t * (1 - 2 flips) for flips in {0, 1}: each entry's sign flipped with probability 1/2
    (flips ~ Bernoulli(1/2)), as one operation: t - 2 t flips."""
    return torch.addcmul(t, t, flips, value=-2)


LAYER_CLASSES: dict[str, type[LoraLinear]] = {
    "lora": LoraLinear,
    "blob": BlobLinear,
    "melora": MeLoraLinear,
    # the baselines are LoRA layers: MCD keeps dropout on at test ("sample" mode), ENS averages
    # several LoRA adapters, LAP fits a Laplace approximation around one, TS one temperature
    # (melora.baselines)
    "mcd": LoraLinear,
    "ens": LoraLinear,
    "lap": LoraLinear,
    "ts": LoraLinear,  # temperature scaling: a MAP LoRA, calibrated post hoc (baselines.temperature)
}
