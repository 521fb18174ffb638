"""A trained adapter as an MLflow model (MLflow 3's logged model), and a sweep's best in the registry.

    model_id = log_run_model(uri, run_id, run)        # fit_run does this when a run ends
    register_best(uri, "demo", model_id, run_id, {"melora.sweep_run_id": parent, ...})
    local, config = download_model(uri, "models:/demo/1", tmp)
    pyfunc = load_model(local, {"base_model": "/new/place/of/the/base"})
    pyfunc.predict([{"question": "...", "choices": ["...", "..."]}])

A training run's model is a pyfunc model whose code is `orchestrator/adapter_pyfunc.py` (MLflow's
"models from code": the file is copied into the model and run at load, nothing of ours is
pickled), whose one artifact is the run's `adapter/` folder (the safetensors file and its
config), and whose `model_config` holds the run's task settings and base model (by name or path:
the base model is never copied into the model). Its predict is `melora.predict.Predictor.answer`
(adapter_pyfunc.py's doc). The logged model belongs to the run's experiment, names the run as its
source (the run page's "Logged models"), carries the run's params, and the run's final metrics
are linked to it (test/*, ood/* and temperature at the run's last step, val/* at its selected
step `best_step`), each with its dataset input (name and digest), as MLflow's own `log_model`
links them.

It is made with `MlflowClient` and `mlflow.pyfunc.save_model` (create the logged model, save, upload,
link, finalize): `mlflow.pyfunc.log_model` would take the tracking URI and the experiment from
MLflow's process-global state, which this project does not use (orchestrator.tracking's doc).
Like orchestrator.tracking (and the model's code, adapter_pyfunc.py), this module imports mlflow.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from orchestrator.config import RunConfig
from orchestrator.errors import ModelError
from orchestrator.redaction import redact_text, redact_uri
from orchestrator.tracking import store
from orchestrator.tracking.conventions import (
    METHOD_TAG,
    MODEL_ERROR_TAG,
    SEED_TAG,
    SWEEP_RUN_TAG,
    TASK_TAG,
)
from orchestrator.tracking.conventions import SWEEP_METRIC_TAG as SWEEP_METRIC_TAG  # re-exported
from orchestrator.tracking.conventions import SWEEP_TRIAL_TAG as SWEEP_TRIAL_TAG  # re-exported
from orchestrator.tracking.conventions import SWEEP_VALUE_TAG as SWEEP_VALUE_TAG  # re-exported
from orchestrator.tracking.log import METRICS_PER_BATCH, set_tags
from orchestrator.tracking.query import download_adapter, run_config

MODEL_CODE = Path(__file__).with_name("adapter_pyfunc.py")  # the model's code (models from code)
MODEL_TYPE = "melora-adapter"  # the logged model's model_type
# what the model's code imports, pinned at the installed versions (the model's requirements.txt;
# MLflow would otherwise infer them by loading the model, base model included, in a subprocess).
# The project itself (melora) must be installed where the model loads: it is not on PyPI.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "datasets",
    "numpy",
    "pandas",
    "pyyaml",
)

_BAD_NAME_CHARS = re.compile(r"[/:.%\"']")  # not allowed in a logged model's name


# ----- the model's settings ---------------------------------------------------------------------
def model_config(run: RunConfig, temperature: float | None = None) -> dict[str, Any]:
    """The pyfunc model's `model_config`: what `melora.predict.load_predictor` takes (the run's
    task settings and base model; `temperature` for method ts), the run's N (the largest of
    `eval.n_samples`) and what `jobs/predict.py --abstain-at` needs to load the validation split
    (`split_policy`, `data_dir`). Every key is present (None where unset): MLflow lets
    `load_model(..., model_config=...)` override only the keys that the model has."""
    t = run.task
    return {
        "task": t.name,
        "base_model": run.model.name_or_path,
        "prompt_style": t.prompt_style,
        "max_length": t.max_length,
        "batch_size": run.eval.batch_size,
        "dtype": run.model.dtype,
        "temperature": temperature,
        "n_samples": max(run.eval.n_samples),
        "split_policy": t.split_policy,
        "data_dir": t.data_dir,
    }


def unloggable_reason(run: RunConfig) -> str | None:
    """Why the run's adapter is not a model of its own (ENS and LAP), else None."""
    if run.adapter.method in ("ens", "lap"):
        return (
            f"method {run.adapter.method!r}: its predictive is not one adapter's (ENS averages "
            "its members, LAP needs its Laplace fit), so no MLflow model is logged for it"
        )
    return None


