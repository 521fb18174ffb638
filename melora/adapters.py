"""Put adapters on a model and work with them: attach, sampling modes, KL, save / load / export.

model = AutoModelForCausalLM.from_pretrained(...)
model = melora.attach(model, melora.AdapterConfig(method="melora", r=8))
with melora.sampling(model, "sample"):
    logits = model(**batch).logits
kl = melora.kl_divergence(model, prior_eps=eps)
melora.save_adapter(model, "out/adapter")          # safetensors + JSON config
melora.export_mean_lora(model, "out/peft_lora")     # a plain PEFT LoRA of the mean model
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from melora import posterior
from melora.config import AdapterConfig
from melora.errors import AdapterStateError, ConfigError, MeLoraError, TargetModuleError
from melora.layers import LAYER_CLASSES, SAMPLING_MODES, LoraLinear

ADAPTER_WEIGHTS = "melora_adapter.safetensors"
ADAPTER_CONFIG = "melora_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


# ----- attach ----------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target is a full module path or the last components of one."""
    return name == target or name.endswith("." + target)


def attach(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every targeted `nn.Linear` of `model` in the config's adapter layer; freeze the rest.

    Returns the same model object, changed in place, with only the adapter parameters trainable
    and `model.melora_config` set. A target that matches no `nn.Linear` is an error that lists
    the linear layers that do exist.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"attach expects a melora.AdapterConfig, got {type(config).__name__}")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise MeLoraError("this model already has adapters: attach once, to a fresh model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config.target_modules if not any(_matches(n, t) for n in linears)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetModuleError(
            f"adapter.target_modules {missing} match no nn.Linear of {type(model).__name__}; "
            f"the linear layers it has are named {suffixes}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layer_cls = LAYER_CLASSES[config.method]
    layers = []
    for name, linear in linears.items():
        if any(_matches(name, t) for t in config.target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layers.append(layer_cls(linear, config))
            setattr(parent, child, layers[-1])
    posterior.PosteriorDraw(layers).install(model)  # all layers' noise at once, per forward
    model.melora_config = config
    return model


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The config `attach` put on the model; an error if the model has no adapters."""
    config = getattr(model, "melora_config", None)
    if config is None:
        raise MeLoraError("this model has no adapters: call melora.attach(model, config) first")
    return config


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Yield `(name, layer)` for every adapted layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def factors(layer: LoraLinear) -> dict[str, Tensor]:
    """The live tensors of a layer: `A`, `B` and, where they exist, `M`, `H`, `Omega`, `A_std`."""
    return layer.factors()


def full_shape(p: Tensor) -> tuple[int, ...]:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (`ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield `(name, parameter)` for every adapter parameter (the trainable ones)."""
    for layer_name, layer in adapted_layers(model):
        for pname, p in layer.named_parameters(recurse=False):
            yield f"{layer_name}.{pname}", p


# ----- sampling --------------------------------------------------------------------------------
class sampling:  # noqa: N801 - reads as a function: `melora.sampling(model, "mean")`
    """Set the sampling mode of every adapted layer: "mean", "sample" or "auto".

    - "mean": deterministic; Me-LoRA uses C = M, BLoB the mean of A, no dropout.
    - "sample": draws C (or A) and applies dropout, in train() and eval() alike; for LoRA with
      dropout > 0 this is MC dropout.
    - "auto" (the state after `attach`): "sample" in train(), "mean" in eval().

    Calling it sets the mode at once (a plain setter); used as a context manager, it restores
    each layer's previous mode on exit.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode not in SAMPLING_MODES:
            raise ConfigError(
                f"sampling mode {mode!r} is not allowed: choose one of {list(SAMPLING_MODES)}"
            )
        layers = [layer for _, layer in adapted_layers(model)]
        if not layers:
            raise MeLoraError("this model has no adapters: call melora.attach(model, config) first")
        self._previous = [(layer, layer.sampling_mode) for layer in layers]
        for layer in layers:
            layer.sampling_mode = mode

    def __enter__(self) -> sampling:
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, mode in self._previous:
            layer.sampling_mode = mode


# ----- KL --------------------------------------------------------------------------------------
def kl_divergence(model: nn.Module, prior_eps: float | Tensor = 0.0) -> Tensor:
    """Sum over adapted layers of each layer's KL against N(0, (sigma_p + prior_eps)^2).

    Me-LoRA: paper Eq. 7 (or the exact form, per `kl_variance`); BLoB: the closed-form Gaussian
    KL of A; LoRA: 0. Layers with the same shapes are computed at once (`posterior.kl_divergence`).
    This reads the parameters directly, which ZeRO-3 does not allow outside a forward for the
    tensors it partitions: there, use `kl_from_forward` (or gather them first).
    """
    layers = [layer for _, layer in adapted_layers(model)]
    if not layers:
        raise MeLoraError("this model has no adapters: call melora.attach(model, config) first")
    return posterior.kl_divergence(layers, prior_eps)


class KLCollector:
    """Receives the KL of the adapted layers while the model's forward runs (`kl_from_forward`):
    a stacked group's from the model's `PosteriorDraw` when the forward starts, any other layer's
    from the layer itself inside its own forward."""

    def __init__(self, prior_eps: float | Tensor) -> None:
        self.prior_eps = prior_eps
        self.terms: list[Tensor] = []
        self.seen: set[int] = set()  # the layers whose KL is in `terms`

    def __call__(self, layer: LoraLinear) -> None:
        if id(layer) not in self.seen:
            self.seen.add(id(layer))
            self.terms.append(layer.kl(self.prior_eps))

    def add_group(self, layers: list[LoraLinear], kl: Tensor | None) -> None:
        """The KL of a group of layers, computed at once (None: LoRA layers, whose KL is 0)."""
        self.seen.update(map(id, layers))
        if kl is not None:
            self.terms.append(kl)

    def total(self) -> Tensor:
        """The summed KL of every layer that ran a forward inside the context."""
        if not self.seen:
            raise MeLoraError("no adapted layer ran a forward inside kl_from_forward")
        if not self.terms:  # LoRA layers only
            return torch.zeros(())
        return torch.stack(self.terms).sum() if len(self.terms) > 1 else self.terms[0]


@contextmanager
def kl_from_forward(model: nn.Module, prior_eps: float | Tensor = 0.0) -> Iterator[KLCollector]:
    """Have every adapted layer compute its KL inside its own forward.

        with melora.kl_from_forward(model, prior_eps=eps) as kl:
            out = model(**batch)
        loss = nll + pi * kl.total()

    This is the way to get the KL under DeepSpeed ZeRO-3, where a layer's parameters are
    gathered only during its forward. Run exactly one forward inside the context.
    """
    collector = KLCollector(prior_eps)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.kl_hook = collector
    try:
        with posterior.collecting_kl(layers, collector):
            yield collector
    finally:
        for layer in layers:
            layer.kl_hook = None


# ----- save / load / export --------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters by name, detached, contiguous, on the CPU (what `save_adapter` writes)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in adapter_parameters(model)}


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write the adapter as `melora_adapter.safetensors` + `melora_config.json` into `directory`.

    `state_dict` defaults to `adapter_state_dict(model)`; pass one gathered yourself where the
    parameters are partitioned (DeepSpeed ZeRO-3). The folder is written whole or not at all.
    """
    config = adapter_config(model)
    state = adapter_state_dict(model) if state_dict is None else state_dict
    expected = {name: full_shape(p) for name, p in adapter_parameters(model)}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != expected:
        raise AdapterStateError(
            f"refusing to save an adapter whose tensors do not match the model: {_diff(expected, got)}"
        )
    meta = {"format": "melora", "adapter": config.to_dict(), "base_model": _base_model_name(model)}
    with _atomic_dir(directory) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    """The `AdapterConfig` stored in an adapter folder written by `save_adapter`."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterStateError(
            f"{path} not found: is {directory} a folder written by melora.save_adapter?"
        )
    return AdapterConfig.from_dict(json.loads(path.read_text())["adapter"])


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into a model that `attach` gave the same config; returns the model."""
    saved = read_adapter_config(directory)
    config = adapter_config(model)
    if saved.to_dict() != config.to_dict():
        raise AdapterStateError(
            f"the adapter in {directory} was saved with {saved} but the model has {config}: "
            "attach the saved config (melora.read_adapter_config) before loading"
        )
    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    params = dict(adapter_parameters(model))
    expected = {n: full_shape(p) for n, p in params.items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    if got != expected:
        raise AdapterStateError(
            f"the adapter in {directory} does not fit this model: {_diff(expected, got)}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model


def export_mean_lora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the mean adapter as a standard PEFT LoRA (`adapter_model.safetensors` + config).

    Me-LoRA folds M into A (A' = M A), BLoB takes the mean of A; B, r and alpha are kept, so
    `peft.PeftModel.from_pretrained(base, directory)` reproduces the "mean" mode logits.
    """
    from peft import LoraConfig  # local import: peft is only needed for the export

    config = adapter_config(model)
    state: dict[str, Tensor] = {}
    for name, layer in adapted_layers(model):
        A, B = layer.mean_lora_factors()
        state[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu").contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu").contiguous()
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=_base_model_name(model),
    )
    with _atomic_dir(directory) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))
    return Path(directory)


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _diff(expected: dict[str, tuple], got: dict[str, tuple]) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        parts.append(
            "shape mismatch " + ", ".join(f"{n}: {got[n]} vs {expected[n]}" for n in shapes[:5])
        )
    return "; ".join(parts)


@contextmanager
def _atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it into place only when it is complete."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
