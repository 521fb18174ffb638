"""Laplace-LoRA (Yang et al. 2024, LAP): a post-hoc Laplace approximation around a trained (MAP)
LoRA adapter, with the PyPI package laplace-torch (import name `laplace`).

    with LaplaceLoRA(model, LaplaceConfig(prior_tuning="marglik")) as lap:
        lap.fit(train_loader)                    # KFAC GGN over every lora_A and lora_B
        lap.tune_prior_precision()               # evidence (marglik) or validation NLL (gridsearch)
        preds = lap.predict_sets({"arc_easy": test_loader}, n_samples=(0, 10))

The posterior over the LoRA parameters theta is N(theta_MAP, (H + lambda I)^-1), H the
Kronecker-factored (KFAC) generalised Gauss-Newton of the summed cross-entropy of the answer
tokens over the training set, lambda the prior precision. The predictive is the linearised (GLM)
one: the class logits are f(x) ~ N(f_MAP(x), J Sigma J^T), J = d f / d theta at the MAP, and

    N = 0:  softmax(f_MAP(x))                       (the MAP prediction)
    N >= 1, link_approx "mc":  (1/N) sum_s softmax(f_s),  f_s ~ N(f_MAP, J Sigma J^T)
    N >= 1, link_approx "probit": softmax(f_MAP / sqrt(1 + pi/8 diag(J Sigma J^T)))  (any N)

so LAP's rows use N as every method does: the number of posterior samples averaged.

How the pieces meet laplace-torch:
- `AnswerLogits` wraps the causal LM into the (batch, classes) function laplace-torch expects; it
  takes the batch dicts of `melora.tasks` (labels under "labels"). Choices a row does not have get
  a logit of -1e4 (probability 0, zero Jacobian) instead of -inf, which the curvature code and
  the Cholesky-free sampling below both handle.
- curvlinops' KFAC (laplace-torch's default backend) recognises `nn.Linear` modules only, and our
  `LoraLinear` keeps A and B as bare parameters. Inside `LaplaceLoRA`, every LoRA layer is
  swapped for a view with `nn.Linear` factors holding copies of A and B (the same function, and
  exactly PEFT's layout); the original layers come back on `close()` / leaving the `with` block.
- KFAC: A (r x n) gets factors (r x r, n x n), B (m x r) gets (m x m, r x r); laplace-torch keeps
  the factors and their eigendecomposition (`kfac_memory` counts both from the layer sizes).
- The GLM predictive is computed here from laplace-torch's Jacobians and functional variance
  (`backend.jacobians`, `functional_variance`), in small batches (`predict_batch_size`): the
  Jacobian is (batch x classes x LoRA parameters), and its cost per example grows with the
  batch. MC draws use the symmetric square root of the
  covariance (an eigendecomposition), which also holds where a row's missing choices make it
  singular and laplace-torch's Cholesky would fail.
- The validation gridsearch is done here as well: one Jacobian per validation batch serves
  every grid value, where laplace-torch's recomputes it per value.

`LaplaceConfig` lives in `melora.baselines.laplace_config` (plain Python) and is re-exported here.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melora.adapters import adapted_layers, adapter_parameters, full_shape
from melora.baselines.laplace_config import LaplaceConfig
from melora.errors import MeLoraError
from melora.evaluation import Batch, Predictions, class_logits
from melora.layers import LoraLinear

MASKED_LOGIT = -1e4  # a choice the row does not have: probability exp(-1e4) = 0 in float32


# ----- the function laplace-torch sees ---------------------------------------------------------------
class AnswerLogits(nn.Module):
    """`model` as a classifier: a batch dict in, the (B, K) float32 answer-token logits out.

    The logits of `melora.evaluation.class_logits`, with the choices a row lacks at -1e4 rather
    than -inf (probability 0 either way; a finite value keeps the curvature code free of inf).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        logits = class_logits(self.model, batch)
        return logits.masked_fill(torch.isneginf(logits), MASKED_LOGIT)


