"""Ask a trained adapter: multiple-choice prompts in, the posterior predictive and its uncertainty out.

    predictor = melora.load_predictor("out/adapter", task="arc_easy", base_model="meta-llama/Llama-2-7b-hf")
    answers = predictor.answer(
        [{"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"]}],
        n_samples=10,
    )
    answers[0].probs, answers[0].answer, answers[0].entropy, answers[0].mutual_information

A prompt is rendered and tokenised exactly as in training and evaluation (`melora.tasks`: the task's
template and prompt style, its answer tokens, prompts cut to `max_length` inside the question or
passage), and answered by `melora.evaluation.predict_with_entropy`, the predictive that a run's
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

Abstention (`abstention_threshold`): on a validation split's predictive, the largest entropy
threshold t such that the prompts with H[p] <= t are answered with at least the requested
accuracy; a prompt above t abstains. The coverage it reports is the fraction of the validation
split answered, the coverage to expect on data like it.

An MLflow pyfunc model (issue 15's `models:/...`) wraps this module: its `load_context` calls
`load_predictor` on its adapter artifact and the run's task settings, and its
`predict(context, model_input)` returns `[a.to_dict() for a in predictor.answer(rows, n)]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from melora import metrics
from melora.adapters import ADAPTER_CONFIG, attach, load_adapter, read_adapter_config
from melora.config import AdapterConfig
from melora.errors import ConfigError
from melora.evaluation import Predictive, predict_with_entropy
from melora.tasks import (
    MAX_LENGTH,
    TaskError,
    TaskSpec,
    answer_token_ids,
    demo_model_config,
    demo_tokenizer,
    get_task,
    make_loader,
)
from melora.tasks.loading import _to_dataset  # the rows -> prompts step of `load_task`
from melora.tasks.prompts import check_style, template
from melora.tasks.registry import Example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PATH_PREFIXES = ("/", "./", "../", "~")  # a name with one of these is a folder, never a hub id
_PARSE_ERRORS = (TaskError, KeyError, TypeError, ValueError, AttributeError)
_EXAMPLE_FIELDS = {"question", "context", "choices", "label"}  # what a parsed hub row gives


# ----- the base model -------------------------------------------------------------------------
def load_base_model(
    name_or_path: str, dtype: str = "auto", device: str | torch.device | None = None
) -> tuple[Any, nn.Module]:
    """(tokenizer, model in eval mode): 'demo', a local folder or a Hugging Face hub id.

    'demo' is the demo's tiny Llama exactly as training builds it (`demo_model_config`, weights
    drawn under `torch.manual_seed(0)`; the caller's RNG state is left as it was). Otherwise
    `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` with `trust_remote_code=False`; the
    tokenizer pads on the left, with EOS where it has no pad token. `dtype` 'auto' is bf16 on a
    GPU and fp32 on the CPU; `device` defaults to the GPU when one is visible.
    A folder that does not exist, or a name the hub cannot serve, is a `ConfigError`.
    """
    tokenizer = load_base_tokenizer(name_or_path)
    return tokenizer, _load_model(name_or_path, tokenizer, dtype, device)


def load_base_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of `load_base_model` alone: the cheap half, to check a task's answer tokens
    before the weights load."""
    if name_or_path == "demo":
        return demo_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(
    name_or_path: str, tokenizer: Any, dtype: str, device: str | torch.device | None
) -> nn.Module:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype, device)
    if name_or_path == "demo":
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the one fixed "pretrained" demo model (orchestrator.worker)
            model = LlamaForCausalLM(demo_model_config(tokenizer))
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=torch_dtype)
    return model.to(device=device, dtype=torch_dtype).eval()


