"""The run configuration: one validated dataclass tree, loaded from YAML with `--set` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["adapter.sigma_p=0.1", "optim.max_steps=20"])
    cfg, sweep = load_experiment("jobs/configs/ablation.yaml")   # the `sweep:` section, untouched

Every field carries a one-line `help`. Validation runs on construction (`__post_init__`), so a
bad value raises `ConfigError` naming the dotted field, the value and what is allowed, before
any worker, MLflow run or checkpoint folder exists. Nothing here writes anything anywhere.
The `adapter` section is `melora.AdapterConfig`, used as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import re
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import yaml

from melora.baselines.laplace import LaplaceConfig
from melora.config import AdapterConfig
from melora.errors import ConfigError
from melora.objective import KL_WEIGHTINGS
from melora.tasks import PROMPT_STYLES, SPLIT_POLICIES, TASKS
from orchestrator.redaction import REDACTED, is_secret_key, redact, redact_uri

DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("linear", "cosine", "constant")
KL_OPTIMIZERS = ("sgd", "joint")
SELECT_METRICS = ("val/nll", "val/acc", "val/ece", "val/brier")
ZERO_STAGES = (0, 2, 3)
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql")
RESERVED_TAGS = ("method", "task", "seed", "sweep", "git_sha")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TAG_KEY = re.compile(r"[\w./\- ]{1,250}")  # MLflow's tag keys (tracking._check_name)
# Limits on what a config file may hold; a real config is far inside each.
MAX_CONFIG_BYTES = 1_000_000  # the size of a config file
MAX_DEPTH = 32  # nesting of mappings and lists (a sweep's named axis is about 6 deep)
MAX_VALUES = 100_000  # values in the file, counting each YAML alias as the copy it stands for
MAX_SEED = 2**31 - 1  # seeds derived from `seed` must stay within torch.manual_seed's 64 bits
_INT64 = 2**63 - 1


# ----- sections ---------------------------------------------------------------------------------
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
        _validate(self)
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
        _validate(self)
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
        _validate(self)


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
        _validate(self)
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
        _validate(self)
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


@dataclass
class TrackingConfig:
    """Where results go: MLflow (params, metrics, artifacts) and Ray Train storage (checkpoints)."""

    section: ClassVar[str] = "tracking"

    tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "MLflow URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. Credentials go in MLFLOW_TRACKING_USERNAME/PASSWORD, never here."
        },
    )
    experiment: str = field(
        default="melora",
        metadata={
            "help": "MLflow experiment name (created when missing; it names report folders): 1-100 letters, digits, '.', '_', '-', starting with a letter or digit."
        },
    )
    storage_path: str | None = field(
        default=None,
        metadata={
            "help": "Ray Train storage for checkpoints: a folder or a URI (s3://...); null: <cwd>/ray_results."
        },
    )
    tags: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Extra MLflow tags for the run, e.g. {owner: me}; method, task, seed, sweep and git_sha are set by the run. A secret-named tag (hf_token) is never logged and reads '***' in written configs."
        },
    )

    def __post_init__(self) -> None:
        _validate(self)
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment='' is empty: give an MLflow experiment name")
        if not _RUN_NAME.fullmatch(self.experiment):  # it becomes a folder name (jobs/report.py)
            raise ConfigError(
                f"tracking.experiment={short_repr(self.experiment)} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        for key in self.tags:
            if not _TAG_KEY.fullmatch(key):
                raise ConfigError(
                    f"tracking.tags key {short_repr(key)} is not allowed: MLflow takes 1-250 letters, digits, '_', '-', '.', ' ' and '/'"
                )
        if self.tracking_uri is not None:
            _check_tracking_uri(self.tracking_uri)
        if self.storage_path is not None and not self.storage_path.strip():
            raise ConfigError("tracking.storage_path='' is empty: give a folder, a URI or null")
        reserved = sorted(k for k in self.tags if k in RESERVED_TAGS or k.startswith("mlflow."))
        if reserved:
            raise ConfigError(
                f"tracking.tags sets {reserved}: these tags are set by the run itself ({list(RESERVED_TAGS)}, mlflow.*); remove them"
            )

    def resolved_storage_path(self) -> str:
        """`storage_path` as Ray Train needs it: a URI, or an absolute folder (default <cwd>/ray_results)."""
        if self.storage_path is not None and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path or "ray_results").expanduser().resolve())


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "laplace": LaplaceConfig,
    "scaling": ScalingConfig,
    "tracking": TrackingConfig,
}


# ----- the run ----------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """One fine-tuning run: (method, task, seed) plus how and where it runs.

    Build it with `load_config` (YAML + overrides), `RunConfig.from_dict` or the constructor;
    all of them validate. The defaults are the demo: tiny Llama, demo task, 2 CPU workers.
    """

    section: ClassVar[str] = ""

    name: str | None = field(
        default=None,
        metadata={
            "help": "Run name (Ray Train folder, MLflow run name): letters, digits, '.', '_', '-'; null: <method>-<task>-seed<seed>."
        },
    )
    seed: int = field(
        default=1,
        metadata={
            "help": "Seed of the adapter init, data order and posterior samples: 0 .. 2^31-1 (the seeds derived from it stay within torch.manual_seed's 64 bits).",
            "ge": 0,
            "le": MAX_SEED,
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    adapter: AdapterConfig = field(
        default_factory=AdapterConfig, metadata={"help": "The adapter (melora.AdapterConfig)."}
    )
    task: TaskConfig = field(
        default_factory=TaskConfig, metadata={"help": "The task, splits and prompts."}
    )
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "Optimisers and schedule."}
    )
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "Validation and final evaluation."}
    )
    laplace: LaplaceConfig = field(
        default_factory=LaplaceConfig,
        metadata={
            "help": "LAP only (adapter.method 'lap'): the Laplace fit, prior tuning and predictive."
        },
    )
    scaling: ScalingConfig = field(
        default_factory=ScalingConfig, metadata={"help": "Ray Train workers and ZeRO."}
    )
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig, metadata={"help": "MLflow and checkpoint storage."}
    )

    def __post_init__(self) -> None:
        for key, cls in SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(
                    f"{key} must be a {cls.__name__}, got {type(getattr(self, key)).__name__}: use RunConfig.from_dict for plain dicts"
                )
        _validate(self, skip=tuple(SECTIONS))
        if self.name is not None and not _RUN_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name={short_repr(self.name)} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        _check_combinations(self)

    @property
    def run_name(self) -> str:
        """`name`, or '<method>-<task>-seed<seed>' when it is null."""
        return self.name or f"{self.adapter.method}-{self.task.name}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars), the inverse of `from_dict`."""
        return _plain(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text, as written beside a run; `load_config` of it gives an
        equal config, except that secrets read '***' (orchestrator.redaction: secret-named tags,
        the credentials of the tracking URI)."""
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False, default_flow_style=False)

    def flat_params(self) -> dict[str, str | int | float | bool]:
        """{'adapter.sigma_p': 0.2, ...} for MLflow params: lists and dicts as JSON text, null as
        'null'; secrets read '***' (as in `to_yaml`)."""
        flat: dict[str, str | int | float | bool] = {}
        for section, value in redact(self.to_dict()).items():
            items = value.items() if section in SECTIONS else [(None, value)]
            for key, v in items:
                name = f"{section}.{key}" if key else section
                flat[name] = (
                    json.dumps(v, sort_keys=True)
                    if isinstance(v, (list, dict))
                    else ("null" if v is None else v)
                )
        return flat

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build and validate from plain data; missing keys take their defaults, unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(d).__name__}")
        _check_keys("", d, cls)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                section_cls = SECTIONS[key]
                if value is None:
                    value = {}
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"{key}={short_repr(value)} must be a mapping of {key} fields: allowed keys are {_field_names(section_cls)}"
                    )
                _check_keys(key, value, section_cls)
                value = section_cls(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def ensemble_member(self, seed: int) -> RunConfig:
        """The LoRA training run that serves an ENS run as its member of seed `seed`: this config
        with adapter.method 'lora', that seed and no name (orchestrator/ensemble.py)."""
        d = self.to_dict()
        d["adapter"]["method"] = "lora"
        d["seed"] = seed
        d["name"] = None
        return RunConfig.from_dict(d)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A new validated config with dotted keys replaced, e.g. {'adapter.sigma_p': 0.1}."""
        d = self.to_dict()
        for key, value in overrides.items():
            _check_dotted_key(key)
            _set_dotted(d, key, value)
        return RunConfig.from_dict(d)


# ----- loading ----------------------------------------------------------------------------------
def load_experiment(
    path: str | Path, overrides: Iterable[str] = (), allow_empty: bool = True
) -> tuple[RunConfig, dict[str, Any]]:
    """Read an experiment YAML: (the validated run config, its raw `sweep:` section or {}).

    `overrides` are `key=value` strings (`--set` arguments) with dotted keys, applied to the file's
    values before validation; values are read as YAML ('0.1', '[a, b]', 'null', 'true').
    `allow_empty=False` refuses a file with no settings (the defaults are the demo run).
    """
    parsed = parse_overrides(overrides)
    raw = read_yaml(path)
    if not raw and not allow_empty:
        raise ConfigError(
            f"config file {short_repr(str(path))} is empty: an experiment sets at least one "
            "section (model:, adapter:, task:, ... sweep:); jobs/configs/demo.yaml is an example"
        )
    for key, value in parsed:
        _check_dotted_key(key)
        _set_dotted(raw, key, value)
    sweep = raw.pop("sweep", None)
    if sweep is None:
        sweep = {}
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"{path}: sweep={short_repr(sweep)} must be a mapping (the sweep section)"
        )
    try:
        return RunConfig.from_dict(raw), sweep
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a run config YAML with `--set` overrides; a `sweep:` section is ignored."""
    return load_experiment(path, overrides)[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, a syntax error (with its line) or a repeated key is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise ConfigError(
            f"config file {short_repr(str(path))} {what} (looked in {path.resolve().parent})"
        )
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config file (at most {MAX_CONFIG_BYTES})"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path} line {line}, column {column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
            "save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # SafeLoader subclass: plain data only
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{path}{_yaml_where(e, text)}: malformed YAML: {_yaml_problem(e)}"
        ) from None
    try:
        _check_plain(data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, adapter:, ...), got {type(data).__name__}"
        )
    return data


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """['optim.lr=3e-4', 'task.ood_tasks=[arc_easy]'] -> [('optim.lr', 0.0003), ('task.ood_tasks', ['arc_easy'])]."""
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(
                f"--set {short_repr(item)} is malformed: expected key=value with a dotted key, e.g. --set optim.lr=1e-4"
            )
        try:
            value = yaml.load(text, Loader=_Loader)  # SafeLoader subclass: plain data only
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {short_repr(item)}: the value is not valid YAML ({_yaml_problem(e)}); quote strings with special characters"
            ) from None
        try:
            _check_plain(value, key)
        except ConfigError as e:
            raise ConfigError(f"--set {key}: {e}") from None
        parsed.append((key, value))
    return parsed


# ----- helpers ----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 needs '1.0e-4'), refuses repeated keys,
    keys that are lists or mappings, nesting deeper than MAX_DEPTH and integers of thousands of digits."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.Node) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # beyond Python's 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} digits is too large", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            what = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a mapping key must be a plain value (a name or a number), not {what}",
                key_node.start_mark,
            )
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_where(e: yaml.YAMLError, text: str) -> str:
    """' line L, column C' of a YAML error, when it has a position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return f" line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(e, "position", None)  # a reader error: a character YAML refuses
    if isinstance(position, int):
        line = text.count("\n", 0, position) + 1
        return f" line {line}, column {position - (text.rfind(chr(10), 0, position) + 1) + 1}"
    return ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f"character {e.character!r} is not allowed in YAML"
    text = str(getattr(e, "problem", None) or e)
    return text if len(text) <= 300 else text[:297] + "..."


