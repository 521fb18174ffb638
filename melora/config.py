"""The adapter configuration: one validated dataclass for LoRA, BLoB, Me-LoRA and the baselines.

Every field has a one-line `help` and its constraints as metadata, checked on construction by
`melora.fields.validate`; invalid values raise `ConfigError` naming the field, the value and what
is allowed, so that a bad config fails before any compute starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from melora.errors import ConfigError
from melora.fields import at_least, check_keys, field_names, validate

METHODS = ("lora", "blob", "melora", "mcd", "ens", "lap", "ts")
SAMPLING_METHODS = ("blob", "melora", "mcd")  # whose N-sample predictive draws something
KL_VARIANCES = ("paper", "exact")
SAMPLE_GRANULARITIES = ("batch", "example")
# a positive number, kept an int when given one (alpha: 16 stays 16 in written configs)
_POSITIVE = {"gt": 0, "out_of_range": "must be > 0", "keep_int": True}


@dataclass
class AdapterConfig:
    """Which adapter to put on which layers, and its prior.

    Raise `r` for more capacity (Me-LoRA's extra cost grows as 2 r^2 per layer, LoRA's as
    r (m + n)); lower `sigma_p` for a tighter prior (less posterior variance, more shrinkage of
    `M A` towards 0). The defaults are the paper's Table 7 values (METHOD.md).
    """

    section: ClassVar[str] = "adapter"

    method: str = field(
        default="melora",
        metadata={
            "help": "Adapter: 'lora' (MAP), 'blob', 'melora', or a baseline on LoRA layers: 'mcd' (MC dropout), 'ens' (ensemble of LoRA seeds), 'lap' (post-hoc Laplace), 'ts' (MAP + temperature scaling).",
            "choices": METHODS,
        },
    )
    r: int = field(
        default=8,
        metadata={
            "help": "Rank of the low-rank update (r >= 1).",
            **at_least(1),
        },
    )
    alpha: float = field(
        default=16.0,
        metadata={
            "help": "LoRA alpha; the update is scaled by s = alpha / r (alpha > 0).",
            **_POSITIVE,
        },
    )
    dropout: float = field(
        default=0.1,
        metadata={
            "help": "Dropout on the adapter's input in training, in [0, 1); method 'mcd' needs > 0 (the paper: 0.1) and keeps it on at test.",
            "ge": 0,
            "lt": 1,
            "out_of_range": "is out of range: allowed is 0 <= dropout < 1",
            "keep_int": True,
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
        metadata={
            "help": "Prior standard deviation sigma_p of the Bayesian factor (> 0).",
            **_POSITIVE,
        },
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
            "help": "Me-LoRA KL: 'paper' (Eq. 7, ||Omega |A| ||_F^2) or 'exact' (the Gaussian KL of each entry of C A).",
            "choices": KL_VARIANCES,
        },
    )
    sample_granularity: str = field(
        default="batch",
        metadata={
            "help": "'batch': one draw per layer per forward (the paper); 'example': one draw per sequence.",
            "choices": SAMPLE_GRANULARITIES,
        },
    )
    init_std: float = field(
        default=0.05,
        metadata={
            "help": "eps0: the std parameter (H or R_A) starts U(eps0/sqrt(2), eps0), so the std starts in [eps0^2/2, eps0^2].",
            **_POSITIVE,
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
        if (
            not isinstance(self.target_modules, tuple)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ConfigError(
                f"adapter.target_modules={self.target_modules!r} is invalid: "
                "allowed is a non-empty list of module names such as ['q_proj', 'v_proj']"
            )
        validate(self)
        if self.method == "mcd" and self.dropout == 0.0:
            raise ConfigError(
                "adapter.method='mcd' with adapter.dropout=0.0: MC dropout averages predictions "
                "over dropout masks, so it needs dropout > 0; set adapter.dropout (the paper: 0.1)"
            )

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
        check_keys("adapter", d, field_names(cls), noun="field")
        return cls(**d)
