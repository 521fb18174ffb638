"""The run configuration: one validated dataclass tree, loaded from YAML with `--set` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["adapter.sigma_p=0.1", "optim.max_steps=20"])
    cfg, sweep = load_experiment("jobs/configs/ablation.yaml")   # the `sweep:` section, untouched

Every field carries a one-line `help` and its constraints as metadata, checked on construction
by `melora.fields.validate` (the project's one field validator), so a bad value raises
`ConfigError` naming the dotted field, the value and what is allowed, before any worker, MLflow
run or checkpoint folder exists. Nothing here writes anything anywhere.

- `sections`: the model, task, optim, eval and scaling sections;
- `tracking_section`: the tracking section (MLflow, storage), its URI and tag checks;
- `run`: `RunConfig` (the sections together, `from_dict` / `to_dict`, `with_overrides`);
- `loading`: YAML files and `--set` overrides (`load_config`, `load_experiment`), and
  `shorten_message` for printing a refusal.

The `adapter` section is `melora.AdapterConfig` and the `laplace` section `melora`'s
`LaplaceConfig`, used as they are.
"""

from melora.fields import short_repr
from orchestrator.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_VALUES,
    add_overrides_option,
    load_config,
    load_experiment,
    parse_overrides,
    read_yaml,
    shorten_message,
)
from orchestrator.config.run import MAX_SEED, SECTIONS, RunConfig
from orchestrator.config.sections import (
    DTYPES,
    KL_OPTIMIZERS,
    SCHEDULES,
    SELECT_METRICS,
    ZERO_STAGES,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TaskConfig,
)
from orchestrator.config.tracking_section import RESERVED_TAGS, TRACKING_SCHEMES, TrackingConfig

__all__ = [
    "DTYPES",
    "KL_OPTIMIZERS",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_SEED",
    "MAX_VALUES",
    "RESERVED_TAGS",
    "SCHEDULES",
    "SECTIONS",
    "SELECT_METRICS",
    "TRACKING_SCHEMES",
    "ZERO_STAGES",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScalingConfig",
    "TaskConfig",
    "TrackingConfig",
    "load_config",
    "load_experiment",
    "add_overrides_option",
    "parse_overrides",
    "read_yaml",
    "short_repr",
    "shorten_message",
]
