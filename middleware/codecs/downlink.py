"""Downlinks: a command value → (topic or path, payload bytes) per the profile's command encoding."""
from __future__ import annotations

import base64
import struct
from typing import Any

import orjson

from middleware.devices.types import Device
from middleware.codecs.binary import pack_field
from middleware.codecs.expressions import evaluate
from middleware.codecs.modbus import WORDS, _FLOATS


class EncodeError(ValueError):
    """A command that cannot be encoded for the device."""


def _template(node: Any, names: dict) -> Any:
    if isinstance(node, str) and node.startswith("="):
        return evaluate(node[1:], names)
    if isinstance(node, dict):
        return {k: _template(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_template(v, names) for v in node]
    return node


def _destination(profile: Any, device: Device) -> str:
    fields = {"device_id": device.device_id, "apikey": device.apikey or ""}
    choices = [("mqtt", "command_topic"), ("coap", "command_path")]
    choices.sort(key=lambda c: c[0] != device.transport)       # the device's own transport first
    for transport, key in choices:
        template = (profile.transports.get(transport) or {}).get(key) if profile else None
        if template:
            return template.format(**fields)
    return f"/{device.apikey}/{device.device_id}/cmd"


def _register_words(spec: dict, value: Any, default_order: str) -> list[int]:
    rtype = spec.get("type", "UINT16")
    if spec["kind"] == "coil":
        return [1 if value else 0]
    raw = (float(value) - spec.get("offset", 0)) / spec.get("scale", 1)
    size = WORDS[rtype] * 2
    if rtype in _FLOATS:
        data = struct.pack(">" + _FLOATS[rtype], raw)
    else:
        data = int(round(raw)).to_bytes(size, "big", signed=rtype.startswith("INT"))
    order = spec.get("byte_order", default_order)
    if order in ("DCBA", "BADC"):
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    return list(reversed(words)) if order in ("DCBA", "CDAB") else words


def encode_command(profile: Any, device: Device, name: str, value: Any) -> tuple[str, bytes]:
    """Encode a command: IoT Agent JSON {name: value} on /<apikey>/<id>/cmd without a profile command."""
    command = profile.command(name) if profile else None
    if command is None:
        if profile is not None and profile.commands:
            raise EncodeError(f"profile {profile.name} has no command {name!r}")
        return _destination(None, device), orjson.dumps({name: value})
    enc = command["encoding"]
    names = {"value": value, "device_id": device.device_id, "command": name}
    try:
        if enc["format"] == "json":
            return _destination(profile, device), orjson.dumps(_template(enc.get("template", {name: "=value"}), names))
        if enc["format"] == "text":
            return _destination(profile, device), str(evaluate(enc["expression"], names)).encode()
        if enc["format"] == "binary":
            order = enc.get("byte_order", "big")
            data = b"".join(pack_field(f["value"] if "value" in f else evaluate(f["expression"], names), f, order)
                            for f in enc["fields"])
            wrap = enc.get("wrapping", "none")
            data = data.hex().upper().encode() if wrap == "hex" else base64.b64encode(data) if wrap == "base64" else data
            return _destination(profile, device), data
        spec = next(r for r in profile.codec["registers"] if r["name"] == enc["register"])
        if "expression" in enc:
            value = evaluate(enc["expression"], names)
        words = _register_words(spec, value, profile.codec.get("byte_order", "ABCD"))
        block = {spec["kind"]: {str(spec["address"] + i): w for i, w in enumerate(words)}}
        return f"{spec['kind']}/{spec['address']}", orjson.dumps(block)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise EncodeError(f"command {name}: {exc}") from None