# ----- logging a run's model --------------------------------------------------------------------
def run_model_id(uri: str, run_id: str) -> str | None:
    """The id of the run's READY logged model (the latest one), or None."""
    client = store.client(uri)
    outputs = client.get_run(run_id).outputs
    for output in reversed(outputs.model_outputs if outputs else []):
        if client.get_logged_model(output.model_id).status == LoggedModelStatus.READY:
            return output.model_id
    return None


def log_run_model(uri: str, run_id: str, run: RunConfig | None = None) -> str:
    """Log the run's adapter as an MLflow pyfunc model (module doc); returns its model id.

    `run`: the run's config (default: its `config/resolved.yaml` artifact). The run must hold its
    final metrics and its `adapter/` artifact: `fit_run` calls this once the workers are done,
    and it works as well for a FINISHED run logged before models were (a backfill). A run that has
    a READY model already gets no second one (its id is returned). A model whose logging fails
    midway is marked FAILED in MLflow, and the error is raised. ModelError for ENS and LAP runs.
    """
    client = store.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        run = run or run_config(uri, run_id, tmp, ModelError)
        reason = unloggable_reason(run)
        if reason is not None:
            raise ModelError(f"MLflow run {run_id}: {reason}")
        existing = run_model_id(uri, run_id)
        if existing is not None:
            return existing
        tracked = client.get_run(run_id)
        metrics = dict(tracked.data.metrics)
        temperature = metrics.get("temperature") if run.adapter.method == "ts" else None
        if run.adapter.method == "ts" and temperature is None:
            raise ModelError(f"MLflow run {run_id} (method ts) has no metric 'temperature'")
        adapter = download_adapter(uri, run_id, Path(tmp) / "adapter", ModelError)
        logged = client.create_logged_model(
            experiment_id=tracked.info.experiment_id,
            name=_BAD_NAME_CHARS.sub("_", run.run_name),
            source_run_id=run_id,
            params=dict(tracked.data.params),
            tags={  # where it comes from, as the run (the UI's "Logged from"), and what it is
                **{
                    k: v
                    for k, v in tracked.data.tags.items()
                    if k.startswith("mlflow.source.") or k == "mlflow.user"
                },
                METHOD_TAG: run.adapter.method,
                TASK_TAG: run.task.name,
                SEED_TAG: str(run.seed),
                "base_model": redact_text(run.model.name_or_path),
            },
            model_type=MODEL_TYPE,
        )
        try:
            local = _save(
                Path(tmp) / "model", logged, run_id, adapter, run, temperature=temperature
            )
            client.log_model_artifacts(logged.model_id, str(local))
            step = run.optim.max_steps
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
            link_final_metrics(uri, run_id, logged.model_id, run, metrics)
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            try:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            except Exception:  # the error that stopped the logging is the one to see
                pass
            raise
    return logged.model_id


