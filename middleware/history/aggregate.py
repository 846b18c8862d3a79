"""Aggregation of attribute instances over periods (clause 4.5.19): totalCount, distinctCount, sum, avg, min, max, stddev, sumsq."""
from __future__ import annotations

import math
from typing import Any

import orjson

AGGR_METHODS = ("totalCount", "distinctCount", "sum", "avg", "min", "max", "stddev", "sumsq")

Point = tuple[int, Any]  # (µs, value)


def periods(points: list[Point], period: int, origin: int | None, end: int | None) -> list[tuple[int, int, list]]:
    """Split time-ordered points into periods of `period` µs from origin (first point if None); 0 = one period.

    Returns (start, end, values) of the periods that hold at least one point.
    """
    if not points:
        return []
    start = origin if origin is not None else points[0][0]
    if period <= 0:
        last = end if end is not None else points[-1][0]
        return [(start, last, [value for _, value in points])]
    buckets: dict[int, list] = {}
    for moment, value in points:
        buckets.setdefault((moment - start) // period, []).append(value)
    return [(start + k * period, start + (k + 1) * period, values) for k, values in sorted(buckets.items())]


def aggregate(method: str, values: list) -> Any:
    """One aggregate of the values of a period; numeric methods count booleans as 0/1 and skip other non-numbers."""
    if method == "totalCount":
        return len(values)
    if method == "distinctCount":
        return len({orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in values})
    numbers = [float(v) if isinstance(v, bool) else v for v in values if isinstance(v, (int, float))]
    if not numbers:
        return None
    if method == "sum":
        return sum(numbers)
    if method == "avg":
        return sum(numbers) / len(numbers)
    if method == "min":
        return min(numbers)
    if method == "max":
        return max(numbers)
    if method == "sumsq":
        return sum(n * n for n in numbers)
    mean = sum(numbers) / len(numbers)
    return math.sqrt(sum((n - mean) ** 2 for n in numbers) / len(numbers))
