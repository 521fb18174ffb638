"""Ask a trained adapter: answer multiple-choice prompts with the posterior predictive and its uncertainty.

    python jobs/predict.py --run <MLflow run id> --input questions.jsonl [--output answers.jsonl]
        [--n-samples 10] [--abstain-at 0.9] [--seed 0] [--tracking-uri URI] [--set key=value ...]
    python jobs/predict.py --model models:/<name>/<version> --input questions.jsonl ...
    python jobs/predict.py --adapter out/adapter --set task.name=arc_easy --input questions.jsonl ...

--run: a FINISHED training run; its `adapter/` artifact and its resolved config (base model,
task, prompt style, max length, eval batch size) come from MLflow (--tracking-uri, else
$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). --model: the MLflow model a training run logged
(models:/<model id>), or a version of one in the Model Registry (models:/<name>/<version>, e.g.
a sweep's best: models:/demo/1), from the same store; `mlflow.pyfunc.load_model` loads it, with
the run settings of its model config (orchestrator/adapter_pyfunc.py). --adapter: a folder
written by `melora.save_adapter`; the task settings are the run config's fields, set with --set
(`task.name`, `task.prompt_style`, `task.max_length`, `task.split_policy`, `task.data_dir`,
`eval.batch_size`, `model.dtype`), and the base model is `model.name_or_path` if set, else the one
the folder records. --set also overrides a run's or a model's fields (e.g. `task.data_dir` where the
data now lies, `model.name_or_path` where the base model now lies).

Each line of --input is a JSON object: a row of the task's hub schema, or
{"question": ..., "choices": [...]} (optional "id", "context", "label"). Each line of the output
(--output, else stdout) is one prompt's answer, in input order: `probs` (over its choices), `answer`
(the task's answer token, "A", ...), `answer_index`, `entropy` and `mutual_information` (nats;
null where the method or N draws nothing), `abstain` (null without --abstain-at), `label` if given.
--n-samples N: the predictive averages N draws (0: the mean adapter; LoRA / MAP ignores N).
--abstain-at A: the largest entropy threshold at which the task's validation split is answered
with accuracy >= A (at the same N); prompts above it abstain; the coverage it expects is printed.

Messages go to stderr. Exit status: 0 answered; 2 bad input (a missing run, model or artifact, a base
model that cannot be found, an answer that is not one token, an empty or malformed prompts file,
an accuracy no threshold reaches), with nothing written; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from melora import metrics  # noqa: E402
from melora.adapters import read_adapter_config  # noqa: E402
from melora.errors import ConfigError, MeLoraError  # noqa: E402
from orchestrator.config import (  # noqa: E402
    RunConfig,
    add_overrides_option,
    parse_overrides,
    shorten_message,
)


class Source(NamedTuple):
    """The adapter to ask and the run settings to ask it with."""

    adapter_dir: Path
    run: RunConfig  # task, prompt style, max length, eval batch size, base model, dtype
    base_model: str | None  # None: the one the adapter folder records
    temperature: float | None  # method 'ts': the run's fitted temperature
    name: str  # for messages
    model_dir: Path | None = None  # --model: the downloaded MLflow model, loaded by MLflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", metavar="RUN_ID", help="a FINISHED MLflow training run")
    where.add_argument("--adapter", metavar="DIR", help="a folder written by melora.save_adapter")
    where.add_argument(
        "--model",
        metavar="MODEL_URI",
        help="an MLflow model: models:/<name>/<version> (registered) or models:/<model id>",
    )
    parser.add_argument("--input", required=True, help="the prompts, one JSON object a line")
    parser.add_argument("--output", help="the answers as JSONL (default: stdout)")
    parser.add_argument("--n-samples", type=_n_samples, default=10, help="N draws (default 10)")
    parser.add_argument(
        "--abstain-at", type=_accuracy, metavar="ACC", help="the accuracy to answer with, in (0, 1]"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the N draws (default 0)")
    parser.add_argument(
        "--tracking-uri", help="--run, --model: MLflow URI (default: $MLFLOW_TRACKING_URI)"
    )
    add_overrides_option(
        parser,
        "a run config field, e.g. task.name=arc_easy (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            answers, summary = answer(args, Path(tmp))
    except MeLoraError as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {shorten_message(str(err))}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps(a.to_dict()) + "\n" for a in answers)
    if args.output:
        write_atomically(Path(args.output), lines)
    else:
        sys.stdout.write(lines)
    print("\n".join(summary), file=sys.stderr)
    return 0


def answer(args: argparse.Namespace, tmp: Path) -> tuple[list[Any], list[str]]:
    """(answers, summary lines): every check first (source, prompts, validation split, base
    model, answer tokens), then the predictive. Raises `MeLoraError` for anything a user caused."""
    from melora.predict import load_predictor  # why: datasets, only once the arguments are read
    from melora.tasks import load_task  # why: datasets, only once the arguments are read
    from melora.user_prompts import read_prompts  # why: datasets, once the arguments are read

    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder: give a file name")
    source = find_source(args, dict(parse_overrides(args.overrides)), tmp)
    t = source.run.task
    prompts = read_prompts(args.input, t.name)
    validation = None
    if args.abstain_at is not None:
        validation = load_task(
            t.name, t.split_policy, t.data_dir, t.prompt_style, splits=("validation",)
        )["validation"]
    if source.model_dir is not None:  # mlflow.pyfunc.load_model: its load_context loads it
        from orchestrator.tracking import model as mlflow_model

        config = mlflow_model.model_config(source.run, source.temperature)
        config.pop("n_samples")  # --n-samples decides
        predictor = mlflow_model.predictor_of(mlflow_model.load_model(source.model_dir, config))
    else:
        predictor = load_predictor(
            source.adapter_dir,
            task=t.name,
            base_model=source.base_model,
            prompt_style=t.prompt_style,
            max_length=t.max_length,
            batch_size=source.run.eval.batch_size,
            dtype=source.run.model.dtype,
            temperature=source.temperature,
        )
    rule = None
    if validation is not None:
        rule = predictor.abstention(args.abstain_at, validation, args.n_samples, args.seed)
    answers = predictor.answer(prompts, args.n_samples, args.seed, rule)
    n_validation = 0 if validation is None else len(validation)
    return answers, summary(source, predictor, answers, args, rule, n_validation)


def find_source(args: argparse.Namespace, overrides: dict, tmp: Path) -> Source:
    """The `Source` of --run (the run's config and adapter, downloaded into `tmp`), --model (the
    MLflow model, downloaded into `tmp`) or --adapter."""
    if args.model:
        return model_source(args.model, args.tracking_uri, overrides, tmp)
    if args.adapter:
        if args.tracking_uri:
            raise ConfigError("--tracking-uri goes with --run or --model, not --adapter")
        if "task.name" not in overrides:
            raise ConfigError(
                "--adapter needs the task its prompts belong to: --set task.name=<task> "
                "(and task.prompt_style, task.max_length as in training)"
            )
        run = RunConfig().with_overrides(overrides)
        base = run.model.name_or_path if "model.name_or_path" in overrides else None
        return Source(Path(args.adapter), run, base, None, f"adapter {args.adapter}")
    return run_source(args.run, args.tracking_uri, overrides, tmp)


def model_source(model_uri: str, tracking_uri: str | None, overrides: dict, tmp: Path) -> Source:
    """An MLflow adapter model (`orchestrator.tracking.model`), downloaded into `tmp`: its
    model_config gives the run settings (with `overrides`); `answer` loads it with
    `mlflow.pyfunc.load_model` and asks the Predictor its `load_context` built."""
    from orchestrator.tracking import model as mlflow_model

    uri = _store_uri(tracking_uri)
    local, config = mlflow_model.download_model(uri, model_uri, tmp / "model")
    settings = {
        "task.name": config["task"],
        "task.prompt_style": config["prompt_style"],
        "task.max_length": config["max_length"],
        "task.split_policy": config["split_policy"],
        "task.data_dir": config["data_dir"],
        "eval.batch_size": config["batch_size"],
        "model.dtype": config["dtype"],
        "model.name_or_path": config["base_model"],
    }
    run = RunConfig().with_overrides({**settings, **overrides})
    adapter_dir = local / "artifacts" / "adapter"
    method = read_adapter_config(adapter_dir).method
    return Source(
        adapter_dir,
        run,
        run.model.name_or_path,
        config.get("temperature"),
        f"MLflow model {model_uri} ({method})",
        local,
    )


def _store_uri(tracking_uri: str | None) -> str:
    """The MLflow store to read (--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db),
    checked: reading must not create an empty database, and a server must answer."""
    from orchestrator import tracking
    from orchestrator.config import TrackingConfig
    from orchestrator.errors import PosthocError

    uri = tracking.resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise PosthocError(
            f"no MLflow database at {db}: give the store the run was logged to (--tracking-uri "
            "or $MLFLOW_TRACKING_URI)"
        )
    tracking.check_reachable(uri)
    return uri


def run_source(run_id: str, tracking_uri: str | None, overrides: dict, tmp: Path) -> Source:
    """A FINISHED run's resolved config (with `overrides`) and adapter artifact, via
    `orchestrator.posthoc` as LAP and ENS read their runs."""
    from orchestrator import tracking
    from orchestrator.errors import PosthocError
    from orchestrator.posthoc.runs import download_adapter, finished_run_config

    uri = _store_uri(tracking_uri)
    run = finished_run_config(uri, run_id, tmp).with_overrides(overrides)
    method = run.adapter.method
    if method in ("ens", "lap"):
        raise PosthocError(
            f"MLflow run {run_id} has method {method!r}, whose predictive is not one adapter's "
            "(ENS averages the LoRA runs of its tag ensemble_members, LAP needs its Laplace fit): "
            "ask a LoRA run with --run instead"
        )
    temperature = None
    if method == "ts":
        temperature = tracking.read_run(uri, run_id)[2].get("temperature")
        if temperature is None:
            raise PosthocError(f"MLflow run {run_id} (method ts) has no metric 'temperature'")
    adapter_dir = download_adapter(uri, run_id, tmp)
    return Source(
        adapter_dir, run, run.model.name_or_path, temperature, f"MLflow run {run_id} ({method})"
    )


def summary(
    source: Source,
    predictor: Any,
    answers: list[Any],
    args: argparse.Namespace,
    rule: Any,
    n_validation: int,
) -> list[str]:
    """What was answered, with which predictive, and what abstention and labels say."""
    sampled = predictor.config.samples_at_test and predictor.temperature is None
    draws = f"N = {args.n_samples}" if sampled else "the mean adapter (N does not apply)"
    where = args.output or "stdout"
    lines = [f"answered {len(answers)} prompts with {source.name}, {draws} -> {where}"]
    if rule is not None:
        abstained = sum(a.abstain for a in answers)
        lines.append(
            f"abstain above entropy {rule.threshold:.4f} nats: on the {n_validation} validation "
            f"examples accuracy {rule.accuracy:.4f} at coverage {rule.coverage:.4f} (the coverage "
            f"to expect); abstained on {abstained} of {len(answers)} prompts"
        )
    if all(a.label is not None for a in answers):
        import torch

        k = len(predictor.task.answers)
        probs = torch.tensor([a.probs + [0.0] * (k - len(a.probs)) for a in answers])
        labels = torch.tensor([a.label for a in answers])
        lines.append(
            f"on their labels: accuracy {metrics.accuracy(probs, labels):.4f}, "
            f"NLL {metrics.nll(probs, labels):.4f}"
        )
    return lines


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file beside it, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _n_samples(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use 0 (the mean adapter) or N >= 1 draws")
    return value


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: an accuracy in (0, 1], e.g. 0.9")
    return value


if __name__ == "__main__":
    sys.exit(main())
