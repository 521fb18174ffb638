"""Me-LoRA: memory-efficient Bayesian LoRA, with LoRA and BLoB as baselines.

The package is usable on its own (torch, transformers, peft, datasets); it never imports ray,
deepspeed or mlflow.

`load_predictor` / `Predictor` (ask a trained adapter, `melora.predict`), `load_base_model`
(`melora.base_model`), `read_prompts` (`melora.user_prompts`) and `abstention_threshold`
(`melora.abstention`) are imported on first use: most need `melora.tasks` (datasets), which
`import melora` alone does not load.
"""

import importlib
from typing import Any

from melora.adapters import (
    adapted_layers,
    adapter_config,
    adapter_parameters,
    adapter_state_dict,
    attach,
    export_mean_lora,
    factors,
    kl_divergence,
    kl_from_forward,
    load_adapter,
    read_adapter_config,
    sampling,
    save_adapter,
)
from melora.config import AdapterConfig
from melora.errors import AdapterStateError, ConfigError, MeLoraError, TargetModuleError
from melora.layers import BlobLinear, LoraLinear, MeLoraLinear

_LAZY = {  # name -> module, imported on first access (PEP 562)
    "Abstention": "melora.abstention",
    "abstention_threshold": "melora.abstention",
    "Answer": "melora.predict",
    "Predictor": "melora.predict",
    "load_predictor": "melora.predict",
    "load_base_model": "melora.base_model",
    "read_prompts": "melora.user_prompts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'melora' has no attribute {name!r}")


__all__ = [
    "Abstention",
    "AdapterConfig",
    "AdapterStateError",
    "Answer",
    "BlobLinear",
    "ConfigError",
    "LoraLinear",
    "MeLoraError",
    "MeLoraLinear",
    "Predictor",
    "TargetModuleError",
    "abstention_threshold",
    "adapted_layers",
    "adapter_config",
    "adapter_parameters",
    "adapter_state_dict",
    "attach",
    "export_mean_lora",
    "factors",
    "kl_divergence",
    "kl_from_forward",
    "load_adapter",
    "load_base_model",
    "load_predictor",
    "read_adapter_config",
    "read_prompts",
    "sampling",
    "save_adapter",
]
