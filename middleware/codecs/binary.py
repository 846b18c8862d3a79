"""Binary struct fields: type, byte order, bit fields, scale; and hex/base64 payload wrapping."""
from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import orjson

from middleware.devices.types import DecodeError
from middleware.codecs.expressions import ExpressionError, evaluate
from middleware.codecs.jsonpath import resolve

SIZES = {"int8": 1, "uint8": 1, "bool": 1, "int16": 2, "uint16": 2, "int24": 3, "uint24": 3, "int32": 4, "uint32": 4,
         "int64": 8, "uint64": 8, "float16": 2, "float32": 4, "float64": 8}
_FLOATS = {"float16": "e", "float32": "f", "float64": "d"}


def unwrap(payload: bytes, wrapping: Any) -> bytes:
    """Undo hex/base64 wrapping: a string shorthand for the whole payload, or {encoding, path} inside JSON."""
    if not wrapping or wrapping == "none":
        return payload
    encoding, path = (wrapping, None) if isinstance(wrapping, str) else (wrapping["encoding"], wrapping.get("path"))
    text: Any = payload
    if path:
        try:
            text = resolve(orjson.loads(payload), path)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"payload is not JSON: {exc}") from None
        if not isinstance(text, str):
            raise DecodeError(f"no {encoding} string at {path}")
        text = text.encode()
    try:
        if encoding == "hex":
            return bytes.fromhex(text.decode("ascii").strip())
        return base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload is not valid {encoding}: {exc}") from None


def read_field(data: bytes, spec: dict, default_order: str = "big") -> Any:
    """Read one field spec (offset, type, byte_order, bits, scale, add) from data."""
    kind, offset = spec["type"], spec["offset"]
    size = spec.get("length", 1) if kind in ("bytes", "ascii") else SIZES[kind]
    if offset + size > len(data):
        raise DecodeError(f"field {spec['name']} needs bytes {offset}..{offset + size - 1}, payload has {len(data)}")
    chunk = data[offset:offset + size]
    if kind == "bytes":
        return chunk.hex()
    if kind == "ascii":
        return chunk.split(b"\0", 1)[0].decode("ascii", "replace")
    order = spec.get("byte_order", default_order)
    if kind in _FLOATS:
        raw: Any = struct.unpack((">" if order == "big" else "<") + _FLOATS[kind], chunk)[0]
    else:
        raw = int.from_bytes(chunk, order, signed=kind.startswith("int"))
    if kind == "bool":
        return raw != 0
    bits = spec.get("bits")
    if bits is not None:
        raw = (int(raw) >> bits["start"]) & ((1 << bits.get("length", 1)) - 1)
        if bits.get("length", 1) == 1 and "scale" not in spec and "add" not in spec:
            return bool(raw)
    return scale(raw, spec.get("scale", 1), spec.get("add", 0))


def scale(raw: Any, factor: float = 1, add: float = 0) -> Any:
    """raw * factor + add, keeping integers integral when nothing changes them."""
    if factor == 1 and add == 0:
        return raw
    value = raw * factor + add
    return round(value, 12) if isinstance(value, float) else value


def decode_fields(data: bytes, fields: list[dict], default_order: str = "big") -> dict[str, Any]:
    """Read every field of a struct layout; a `when` expression skips a field (e.g. by message type)."""
    out: dict[str, Any] = {}
    for spec in fields:
        if "when" in spec:
            try:
                if not evaluate(spec["when"], out):
                    continue
            except ExpressionError as exc:
                raise DecodeError(str(exc)) from None
        out[spec["name"]] = read_field(data, spec, default_order)
    return out


def pack_field(value: Any, spec: dict, default_order: str = "big") -> bytes:
    """Encode one value as a field (for downlinks): raw = value / scale."""
    kind, order = spec["type"], spec.get("byte_order", default_order)
    factor = spec.get("scale", 1)
    if kind in _FLOATS:
        return struct.pack((">" if order == "big" else "<") + _FLOATS[kind], float(value) / factor)
    if kind in ("bytes", "ascii"):
        return bytes.fromhex(value) if kind == "bytes" else str(value).encode("ascii")
    raw = int(round(float(value) / factor)) if kind != "bool" else int(bool(value))
    try:
        return raw.to_bytes(SIZES[kind], order, signed=kind.startswith("int"))
    except OverflowError:
        raise ValueError(f"{value!r} does not fit {kind}") from None
