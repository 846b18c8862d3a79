"""Codecs: an Uplink's bytes → a Measurement, driven by the device's profile (DESIGN.md pipeline stage 3).

decode(uplink, device, profile) handles IoT Agent JSON (no profile), json, binary (hex/base64 wrapped too),
modbus register blocks and serial frames; every failure is a DecodeError whose message is the dead-letter reason.
"""
from __future__ import annotations

from typing import Any

import orjson

from middleware.devices.types import DecodeError, Device, Measurement, Uplink
from middleware.codecs import iota
from middleware.codecs.binary import decode_fields, unwrap
from middleware.codecs.downlink import encode_command
from middleware.codecs.jsonpath import MISSING, resolve
from middleware.codecs.mapping import map_values
from middleware.codecs.modbus import ReadRequest, decode_registers, read_requests, registers_from_payload, registers_to_payload
from middleware.codecs.profiles import Profile, ProfileError, ProfileLibrary
from middleware.codecs.serial import FrameSplitter, check_frame
from middleware.codecs.timeutil import iso_from_epoch, to_datetime

__all__ = ["decode", "decode_many", "decode_registers", "read_requests", "ReadRequest", "registers_to_payload",
           "registers_from_payload", "FrameSplitter", "check_frame", "encode_command", "Profile", "ProfileError",
           "ProfileLibrary", "DecodeError"]


def decode(uplink: Uplink, device: Device, profile: Profile | None) -> Measurement:
    """One uplink → one Measurement; raises DecodeError (the dead-letter reason) when it cannot."""
    measurements = decode_many(uplink, device, profile)
    if len(measurements) != 1:
        raise DecodeError(f"payload holds {len(measurements)} measurements; use decode_many")
    return measurements[0]


def decode_many(uplink: Uplink, device: Device, profile: Profile | None) -> list[Measurement]:
    """Like decode, but an IoT Agent JSON array of measure objects gives one Measurement each."""
    received = iso_from_epoch(uplink.received_at)
    if profile is None or profile.format == "iota-json":
        out = []
        for measures in iota.measures_of(uplink, device):
            values, metadata, observed = iota.map_measures(measures, device)
            if profile is not None:
                values = _check_profile_ranges(profile, values)
            out.append(Measurement(device, values, observed or received, metadata))
        return out
    fmt = profile.format
    document: Any = None
    fields: dict[str, Any] = {}
    if fmt == "json":
        try:
            document = orjson.loads(unwrap(uplink.payload, profile.codec.get("wrapping")))
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"payload is not JSON: {exc}") from None
        if not isinstance(document, (dict, list)):
            raise DecodeError("JSON payload is neither an object nor an array")
    elif fmt == "binary":
        data = unwrap(uplink.payload, profile.codec.get("wrapping"))
        if len(data) < profile.codec.get("min_length", 0):
            raise DecodeError(f"payload is {len(data)} bytes, the profile needs at least {profile.codec['min_length']}")
        fields = decode_fields(data, profile.codec["fields"], profile.codec.get("byte_order", "big"))
    elif fmt == "modbus":
        fields = decode_registers(profile, registers_from_payload(uplink.payload))
    elif fmt == "serial":
        check_frame(uplink.payload, profile.codec["framing"])
        fields = decode_fields(uplink.payload, profile.codec["fields"], profile.codec.get("byte_order", "big"))
    values = map_values(profile, fields, document)
    observed = _observed(profile, fields, document) or received
    return [Measurement(device, values, observed)]


def _observed(profile: Profile, fields: dict, document: Any) -> str | None:
    spec = profile.codec.get("timestamp")
    if not spec:
        return None
    raw = resolve(document, spec["source"]) if document is not None else fields.get(spec["source"], MISSING)
    if raw is MISSING or raw is None:
        return None
    try:
        return to_datetime(raw, spec.get("format", "iso8601"))
    except (ValueError, OverflowError, OSError) as exc:
        raise DecodeError(f"timestamp {spec['source']}: {exc}") from None


def _check_profile_ranges(profile: Profile, values: dict) -> dict:
    from middleware.codecs.mapping import in_range
    out = dict(values)
    for attr in profile.attributes:
        name = attr["name"]
        if name in out and not in_range(out[name], attr.get("range")):
            if profile.out_of_range == "drop":
                del out[name]
                continue
            raise DecodeError(f"{name}={out[name]} outside the valid range {attr['range']}")
    return out
