"""The DeepSpeed config dict of a run: ZeRO stage 0, 2 or 3, bf16 on GPU, fp32 on CPU.

The worker passes it with its own optimiser and schedule:

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=...), lr_scheduler=scheduler,
        config=deepspeed_config(run, world_size=ray.train.get_context().get_world_size(), on_gpu=...),
    )
"""

from __future__ import annotations

from typing import Any

from melora.errors import ConfigError
from orchestrator.config import RunConfig


def deepspeed_config(run: RunConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for `run` on `world_size` data-parallel ranks.

    The choices, one by one:
    - Batch: `train_micro_batch_size_per_gpu` = optim.batch_size (examples per worker per forward),
      `gradient_accumulation_steps` = optim.grad_accum, and `train_batch_size` their product times
      `world_size`, the three numbers DeepSpeed checks against each other.
    - Precision: `bf16` when the base weights load in bf16 (model.dtype 'auto' on a GPU, or
      'bfloat16'); DeepSpeed then casts every parameter, the adapter's included, to bf16 (under
      ZeRO-3 with `zero.Init` the adapter, attached after loading, stays fp32) and keeps fp32
      master weights of the trainable adapter in its ZeRO optimiser. The layers compute the
      adapter path in fp32 (melora.layers), and the adapter's gradients are accumulated
      (`data_types.grad_accum_dtype`) and reduced over ranks (`communication_data_type`) in fp32:
      in bf16 the small gradients of H (Omega = H**2, about 2e-3) lose all but 8 bits. On CPU
      with 'auto' everything is fp32. fp16 is never used (no loss scaling to tune; every GPU that
      runs Llama-2 13B here has bf16).
    - Optimiser and schedule: no "optimizer" or "scheduler" block. The worker passes a
      `torch.optim.AdamW` and its own schedule to `deepspeed.initialize`: DeepSpeed's Adam variants
      compile FusedAdam / cpu_adam first (about 65 s on CPU), and the torch optimiser behaves the
      same on CPU and GPU. (The alternative is `"optimizer": {"type": "AdamW", "params":
      {"torch_adam": true}}`.) torch AdamW is on ZeRO's list of tested optimisers, so
      `zero_allow_untested_optimizer` is not set: another optimiser should be an explicit choice.
      The KL step of kl_optimizer 'sgd' is the worker's own SGD and is not seen by DeepSpeed.
    - Clipping: `gradient_clipping` = optim.max_grad_norm (0.0, DeepSpeed's "off", when null); it
      applies to the AdamW step only.
    - ZeRO: stage 0 is plain data parallelism. Stage 2 partitions gradients and optimiser state,
      with `contiguous_gradients` (less fragmentation). Stage 3 also partitions the weights, so a
      13B base model never sits whole in one process (load it under `HfDeepSpeedConfig` with this
      dict); `stage3_gather_16bit_weights_on_model_save` is false because the run saves only the
      adapter, gathering it itself inside `deepspeed.zero.GatheredParameters`. `overlap_comm`
      overlaps the gradient reduction with backward on GPUs (CUDA streams); on CPU (gloo) it is off.
    - `steps_per_print` stays unset: the worker logs its own progress line.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be an integer >= 1")
    stage = run.scaling.zero_stage
    micro_batch, grad_accum = run.optim.batch_size, run.optim.grad_accum
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    bf16 = run.model.resolved_dtype(on_gpu) == "bfloat16"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": run.optim.max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
    }
    if bf16:
        config.update(communication_data_type="fp32", data_types={"grad_accum_dtype": "fp32"})
    return config
