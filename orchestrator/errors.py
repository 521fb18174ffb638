"""Every error type the orchestrator raises, in one place (all are `MeLoraError`s, so a job script
catches them with one `except` and exits 2 with the message)."""

from melora.errors import MeLoraError


# state_files.py
class StateFileError(MeLoraError, RuntimeError):
    """A state file cannot be read or written; the message names the file and what to do."""


# state_files.py
class LockedError(StateFileError):
    """Another process (or this one) holds the lock: the sweep or run is in use."""


# tracking/__init__.py
class TrackingError(MeLoraError, RuntimeError):
    """MLflow cannot be used as configured (server unreachable, run or experiment missing)."""


# tracking/model.py
class ModelError(MeLoraError, RuntimeError):
    """A run's adapter cannot be an MLflow model, or a model cannot be found or loaded as asked."""


# train/trainer.py
class RunFailedError(MeLoraError, RuntimeError):
    """The training run failed; the MLflow run is marked FAILED with the reason."""


# train/trainer.py
class RunConflictError(MeLoraError):
    """The run's recorded MLflow run cannot be resumed as asked: it FINISHED, or it was made with
    another config; nothing was changed in MLflow."""


# train/worker.py
class NonFiniteLossError(RuntimeError):
    """The loss is NaN or inf on some rank."""


# posthoc/runs.py
class PosthocError(MeLoraError, RuntimeError):
    """A finished run cannot be used as asked (not finished, no adapter, another task, ...)."""


# sweep/schema.py
class SweepError(MeLoraError, RuntimeError):
    """The sweep cannot start or continue as asked (it exists already, the cluster is too small)."""


# report/build.py
class ReportError(MeLoraError, RuntimeError):
    """The report cannot be made: no such experiment or sweep, or no finished runs."""
