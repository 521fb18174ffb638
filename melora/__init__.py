"""Me-LoRA: memory-efficient Bayesian LoRA, with LoRA and BLoB as baselines.

The package is usable on its own (torch, transformers, peft, datasets); it never imports ray,
deepspeed or mlflow.
"""

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

__all__ = [
    "AdapterConfig",
    "AdapterStateError",
    "BlobLinear",
    "ConfigError",
    "LoraLinear",
    "MeLoraError",
    "MeLoraLinear",
    "TargetModuleError",
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
    "read_adapter_config",
    "sampling",
    "save_adapter",
]
