"""Temporal queries (clause 4.11): timerel, timeAt, endTimeAt and timeproperty as a µs range; ISO 8601 durations."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from ..context.errors import BadRequestData
from ..context.model import check_datetime
from .recorder import to_micros

TIMEPROPERTIES = ("observedAt", "createdAt", "modifiedAt")
TIME_FIELDS = {"observedAt": "observed_at", "createdAt": "created_at", "modifiedAt": "modified_at"}  # of HistoryRow
_DURATION = re.compile(r"^P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")
_UNITS = (7 * 86_400, 86_400, 3_600, 60, 1)


@dataclass(slots=True)
class TemporalQ:
    """A parsed temporal query: which time of an instance to test and the range it must fall in."""

    timeproperty: str = "observedAt"
    start: int | None = None    # µs, inclusive
    end: int | None = None      # µs, exclusive
    time_at: int | None = None  # the timeAt given, origin of aggregation periods


def parse_temporal_q(timerel: str | None, time_at: str | None, end_time_at: str | None,
                     timeproperty: str | None) -> TemporalQ:
    """Validate the temporal query parameters: before (< timeAt), after (> timeAt), between (timeAt <= t < endTimeAt)."""
    prop = timeproperty or "observedAt"
    if prop not in TIMEPROPERTIES:
        raise BadRequestData(f"timeproperty must be one of {', '.join(TIMEPROPERTIES)}, got {prop!r}")
    if timerel is None:
        if time_at is not None or end_time_at is not None:
            raise BadRequestData("timeAt and endTimeAt need timerel (before, after or between)")
        return TemporalQ(prop)
    if timerel not in ("before", "after", "between"):
        raise BadRequestData(f"timerel must be before, after or between, got {timerel!r}")
    if time_at is None:
        raise BadRequestData(f"timerel={timerel} needs timeAt")
    at = to_micros(check_datetime(time_at, "timeAt"))
    if timerel == "before":
        return TemporalQ(prop, None, at, at)
    if timerel == "after":
        return TemporalQ(prop, at + 1, None, at)
    if end_time_at is None:
        raise BadRequestData("timerel=between needs endTimeAt")
    end = to_micros(check_datetime(end_time_at, "endTimeAt"))
    if end <= at:
        raise BadRequestData("endTimeAt must be later than timeAt")
    return TemporalQ(prop, at, end, at)


def parse_duration(text: str) -> int:
    """An ISO 8601 duration of weeks, days, hours, minutes and seconds (P0D, PT1H, P1DT12H) in µs."""
    match = _DURATION.match(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise BadRequestData(f"aggrPeriodDuration must be an ISO 8601 duration such as PT1H or P1D "
                             f"(years and months are not supported), got {text!r}")
    seconds = sum(float(part) * unit for part, unit in zip(match.groups(), _UNITS) if part)
    return round(seconds * 1_000_000)


def iso_from_micros(micros: int) -> str:
    """µs since the epoch → NGSI-LD DateTime (milliseconds, or microseconds when they are not zero)."""
    moment = datetime.fromtimestamp(micros // 1_000_000, timezone.utc).replace(microsecond=micros % 1_000_000)
    spec = "milliseconds" if micros % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")
