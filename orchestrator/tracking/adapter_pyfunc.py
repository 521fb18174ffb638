"""The MLflow pyfunc model of a trained adapter, as MLflow's "models from code" file.

`orchestrator.tracking.model.log_run_model` logs a training run's adapter with
`python_model=<this file>`: MLflow copies the file into the model and runs it when the model is
loaded, so no object of ours is pickled. Loading needs this project installed (`melora`), and
the base model where the run's config names it (a hub id, a folder, or 'demo'); it is never part
of the model.

    model = mlflow.pyfunc.load_model("models:/<model id>")   # or models:/<name>/<version>
    model.predict([{"question": "Which gas do plants take in?", "choices": ["oxygen", "CO2"]}])
    # -> [{"id": "0", "probs": [...], "answer": "B", "answer_index": 1, "entropy": ...,
    #      "mutual_information": ..., "abstain": None}]

The model holds two artifacts, `adapter` (the run's `adapter/` folder: melora_adapter.safetensors
and melora_config.json) and the model config (the pyfunc flavor's `model_config`, see
`orchestrator.tracking.model.model_config`): the task settings of the run (task, prompt style, max
length, eval batch size, dtype, split policy, data folder), the base model, the fitted temperature
(method ts) and the run's N. `mlflow.pyfunc.load_model(uri, model_config={"base_model": ...})`
overrides one of them at load time, for example a base model folder that has moved.

`predict(context, model_input, params=None)` answers with `melora.predict.Predictor.answer`, the
predictive of the run's logged test metrics: per prompt `probs` (over its choices), `answer`,
`answer_index`, `entropy` and `mutual_information` (nats; None where nothing is drawn), `abstain`
(None) and `label` when given. `model_input` is a list of prompts (dicts in the task's hub schema,
or {"question": ..., "choices": [...]}, optional "context", "label", "id"), one such dict, or a
pandas DataFrame with those columns. `params`: `n_samples` (default the run's N, the largest of
its `eval.n_samples`) and `seed` (default 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ADAPTER_ARTIFACT = "adapter"  # the artifact key (and folder) of the adapter
# the model config keys that `melora.predict.load_predictor` takes
PREDICTOR_KEYS = (
    "task",
    "base_model",
    "prompt_style",
    "max_length",
    "batch_size",
    "dtype",
    "temperature",
)


class AdapterModel(PythonModel):
    """A base model with its trained adapter, answering multiple-choice prompts."""

    # `predict` has no type hints on purpose: MLflow converts the input by them (a list[...] hint
    # keeps only a DataFrame's first column), and the prompts are normalised here instead
    # (`prompt_rows`). This attribute (MLflow's own, set on its ChatModel) skips MLflow's type-hint
    # check of `predict`, which would otherwise warn at every load that hints are missing; without
    # it nothing changes but that warning.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        """The base model and the adapter of `context.artifacts['adapter']`, loaded with the
        run's task settings (`melora.predict.load_predictor`: every check before any forward)."""
        from melora.predict import load_predictor  # why here: torch and transformers, at load only

        config = dict(context.model_config or {})
        self.n_samples = int(config.get("n_samples", 10))
        self.predictor = load_predictor(
            context.artifacts[ADAPTER_ARTIFACT],
            **{k: config[k] for k in PREDICTOR_KEYS if config.get(k) is not None},
        )

    def predict(self, context, model_input, params=None):
        """One answer dict per prompt, in input order (module doc)."""
        params = dict(params or {})
        n_samples = int(params.get("n_samples", self.n_samples))
        seed = int(params.get("seed", 0))
        rows = prompt_rows(model_input)
        return [a.to_dict() for a in self.predictor.answer(rows, n_samples, seed)]


def prompt_rows(model_input: Any) -> list[Any]:
    """`model_input` as a list of prompt dicts: a DataFrame's records, a list, or one dict (a list
    of one). In each dict a missing cell (NaN, None) is left out, numpy arrays and scalars become
    lists and numbers, and a whole float label an int (pandas makes an int column with a gap
    float). Anything else is passed on, for `Predictor.answer` to name."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        return [_plain_row(r) for r in model_input.to_dict(orient="records")]
    if isinstance(model_input, Mapping):
        return [_plain_row(model_input)]
    if isinstance(model_input, (list, tuple)):
        return [_plain_row(r) if isinstance(r, Mapping) else r for r in model_input]
    return model_input


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    plain = {str(k): _plain(v) for k, v in row.items() if not _missing(v)}
    label = plain.get("label")
    if isinstance(label, float) and label.is_integer():  # an int column with a gap is float
        plain["label"] = int(label)
    return plain


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars (a choices column, an int label)
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


set_model(AdapterModel())
