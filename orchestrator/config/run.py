"""One run's config: `RunConfig`, the tree of validated sections, and how to derive another.

    cfg = RunConfig.from_dict({"adapter": {"sigma_p": 0.1}})     # missing keys take defaults
    other = cfg.with_overrides({"optim.lr": 3e-4, "seed": 2})    # a new, validated config

`to_dict` / `from_dict` round-trip plain data; `to_yaml` and `flat_params` are what a run writes
and logs (secrets redacted). `check_combinations` refuses options that are valid one by one but
cannot run together.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from melora.baselines.laplace_config import LaplaceConfig
from melora.config import AdapterConfig
from melora.errors import ConfigError
from melora.fields import check_keys, field_names, short_repr, validate
from orchestrator.config.sections import (
    RUN_NAME,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TaskConfig,
)
from orchestrator.config.tracking_section import TrackingConfig
from orchestrator.redaction import redact

MAX_SEED = 2**31 - 1  # seeds derived from `seed` must stay within torch.manual_seed's 64 bits

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
        validate(self, skip=tuple(SECTIONS))
        if self.name is not None and not RUN_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name={short_repr(self.name)} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        check_combinations(self)

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
        check_keys("", d, field_names(cls))
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                section_cls = SECTIONS[key]
                if value is None:
                    value = {}
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"{key}={short_repr(value)} must be a mapping of {key} fields: allowed keys are {field_names(section_cls)}"
                    )
                check_keys(key, value, field_names(section_cls))
                value = section_cls(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def ensemble_member(self, seed: int) -> RunConfig:
        """The LoRA training run that serves an ENS run as its member of seed `seed`: this config
        with adapter.method 'lora', that seed and no name (orchestrator/posthoc/ensemble.py)."""
        d = self.to_dict()
        d["adapter"]["method"] = "lora"
        d["seed"] = seed
        d["name"] = None
        return RunConfig.from_dict(d)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A new validated config with dotted keys replaced, e.g. {'adapter.sigma_p': 0.1}."""
        d = self.to_dict()
        for key, value in overrides.items():
            check_dotted_key(key)
            set_dotted(d, key, value)
        return RunConfig.from_dict(d)


def check_combinations(cfg: RunConfig) -> None:
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


def check_dotted_key(key: str) -> None:
    """An override key must name a field ('optim.lr') or an entry of a dict field ('tracking.tags.owner')."""
    parts = key.split(".")
    if parts[0] == "sweep":
        return  # the sweep section's schema belongs to the sweep
    cls: type = RunConfig
    for i, part in enumerate(parts[:-1]):
        check_keys(".".join(parts[:i]), [part], field_names(cls))
        if cls is RunConfig and part in SECTIONS:
            cls = SECTIONS[part]
            continue
        if typing.get_origin(typing.get_type_hints(cls)[part]) is dict and i == len(parts) - 2:
            return
        raise ConfigError(
            f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section"
        )
    check_keys(".".join(parts[:-1]), [parts[-1]], field_names(cls))


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
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
