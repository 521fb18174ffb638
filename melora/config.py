"""The adapter configuration: one validated dataclass for LoRA, BLoB, Me-LoRA and the baselines.

Every field has a one-line `help`; invalid values raise `ConfigError` on construction, naming the
field, the value and what is allowed, so that a bad config fails before any compute starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from melora.errors import ConfigError

METHODS = ("lora", "blob", "melora", "mcd", "ens", "lap", "ts")
SAMPLING_METHODS = ("blob", "melora", "mcd")  # whose N-sample predictive draws something
KL_VARIANCES = ("paper", "exact")
SAMPLE_GRANULARITIES = ("batch", "example")


@dataclass
class AdapterConfig:
    """Which adapter to put on which layers, and its prior.

    Raise `r` for more capacity (Me-LoRA's extra cost grows as 2 r^2 per layer, LoRA's as
    r (m + n)); lower `sigma_p` for a tighter prior (less posterior variance, more shrinkage of
    `M A` towards 0). The defaults are the paper's Table 7 values (METHOD.md).
    """

    method: str = field(
        default="melora",
        metadata={
            "help": "Adapter: 'lora' (MAP), 'blob', 'melora', or a baseline on LoRA layers: 'mcd' (MC dropout), 'ens' (ensemble of LoRA seeds), 'lap' (post-hoc Laplace), 'ts' (MAP + temperature scaling)."
        },
    )
    r: int = field(default=8, metadata={"help": "Rank of the low-rank update (r >= 1)."})
    alpha: float = field(
        default=16.0,
        metadata={"help": "LoRA alpha; the update is scaled by s = alpha / r (alpha > 0)."},
    )
    dropout: float = field(
        default=0.1,
        metadata={
            "help": "Dropout on the adapter's input in training, in [0, 1); method 'mcd' needs > 0 (the paper: 0.1) and keeps it on at test."
        },
    )
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={
            "help": "nn.Linear modules to adapt: a name suffix ('q_proj') or a full module path."
        },
    )
    sigma_p: float = field(
        default=0.2,
        metadata={"help": "Prior standard deviation sigma_p of the Bayesian factor (> 0)."},
    )
    prior_noise: bool = field(
        default=True,
        metadata={
            "help": "Draw eps ~ U(0, 1) once per step and use sigma_p + eps as the prior std (paper Eq. 8); false is the 'w/o noise' ablation."
        },
    )
    kl_variance: str = field(
        default="paper",
        metadata={
            "help": "Me-LoRA KL: 'paper' (Eq. 7, ||Omega |A| ||_F^2) or 'exact' (the Gaussian KL of each entry of C A)."
        },
    )
    sample_granularity: str = field(
        default="batch",
        metadata={
            "help": "'batch': one draw per layer per forward (the paper); 'example': one draw per sequence."
        },
    )
    init_std: float = field(
        default=0.05,
        metadata={
            "help": "eps0: the std parameter (H or R_A) starts U(eps0/sqrt(2), eps0), so the std starts in [eps0^2/2, eps0^2]."
        },
    )
    flipout: bool = field(
        default=True,
        metadata={
            "help": "BLoB only: flipout sign vectors per token decorrelate the noise of one draw across tokens."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        _check_choice("method", self.method, METHODS)
        _check_int("r", self.r, minimum=1)
        _check_positive("alpha", self.alpha)
        _check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"adapter.dropout={self.dropout!r} is out of range: allowed is 0 <= dropout < 1"
            )
        if self.method == "mcd" and self.dropout == 0.0:
            raise ConfigError(
                "adapter.method='mcd' with adapter.dropout=0.0: MC dropout averages predictions "
                "over dropout masks, so it needs dropout > 0; set adapter.dropout (the paper: 0.1)"
            )
        if (
            not isinstance(self.target_modules, tuple)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ConfigError(
                f"adapter.target_modules={self.target_modules!r} is invalid: "
                "allowed is a non-empty list of module names such as ['q_proj', 'v_proj']"
            )
        _check_positive("sigma_p", self.sigma_p)
        _check_bool("prior_noise", self.prior_noise)
        _check_choice("kl_variance", self.kl_variance, KL_VARIANCES)
        _check_choice("sample_granularity", self.sample_granularity, SAMPLE_GRANULARITIES)
        _check_positive("init_std", self.init_std)
        _check_bool("flipout", self.flipout)

    @property
    def scaling(self) -> float:
        """s = alpha / r, the factor on the low-rank update."""
        return self.alpha / self.r

    @property
    def is_bayesian(self) -> bool:
        """True for the methods with a variational posterior and a KL term (BLoB, Me-LoRA)."""
        return self.method in ("blob", "melora")

    @property
    def samples_at_test(self) -> bool:
        """Whether the N-sample predictive (N >= 1) draws anything in the adapter layers.

        BLoB and Me-LoRA draw from their posterior, MCD draws dropout masks. LoRA (MAP), the
        members of ENS, LAP's and TS's MAP adapter are deterministic: their N >= 1 rows are the mean
        prediction (LAP samples in function space instead: `melora.baselines.laplace`).
        """
        return self.method in SAMPLING_METHODS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """The inverse of `to_dict`; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"adapter: unknown field(s) {unknown}; allowed are {sorted(known)}")
        return cls(**d)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"adapter.{name}={value!r} is not allowed: choose one of {list(allowed)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"adapter.{name}={value!r} must be a boolean (true or false)")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"adapter.{name}={value!r} must be a finite number")


def _check_positive(name: str, value: Any) -> None:
    _check_number(name, value)
    if value <= 0:
        raise ConfigError(f"adapter.{name}={value!r} must be > 0")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"adapter.{name}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"adapter.{name}={value!r} must be an integer >= {minimum}")
