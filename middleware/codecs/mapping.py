"""Profile mapping: decoded fields → NGSI-LD attribute values (source, expression, type, valid range)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from middleware.devices.types import DecodeError
from middleware.codecs.expressions import ExpressionError, evaluate
from middleware.codecs.jsonpath import MISSING, resolve
from middleware.codecs.timeutil import to_datetime

log = logging.getLogger("citybridge.codecs")


def coerce(value: Any, kind: str | None, name: str) -> Any:
    """Convert a value to the profile's declared type; DecodeError if it cannot be."""
    if kind is None or value is None:
        return value
    try:
        if kind == "number":
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float(value)
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                return round(value)
            return int(value)
        if kind == "boolean":
            if isinstance(value, str):
                if value.strip().lower() in ("true", "1", "on", "yes"):
                    return True
                if value.strip().lower() in ("false", "0", "off", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "string":
            return value if isinstance(value, str) else str(value)
        if kind == "datetime":
            return to_datetime(value)
    except (TypeError, ValueError):
        raise DecodeError(f"{name}: {value!r} is not a {kind}") from None
    return value


def in_range(value: Any, spec: Mapping | None) -> bool:
    """Whether a numeric value lies within {min, max} (inclusive); non-numbers always pass."""
    if not spec or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return spec.get("min", value) <= value <= spec.get("max", value)


def map_values(profile: Any, fields: Mapping[str, Any], document: Any = None) -> dict[str, Any]:
    """Apply profile.attributes to decoded fields (or, for json, to the document via JSON paths)."""
    values: dict[str, Any] = {}
    for attr in profile.attributes:
        name, source = attr["name"], attr.get("source", attr["name"])
        value = resolve(document, source) if document is not None else fields.get(source, MISSING)
        if value is MISSING or value is None:
            if attr.get("optional", True) is False:
                raise DecodeError(f"{name}: required value {source!r} is missing")
            continue
        if "expression" in attr:
            names = {**fields, **values, "value": value}
            try:
                value = evaluate(attr["expression"], names)
            except ExpressionError as exc:
                raise DecodeError(f"{name}: {exc}") from None
            if value is None:             # an expression may decline a value (e.g. no GPS fix)
                continue
        value = coerce(value, attr.get("type"), name)
        if not in_range(value, attr.get("range")):
            r = attr["range"]
            reason = f"{name}={value} outside the valid range [{r.get('min', '-inf')}, {r.get('max', 'inf')}]"
            if profile.out_of_range == "drop":
                log.warning("dropped out-of-range value", extra={"profile": profile.name, "reason": reason})
                continue
            raise DecodeError(reason)
        values[name] = value
    return values
