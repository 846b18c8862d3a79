"""Normalize: a Measurement → NGSI-LD fragments (normalized form, core @context short names) for the broker.

to_fragments returns (data entity, Device entity). Values become Property / GeoProperty / Relationship with
unitCode and observedAt; latitude/longitude become `location`; profile static and derived attributes are added;
an AirQualityObserved gets airQualityLevel (Korean PM grades) when the profile does not derive it itself.
"""
from __future__ import annotations

import logging
from typing import Any

from middleware.devices.types import Measurement
from middleware.codecs.expressions import ExpressionError, evaluate
from middleware.codecs.grades import pm_grade
from middleware.codecs.profiles import Profile

__all__ = ["to_fragments", "device_entity_id", "LOCATION_NAMES", "DEVICE_ONLY"]

log = logging.getLogger("citybridge.normalize")
LOCATION_NAMES = {"latitude": 1, "lat": 1, "longitude": 0, "lon": 0, "lng": 0, "altitude": 2}
DEVICE_ONLY = ("batteryLevel", "rssi")     # Smart Data Model Device attributes, kept off the data entity
_GEO_TYPES = {"geo:point", "geo:json", "geo:polygon", "geo:line", "GeoProperty"}


def device_entity_id(device_id: str) -> str:
    """urn:ngsi-ld:Device:<device_id>."""
    return f"urn:ngsi-ld:Device:{device_id}"


def _datetime(value: str) -> dict:
    return {"@type": "DateTime", "@value": value}


def _kind(name: str, value: Any, spec: dict | None, iota: dict | None) -> str:
    if spec and spec.get("kind"):
        return spec["kind"]
    if iota and iota.get("type") in _GEO_TYPES:
        return "GeoProperty"
    if iota and iota.get("type") == "Relationship":
        return "Relationship"
    if isinstance(value, dict) and value.get("type") in ("Point", "LineString", "Polygon", "MultiPoint") and "coordinates" in value:
        return "GeoProperty"
    return "Property"


def _attribute(value: Any, kind: str, observed: str | None, unit: str | None = None,
               datetime: bool = False, metadata: dict | None = None) -> dict:
    if kind == "Relationship":
        out: dict[str, Any] = {"type": "Relationship", "object": value}
    elif kind == "GeoProperty":
        out = {"type": "GeoProperty", "value": value}
    else:
        out = {"type": "Property", "value": _datetime(value) if datetime else value}
    if observed:
        out["observedAt"] = observed
    if unit:
        out["unitCode"] = unit
    for key, sub in (metadata or {}).items():
        if key == "unitCode":
            out["unitCode"] = sub.get("value") if isinstance(sub, dict) else sub
        elif isinstance(sub, dict) and sub.get("type") in ("Property", "Relationship"):
            out[key] = sub
        else:
            out[key] = {"type": "Property", "value": sub.get("value") if isinstance(sub, dict) else sub}
    return out


def _location(values: dict) -> dict | None:
    coords: dict[int, float] = {}
    for name, axis in LOCATION_NAMES.items():
        v = values.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            coords[axis] = float(v)
    if 0 not in coords or 1 not in coords:
        return None
    lon, lat = coords[0], coords[1]
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == 0 and lon == 0):
        return None                 # (0, 0) is what GPS modules send without a fix
    point = [lon, lat] + ([coords[2]] if 2 in coords else [])
    return {"type": "Point", "coordinates": point}


def _derived(profile: Profile | None, entity_type: str, values: dict) -> dict[str, tuple[Any, dict]]:
    out: dict[str, tuple[Any, dict]] = {}
    for spec in (profile.derived if profile else ()):
        names = {**{s["name"]: s["value"] for s in profile.static}, **values}
        try:
            value = evaluate(spec["expression"], names)
        except ExpressionError as exc:
            log.debug("derived attribute skipped", extra={"attribute": spec["name"], "reason": str(exc)})
            continue
        if value is not None:
            out[spec["name"]] = (value, spec)
    if entity_type == "AirQualityObserved" and "airQualityLevel" not in out and "airQualityLevel" not in values:
        grade = pm_grade(values.get("pm10"), values.get("pm25"))
        if grade is not None:
            out["airQualityLevel"] = (grade, {"name": "airQualityLevel"})
    return out


def to_fragments(measurement: Measurement, profile: Profile | None) -> tuple[dict, dict]:
    """(data entity fragment, Device entity fragment); the second is {} when the data entity is the Device itself."""
    device, values, observed = measurement.device, measurement.values, measurement.observed_at
    entity_type = device.entity_type or (profile.entity_type if profile else "Thing")
    entity_id = device.entity_name or f"urn:ngsi-ld:{entity_type}:{device.device_id}"
    is_device = entity_id == device_entity_id(device.device_id)
    iota_attrs = {a["name"]: a for a in device.attributes if a.get("name")}
    entity: dict[str, Any] = {"id": entity_id, "type": entity_type}
    location = _location(values)
    for name, value in values.items():
        if value is None or (name in LOCATION_NAMES and location is not None):
            continue
        if name in DEVICE_ONLY and not is_device:
            continue
        spec = profile.attribute(name) if profile else None
        iota = iota_attrs.get(name)
        entity[name] = _attribute(value, _kind(name, value, spec, iota), observed, (spec or {}).get("unitCode"),
                                  (spec or {}).get("type") == "datetime", measurement.metadata.get(name))
    if location is not None and "location" not in entity:
        entity["location"] = _attribute(location, "GeoProperty", observed)
    for name, (value, spec) in _derived(profile, entity_type, values).items():
        entity[name] = _attribute(value, spec.get("kind", "Property"), observed, spec.get("unitCode"))
    for spec in (profile.static if profile else ()):
        entity.setdefault(spec["name"], _attribute(spec["value"], spec.get("kind", "Property"), None, spec.get("unitCode")))
    for spec in device.static_attributes:
        if "name" in spec:
            kind = _kind(spec["name"], spec.get("value"), None, spec)
            entity[spec["name"]] = _attribute(spec.get("value"), kind, None, metadata=spec.get("metadata"))
    if entity_type.endswith(("Observed", "Observation")) and "dateObserved" not in entity:
        entity["dateObserved"] = {"type": "Property", "value": _datetime(observed)}
    device_fragment: dict[str, Any] = {
        "id": device_entity_id(device.device_id), "type": "Device",
        "dateLastValueReported": {"type": "Property", "value": _datetime(observed)},
        "deviceState": {"type": "Property", "value": "ok"},
    }
    for name in DEVICE_ONLY:
        if values.get(name) is not None:
            device_fragment[name] = _attribute(values[name], "Property", observed)
    if is_device:
        for key, value in device_fragment.items():
            entity.setdefault(key, value)
        return entity, {}
    device_fragment["controlledAsset"] = {"type": "Relationship", "object": entity_id}
    return entity, device_fragment
