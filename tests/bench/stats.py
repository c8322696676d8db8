"""Percentiles and medians over rounds, kept free of numpy on purpose."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

__all__ = ["median", "median_of", "percentile", "summary"]


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear-interpolated percentile (the same rule as numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, p50, p90, p99 and max of a latency sample (ms), rounded to µs."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "n": len(values),
        "mean": rounded(statistics.fmean(values)) if values else None,
        "p50": rounded(percentile(values, 50)),
        "p90": rounded(percentile(values, 90)),
        "p99": rounded(percentile(values, 99)),
        "max": rounded(max(values)) if values else None,
    }


def median(values: Sequence[float | int | None]) -> float | None:
    """Median of the rounds that produced a value; None when none did."""
    present = [float(v) for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def median_of(rounds: Sequence[Mapping[str, float | int | None]]) -> dict[str, float | None]:
    """Field-by-field median over rounds (each round a flat mapping of numbers)."""
    if not rounds:
        return {}
    return {field: median([r.get(field) for r in rounds]) for field in rounds[0]}
