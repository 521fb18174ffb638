"""How LAP (Laplace-LoRA, `melora.baselines.laplace`) fits, tunes and predicts: `LaplaceConfig`,
the `laplace` section of a run config.

Every field has a one-line `help` and its constraints as metadata, checked on construction by
`melora.fields.validate`; `__post_init__` adds the checks between fields (grid_max > grid_min,
a layerwise prior only with marglik). Plain Python: no torch, no laplace-torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from melora.errors import ConfigError
from melora.fields import at_least, validate

PRIOR_TUNINGS = ("marglik", "gridsearch", "none")
PRIOR_STRUCTURES = ("scalar", "layerwise")
LINK_APPROXES = ("mc", "probit")


_POSITIVE = {"gt": 0, "out_of_range": "must be > 0"}


@dataclass
class LaplaceConfig:
    """How LAP fits, tunes and predicts (METHOD.md: KFAC, marglik-tuned prior, GLM predictive by MC).

    `prior_tuning` "marglik" maximises the Laplace evidence on the training set (Laplace-LoRA with
    the whole training set); "gridsearch" minimises the validation NLL of the predictive over a
    log grid (needs a validation split: Laplace-LoRA's train/val protocol). Raise `grid_size` for
    a finer grid (each value costs one covariance solve per validation batch, not a forward).
    `predict_batch_size` stays small: each of the batch x classes Jacobian rows is a backward pass
    through the whole batch, so time per example grows with the batch (demo on CPU: 40 examples
    took 0.42 s at 1 or 2 per batch, 0.69 s at 5, 1.46 s at 10, 5.0 s at 20), and so does the
    memory of the Jacobian (batch x classes x LoRA parameters).
    """

    section: ClassVar[str] = "laplace"

    prior_tuning: str = field(
        default="marglik",
        metadata={
            "help": "Prior precision: 'marglik' (Laplace evidence on the training set), 'gridsearch' (validation NLL) or 'none' (keep prior_precision).",
            "choices": PRIOR_TUNINGS,
        },
    )
    prior_structure: str = field(
        default="scalar",
        metadata={
            "help": "'scalar': one prior precision for every LoRA parameter (Laplace-LoRA); 'layerwise': one per factor (marglik only).",
            "choices": PRIOR_STRUCTURES,
        },
    )
    prior_precision: float = field(
        default=1.0,
        metadata={
            "help": "Prior precision lambda: the start of the marglik optimisation, or the value used with prior_tuning 'none' (> 0).",
            **_POSITIVE,
        },
    )
    link_approx: str = field(
        default="mc",
        metadata={
            "help": "GLM predictive at N >= 1: 'mc' (average softmax of N sampled logit vectors) or 'probit' (closed form, the same for every N).",
            "choices": LINK_APPROXES,
        },
    )
    marglik_steps: int = field(
        default=100,
        metadata={
            "help": "Adam steps on log lambda when prior_tuning is 'marglik' (>= 1).",
            **at_least(1),
        },
    )
    marglik_lr: float = field(
        default=0.1, metadata={"help": "Adam learning rate on log lambda (> 0).", **_POSITIVE}
    )
    grid_min: float = field(
        default=-4.0, metadata={"help": "Gridsearch: smallest lambda is 10**grid_min."}
    )
    grid_max: float = field(
        default=4.0, metadata={"help": "Gridsearch: largest lambda is 10**grid_max (> grid_min)."}
    )
    grid_size: int = field(
        default=21,
        metadata={"help": "Gridsearch: lambda values, log-spaced (>= 2).", **at_least(2)},
    )
    tune_n_samples: int = field(
        default=100,
        metadata={
            "help": "Gridsearch with link_approx 'mc': logit samples per validation example (>= 1).",
            **at_least(1),
        },
    )
    fit_batch_size: int = field(
        default=8,
        metadata={
            "help": "Examples per KFAC batch (one forward and one backward per class each) (>= 1).",
            **at_least(1),
        },
    )
    predict_batch_size: int = field(
        default=2,
        metadata={
            "help": "Examples per Jacobian in prediction and gridsearch; time per example and memory grow with it: keep it small (>= 1).",
            **at_least(1),
        },
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.grid_max <= self.grid_min:
            raise ConfigError(
                f"laplace.grid_max={self.grid_max!r} must be > laplace.grid_min={self.grid_min!r}"
            )
        if self.prior_structure == "layerwise" and self.prior_tuning != "marglik":
            raise ConfigError(
                f"laplace.prior_structure='layerwise' with prior_tuning={self.prior_tuning!r}: "
                "a per-factor prior is only tuned by 'marglik'; use prior_structure 'scalar'"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)
