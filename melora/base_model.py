"""The base model an adapter is attached to: its tokenizer and its weights, from 'demo', a local
folder or a Hugging Face hub id, and the base model an adapter folder records.

`load_base_model` is the whole (tokenizer, model); `load_base_tokenizer` and `load_base_weights`
are its two halves, so that a task's answer tokens can be checked before the weights load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melora.adapters import ADAPTER_CONFIG, read_adapter_config
from melora.errors import ConfigError
from melora.tasks import demo_model_config, demo_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PATH_PREFIXES = ("/", "./", "../", "~")  # a name with one of these is a folder, never a hub id


def load_base_model(
    name_or_path: str, dtype: str = "auto", device: str | torch.device | None = None
) -> tuple[Any, nn.Module]:
    """(tokenizer, model in eval mode): 'demo', a local folder or a Hugging Face hub id.

    'demo' is the demo's tiny Llama exactly as training builds it (`demo_model_config`, weights
    drawn under `torch.manual_seed(0)`; the caller's RNG state is left as it was). Otherwise
    `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` with `trust_remote_code=False`; the
    tokenizer pads on the left, with EOS where it has no pad token. `dtype` 'auto' is bf16 on a
    GPU and fp32 on the CPU; `device` defaults to the GPU when one is visible.
    A folder that does not exist, or a name the hub cannot serve, is a `ConfigError`.
    """
    tokenizer = load_base_tokenizer(name_or_path)
    return tokenizer, load_base_weights(name_or_path, tokenizer, dtype, device)


def load_base_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of `load_base_model` alone: the cheap half, to check a task's answer tokens
    before the weights load."""
    if name_or_path == "demo":
        return demo_tokenizer()
    from transformers import AutoTokenizer  # why: transformers is heavy, loaded only when used

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_weights(
    name_or_path: str, tokenizer: Any, dtype: str, device: str | torch.device | None
) -> nn.Module:
    """The model of `load_base_model` alone (in eval mode, on `device`, in `dtype`), for the
    `tokenizer` that `load_base_tokenizer` gave."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype, device)
    if name_or_path == "demo":
        from transformers import LlamaForCausalLM  # why: transformers is heavy, loaded when used

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the one fixed "pretrained" demo model (orchestrator.train.model)
            model = LlamaForCausalLM(demo_model_config(tokenizer))
    else:
        from transformers import AutoModelForCausalLM  # why: heavy, loaded only when used

        model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=torch_dtype)
    return model.to(device=device, dtype=torch_dtype).eval()


def _from_pretrained(cls: Any, name_or_path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` of a folder or hub id, never with remote code; a `ConfigError`
    naming the model when there is no such folder or the hub cannot serve it."""
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(_PATH_PREFIXES) and not local.is_dir():
        raise ConfigError(
            f"base model {name_or_path!r} not found: no such folder (a local model is a folder "
            "with config.json); give the folder the adapter was trained on, a hub id, or 'demo'"
        )
    source = str(local) if local.is_dir() else name_or_path
    try:
        return cls.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as err:  # no such folder or hub id, offline, not a causal LM
        raise ConfigError(
            f"base model {name_or_path!r} could not be loaded: it is not a local model folder, "
            f"and the Hugging Face hub cannot serve it ({type(err).__name__}: {err}); give the "
            "model the adapter was trained on (a hub id, a folder, or 'demo')"
        ) from None


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed: use 'auto' or one of {list(DTYPES)}")
    return DTYPES[dtype]


def recorded_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model `melora.save_adapter` recorded beside the adapter (None when it has none,
    as for a model built from a config, such as the demo's)."""
    read_adapter_config(adapter_dir)  # a clear error when the folder holds no adapter
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model")