def log_run_model_or_warn(uri: str, run_id: str, run: RunConfig) -> str | None:
    """`log_run_model` for `fit_run`: a model that cannot be logged does not fail the run.

    The run trained, and its metrics and adapter are in MLflow: it stays a good run. So a failure
    here prints a warning and sets the run's tag `melora.model_error` to the reason (the model
    can be logged later with `log_run_model(uri, run_id)`); None is returned. ENS and LAP runs
    get no model and no tag.
    """
    if unloggable_reason(run) is not None:
        return None
    try:
        return log_run_model(uri, run_id, run)
    except Exception as err:
        reason = redact_text(f"{type(err).__name__}: {err}")
        hint = (
            f'the run is kept; log its model later with: python -c "from orchestrator.tracking '
            f"import model; model.log_run_model('<tracking URI>', '{run_id}')\""
        )
        print(
            f"[tracking] warning: MLflow run {run_id}: its adapter could not be logged as an "
            f"MLflow model ({reason}); {hint}",
            flush=True,
        )
        try:
            set_tags(uri, run_id, {MODEL_ERROR_TAG: f"{reason}; {hint}"})
        except Exception:  # MLflow itself may be what failed: the warning above says it all
            pass
        return None


def link_final_metrics(
    uri: str, run_id: str, model_id: str, run: RunConfig, metrics: Mapping[str, float]
) -> int:
    """Link the run's final metrics to its logged model, as MLflow's `log_model` links a run's
    metrics: the same points (key, value, timestamp, step) logged again with `model_id`, so the
    run's histories gain no point. test/* and ood/* (and temperature, best_step): their last
    point (the run's final evaluation); val/*: the point at the selected step (`best_step`; the
    last point without one). Each test / OOD / validation metric with its dataset input (name and
    digest). Returns how many were linked."""
    client = store.client(uri)
    digests = _dataset_digests(uri, run_id)
    best_step = int(metrics["best_step"]) if "best_step" in metrics else None
    points = []
    for key in sorted(metrics):
        split, _, rest = key.partition("/")
        step = None
        if split in ("test", "ood"):
            dataset = f"{rest.partition('/')[0]}/test"
        elif split == "val":
            step, dataset = best_step, f"{run.task.name}/validation"
        elif key in ("temperature", "best_step"):
            dataset = None
        else:
            continue
        history = sorted(
            client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
        )
        at_step = [m for m in history if step is None or m.step == step]
        if not at_step:
            continue
        m = at_step[-1]
        named = dataset if dataset in digests else None
        points.append(
            Metric(
                m.key,
                m.value,
                m.timestamp,
                m.step,
                model_id=model_id,
                dataset_name=named,
                dataset_digest=digests.get(named) if named else None,
            )
        )
    for i in range(0, len(points), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=points[i : i + METRICS_PER_BATCH])
    return len(points)


def _save(
    path: Path,
    logged: Any,
    run_id: str,
    adapter: Path,
    run: RunConfig,
    *,
    temperature: float | None,
) -> Path:
    """The model folder (MLmodel, the code file, the adapter artifact, requirements)."""
    import mlflow.pyfunc  # loads MLflow's model flavors: only where a model is saved
    from mlflow.models import Model, ModelSignature  # with mlflow.pyfunc
    from mlflow.types import ParamSchema, ParamSpec  # with mlflow.pyfunc

    config = model_config(run, temperature)
    signature = ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("n_samples", "long", config["n_samples"]),
                ParamSpec("seed", "long", 0),
            ]
        )
    )
    with warnings.catch_warnings():  # no input example: it would differ by task (hub schemas)
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_CODE),
            artifacts={"adapter": str(adapter)},
            model_config=config,
            signature=signature,
            pip_requirements=requirements(),
            metadata={"melora_method": run.adapter.method, "melora_run_id": run_id},
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            ),
        )
    return path


