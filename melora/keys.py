"""The names of metrics and predictions, one owner: how a key is built and how it is read back.

    final_key("test", "openbookqa", "ece", 10)  ->  "test/openbookqa/ece_n10"
    predictions_key("ood", "arc_easy", 0)       ->  "ood/arc_easy/n0"
    parse_final_key("ood/arc_easy/auroc_n10")   ->  FinalKey("ood", "arc_easy", "auroc", 10)
    parse_predictions_key("test/arc_easy/n10")  ->  ("test", "arc_easy", 10)
    val_key("nll")                              ->  "val/nll"

A final metric is measured once, after training, on the task's test split ("test") or on an
out-of-distribution task ("ood"), at N posterior samples (N = 0: the posterior mean). Validation
metrics ("val/<metric>") are logged during training and carry no N.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINAL_SPLITS = ("test", "ood")
# Every final metric a run logs (melora.metrics, the in-worker evaluation): acc_cov80 is the
# accuracy at 80% coverage, aurc the area under the risk-coverage curve, mi the mean mutual
# information; auroc (of the predictive entropy) and auroc_mi are the OOD detection scores.
FINAL_METRICS = ("acc", "nll", "ece", "brier", "acc_cov80", "aurc", "mi", "auroc", "auroc_mi")
VAL_METRICS = ("acc", "nll", "ece", "brier")  # logged during training, at the posterior mean

_FINAL = re.compile(
    rf"({'|'.join(FINAL_SPLITS)})/([\w.-]+)/"
    rf"({'|'.join(sorted(FINAL_METRICS, key=len, reverse=True))})_n(\d+)"
)

_PREDICTIONS = re.compile(rf"({'|'.join(FINAL_SPLITS)})/([\w.-]+)/n(\d+)")


@dataclass(frozen=True)
class FinalKey:
    """A final metric's key, read back: split ('test' | 'ood'), task, metric, N."""

    split: str
    task: str
    metric: str
    n: int

    def __str__(self) -> str:
        return final_key(self.split, self.task, self.metric, self.n)


def final_key(split: str, task: str, metric: str, n: int) -> str:
    """'test/openbookqa/ece_n10': the key of `metric` on `task` at N = `n`."""
    _check_split(split)
    return f"{split}/{task}/{metric}_n{n}"


def predictions_key(split: str, task: str, n: int) -> str:
    """'test/openbookqa/n10': the key of the predictions that `task`'s final metrics at N come from."""
    _check_split(split)
    return f"{split}/{task}/n{n}"


def val_key(metric: str) -> str:
    """'val/nll': a validation metric's key."""
    return f"val/{metric}"


def parse_final_key(key: str) -> FinalKey | None:
    """The parts of a final metric's key, or None when `key` is not one (e.g. 'val/acc')."""
    m = _FINAL.fullmatch(key)
    return FinalKey(m[1], m[2], m[3], int(m[4])) if m else None


def parse_predictions_key(key: str) -> tuple[str, str, int]:
    """(split, task, N) of a predictions key; ValueError when `key` is not one."""
    m = _PREDICTIONS.fullmatch(key)
    if not m:
        raise ValueError(f"{key!r} is not a predictions key '<test|ood>/<task>/n<N>'")
    return m[1], m[2], int(m[3])


def _check_split(split: str) -> None:
    if split not in FINAL_SPLITS:
        raise ValueError(f"split={split!r}: final metrics and predictions are 'test' or 'ood'")