class KfacLoraLinear(nn.Module):
    """A trained `LoraLinear` as `W0 x + s B(A x)` with `nn.Linear` factors (PEFT's layout, no
    dropout): the function of the layer's mean mode, in the layers curvlinops' KFAC knows.
    A and B are float32 copies whatever the training dtype, so the curvature is float32."""

    def __init__(self, layer: LoraLinear) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.scaling = layer.scaling
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        fp32 = {"bias": False, "device": A.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(A.shape[1], A.shape[0], **fp32)
        self.lora_B = nn.Linear(B.shape[1], B.shape[0], **fp32)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return result + (self.scaling * delta).to(result.dtype)


# ----- the Laplace approximation ----------------------------------------------------------------------
class LaplaceLoRA:
    """KFAC Laplace over the LoRA parameters of `model` and its GLM predictive (module doc).

    Construction swaps the model's LoRA layers for `KfacLoraLinear` views (copies of A and B, the
    only parameters with `requires_grad`); `close()`, or leaving the `with` block, puts the
    original layers back. The model must have plain LoRA layers (methods lora, mcd, ens, lap),
    whole in this process (not partitioned by DeepSpeed ZeRO-3).
    """

    def __init__(self, model: nn.Module, config: LaplaceConfig | None = None) -> None:
        try:
            from laplace import Laplace  # optional dependency (requirements/laplace.txt)
            from laplace.curvature import CurvlinopsGGN  # the same optional dependency
        except ImportError as err:  # pragma: no cover - the project installs it
            raise MeLoraError(
                "LAP needs laplace-torch: install it with "
                "`pip install -c requirements/lock.txt --no-deps -r requirements/laplace.txt` "
                f"(a plain `pip install laplace-torch` pulls a CUDA torchvision) ({err})"
            ) from err
        self.config = config or LaplaceConfig()
        self.model = model
        self._swapped: list[tuple[nn.Module, str, LoraLinear]] = []
        layers = list(adapted_layers(model))
        if not layers:
            raise MeLoraError("LAP needs a model with LoRA adapters: call melora.attach first")
        wrong = sorted(
            {type(layer).__name__ for _, layer in layers if type(layer) is not LoraLinear}
        )
        if wrong:
            raise MeLoraError(
                f"LAP fits a Laplace approximation around a LoRA (MAP) adapter; this model has {wrong} "
                "layers: train it with adapter.method 'lap' or 'lora'"
            )
        if any(hasattr(p, "ds_id") for _, layer in layers for p in layer.parameters(recurse=False)):
            raise MeLoraError(
                "LAP needs the adapter whole in this process, but its parameters are partitioned "
                "by DeepSpeed ZeRO-3: train with scaling.zero_stage 2, or run "
                "`jobs/evaluate.py --laplace <run>` on the finished run"
            )
        self._frozen_check(model)
        self._paused_checkpointing: list[nn.Module] = []
        self._paused_input_grads = False
        try:
            self._pause_activation_checkpointing()
            for name, layer in layers:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, KfacLoraLinear(layer))
                self._swapped.append((parent, child, layer))
            self.wrapper = AnswerLogits(model)
            self.la = Laplace(
                self.wrapper,
                "classification",
                subset_of_weights="all",
                hessian_structure="kron",
                prior_precision=self.config.prior_precision,
                backend=CurvlinopsGGN,
            )
        except BaseException:
            self.close()
            raise
        self.fit_seconds: float | None = None
        self.tune_seconds: float | None = None
        self.grid: list[tuple[float, float]] = []  # gridsearch: (lambda, validation NLL)

    @staticmethod
    def _frozen_check(model: nn.Module) -> None:
        adapter = {id(p) for _, p in adapter_parameters(model)}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter]
        if extra:
            raise MeLoraError(
                f"LAP covers the LoRA parameters only, but {extra[:3]} also require grad: "
                "freeze them (melora.attach freezes everything else)"
            )

    # ----- life cycle ---------------------------------------------------------------------------
    def _pause_activation_checkpointing(self) -> None:
        """laplace-torch's Jacobians (torch.func) cannot run through the hook that Hugging Face's
        `gradient_checkpointing_enable` puts on the input embeddings (it calls `requires_grad_`
        inside the transform: "You are attempting to call Tensor.requires_grad_() ... inside of a
        function being transformed"), nor through checkpointed layers: both are paused for the
        LAP step and restored by `close`."""
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.gradient_checkpointing = False
                self._paused_checkpointing.append(module)
        if getattr(self.model, "_require_grads_hooks", None):
            self.model.disable_input_require_grads()
            self._paused_input_grads = True

    def close(self) -> None:
        """Put the original LoRA layers back, and activation checkpointing as it was (idempotent)."""
        while self._swapped:
            parent, child, layer = self._swapped.pop()
            setattr(parent, child, layer)
        while self._paused_checkpointing:
            self._paused_checkpointing.pop().gradient_checkpointing = True
        if self._paused_input_grads:
            self.model.enable_input_require_grads()
            self._paused_input_grads = False

    def __enter__(self) -> LaplaceLoRA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- fit and tune -------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[Batch]) -> None:
        """The KFAC GGN of the summed training NLL at the MAP (laplace-torch's `fit`).

        `train_loader` must have a `.dataset` with a length (a torch DataLoader): laplace-torch
        takes N, the number of training examples, from it.
        """
        t0 = time.perf_counter()
        self.la.fit(train_loader)
        self.fit_seconds = time.perf_counter() - t0

    def tune_prior_precision(
        self,
        val_loader: Iterable[Batch] | None = None,
        all_reduce: Callable[[Tensor], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Set the prior precision by `config.prior_tuning`; returns it.

        "marglik": Adam on log lambda against the negative Laplace evidence (laplace-torch).
        "gridsearch": the lambda of `10**linspace(grid_min, grid_max, grid_size)` with the lowest
        NLL of the predictive (`config.link_approx`, `tune_n_samples` draws, the same draws for
        every lambda) on `val_loader`. With data sharded over processes, pass `all_reduce` (an
        in-place sum over processes) so every process picks the same lambda.
        """
        cfg = self.config
        t0 = time.perf_counter()
        if cfg.prior_tuning == "marglik":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "By default `link_approx` is `probit`": not used
                self.la.optimize_prior_precision(
                    pred_type="glm",
                    method="marglik",
                    n_steps=cfg.marglik_steps,
                    lr=cfg.marglik_lr,
                    init_prior_prec=cfg.prior_precision,
                    prior_structure=cfg.prior_structure,
                    link_approx=cfg.link_approx,
                )
        elif cfg.prior_tuning == "gridsearch":
            if val_loader is None:
                raise MeLoraError(
                    "laplace.prior_tuning='gridsearch' needs a validation set: use a task split "
                    "policy with a validation split, or prior_tuning 'marglik'"
                )
            self._gridsearch(val_loader, all_reduce, generator)
        self.tune_seconds = time.perf_counter() - t0
        return self.la.prior_precision.detach().clone()

    def _gridsearch(
        self,
        val_loader: Iterable[Batch],
        all_reduce: Callable[[Tensor], None] | None,
        generator: torch.Generator | None,
    ) -> None:
        cfg = self.config
        grid = torch.logspace(cfg.grid_min, cfg.grid_max, cfg.grid_size, dtype=torch.float64)
        totals = torch.zeros(cfg.grid_size + 1, dtype=torch.float64)  # NLL sums, then the count
        for batch in val_loader:
            Js, f_mu = self._jacobians(batch)
            labels = torch.as_tensor(batch["labels"], dtype=torch.long, device=f_mu.device)
            eps = self._draws(f_mu, cfg.tune_n_samples, generator)
            for i, lam in enumerate(grid.tolist()):
                self.la.prior_precision = lam
                probs = self._predictive(f_mu, self.la.functional_variance(Js), eps)
                p_true = probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)
                totals[i] -= p_true.double().log().sum().cpu()
            totals[-1] += len(labels)
        if all_reduce is not None:
            all_reduce(totals)
        nll = totals[:-1] / totals[-1]
        self.grid = list(zip(grid.tolist(), nll.tolist(), strict=True))
        self.la.prior_precision = float(grid[int(torch.argmin(nll))])

    @property
    def prior_precision(self) -> Tensor:
        """The prior precision lambda (one value, or one per factor with 'layerwise')."""
        return self.la.prior_precision.detach().clone()

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self.la.prior_precision = value

    def log_marginal_likelihood(self) -> float:
        """The Laplace evidence at the current prior precision."""
        with torch.no_grad():
            return float(self.la.log_marginal_likelihood())

    def kron_factors(self) -> list[tuple[str, Tensor, Tensor]]:
        """`(parameter name, F0, F1)` per LoRA factor: the Hessian block is `kron(F0, F1)`
        (row-major vec of the parameter), before the prior is added."""
        names = [n for n, p in self.wrapper.named_parameters() if p.requires_grad]
        return [(n, F0, F1) for n, (F0, F1) in zip(names, self.la.H_facs.kfacs, strict=True)]

    def memory_bytes(self) -> dict[str, int]:
        """What the fitted approximation holds: the KFAC factors and their eigendecomposition."""
        factors = sum(t.numel() * t.element_size() for F in self.la.H_facs.kfacs for t in F)
        decomposed = sum(
            t.numel() * t.element_size()
            for part in (self.la.H.eigenvectors, self.la.H.eigenvalues)
            for F in part
            for t in F
        )
        return {"factors": factors, "eigendecomposition": decomposed}

    # ----- predict -------------------------------------------------------------------------------
    def _jacobians(self, batch: Batch) -> tuple[Tensor, Tensor]:
        with torch.enable_grad(), warnings.catch_warnings():
            # vmap has no batching rule for CPU flash attention's backward: a slower loop, same values
            warnings.filterwarnings("ignore", message="There is a performance drop")
            Js, f_mu = self.la.backend.jacobians(batch)
        return Js.detach(), f_mu.detach().float()

    def _draws(self, f_mu: Tensor, n: int, generator: torch.Generator | None) -> Tensor | None:
        """Standard normal draws (K, n) for the MC link, shared by the rows of a batch; None for probit."""
        if self.config.link_approx != "mc":
            return None
        return torch.randn(f_mu.shape[1], n, generator=generator, dtype=torch.float64).to(
            f_mu.device
        )

    @staticmethod
    def _predictive(f_mu: Tensor, f_var: Tensor, eps: Tensor | None) -> Tensor:
        """Class probabilities (B, K) from the logit mean (B, K) and covariance (B, K, K)."""
        f_mu, f_var = f_mu.double(), f_var.double()
        if eps is None:  # probit
            kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * f_var.diagonal(dim1=1, dim2=2))
            return F.softmax(kappa * f_mu, dim=-1).float()
        f_var = 0.5 * (f_var + f_var.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(f_var)
        root = evecs * evals.clamp_min(0.0).sqrt().unsqueeze(1)  # root @ root^T = f_var
        samples = f_mu.unsqueeze(-1) + root @ eps  # (B, K, n)
        return F.softmax(samples, dim=1).mean(dim=-1).float()

    def predict(
        self,
        loader: Iterable[Batch],
        n_samples: Sequence[int] = (0, 10),
        generator: torch.Generator | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """`{N: (probs (N_ex, K), labels (N_ex,))}` on CPU for every N, one Jacobian per batch.

        N = 0 is the MAP prediction; N >= 1 the GLM predictive (module doc). MC draws come from
        `generator` (torch's global RNG if None), batch by batch, N by N.
        """
        out: dict[int, tuple[list[Tensor], list[Tensor]]] = {n: ([], []) for n in n_samples}
        for batch in loader:
            Js, f_mu = self._jacobians(batch)
            f_var = self.la.functional_variance(Js)
            labels = torch.as_tensor(batch["labels"], dtype=torch.long).cpu()
            for n in n_samples:
                if n == 0:
                    probs = F.softmax(f_mu.double(), dim=-1).float()
                else:
                    probs = self._predictive(f_mu, f_var, self._draws(f_mu, n, generator))
                out[n][0].append(probs.cpu())
                out[n][1].append(labels)
        if not out or not out[next(iter(out))][0]:
            raise MeLoraError("the loader yielded no batches: there is nothing to predict")
        return {n: (_concat(p), torch.cat(y)) for n, (p, y) in out.items()}

    def predict_sets(
        self,
        loaders: Mapping[str, Iterable[Batch]],
        n_samples: Sequence[int] = (0, 10),
        prefix: str = "test",
        generator: torch.Generator | None = None,
    ) -> Predictions:
        """`{"<prefix>/<task>/n<N>": (probs, labels)}`, the shape `melora.evaluation.metrics_of` reads."""
        out: Predictions = {}
        for task, loader in loaders.items():
            for n, value in self.predict(loader, n_samples, generator).items():
                out[f"{prefix}/{task}/n{n}"] = value
        return out


def _concat(chunks: list[Tensor]) -> Tensor:
    """Concatenate per-batch probabilities whose K may differ (zero columns on the right)."""
    width = max(c.shape[1] for c in chunks)
    return torch.cat([nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


def kfac_memory(model: nn.Module, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes of LAP's KFAC factors over the model's LoRA layers, from their sizes alone.

    A (r x n) gets (r x r, n x n) and B (m x r) gets (m x m, r x r); laplace-torch also keeps an
    eigendecomposition of each factor (as many values again, plus the eigenvalues). Works on a
    model built on the meta device.
    """
    factors = 0
    eigenvalues = 0
    for _, layer in adapted_layers(model):
        r, n = full_shape(layer.lora_A)
        m, _ = full_shape(layer.lora_B)
        factors += r * r + n * n + m * m + r * r
        eigenvalues += r + n + m + r
    return {
        "factors": factors * bytes_per_value,
        "with_eigendecomposition": (2 * factors + eigenvalues) * bytes_per_value,
    }