def requirements() -> list[str]:
    """`REQUIREMENTS` pinned at the installed versions (a local label such as +cpu dropped)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


# ----- the registry -----------------------------------------------------------------------------
def register_best(
    uri: str, name: str, model_id: str, run_id: str, tags: Mapping[str, Any]
) -> tuple[str, bool]:
    """Register the logged model `model_id` (of run `run_id`) as a new version of the registered
    model `name` (created when missing), with `tags`; returns (version, created).

    A version with the same `SWEEP_RUN_TAG` and model already there (a resumed sweep ending
    again) is returned instead of a second one: one version per sweep run.
    """
    client = store.client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="The best trial of each run of the sweep of this name."
            )
        except MlflowException:  # made meanwhile by another process
            client.get_registered_model(name)
    sweep_run, source = tags.get(SWEEP_RUN_TAG), f"models:/{model_id}"
    for version in client.search_model_versions(f"name = '{_quoted(name)}'"):
        if version.source == source and version.tags.get(SWEEP_RUN_TAG) == sweep_run:
            return str(version.version), False
    with _global_tracking_uri(uri):
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={k: redact_text(str(v)) for k, v in tags.items()},
            model_id=model_id,
        )
    # the logged model's list of its versions (the UI's "Registered models" of a logged model),
    # as mlflow.register_model keeps it
    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    links.append({"name": name, "version": str(version.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    return str(version.version), True


# ----- loading ----------------------------------------------------------------------------------
def download_model(uri: str, model_uri: str, dst: str | Path) -> tuple[Path, dict[str, Any]]:
    """(local folder, model_config) of an MLflow model: `models:/<model id>`,
    `models:/<name>/<version>` or `models:/<name>@<alias>` at the tracking (and registry) URI
    `uri`. ModelError when it cannot be found or is not one of this project's adapter models."""
    import mlflow.artifacts  # with mlflow.models: only where a model is downloaded
    from mlflow.models import Model  # loads MLflow's model flavors: only where one is read

    if not model_uri.startswith("models:/"):
        raise ModelError(
            f"--model {model_uri!r}: give an MLflow model URI, models:/<name>/<version> (a "
            "registered version) or models:/<model id> (a logged model, m-...)"
        )
    try:
        with _global_tracking_uri(uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri, registry_uri=uri
                )
            )
    except MlflowException as err:
        raise ModelError(
            f"MLflow model {model_uri} not found at {redact_uri(uri)}: {redact_text(err.message)}"
        ) from None
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    config = flavor.get("config")  # mlflow.pyfunc's key of the model_config in MLmodel
    if not isinstance(config, dict) or "task" not in config:
        raise ModelError(
            f"MLflow model {model_uri} is not a Me-LoRA adapter model (its pyfunc flavor has no "
            "task settings): give a model that a training run of this project logged"
        )
    return local, config


def load_model(local: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """`mlflow.pyfunc.load_model` of a downloaded adapter model, with `overrides` of its
    model_config (e.g. {"base_model": folder}); the `melora` errors of loading (a base model that
    cannot be found, an answer that is not one token) come through unchanged."""
    import mlflow.pyfunc  # loads MLflow's model flavors: only where a model is loaded

    return mlflow.pyfunc.load_model(str(local), model_config=dict(overrides or {}))


def predictor_of(pyfunc_model: Any) -> Any:
    """The `melora.predict.Predictor` inside a loaded adapter model."""
    return pyfunc_model.unwrap_python_model().predictor


# ----- helpers ----------------------------------------------------------------------------------
@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then restored as it was.

    MLflow 3.17 resolves a logged model's `models:/<model id>` with a default `MlflowClient()`
    (the process-wide URI) in two places even when it is given a URI: registering a version whose
    source is a logged model (sqlalchemy registry store, "TODO: Propagate tracking URI") and
    downloading `models:/<model id>`. `_use_tracking_uri` is the context manager MLflow uses itself.
    """
    # MLflow-private, so imported here alone
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def _dataset_digests(uri: str, run_id: str) -> dict[str, str]:
    """{dataset name: digest} of the run's dataset inputs."""
    inputs = store.client(uri).get_run(run_id).inputs
    return {d.dataset.name: d.dataset.digest for d in (inputs.dataset_inputs if inputs else [])}


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")