def _from_pretrained(cls: Any, name_or_path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` of a folder or hub id, never with remote code; a `ConfigError`
    naming the model when there is no such folder or the hub cannot serve it."""
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(_PATH_PREFIXES) and not local.is_dir():
        raise ConfigError(
            f"base model {name_or_path!r} not found: no such folder (a local model is a folder "
            "with config.json); give the folder the adapter was trained on, a hub id, or 'demo'"
        )
    source = str(local) if local.is_dir() else name_or_path
    try:
        return cls.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as err:  # no such folder or hub id, offline, not a causal LM
        raise ConfigError(
            f"base model {name_or_path!r} could not be loaded: it is not a local model folder, "
            f"and the Hugging Face hub cannot serve it ({type(err).__name__}: {err}); give the "
            "model the adapter was trained on (a hub id, a folder, or 'demo')"
        ) from None


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed: use 'auto' or one of {list(DTYPES)}")
    return DTYPES[dtype]


def recorded_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model `melora.save_adapter` recorded beside the adapter (None when it has none,
    as for a model built from a config, such as the demo's)."""
    read_adapter_config(adapter_dir)  # a clear error when the folder holds no adapter
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model")


# ----- prompts --------------------------------------------------------------------------------
def normalise_prompt(row: Any, spec: TaskSpec, where: str, fallback_id: str) -> Example:
    """One prompt as a normalised `Example` of task `spec`; `label` is None when it has none.

    `row` is a row of the task's hub schema (parsed by the task's own parser) or the plain form
    (module doc). A `TaskError` naming `where` and the field says what is wrong.
    """
    if not isinstance(row, Mapping):
        raise TaskError(
            f"{where}: a prompt is a JSON object such as "
            f'{{"question": "...", "choices": ["...", "..."]}}, got {type(row).__name__}'
        )
    try:
        parsed: dict[str, Any] | None = dict(spec.parse(dict(row), fallback_id))
        hub_error = None
    except _PARSE_ERRORS as err:
        parsed, hub_error = None, err
    if parsed is None or not _EXAMPLE_FIELDS <= parsed.keys():  # not a labelled hub row
        parsed = _plain_prompt(row, spec, where, hub_error)
    if parsed.get("id") is None:
        parsed["id"] = fallback_id
    parsed.setdefault("context", "")
    return _checked(parsed, spec, where)


def _plain_prompt(
    row: Mapping[str, Any], spec: TaskSpec, where: str, hub_error: BaseException | None
) -> dict[str, Any]:
    passage = spec.kind == "passage"
    needed = ("question",) if passage else ("question", "choices")
    missing = [name for name in needed if name not in row]
    if missing:
        hub = f" ({hub_error})" if hub_error is not None else ""
        raise TaskError(
            f"{where}: the field(s) {missing} are missing: a prompt needs 'question' and "
            f"'choices' (a list of strings), or a row in the hub schema of task {spec.name!r}{hub}"
        )
    choices = row.get("choices", list(spec.answers))
    if passage and choices != list(spec.answers):
        raise TaskError(
            f"{where}: 'choices' must be left out or be {list(spec.answers)}: task {spec.name!r} "
            "answers a question about a passage ('context') with those answers"
        )
    return {
        "id": row.get("id"),
        "question": row["question"],
        "context": row.get("context", ""),
        "choices": choices,
        "label": row.get("label"),
    }


def _checked(parsed: Mapping[str, Any], spec: TaskSpec, where: str) -> Example:
    """A clean `Example` with the fields checked against the task (types, number of choices)."""
    for name in ("question", "context"):
        if not isinstance(parsed[name], str):
            raise TaskError(
                f"{where}: '{name}' must be a string, got {type(parsed[name]).__name__}"
            )
    choices = parsed["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a list of strings, got {choices!r:.200}")
    k = len(spec.answers)
    if not 2 <= len(choices) <= k:
        raise TaskError(
            f"{where}: 'choices' has {len(choices)} entries; task {spec.name!r} answers with "
            f"{list(spec.answers)}, so a prompt has 2 to {k} choices"
        )
    label = parsed.get("label")
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices)
    ):
        raise TaskError(
            f"{where}: 'label' must be the index of the right choice, an integer in "
            f"[0, {len(choices)}), or left out; got {label!r:.100}"
        )
    return Example(
        id=str(parsed["id"]),
        question=parsed["question"],
        context=parsed["context"],
        choices=list(choices),
        label=label,  # type: ignore[typeddict-item]  # None: no label given
    )


def read_prompts(path: str | os.PathLike, task: str) -> list[Example]:
    """The prompts of a JSONL file (one JSON object a line; blank lines are skipped), checked
    against task `task` (`normalise_prompt`); errors name the file and the line."""
    spec = get_task(task)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read the prompts file {path}: {err}") from None
    prompts = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err})") from None
        prompts.append(normalise_prompt(row, spec, where, fallback_id=f"line-{line_no}"))
    if not prompts:
        raise TaskError(f"{path} holds no prompts: write one JSON object per line")
    return prompts


# ----- answers and abstention -----------------------------------------------------------------
@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Abstention:
    """Answer a prompt when its predictive entropy is at most `threshold` (nats), else abstain.

    `accuracy` and `coverage` are measured on the split the threshold was picked on (the
    fraction of it answered, and the accuracy there); `target` is the accuracy that was asked.
    """

    threshold: float
    target: float
    accuracy: float
    coverage: float

    def abstains(self, entropy: float) -> bool:
        """True when a prompt of this entropy is left unanswered."""
        return bool(entropy > self.threshold)


def abstention_threshold(probs: Any, labels: Any, target_accuracy: float) -> Abstention:
    """The entropy threshold with the largest coverage whose answered part reaches the accuracy.

    With u_i = H[p_i] (`melora.metrics.entropy`) and c_i = [argmax_k p_ik == y_i], answering the
    examples with u_i <= t has coverage |{u_i <= t}| / n and accuracy mean(c_i : u_i <= t). The
    candidates t are the distinct u_i (a threshold cannot split examples of equal entropy); the
    largest t whose accuracy is >= `target_accuracy` is chosen (accuracy need not fall
    monotonically with t, so this is a search, not a bisection). None reaching it is a
    `ConfigError` giving the best accuracy on offer.
    """
    if isinstance(target_accuracy, bool) or not 0.0 < float(target_accuracy) <= 1.0:
        raise ConfigError(f"abstain_at={target_accuracy!r} must be an accuracy in (0, 1]")
    entropy = metrics.entropy(probs)
    p = np.asarray(torch.as_tensor(probs).double())
    y = np.asarray(torch.as_tensor(labels))
    if y.shape != (len(p),):
        raise ConfigError(f"labels must have shape ({len(p)},), got {y.shape}")
    order = np.argsort(entropy, kind="stable")
    u, correct = entropy[order], (p.argmax(axis=1) == y)[order]
    accuracy = np.cumsum(correct) / np.arange(1, len(u) + 1)
    ends = np.flatnonzero(np.append(u[1:] != u[:-1], True))  # the last index of each tie group
    reached = ends[accuracy[ends] >= target_accuracy]
    if len(reached) == 0:
        best = ends[np.argmax(accuracy[ends])]
        raise ConfigError(
            f"no entropy threshold reaches accuracy {target_accuracy:g} on the {len(u)} "
            f"validation examples: the best is {accuracy[best]:.4f}, answering the "
            f"{best + 1} most certain (coverage {(best + 1) / len(u):.4f}); ask for less"
        )
    k = int(reached[-1])
    return Abstention(
        threshold=float(u[k]),
        target=float(target_accuracy),
        accuracy=float(accuracy[k]),
        coverage=(k + 1) / len(u),
    )


# ----- the predictor --------------------------------------------------------------------------
@dataclass
class Predictor:
    """A base model with a trained adapter, and the task whose prompts it answers.

    Build it with `load_predictor`. `temperature` (method 'ts' only) rescales the mean
    predictive as the run's evaluation did: `melora.baselines.temperature.apply_temperature`.
    """

    model: nn.Module
    tokenizer: Any
    task: TaskSpec
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
            from melora.baselines.temperature import apply_temperature

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
        return _to_dataset(rows, self.task, self.prompt_style)

    def _device(self) -> torch.device:
        param = next(self.model.parameters())
        return param.device


def load_predictor(
    adapter_dir: str | os.PathLike,
    task: str,
    base_model: str | None = None,
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
    base = base_model or recorded_base_model(adapter_dir)
    if not base:
        raise ConfigError(
            f"the adapter in {adapter_dir} does not record its base model: give the model it "
            "was trained on (a hub id, a folder, or 'demo') as base_model, or in "
            "jobs/predict.py as --set model.name_or_path=..."
        )
    tokenizer = load_base_tokenizer(base)
    answer_token_ids(tokenizer, spec.answers, template(prompt_style, spec.kind).cue)
    model = attach(_load_model(base, tokenizer, dtype, device), config)
    load_adapter(model, adapter_dir)
    return Predictor(
        model.eval(), tokenizer, spec, prompt_style, max_length, batch_size, temperature
    )