def _check_combinations(cfg: RunConfig) -> None:
    """Options that are valid one by one but cannot run together."""
    if cfg.adapter.method == "lap" and cfg.scaling.zero_stage == 3:
        raise ConfigError(
            "adapter.method='lap' with scaling.zero_stage=3 cannot run: the Laplace step after "
            "training (laplace-torch's KFAC and Jacobians) needs every weight whole in each "
            "worker, and ZeRO-3 partitions them. Use scaling.zero_stage 2 (an adapter trains the "
            "same), or train adapter.method 'lora' under ZeRO-3 and run "
            "`python jobs/evaluate.py --laplace <MLflow run id>` on one machine that holds the model"
        )
    if (
        cfg.adapter.method == "lap"
        and cfg.laplace.prior_tuning == "gridsearch"
        and cfg.task.split_policy == "blob"
    ):
        raise ConfigError(
            "laplace.prior_tuning='gridsearch' with task.split_policy='blob': the gridsearch "
            "tunes the prior precision on the validation split, and the 'blob' policy has none. "
            "Use laplace.prior_tuning 'marglik', or task.split_policy 'paper' or 'laplace'"
        )
    if cfg.adapter.method == "ts" and cfg.task.split_policy == "blob":
        raise ConfigError(
            "adapter.method='ts' with task.split_policy='blob': temperature scaling fits its "
            "temperature on the validation split, and the 'blob' policy has none. Use "
            "task.split_policy 'paper' or 'laplace'"
        )
    dtype = cfg.model.resolved_dtype(on_gpu=cfg.scaling.use_gpu)
    if cfg.scaling.zero_stage == 0 and dtype == "bfloat16":
        raise ConfigError(
            f"scaling.zero_stage=0 with bf16 weights (model.dtype={cfg.model.dtype!r}, "
            f"scaling.use_gpu={str(cfg.scaling.use_gpu).lower()}) cannot run exactly: DeepSpeed's "
            "stage-0 bf16 optimiser wrapper takes one AdamW step with zero gradients at start-up, "
            "so AdamW's step count is off by one (the first update is 0.74 x lr). Use "
            "scaling.zero_stage 2 (for an adapter it costs nothing extra) or model.dtype 'float32'"
        )


