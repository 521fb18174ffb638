"""Ask a trained adapter: multiple-choice prompts in, the posterior predictive and its uncertainty out.

    predictor = melora.load_predictor("out/adapter", task="arc_easy", base_model="meta-llama/Llama-2-7b-hf")
    answers = predictor.answer(
        [{"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"]}],
        n_samples=10,
    )
    answers[0].probs, answers[0].answer, answers[0].entropy, answers[0].mutual_information

A prompt is rendered and tokenised exactly as in training and evaluation (`melora.tasks`: the task's
template and prompt style, its answer tokens, prompts cut to `max_length` inside the question or
passage), and answered by `melora.predictive.predict_with_entropy`, the predictive that a run's
logged test metrics come from:

    p(y | x) = (1/N) sum_{s=1..N} softmax(class_logits(x; theta_s)),   theta_s ~ q

over the task's answer tokens. N = 0 is the mean adapter. For the methods that do not sample at
test (LoRA / MAP, TS) N is irrelevant and the mean adapter answers, as in a run's evaluation;
MCD draws dropout masks, BLoB and Me-LoRA their posterior. Per prompt:

- `probs`: p(y | x) for each of the prompt's choices (they sum to 1);
- `answer`: the task's answer token of the most probable choice ("A", ..., or "True" / "False");
- `entropy`: H[p] = -sum_k p_k log p_k in nats (`melora.metrics.entropy`), the total uncertainty;
- `mutual_information`: H[p] - (1/N) sum_s H[p_s] in nats (`melora.metrics.mutual_information`),
  the epistemic part, for the sampling methods at N >= 1 (identically 0 at N = 1: one draw);
  None otherwise.

Prompts come in the task's hub schema (an ARC row, a BoolQ row, ...) or in the plain form
`{"question": ..., "choices": [...], "context": ..., "label": ..., "id": ...}` (only `question`
and `choices` are required; a passage task such as BoolQ takes `question` and `context`, its
choices being its answers). `label` (the index of the right choice) is optional and only passed
through. Every prompt is checked before any forward runs; an error names the prompt and the field.

Abstention (`melora.abstention`): on a validation split's predictive, the largest entropy
threshold t such that the prompts with H[p] <= t are answered with at least the requested
accuracy; a prompt above t abstains. The base model comes from `melora.base_model`, the prompts
are checked by `melora.user_prompts`; their public names are importable from here as well.

An MLflow pyfunc model (issue 15's `models:/...`) wraps this module: its `load_context` calls
`load_predictor` on its adapter artifact and the run's task settings, and its
`predict(context, model_input)` returns `[a.to_dict() for a in predictor.answer(rows, n)]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, replace
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from melora import metrics
from melora.abstention import Abstention, abstention_threshold
from melora.adapters import attach, load_adapter, read_adapter_config
from melora.base_model import (
    DTYPES,
    load_base_model,
    load_base_tokenizer,
    load_base_weights,
    recorded_base_model,
)
from melora.baselines.temperature import apply_temperature
from melora.config import AdapterConfig
from melora.errors import ConfigError
from melora.predictive import Predictive, predict_with_entropy
from melora.tasks import (
    MAX_LENGTH,
    TaskError,
    TaskSpec,
    answer_token_ids,
    get_task,
    make_loader,
)
from melora.tasks.loading import prompts_dataset
from melora.tasks.prompts import check_style, template
from melora.tasks.registry import Example
from melora.user_prompts import normalise_prompt, read_prompts

__all__ = [  # this module's own names, and those of the modules it was split into
    "DTYPES",
    "Abstention",
    "Answer",
    "Predictor",
    "abstention_threshold",
    "load_base_model",
    "load_base_tokenizer",
    "load_predictor",
    "normalise_prompt",
    "read_prompts",
    "recorded_base_model",
]


@dataclass(frozen=True, kw_only=True)
class Answer:
    """The predictive of one prompt (module doc). `abstain` is None without an abstention rule."""

    id: str
    probs: list[float]  # over the prompt's choices, in their order
    answer: str  # the task's answer token of the most probable choice
    answer_index: int
    entropy: float
    mutual_information: float | None
    abstain: bool | None = None
    label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (one line of `jobs/predict.py`'s output); no label key without one."""
        d = asdict(self)
        if self.label is None:
            del d["label"]
        return d


