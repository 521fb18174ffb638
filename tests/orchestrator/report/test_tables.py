"""orchestrator.report.tables: the best / second marks of a column."""

from __future__ import annotations

from orchestrator.report.tables import ranks


def test_ranks_share_marks_on_ties_and_follow_the_direction() -> None:
    assert ranks([0.5, None, 0.4, 0.5, 0.3], higher=True) == ["best", "", "second", "best", ""]
    assert ranks([0.5, 0.4, 0.3], higher=False) == ["", "second", "best"]
    assert ranks([None, 1.0], higher=False) == ["", "best"]