_BOUNDS = {  # metadata key -> (test, words); bounds apply to numbers only
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}


def _validate(obj: Any, skip: tuple[str, ...] = ()) -> None:
    """Check every field of a section against its type hint and its metadata (choices, bounds)."""
    hints = typing.get_type_hints(type(obj))
    prefix = f"{obj.section}." if obj.section else ""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        key = prefix + f.name
        value = _coerce(key, getattr(obj, f.name), hints[f.name])
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(
                f"{key}={short_repr(value)} is not allowed: choose one of {list(meta['choices'])}"
            )
        for bound, (ok, words) in _BOUNDS.items():
            if bound in meta and value is not None and not ok(value, meta[bound]):
                raise ConfigError(
                    f"{key}={short_repr(value)} is out of range: allowed is {words} {meta[bound]}"
                )
        setattr(obj, f.name, value)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against `hint` (ints widen to float; lists become tuples); else ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            return float(value)
        raise ConfigError(f"{key}={short_repr(value)} must be a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={short_repr(value)} must be a list")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={short_repr(value)} must be a mapping")
        for k, v in value.items():
            if not isinstance(k, str) or not k or not isinstance(v, (str, int, float, bool)):
                shown = REDACTED if is_secret_key(k) else short_repr(v)  # never echo a secret
                raise ConfigError(
                    f"{key}[{short_repr(k)}]={shown}: allowed are string keys with string or number values"
                )
        return {k: str(v) for k, v in value.items()}
    raise TypeError(f"no validation for the type {hint!r} of {key}")  # a bug in this module


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range
        return False


