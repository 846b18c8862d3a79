"""Temporal pagination (clause 6.3.10): cap the instances per attribute and cut every attribute at one common time."""
from __future__ import annotations

from ..store.base import HistoryRow
from .timerange import TIME_FIELDS


def trim(rows: list[HistoryRow], n: int, *, newest_first: bool,
         timeproperty: str) -> tuple[list[HistoryRow], tuple[int, int] | None]:
    """Keep at most n rows per (entity, attribute) from rows fetched with up to n + 1 each, in query order.

    When some attribute had more, every attribute is cut at the time of that attribute's n-th row (the earliest
    such time going forwards, the latest going backwards), so the page is complete over the range it reports.
    Returns the kept rows and that range (first, last) in µs, or None when nothing was cut.
    """
    column = TIME_FIELDS[timeproperty]
    groups: dict[tuple[str, str], list[HistoryRow]] = {}
    for row in rows:
        groups.setdefault((row.entity_id, row.attr), []).append(row)
    cut = [getattr(group[n - 1], column) for group in groups.values() if len(group) > n]
    if not cut:
        return rows, None
    boundary = max(cut) if newest_first else min(cut)
    kept = [row for group in groups.values() for row in group[:n]
            if (getattr(row, column) >= boundary if newest_first else getattr(row, column) <= boundary)]
    times = [getattr(row, column) for row in kept]
    first = max(times) if newest_first else min(times)
    return kept, (first, boundary)
