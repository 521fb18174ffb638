"""The one error `melora.tasks` raises on purpose."""

from __future__ import annotations

from melora.errors import MeLoraError


class TaskError(MeLoraError, ValueError):
    """A task, split, data file or tokenizer does not fit; the message says what to change."""
