"""The run config's sections, one dataclass each: model, task, optim, eval and scaling.

Every field carries a one-line `help` and its constraints as metadata (`choices`, bounds), which
`melora.fields.validate` checks on construction; a section's `__post_init__` adds the checks
that metadata cannot say (a known task, an existing folder). The `adapter` and `laplace` sections
are melora's `AdapterConfig` and `LaplaceConfig`; `tracking` is in `tracking_section`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from melora.errors import ConfigError
from melora.fields import validate
from melora.objective import KL_WEIGHTINGS
from melora.tasks import PROMPT_STYLES, SPLIT_POLICIES, TASKS

DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("linear", "cosine", "constant")
KL_OPTIMIZERS = ("sgd", "joint")
SELECT_METRICS = ("val/nll", "val/acc", "val/ece", "val/brier")
ZERO_STAGES = (0, 2, 3)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a run or experiment name


@dataclass
class ModelConfig:
    """The base model. `demo` is a tiny random-init Llama (no download), for tests and laptops."""

    section: ClassVar[str] = "model"

    name_or_path: str = field(
        default="demo",
        metadata={
            "help": "A hub id ('meta-llama/Llama-2-13b-hf'), a local folder ('/', './', '~' prefix; must exist) or 'demo'."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Base weights: 'auto' (bf16 on GPU, fp32 on CPU), 'float32' or 'bfloat16'.",
            "choices": DTYPES,
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in backward: less memory, about 30% more time."},
    )

    def __post_init__(self) -> None:
        validate(self)
        if not self.name_or_path.strip():
            raise ConfigError(
                "model.name_or_path='' is empty: give a hub id, a local folder or 'demo'"
            )
        if self.name_or_path.startswith(("/", "./", "../", "~")):
            if not Path(self.name_or_path).expanduser().is_dir():
                raise ConfigError(
                    f"model.name_or_path={self.name_or_path!r}: no such folder (a local model must be a folder with config.json)"
                )
            # absolute: Ray Train workers need not share the driver's working directory
            self.name_or_path = str(Path(self.name_or_path).expanduser().resolve())

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The dtype the base weights load in: 'bfloat16' or 'float32' ('auto' follows the device)."""
        if self.dtype == "auto":
            return "bfloat16" if on_gpu else "float32"
        return self.dtype


@dataclass
class TaskConfig:
    """What to train on and how to split and prompt it (METHOD.md, "Tasks and protocol")."""

    section: ClassVar[str] = "task"

    name: str = field(
        default="demo",
        metadata={
            "help": "A name from the task registry (melora.tasks), for example 'openbookqa' or 'demo'."
        },
    )
    split_policy: str = field(
        default="paper",
        metadata={
            "help": "'paper' (HF splits, val cut 1:2 where test has no labels), 'laplace' (train 80/20) or 'blob' (no validation: last checkpoint).",
            "choices": SPLIT_POLICIES,
        },
    )
    prompt_style: str = field(
        default="laplace",
        metadata={
            "help": "Prompt template: 'laplace' (Yang et al.) or 'blob' (Wang et al.).",
            "choices": PROMPT_STYLES,
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "null: load from the Hugging Face hub; else a local folder (must exist) with the datasets in the hub's schema."
        },
    )
    ood_tasks: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Task names evaluated out of distribution with the final adapter, e.g. [arc_easy, arc_challenge]."
        },
    )
    max_length: int = field(
        default=300,
        metadata={
            "help": "Maximum prompt length in tokens (the paper: 300); longer prompts are truncated from the left.",
            "ge": 8,
        },
    )

    def __post_init__(self) -> None:
        validate(self)
        trainable = sorted(name for name, spec in TASKS.items() if not spec.test_only)
        if self.name not in trainable:
            why = (
                "has only a test split (use it in task.ood_tasks)"
                if self.name in TASKS
                else "is not a known task"
            )
            raise ConfigError(f"task.name={self.name!r} {why}: choose one of {trainable}")
        for i, ood in enumerate(self.ood_tasks):
            if ood not in TASKS:
                raise ConfigError(
                    f"task.ood_tasks[{i}]={ood!r} is not a known task: choose from {sorted(TASKS)}"
                )
        if self.name in self.ood_tasks:
            raise ConfigError(
                f"task.ood_tasks={list(self.ood_tasks)!r} contains the training task {self.name!r}: an OOD set must be another task"
            )
        if len(set(self.ood_tasks)) != len(self.ood_tasks):
            raise ConfigError(
                f"task.ood_tasks={list(self.ood_tasks)!r} lists a task twice: list each once"
            )
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ConfigError(
                f"task.data_dir={self.data_dir!r}: no such folder; give an existing folder or null to load from the hub"
            )
        if self.data_dir is not None:  # absolute, as model.name_or_path
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())


