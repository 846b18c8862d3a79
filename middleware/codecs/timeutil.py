"""NGSI-LD DateTime strings: UTC, milliseconds, 'Z'."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def iso_from_epoch(seconds: float) -> str:
    """Epoch seconds → 2024-05-01T12:00:00.000Z."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_datetime(value: Any, fmt: str = "iso8601") -> str:
    """A payload timestamp (ISO 8601 text, epoch seconds or milliseconds) → NGSI-LD DateTime; ValueError if unreadable."""
    if fmt in ("epoch_s", "epoch_ms") or isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) / (1000 if fmt == "epoch_ms" else 1)
        return iso_from_epoch(seconds)
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    dt = datetime.fromisoformat(value.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)        # IoT Agents treat zone-less times as UTC
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
