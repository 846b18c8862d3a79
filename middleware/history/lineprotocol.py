"""History rows as InfluxDB line protocol: measurement = entity type, tags = entity/device/tenant, fields = values."""
from __future__ import annotations

from typing import Any, Callable

import orjson
from shapely.geometry import shape

from ..context.model import VALUE_MEMBER
from ..store.base import HistoryRow


def _escape_key(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_measurement(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


def _field_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))  # always float: a reading that goes from 20 to 20.5 never conflicts in type
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return None


def fields_of(name: str, row: HistoryRow) -> dict[str, str]:
    """The line-protocol fields of one instance: its value under the attribute name, GeoProperty as name_lat/name_lon."""
    inst = orjson.loads(row.instance)
    value = inst.get(VALUE_MEMBER.get(row.kind, "value"))
    if row.kind == "GeoProperty" and isinstance(value, dict):
        point = shape(value).centroid
        return {f"{name}_lat": repr(point.y), f"{name}_lon": repr(point.x)}
    encoded = _field_value(value)
    return {name: encoded} if encoded is not None else {}


def to_line(tenant: str, row: HistoryRow, compact: Callable[[str], str], device_id: str | None,
            static_tags: dict[str, str]) -> str | None:
    """One point (None for deletions and values that are neither number, boolean, string nor geometry)."""
    if row.deleted:
        return None
    fields = fields_of(compact(row.attr), row)
    if not fields:
        return None
    tags = {**static_tags, "entity_id": row.entity_id}
    if tenant:
        tags["tenant"] = tenant
    if device_id:
        tags["device_id"] = device_id
    if row.dataset_id:
        tags["dataset_id"] = row.dataset_id
    tag_text = ",".join(f"{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(tags.items()))
    field_text = ",".join(f"{_escape_key(k)}={v}" for k, v in fields.items())
    return f"{_escape_measurement(compact(row.entity_type))},{tag_text} {field_text} {row.observed_at}"
