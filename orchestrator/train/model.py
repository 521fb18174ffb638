"""A worker's device, base model and tokenizer: `worker_device`, `build_model`, `load_tokenizer`
(the driver's pre-flight check loads the same tokenizer), and `init_deepspeed_comm`, which hands
Ray Train's process group to DeepSpeed before a ZeRO-3 `from_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from melora.errors import ConfigError
from melora.tasks import demo_model_config, demo_tokenizer
from orchestrator.config import RunConfig
from orchestrator.train import collectives


def worker_device(run: RunConfig, local_rank: int) -> torch.device:
    """This worker's device: GPU `local_rank` with `scaling.use_gpu`, else the CPU.

    `use_gpu` where torch sees no usable CUDA is refused: falling back to the CPU would train a
    13B model in fp32 on CPUs for days, without a word.
    """
    if not run.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "scaling.use_gpu=true, but this Ray Train worker sees no usable CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install a CUDA "
            "build of torch and a working driver on the GPU nodes, or set scaling.use_gpu: false "
            "to train on CPUs"
        )
    return torch.device("cuda", local_rank)


def build_model(run: RunConfig, ds_config: dict[str, Any], on_gpu: bool) -> tuple[Any, nn.Module]:
    """(tokenizer, model): the demo's tiny random Llama, or `from_pretrained` (hub id or folder).

    Base weights are bf16 on GPU ('auto') and fp32 on CPU. Under ZeRO-3 they load partitioned:
    `HfDeepSpeedConfig` is alive while `from_pretrained` runs, so no process holds the whole model.
    `trust_remote_code` is never set.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # why: heavy, worker only

    dtype = torch.bfloat16 if run.model.resolved_dtype(on_gpu) == "bfloat16" else torch.float32
    tokenizer = load_tokenizer(run.model.name_or_path)
    if run.model.name_or_path == "demo":
        torch.manual_seed(0)  # one fixed "pretrained" demo model, whatever the run's seed
        model = LlamaForCausalLM(demo_model_config(tokenizer)).to(dtype)
    else:
        keep_alive = None
        if run.scaling.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig  # why: heavy, ZeRO-3 only

            init_deepspeed_comm()  # zero.Init inside from_pretrained reads the world size from it
            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must live during from_pretrained
        model = AutoModelForCausalLM.from_pretrained(
            run.model.name_or_path, dtype=dtype, trust_remote_code=False
        )
        del keep_alive
    if run.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer: the demo's, or `AutoTokenizer.from_pretrained` (left padding; EOS pads
    when the tokenizer has no pad token). The driver's pre-flight check loads the same one."""
    if name_or_path == "demo":
        return demo_tokenizer()
    from transformers import AutoTokenizer  # why: heavy; the demo's tokenizer needs none

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def init_deepspeed_comm() -> None:
    """Give DeepSpeed's comm layer the process group Ray Train already made (gloo or NCCL).

    `deepspeed.initialize` would do this itself, but a ZeRO-3 `from_pretrained` runs before it:
    there `deepspeed.zero.Init` parses the DeepSpeed config while `deepspeed.comm` is still
    uninitialised, takes world size 1 and fails the batch check (`train_batch_size ... !=
    micro_batch * grad_acc * world_size`) on every rank. `dist_init_required=False`: DeepSpeed
    wraps the existing group and never creates one. A no-op without a process group.
    """
    if not collectives.distributed():
        return
    import deepspeed  # why: heavy, and it picks its accelerator on import (worker only)

    deepspeed.init_distributed(dist_init_required=False)