@dataclass
class Predictor:
    """A base model with a trained adapter, and the task whose prompts it answers.

    Build it with `load_predictor`. `temperature` (method 'ts' only) rescales the mean
    predictive as the run's evaluation did: `melora.baselines.temperature.apply_temperature`.
    """

    model: nn.Module
    tokenizer: Any
    task: TaskSpec
    _: KW_ONLY
    prompt_style: str = "laplace"
    max_length: int = MAX_LENGTH
    batch_size: int = 16
    temperature: float | None = None

    @property
    def config(self) -> AdapterConfig:
        """The adapter's config (method, r, ...)."""
        return self.model.melora_config

    def prompts(self, rows: Sequence[Any]) -> list[Example]:
        """`rows` (hub schema or plain form) checked and normalised; errors name the prompt index."""
        if len(rows) == 0:
            raise TaskError("there are no prompts to answer")
        return [
            normalise_prompt(row, self.task, f"prompt {i}", fallback_id=str(i))
            for i, row in enumerate(rows)
        ]

    def predictive(
        self, prompts: Sequence[Example] | datasets.Dataset, n_samples: int = 10, seed: int = 0
    ) -> Predictive:
        """The N-sample predictive of normalised prompts (or a split from `load_task`), in order.

        N is used only by the methods that sample at test (module doc); the draws come from
        `torch.manual_seed(seed)` and leave the caller's RNG state as it was. They are drawn
        batch by batch (`predict_with_entropy`), so they depend on `batch_size` as well as on
        the seed. Prompts without a label get the label 0 in the returned `Predictive`.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
            raise ConfigError(f"n_samples={n_samples!r}: use 0 (the mean adapter) or N >= 1 draws")
        dataset = prompts if isinstance(prompts, datasets.Dataset) else self._dataset(prompts)
        loader = make_loader(dataset, self.tokenizer, self.batch_size, max_length=self.max_length)
        drawn = n_samples if self.config.samples_at_test else 0
        devices = [self._device()] if self._device().type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            result = predict_with_entropy(self.model, loader, drawn)
        if not self.config.samples_at_test:
            result = replace(result, draws=1)
        if self.temperature is not None:
            probs = apply_temperature(result.probs, self.temperature)
            entropy = torch.from_numpy(metrics.entropy(probs))
            result = replace(result, probs=probs, expected_entropy=entropy, draws=1)
        return result

    def answer(
        self,
        rows: Sequence[Any],
        n_samples: int = 10,
        seed: int = 0,
        abstention: Abstention | None = None,
    ) -> list[Answer]:
        """Answer prompts (hub schema or plain form, or `Example`s): one `Answer` per prompt."""
        prompts = self.prompts(rows)
        result = self.predictive(prompts, n_samples, seed)
        entropy = metrics.entropy(result.probs)
        sampled = self.config.samples_at_test and self.temperature is None and n_samples >= 1
        mi = result.mutual_information().tolist() if sampled else [None] * len(prompts)
        answers = []
        for i, prompt in enumerate(prompts):
            probs = result.probs[i, : len(prompt["choices"])].tolist()
            best = int(np.argmax(probs))
            answers.append(
                Answer(
                    id=prompt["id"],
                    probs=probs,
                    answer=self.task.answers[best],
                    answer_index=best,
                    entropy=float(entropy[i]),
                    mutual_information=mi[i],
                    abstain=None if abstention is None else abstention.abstains(entropy[i]),
                    label=prompt["label"],
                )
            )
        return answers

    def abstention(
        self,
        target_accuracy: float,
        validation: Sequence[Example] | datasets.Dataset,
        n_samples: int = 10,
        seed: int = 0,
    ) -> Abstention:
        """`abstention_threshold` on the predictive of a labelled validation split at N = n_samples."""
        if not isinstance(validation, datasets.Dataset) and any(
            p["label"] is None for p in validation
        ):
            raise TaskError("every validation prompt needs its 'label' to pick a threshold")
        result = self.predictive(validation, n_samples, seed)
        return abstention_threshold(result.probs, result.labels, target_accuracy)

    def _dataset(self, prompts: Sequence[Example]) -> datasets.Dataset:
        rows = [{**p, "label": 0 if p["label"] is None else p["label"]} for p in prompts]
        return prompts_dataset(rows, self.task, self.prompt_style)

    def _device(self) -> torch.device:
        param = next(self.model.parameters())
        return param.device


def load_predictor(
    adapter_dir: str | os.PathLike,
    task: str,
    base_model: str | None = None,
    *,
    prompt_style: str = "laplace",
    max_length: int = MAX_LENGTH,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    temperature: float | None = None,
) -> Predictor:
    """A `Predictor`: the base model, the adapter of `adapter_dir` (`melora.save_adapter`'s
    folder) attached and loaded, for prompts of `task` in `prompt_style`.

    `base_model` defaults to the one recorded in the adapter folder. Everything a user can get
    wrong is checked here, before any forward: the adapter folder, the task and style, the
    method (an ENS or LAP predictive is not one adapter's), the base model, and that the task's
    answers are single tokens of its tokenizer (`melora.tasks.answer_token_ids`).
    """
    config = read_adapter_config(adapter_dir)
    spec = get_task(task)
    check_style(prompt_style)
    _check_method(config, adapter_dir, temperature)
    base = base_model or recorded_base_model(adapter_dir)
    if not base:
        raise ConfigError(
            f"the adapter in {adapter_dir} does not record its base model: give the model it "
            "was trained on (a hub id, a folder, or 'demo') as base_model, or in "
            "jobs/predict.py as --set model.name_or_path=..."
        )
    tokenizer = load_base_tokenizer(base)
    answer_token_ids(tokenizer, spec.answers, template(prompt_style, spec.kind).cue)
    model = attach(load_base_weights(base, tokenizer, dtype, device), config)
    load_adapter(model, adapter_dir)
    return Predictor(
        model.eval(),
        tokenizer,
        spec,
        prompt_style=prompt_style,
        max_length=max_length,
        batch_size=batch_size,
        temperature=temperature,
    )


def _check_method(
    config: AdapterConfig, adapter_dir: str | os.PathLike, temperature: float | None
) -> None:
    """A `ConfigError` for an adapter whose predictive is not one adapter's (ENS, LAP), and for a
    temperature given without method 'ts' or missing with it."""
    if config.method in ("ens", "lap"):
        raise ConfigError(
            f"the adapter in {adapter_dir} has method {config.method!r}, whose predictive is not "
            "one adapter's (ENS averages its LoRA members, LAP needs its Laplace fit): answer "
            "with the LoRA (MAP) adapter it was built from instead"
        )
    if (temperature is not None) != (config.method == "ts"):
        raise ConfigError(
            f"temperature={temperature!r} with adapter method {config.method!r}: a temperature "
            "is given for method 'ts' (its run's metric 'temperature'), and only for it"
        )
