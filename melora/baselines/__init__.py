"""The comparison methods besides LoRA, BLoB and Me-LoRA (METHOD.md, "Baselines besides LoRA/BLoB").

- MCD (`method: mcd`) is a LoRA with dropout > 0 whose N-sample predictive keeps dropout on:
  `melora.evaluation.predict(model, loader, n)` under "sample" mode; nothing more is needed here.
- ENS (`method: ens`): `ensemble` averages the probabilities of LoRA members (seeds 1, 2, 3).
- LAP (`method: lap`): `laplace` fits a KFAC Laplace approximation around a trained (MAP) LoRA
  adapter with laplace-torch and predicts with the linearised (GLM) predictive.
- TS (`method: ts`): `temperature` fits one temperature for a trained (MAP) LoRA on the validation
  split (Guo et al. 2017): the cheapest calibration, the bar a Bayesian method must clear.

`laplace` imports laplace-torch only when used (it is installed by `requirements/laplace.txt`).
"""

from melora.baselines.ensemble import (
    average_predictions,
    ensemble_seeds,
    evaluate_ensemble,
    predict_members,
)
from melora.baselines.laplace import (
    AnswerLogits,
    LaplaceConfig,
    LaplaceLoRA,
    kfac_memory,
)
from melora.baselines.temperature import apply_temperature, fit_temperature

__all__ = [
    "AnswerLogits",
    "LaplaceConfig",
    "LaplaceLoRA",
    "apply_temperature",
    "average_predictions",
    "ensemble_seeds",
    "evaluate_ensemble",
    "fit_temperature",
    "kfac_memory",
    "predict_members",
]