@dataclass
class OptimConfig:
    """The optimisers and schedule (METHOD.md, "Objective and optimisers"; paper Table 7)."""

    section: ClassVar[str] = "optim"

    lr: float = field(
        default=1e-4,
        metadata={
            "help": "AdamW learning rate on the NLL (and on the KL when kl_optimizer is 'joint').",
            "gt": 0,
        },
    )
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "AdamW weight decay; 0 for LoRA/BLoB/Me-LoRA, 1e-5 makes the MAP baseline (BLoB's scripts).",
            "ge": 0,
        },
    )
    warmup_ratio: float = field(
        default=0.02,
        metadata={
            "help": "Fraction of max_steps with a linear warm-up from 0, for both optimisers.",
            "ge": 0,
            "lt": 1,
        },
    )
    schedule: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate decay after warm-up: 'linear' (to 0 at max_steps), 'cosine' or 'constant'.",
            "choices": SCHEDULES,
        },
    )
    max_steps: int = field(
        default=5000, metadata={"help": "Optimiser steps in the whole run.", "ge": 1}
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Examples per worker per micro-batch; the global batch is batch_size x grad_accum x num_workers.",
            "ge": 1,
        },
    )
    grad_accum: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimiser step.", "ge": 1}
    )
    kl_lr: float = field(
        default=1e-4,
        metadata={
            "help": "Learning rate of the SGD step on the weighted KL (kl_optimizer 'sgd'), same schedule shape as lr.",
            "gt": 0,
        },
    )
    kl_weighting: str = field(
        default="blundell",
        metadata={
            "help": "KL weight per step: 'blundell' (2^(M-i) / (2^M - 1) for the i-th of M batches of an epoch) or 'uniform' (1 / M).",
            "choices": KL_WEIGHTINGS,
        },
    )
    kl_optimizer: str = field(
        default="sgd",
        metadata={
            "help": "'sgd': the paper's second, SGD step on the weighted KL after the AdamW step; 'joint': the weighted KL joins the AdamW loss.",
            "choices": KL_OPTIMIZERS,
        },
    )
    max_grad_norm: float | None = field(
        default=1.0,
        metadata={
            "help": "Clip the global gradient norm of the AdamW step to this (the Hugging Face default 1.0); null: no clipping.",
            "gt": 0,
        },
    )

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class EvalConfig:
    """Validation during training and the final evaluation of the selected checkpoint."""

    section: ClassVar[str] = "eval"

    eval_every: int = field(
        default=100,
        metadata={
            "help": "Validate, checkpoint and report every this many steps (and at the last step).",
            "ge": 1,
        },
    )
    select_metric: str = field(
        default="val/nll",
        metadata={
            "help": "Validation metric that picks the best checkpoint; nll, ece and brier are minimised, acc maximised.",
            "choices": SELECT_METRICS,
        },
    )
    val_n_samples: int = field(
        default=0,
        metadata={
            "help": "Posterior samples N for validation metrics: 0 is the mean adapter (deterministic, cheapest).",
            "ge": 0,
        },
    )
    n_samples: tuple[int, ...] = field(
        default=(0, 1, 10),
        metadata={"help": "Sample counts N for the final test and OOD metrics (0: mean adapter)."},
    )
    ece_bins: int = field(
        default=15,
        metadata={"help": "Equal-width bins of the ECE (BLoB: 15; Laplace-LoRA: 10).", "ge": 1},
    )
    batch_size: int = field(
        default=8, metadata={"help": "Examples per worker per evaluation forward.", "ge": 1}
    )

    def __post_init__(self) -> None:
        validate(self)
        if (
            not self.n_samples
            or any(n < 0 for n in self.n_samples)
            or len(set(self.n_samples)) != len(self.n_samples)
        ):
            raise ConfigError(
                f"eval.n_samples={list(self.n_samples)!r} is invalid: allowed is a non-empty list of distinct integers >= 0, such as [0, 1, 10]"
            )

    @property
    def select_mode(self) -> str:
        """'max' for accuracy, 'min' for the others (Ray's `checkpoint_score_order`)."""
        return "max" if self.select_metric == "val/acc" else "min"


@dataclass
class ScalingConfig:
    """How many Ray Train workers, on what, with which ZeRO stage."""

    section: ClassVar[str] = "scaling"

    num_workers: int = field(
        default=2, metadata={"help": "Ray Train workers (data-parallel ranks).", "ge": 1}
    )
    use_gpu: bool = field(
        default=False,
        metadata={
            "help": "One or more GPUs per worker (bf16 with dtype 'auto'); false: CPU workers with gloo and fp32."
        },
    )
    cpus_per_worker: float = field(
        default=0.5,
        metadata={
            "help": "CPUs reserved per worker; fractions let 2 workers fit a 2-core machine beside the driver.",
            "gt": 0,
        },
    )
    gpus_per_worker: float | None = field(
        default=None,
        metadata={
            "help": "GPUs per worker when use_gpu (null: 1); must stay null on CPU.",
            "gt": 0,
        },
    )
    zero_stage: int = field(
        default=2,
        metadata={
            "help": "DeepSpeed ZeRO stage: 0 (data parallel; fp32 only), 2 (partition grads and optimizer state) or 3 (also the weights).",
            "choices": ZERO_STAGES,
        },
    )
    max_failures: int = field(
        default=0,
        metadata={
            "help": "Worker failures Ray Train recovers from by restarting at the last checkpoint.",
            "ge": 0,
        },
    )

    def __post_init__(self) -> None:
        validate(self)
        if not self.use_gpu and self.gpus_per_worker is not None:
            raise ConfigError(
                f"scaling.gpus_per_worker={self.gpus_per_worker!r} with scaling.use_gpu=false: set use_gpu: true or remove gpus_per_worker"
            )

    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources of one worker, e.g. {'CPU': 0.5} or {'CPU': 4, 'GPU': 1}."""
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker if self.gpus_per_worker is not None else 1.0
        return resources