def _check_tracking_uri(uri: str) -> None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise ConfigError(
            f"tracking.tracking_uri={short_repr(redact_uri(uri))} is not a valid URI: {e}"
        ) from None
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.tracking_uri={short_repr(redact_uri(uri))} has an unsupported scheme: use one of {[s + '://' for s in TRACKING_SCHEMES]}"
        )
    if parts.password:
        raise ConfigError(
            "tracking.tracking_uri contains a password: remove it from the URI and set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment instead"
        )


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value: Any, limit: int = 100) -> str:
    """repr(value) for a message, cut to about `limit` characters without building the whole
    repr (a YAML alias bomb would expand to billions of values); a huge string keeps its start."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int beyond Python's 4300 printable digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten_message(text: str, word: int = 200, limit: int = 1500) -> str:
    """A message fit to print: each run of more than `word` non-space characters (a huge value
    or key) is cut in its middle, and the whole to about `limit` characters."""

    def cut(m: re.Match) -> str:
        s = m.group()
        return f"{s[:100]}...[{len(s) - 120} characters cut]...{s[-20:]}"

    text = re.sub(rf"\S{{{word + 1},}}", cut, text)
    if len(text) > limit:
        cut_n = len(text) - limit + 350
        text = f"{text[: limit - 400]} ...[{cut_n} characters cut]... {text[-350:]}"
    return text


def _check_plain(data: Any, where: str) -> None:
    """Refuse what config data never holds: a value that contains itself, more than MAX_VALUES
    values once YAML aliases are expanded, nesting deeper than MAX_DEPTH, an integer beyond 64 bits.

    Iterative and memoised by object, so an alias bomb costs its size on disk, not its expansion.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(data, where, False)]
    while stack:
        node, path, done = stack.pop()
        if not isinstance(node, (dict, list)):
            if isinstance(node, int) and not isinstance(node, bool) and abs(node) > _INT64:
                raise ConfigError(
                    f"{path}={short_repr(node)} is too large: integers in a config fit in 64 bits"
                )
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            depths[key] = 1 + max((depths.get(id(c), 0) for c in children), default=0)
            if sizes[key] > MAX_VALUES:
                raise ConfigError(
                    f"{path} expands to more than {MAX_VALUES} values (YAML aliases?): "
                    f"{short_repr(node)}; a config holds far fewer"
                )
            if depths[key] > MAX_DEPTH:
                raise ConfigError(f"{path} is nested more than {MAX_DEPTH} levels deep")
            continue
        if key in sizes:  # another alias of a value already counted
            continue
        if key in open_:
            raise ConfigError(f"{path} contains itself (a YAML alias inside its own anchor)")
        open_.add(key)
        stack.append((node, path, True))
        if isinstance(node, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), False) for k, v in node.items()]
        else:
            stack += [(v, f"{path}[{i}]", False) for i, v in enumerate(node)]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(section: str, d: Mapping[str, Any], cls: type) -> None:
    allowed = _field_names(cls)
    for key in d:
        if key not in allowed:
            dotted = short_repr(f"{section}.{key}" if section else str(key))
            close = difflib.get_close_matches(str(key)[:100], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"in {section}" if section else "at the top level"
            raise ConfigError(f"unknown key {dotted}{hint}; allowed keys {where}: {allowed}")


def _check_dotted_key(key: str) -> None:
    """An override key must name a field ('optim.lr') or an entry of a dict field ('tracking.tags.owner')."""
    parts = key.split(".")
    if parts[0] == "sweep":
        return  # the sweep section's schema belongs to the sweep
    cls: type = RunConfig
    for i, part in enumerate(parts[:-1]):
        _check_keys(".".join(parts[:i]), {part: None}, cls)
        if cls is RunConfig and part in SECTIONS:
            cls = SECTIONS[part]
            continue
        if typing.get_origin(typing.get_type_hints(cls)[part]) is dict and i == len(parts) - 2:
            return
        raise ConfigError(
            f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section"
        )
    _check_keys(".".join(parts[:-1]), {parts[-1]: None}, cls)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d['a']['b'] = value for key 'a.b', creating missing mappings."""
    *parents, last = key.split(".")
    node = d
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(
                f"cannot set {key!r}: {where!r} is a value ({short_repr(child)}), not a section"
            )
        node = child
    node[last] = value


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
