"""FIWARE IoT Agent JSON uplinks: /<apikey>/<device_id>/attrs[/<attr>] and /cmdexe, mapped through device.attributes."""
from __future__ import annotations

import re
from typing import Any

import orjson

from middleware.devices.types import DecodeError, Device, Uplink
from middleware.codecs.expressions import ExpressionError, evaluate
from middleware.codecs.timeutil import to_datetime

TOPIC = re.compile(r"^/?(?:json/)?(?P<apikey>[^/]+)/(?P<device_id>[^/]+)/(?P<kind>attrs|cmdexe)(?:/(?P<attr>[^/]+))?$")
_NUMERIC = {"Number": float, "Float": float, "Integer": int}


def parse_topic(topic: str) -> dict | None:
    """apikey, device_id, kind (attrs|cmdexe), attr of an IoT Agent JSON topic, or None."""
    m = TOPIC.match(topic or "")
    return m.groupdict() if m else None


def _scalar(text: bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.decode("utf-8", "replace").strip()


def _coerce(value: Any, attr_type: str | None) -> Any:
    """IoT Agent attribute types: strings become numbers/booleans/points where the type says so."""
    if attr_type in _NUMERIC and isinstance(value, str):
        try:
            return _NUMERIC[attr_type](value)
        except ValueError:
            return value
    if attr_type == "Boolean" and isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    if attr_type in ("geo:point", "GeoProperty") and isinstance(value, str) and "," in value:
        lat, lon = (float(p) for p in value.split(",", 1))
        return {"type": "Point", "coordinates": [lon, lat]}
    return value


def measures_of(uplink: Uplink, device: Device) -> list[dict]:
    """The raw measure objects (object_id → value) an uplink carries; DecodeError when it carries none."""
    parts = parse_topic(uplink.topic) if uplink.transport in ("mqtt", "amqp") else None
    if parts and parts["device_id"] != device.device_id:
        raise DecodeError(f"topic names device {parts['device_id']!r}, uplink was resolved to {device.device_id!r}")
    if parts and parts["kind"] == "cmdexe":
        result = _load(uplink.payload)
        if not isinstance(result, dict):
            raise DecodeError("a command result is a JSON object {command: result}")
        return [{f"{k}_info": v for k, v in result.items()} | {f"{k}_status": "OK" for k in result}]
    if parts and parts["attr"]:
        return [{parts["attr"]: _scalar(uplink.payload)}]
    doc = _load(uplink.payload)
    docs = doc if isinstance(doc, list) else [doc]
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise DecodeError("an IoT Agent JSON measure is a JSON object (or an array of them)")
    return docs


def _load(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"payload is not JSON: {exc}") from None


def map_measures(measures: dict, device: Device) -> tuple[dict, dict, str | None]:
    """object_id → name, type, expression per device.attributes; returns (values, metadata, observed_at or None)."""
    by_object = {a.get("object_id") or a["name"]: a for a in device.attributes if a.get("name")}
    observed = None
    measures = dict(measures)
    if device.timestamp and "TimeInstant" in measures:
        try:
            observed = to_datetime(measures.pop("TimeInstant"))
        except ValueError as exc:
            raise DecodeError(f"TimeInstant: {exc}") from None
    explicit = device.explicit_attrs
    allowed = set(explicit) if isinstance(explicit, list) else None
    context = {"id": device.device_id, "type": device.entity_type, "entity_name": device.entity_name,
               "service": device.tenant, "subservice": device.service_path}
    context.update({s["name"]: s.get("value") for s in device.static_attributes if "name" in s})
    named = {(by_object[k]["name"] if k in by_object else k): v for k, v in measures.items()}
    context.update(measures)
    context.update(named)
    values: dict[str, Any] = {}
    metadata: dict[str, dict] = {}
    for key, value in measures.items():
        attr = by_object.get(key)
        if attr is None and (explicit is True or (allowed is not None and key not in allowed)):
            continue
        name = attr["name"] if attr else key
        if allowed is not None and name not in allowed and key not in allowed:
            continue
        if attr:
            if attr.get("expression"):
                try:
                    value = evaluate(attr["expression"], {**context, "value": value})
                except ExpressionError as exc:
                    raise DecodeError(f"{name}: {exc}") from None
            value = _coerce(value, attr.get("type"))
            meta = dict(attr.get("metadata") or {})
            if meta:
                metadata[name] = meta
        values[name] = value
    return values, metadata, observed
