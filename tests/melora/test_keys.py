"""melora.keys: every metric and predictions key is built and read back by one module."""

import pytest

from melora.keys import (
    FINAL_METRICS,
    FinalKey,
    final_key,
    parse_final_key,
    parse_predictions_key,
    predictions_key,
    val_key,
)


@pytest.mark.parametrize("metric", FINAL_METRICS)
@pytest.mark.parametrize("split", ["test", "ood"])
def test_final_keys_read_back(split: str, metric: str) -> None:
    key = final_key(split, "mmlu_college_mathematics", metric, 10)
    assert key == f"{split}/mmlu_college_mathematics/{metric}_n10"
    assert parse_final_key(key) == FinalKey(split, "mmlu_college_mathematics", metric, 10)
    assert str(parse_final_key(key)) == key


def test_longest_metric_name_wins() -> None:
    """'auroc_mi' is not 'auroc' of a task called '..._mi'; 'acc_cov80' is not 'acc'."""
    assert parse_final_key("ood/arc_easy/auroc_mi_n0").metric == "auroc_mi"
    assert parse_final_key("test/obqa/acc_cov80_n1").metric == "acc_cov80"


@pytest.mark.parametrize(
    "key",
    [
        "val/acc",
        "train/nll",
        "test/obqa/n10",
        "test/obqa/f1_n0",
        "dev/obqa/acc_n0",
        "test/obqa/acc_nx",
    ],
)
def test_what_is_not_a_final_key(key: str) -> None:
    assert parse_final_key(key) is None


def test_predictions_keys_read_back() -> None:
    assert predictions_key("ood", "arc_easy", 0) == "ood/arc_easy/n0"
    assert parse_predictions_key("ood/arc_easy/n0") == ("ood", "arc_easy", 0)
    with pytest.raises(ValueError, match="not a predictions key"):
        parse_predictions_key("ood/arc_easy/acc_n0")


def test_splits_are_test_or_ood() -> None:
    assert val_key("nll") == "val/nll"
    with pytest.raises(ValueError, match="'test' or 'ood'"):
        final_key("val", "obqa", "acc", 0)
    with pytest.raises(ValueError, match="'test' or 'ood'"):
        predictions_key("train", "obqa", 0)
