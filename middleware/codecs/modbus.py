"""Modbus register maps (Telegraf's habit): decode register values, and plan few merged read requests."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from middleware.devices.types import DecodeError
from middleware.codecs.binary import scale

WORDS = {"BOOL": 1, "INT8L": 1, "INT8H": 1, "UINT8L": 1, "UINT8H": 1, "INT16": 1, "UINT16": 1, "FLOAT16": 1,
         "INT32": 2, "UINT32": 2, "FLOAT32": 2, "INT64": 4, "UINT64": 4, "FLOAT64": 4}
_FLOATS = {"FLOAT16": "e", "FLOAT32": "f", "FLOAT64": "d"}
BIT_KINDS = ("coil", "discrete")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: function by kind (coil 1, discrete 2, holding 3, input 4), start address, count."""

    kind: str
    address: int
    count: int


def register_words(spec: dict) -> int:
    """How many consecutive registers (or bits) a register definition spans."""
    return 1 if spec["kind"] in BIT_KINDS else WORDS[spec.get("type", "UINT16")]


def read_requests(profile: Any) -> list[ReadRequest]:
    """Merge the profile's registers into as few reads as the limits allow (adjacent, or within max_gap)."""
    transport = (profile.transports.get("modbus") or {})
    max_gap = transport.get("max_gap", 0)
    spans: dict[str, list[tuple[int, int]]] = {}
    for spec in profile.codec["registers"]:
        spans.setdefault(spec["kind"], []).append((spec["address"], spec["address"] + register_words(spec)))
    requests: list[ReadRequest] = []
    for kind in ("coil", "discrete", "holding", "input"):
        limit = transport.get("max_bits_per_request", 2000) if kind in BIT_KINDS else transport.get("max_registers_per_request", 125)
        start = end = None
        for lo, hi in sorted(spans.get(kind, [])):
            if start is not None and lo <= end + max_gap and max(end, hi) - start <= limit:
                end = max(end, hi)
                continue
            if start is not None:
                requests.append(ReadRequest(kind, start, end - start))
            start, end = lo, hi
        if start is not None:
            requests.append(ReadRequest(kind, start, end - start))
    return requests


def _order_words(words: list[int], byte_order: str) -> bytes:
    """Bytes in big-endian order (A first) from register words read under byte_order."""
    if byte_order in ("DCBA", "CDAB"):
        words = list(reversed(words))
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if byte_order in ("DCBA", "BADC"):
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    return data


def decode_register(spec: dict, words: list[int], default_order: str = "ABCD") -> Any:
    """One register definition's value from its raw 16-bit words (or a single bit)."""
    kind, rtype = spec["kind"], spec.get("type", "BOOL" if spec["kind"] in BIT_KINDS else "UINT16")
    if kind in BIT_KINDS or rtype == "BOOL":
        return bool(words[0])
    if rtype in ("INT8L", "UINT8L", "INT8H", "UINT8H"):
        byte = words[0] & 0xFF if rtype.endswith("L") else (words[0] >> 8) & 0xFF
        raw: Any = byte - 256 if rtype.startswith("INT") and byte > 127 else byte
    else:
        data = _order_words(words, spec.get("byte_order", default_order))
        if rtype in _FLOATS:
            raw = struct.unpack(">" + _FLOATS[rtype], data)[0]
        else:
            raw = int.from_bytes(data, "big", signed=rtype.startswith("INT"))
    if "bit" in spec:
        return bool((int(raw) >> spec["bit"]) & 1)
    if "bits" in spec:
        b = spec["bits"]
        raw = (int(raw) >> b["start"]) & ((1 << b.get("length", 1)) - 1)
    return scale(raw, spec.get("scale", 1), spec.get("offset", 0))


def decode_registers(profile: Any, registers: Mapping[tuple[str, int], int]) -> dict[str, Any]:
    """Field name → value from raw register values keyed by (kind, address); a missing register is a DecodeError."""
    order = profile.codec.get("byte_order", "ABCD")
    out: dict[str, Any] = {}
    for spec in profile.codec["registers"]:
        words = []
        for address in range(spec["address"], spec["address"] + register_words(spec)):
            value = registers.get((spec["kind"], address))
            if value is None:
                raise DecodeError(f"register {spec['kind']} {address} (0x{address:04X}) for {spec['name']} was not read")
            if not 0 <= int(value) <= 0xFFFF:
                raise DecodeError(f"register {spec['kind']} {address} holds {value}, not a 16-bit value")
            words.append(int(value))
        out[spec["name"]] = decode_register(spec, words, order)
    return out


def registers_to_payload(registers: Mapping[tuple[str, int], int]) -> bytes:
    """The Uplink payload a Modbus adapter emits: JSON {"input": {"0": 17258, ...}, "coil": {...}}."""
    doc: dict[str, dict[str, int]] = {}
    for (kind, address), value in registers.items():
        doc.setdefault(kind, {})[str(address)] = int(value)
    return orjson.dumps(doc)


def registers_from_payload(payload: bytes) -> dict[tuple[str, int], int]:
    """Inverse of registers_to_payload; a malformed payload is a DecodeError."""
    try:
        doc = orjson.loads(payload)
        return {(kind, int(address)): int(value) for kind, block in doc.items() for address, value in block.items()}
    except (orjson.JSONDecodeError, AttributeError, ValueError, TypeError) as exc:
        raise DecodeError(f"Modbus payload is not a register block: {exc}") from None
