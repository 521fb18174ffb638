"""The `tracking` section of the run config: where results go (MLflow, Ray Train storage).

Its fields are checked by `melora.fields.validate` (a secret-named tag's value is never echoed in
a message); `__post_init__` checks the experiment name, tag keys, the tracking URI's scheme and
that it holds no password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from melora.errors import ConfigError
from melora.fields import short_repr, validate
from orchestrator.config.sections import RUN_NAME
from orchestrator.redaction import REDACTED, is_secret_key, redact_uri

TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql")
RESERVED_TAGS = ("method", "task", "seed", "sweep", "git_sha")
_TAG_KEY = re.compile(r"[\w./\- ]{1,250}")  # MLflow's tag keys (tracking.check_name)


def _shown_tag(key: object, value: object) -> str:
    """A refused tag's value as a message shows it: never a secret's."""
    return REDACTED if is_secret_key(key) else short_repr(value)


@dataclass
class TrackingConfig:
    """Where results go: MLflow (params, metrics, artifacts) and Ray Train storage (checkpoints)."""

    section: ClassVar[str] = "tracking"

    tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "MLflow URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. Credentials go in MLFLOW_TRACKING_USERNAME/PASSWORD, never here."
        },
    )
    experiment: str = field(
        default="melora",
        metadata={
            "help": "MLflow experiment name (created when missing; it names report folders): 1-100 letters, digits, '.', '_', '-', starting with a letter or digit."
        },
    )
    storage_path: str | None = field(
        default=None,
        metadata={
            "help": "Ray Train storage for checkpoints: a folder or a URI (s3://...); null: <cwd>/ray_results."
        },
    )
    tags: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Extra MLflow tags for the run, e.g. {owner: me}; method, task, seed, sweep and git_sha are set by the run. A secret-named tag (hf_token) is never logged and reads '***' in written configs.",
            "shown": _shown_tag,
        },
    )

    def __post_init__(self) -> None:
        validate(self)
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment='' is empty: give an MLflow experiment name")
        if not RUN_NAME.fullmatch(self.experiment):  # it becomes a folder name (jobs/report.py)
            raise ConfigError(
                f"tracking.experiment={short_repr(self.experiment)} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        for key in self.tags:
            if not _TAG_KEY.fullmatch(key):
                raise ConfigError(
                    f"tracking.tags key {short_repr(key)} is not allowed: MLflow takes 1-250 letters, digits, '_', '-', '.', ' ' and '/'"
                )
        if self.tracking_uri is not None:
            _check_tracking_uri(self.tracking_uri)
        if self.storage_path is not None and not self.storage_path.strip():
            raise ConfigError("tracking.storage_path='' is empty: give a folder, a URI or null")
        reserved = sorted(k for k in self.tags if k in RESERVED_TAGS or k.startswith("mlflow."))
        if reserved:
            raise ConfigError(
                f"tracking.tags sets {reserved}: these tags are set by the run itself ({list(RESERVED_TAGS)}, mlflow.*); remove them"
            )

    def resolved_storage_path(self) -> str:
        """`storage_path` as Ray Train needs it: a URI, or an absolute folder (default <cwd>/ray_results)."""
        if self.storage_path is not None and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path or "ray_results").expanduser().resolve())


def _check_tracking_uri(uri: str) -> None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise ConfigError(
            f"tracking.tracking_uri={short_repr(redact_uri(uri))} is not a valid URI: {e}"
        ) from None
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.tracking_uri={short_repr(redact_uri(uri))} has an unsupported scheme: use one of {[s + '://' for s in TRACKING_SCHEMES]}"
        )
    if parts.password:
        raise ConfigError(
            "tracking.tracking_uri contains a password: remove it from the URI and set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment instead"
        )
