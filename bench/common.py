"""Helpers shared by benchmarks: percentiles and ratios, all from measured samples."""

from __future__ import annotations

import statistics


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    assert samples, "no samples"
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(round(q / 100.0 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")
