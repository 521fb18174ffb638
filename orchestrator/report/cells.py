"""One table cell from a metric's values over seeds: "72.35 ± 0.75". Used by the report's tables
and the results table a sweep prints at its end, so both read the same."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

MISSING = "—"  # no finished run has the value


def mean_std(
    values: Sequence[float], *, scale: float = 1.0, decimals: int = 2
) -> tuple[str, float | None]:
    """("72.35 ± 0.75", 72.35): the mean and sample std of `values` * `scale` (NaN and inf left
    out), and the mean as printed, for ranking; one value prints alone, none prints MISSING."""
    scaled = [v * scale for v in values if math.isfinite(v)]
    if not scaled:
        return MISSING, None
    mean = f"{statistics.fmean(scaled):.{decimals}f}"
    if len(scaled) == 1:
        return mean, float(mean)
    return f"{mean} ± {statistics.stdev(scaled):.{decimals}f}", float(mean)
