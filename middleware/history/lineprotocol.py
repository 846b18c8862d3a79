"""History rows as InfluxDB line protocol: measurement = entity type, tags = entity/device/tenant, fields = values.

With the instances option each row is also written in full to the measurement `citybridge_instances` (tags tenant,
entity_id, attr, dataset_id; one string field `row`), which is what the temporal API reads back from InfluxDB.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson
from shapely.geometry import shape

from ..context.model import VALUE_MEMBER
from ..store.base import HistoryRow


INSTANCE_MEASUREMENT = "citybridge_instances"
DIVISORS = {"s": 1_000_000, "ms": 1000, "us": 1, "ns": 1}  # µs → the precision (ns: multiplied instead)


def timestamp(micros: int, precision: str) -> int:
    """A µs time in the given precision (s, ms, us, ns), cut towards the past."""
    return micros * 1000 if precision == "ns" else micros // DIVISORS[precision]


def _escape_key(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_measurement(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


def _string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _field_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))  # always float: a reading that goes from 20 to 20.5 never conflicts in type
    if isinstance(value, str):
        return _string(value)
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
            static_tags: dict[str, str], precision: str = "us") -> str | None:
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
    return f"{_escape_measurement(compact(row.entity_type))},{tag_text} {field_text} {timestamp(row.observed_at, precision)}"


def instance_line(tenant: str, row: HistoryRow, precision: str = "us") -> str:
    """The row in full, deletions included, as a point of citybridge_instances (read back by history/influx_read.py)."""
    tags = {"entity_id": row.entity_id, "attr": row.attr}
    if tenant:
        tags["tenant"] = tenant
    if row.dataset_id:
        tags["dataset_id"] = row.dataset_id
    tag_text = ",".join(f"{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(tags.items()))
    full = orjson.dumps({"seq": row.seq, "type": row.entity_type, "kind": row.kind, "observed": row.observed_at,
                         "created": row.created_at, "modified": row.modified_at, "deleted": row.deleted,
                         "instance": orjson.Fragment(row.instance)}).decode()
    return f"{INSTANCE_MEASUREMENT},{tag_text} row={_string(full)} {timestamp(row.observed_at, precision)}"
