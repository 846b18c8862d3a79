"""Codec golden cases (tests/unit/codec_cases/<name>/) plus Modbus planning, serial splitting, expressions, downlinks."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import orjson
import pytest

from middleware.codecs import (DecodeError, FrameSplitter, ProfileLibrary, ReadRequest, decode, decode_many,
                               decode_registers, encode_command, read_requests, registers_to_payload)
from middleware.codecs.downlink import EncodeError
from middleware.codecs.expressions import ExpressionError, compile_expression, evaluate, translate_jexl
from middleware.codecs.profiles import Profile, load_profile
from middleware.devices.types import Device, Uplink

CASES = Path(__file__).parent / "codec_cases"
LIBRARY = ProfileLibrary.load()
RECEIVED = 1714564800.0   # 2024-05-01T12:00:00Z


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _device(directory: Path, profile: Profile | None) -> Device:
    path = directory / "device.json"
    if path.exists():
        return Device(tenant="", service_path="/", **json.loads(path.read_text()))
    entity_type = profile.entity_type if profile else "Thing"
    return Device(tenant="", service_path="/", device_id="dev-001", entity_type=entity_type,
                  entity_name=f"urn:ngsi-ld:{entity_type}:dev-001", profile=profile.name if profile else None)


def _payload(directory: Path) -> bytes:
    if (directory / "payload.hex").exists():
        return bytes.fromhex((directory / "payload.hex").read_text())
    return next(directory.glob("payload.*")).read_bytes()


def _profile(directory: Path) -> Profile | None:
    if (directory / "profile.txt").exists():
        return LIBRARY.get((directory / "profile.txt").read_text().strip())
    if (directory / "profile.yaml").exists():
        return load_profile(directory / "profile.yaml")
    return None


def run_case(directory: Path):
    """Decode a case's payload the way the ingest pipeline does; returns the Measurement."""
    profile = _profile(directory)
    up = {"transport": "mqtt", "topic": ""}
    if (directory / "uplink.json").exists():
        up.update(json.loads((directory / "uplink.json").read_text()))
    uplink = Uplink(up["transport"], "test", up["topic"], _payload(directory), RECEIVED)
    return decode(uplink, _device(directory, profile), profile)


CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())


def test_every_shipped_profile_has_a_golden_case():
    used = {(d / "profile.txt").read_text().strip() for d in CASE_DIRS if (d / "profile.txt").exists()}
    assert used == set(LIBRARY.profiles)


@pytest.mark.parametrize("directory", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_golden_case(directory: Path):
    expected = json.loads((directory / "expected.json").read_text())
    if "error" in expected:
        with pytest.raises(DecodeError) as info:
            run_case(directory)
        assert expected["error"] in str(info.value)
        return
    measurement = run_case(directory)
    assert _rounded(measurement.values) == _rounded(expected["values"])
    assert measurement.observed_at == expected["observed_at"]


def test_modbus_requests_merge_adjacent_registers_only():
    requests = read_requests(LIBRARY.get("sdm630"))
    assert requests == [ReadRequest("input", 0x00, 18), ReadRequest("input", 0x1E, 6), ReadRequest("input", 0x34, 2),
                        ReadRequest("input", 0x46, 6), ReadRequest("input", 0x156, 2)]


def _modbus_profile(tmp_path, registers: str, transport: str = "") -> Profile:
    path = tmp_path / "m.yaml"
    path.write_text(f"entity_type: X\n{transport}codec:\n  format: modbus\n  registers:\n{registers}")
    return load_profile(path)


def test_modbus_requests_respect_gap_and_size_limits(tmp_path):
    regs = "".join(f"    - {{name: r{a}, kind: holding, address: {a}}}\n" for a in (0, 1, 3, 10, 11))
    regs += "    - {name: c0, kind: coil, address: 0}\n    - {name: c1, kind: coil, address: 1}\n"
    assert read_requests(_modbus_profile(tmp_path, regs)) == [
        ReadRequest("coil", 0, 2), ReadRequest("holding", 0, 2), ReadRequest("holding", 3, 1), ReadRequest("holding", 10, 2)]
    gap = "transports:\n  modbus: {max_gap: 1, max_registers_per_request: 4}\n"
    assert read_requests(_modbus_profile(tmp_path, regs, gap))[1:] == [ReadRequest("holding", 0, 4), ReadRequest("holding", 10, 2)]
    small = "transports:\n  modbus: {max_gap: 1, max_registers_per_request: 3}\n"
    assert read_requests(_modbus_profile(tmp_path, regs, small))[1:] == [
        ReadRequest("holding", 0, 2), ReadRequest("holding", 3, 1), ReadRequest("holding", 10, 2)]


def test_decode_registers_takes_kind_address_keys():
    profile = LIBRARY.get("sdm630")
    words = struct.unpack(">HH", struct.pack(">f", 50.0))
    registers = {("input", a + i): w for a in range(0, 0x4C, 2) for i, w in enumerate(words)}
    registers.update({("input", 0x156): words[0], ("input", 0x157): words[1]})
    fields = decode_registers(profile, registers)
    assert fields["frequency"] == 50.0 and fields["total_kwh"] == 50.0
    assert orjson.loads(registers_to_payload({("input", 1): 7})) == {"input": {"1": 7}}


def test_frame_splitter_finds_frames_across_chunks_and_skips_garbage():
    good = bytes.fromhex((CASES / "pms5003" / "payload.hex").read_text())
    bad = bytes.fromhex((CASES / "pms5003-bad-checksum" / "payload.hex").read_text())
    splitter = FrameSplitter.for_profile(LIBRARY.get("pms5003"))
    stream = b"\x00\x42\x17" + good + bad + good
    frames = []
    for i in range(0, len(stream), 7):
        frames += splitter.feed(stream[i:i + 7])
    assert frames == [good, good]
    assert len(splitter.rejected) == 1 and "bad checksum" in splitter.rejected[0][1]
    assert splitter.skipped >= 3


def test_frame_splitter_sds011():
    good = bytes.fromhex((CASES / "sds011" / "payload.hex").read_text())
    splitter = FrameSplitter.for_profile(LIBRARY.get("sds011"))
    assert splitter.feed(good[:4]) == []
    assert splitter.feed(good[4:] + good) == [good, good]


def test_iota_array_gives_one_measurement_each():
    device = Device("", "/", "dev1", "urn:ngsi-ld:Room:dev1", "Room", apikey="k")
    uplink = Uplink("mqtt", "c", "/k/dev1/attrs", b'[{"t": 1}, {"t": 2}]', RECEIVED)
    assert [m.values for m in decode_many(uplink, device, None)] == [{"t": 1}, {"t": 2}]
    with pytest.raises(DecodeError, match="decode_many"):
        decode(uplink, device, None)


def test_iota_http_body_without_topic_is_a_measure_object():
    device = Device("", "/", "dev1", "urn:ngsi-ld:Room:dev1", "Room")
    assert decode(Uplink("http", "c", "/iot/json", b'{"t": 3}', RECEIVED), device, None).values == {"t": 3}


def test_iota_metadata_travels_to_the_measurement():
    device = Device("", "/", "d", "urn:ngsi-ld:Room:d", "Room",
                    attributes=[{"object_id": "t", "name": "temperature", "type": "Number",
                                 "metadata": {"unitCode": {"type": "Text", "value": "CEL"}}}])
    m = decode(Uplink("mqtt", "c", "/k/d/attrs", b'{"t": 3}', RECEIVED), device, None)
    assert m.metadata == {"temperature": {"unitCode": {"type": "Text", "value": "CEL"}}}


def test_out_of_range_drop_mode_keeps_the_rest(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("entity_type: X\nout_of_range: drop\ncodec: {format: json}\nattributes:\n"
                    "  - {name: a, range: {max: 10}}\n  - {name: b}\n")
    device = Device("", "/", "d", "urn:ngsi-ld:X:d", "X")
    m = decode(Uplink("mqtt", "c", "t", b'{"a": 11, "b": 2}', RECEIVED), device, load_profile(path))
    assert m.values == {"b": 2}


# --- expressions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,names,result", [
    ("temperature * 100", {"temperature": 0.5}, 50.0),
    ("a && b", {"a": True, "b": False}, False),
    ("a || b", {"a": False, "b": True}, True),
    ("!a", {"a": False}, True),
    ("a != b", {"a": 1, "b": 2}, True),
    ("c ? x : y", {"c": False, "x": 1, "y": 2}, 2),
    ("c ? 1 : d ? 2 : 3", {"c": False, "d": True}, 2),
    ("c ? (d ? 1 : 2) : 3", {"c": True, "d": False}, 2),
    ('"id-" + n', {"n": 7}, "id-7"),
    ('"on=" + v', {"v": True}, "on=true"),
    ("v|round(1)", {"v": 2.25}, 2.2),
    ("v|toString|upper", {"v": "ab"}, "AB"),
    ("2 ^ 10", {}, 1024),
    ("x == null", {"x": None}, True),
    ("p.q * 2", {"p": {"q": 4}}, 8),
    ("bit(s, 2)", {"s": 4}, True),
    ("bits(s, 4, 4)", {"s": 0xA0}, 10),
    ('{"L1": a}', {"a": 1}, {"L1": 1}),
    ("pmGrade(pm10, pm25)", {"pm10": 81, "pm25": 10}, "bad"),
    ("parseInt(v) + 1", {"v": " 41"}, 42),
])
def test_expression(text, names, result):
    assert evaluate(text, names) == result


def test_expression_translation_is_readable():
    assert " ".join(translate_jexl("a && !b ? 1 : 2").split()) == "((1) if (a and not b) else (2))"


def test_expressions_are_cached():
    assert compile_expression("a + 1") is compile_expression("a + 1")


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "open('/etc/passwd')", "().__class__.__bases__",
                                  "a.__class__"])
def test_expressions_cannot_escape(text):
    with pytest.raises(ExpressionError):
        evaluate(text, {"a": 1})


def test_expression_errors_name_the_problem():
    with pytest.raises(ExpressionError, match="unknown name 'nope'"):
        evaluate("nope + 1", {})
    with pytest.raises(ExpressionError, match="cannot parse"):
        compile_expression("1 +")


# --- downlinks ----------------------------------------------------------------------------------------------

def test_hydrant_threshold_command_is_binary():
    device = Device("", "/", "h1", "urn:ngsi-ld:FireHydrant:h1", "FireHydrant", transport="coap")
    path, data = encode_command(LIBRARY.get("hydrant-pressure"), device, "setThresholds", {"low": 1.5, "high": 10})
    assert path == "/hydrant/h1/cmd"
    assert data == bytes([1]) + struct.pack(">HH", 1500, 10000)
    assert encode_command(LIBRARY.get("hydrant-pressure"), device, "heater", "on")[1] == b"\x02\x01"
    with pytest.raises(EncodeError):
        encode_command(LIBRARY.get("hydrant-pressure"), device, "selfDestruct", 1)


def test_json_command_and_iota_default():
    device = Device("", "/", "d1", "urn:ngsi-ld:AirQualityObserved:d1", "AirQualityObserved", apikey="k")
    topic, data = encode_command(LIBRARY.get("dust-portable"), device, "setInterval", 30)
    assert topic == "city/dust/d1/down" and orjson.loads(data) == {"cmd": "interval", "seconds": 30}
    assert encode_command(None, device, "ping", "x") == ("/k/d1/cmd", b'{"ping":"x"}')


def test_modbus_command_writes_holding_registers(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("entity_type: X\ncodec:\n  format: modbus\n  byte_order: CDAB\n  registers:\n"
                    "    - {name: limit, kind: holding, address: 100, type: FLOAT32}\n"
                    "commands:\n  - {name: setLimit, encoding: {format: modbus, register: limit}}\n")
    profile = load_profile(path)
    target, data = encode_command(profile, Device("", "/", "m", "e", "X"), "setLimit", 1.5)
    hi, lo = struct.unpack(">HH", struct.pack(">f", 1.5))
    assert target == "holding/100" and orjson.loads(data) == {"holding": {"100": lo, "101": hi}}
    assert decode_registers(profile, {("holding", 100): lo, ("holding", 101): hi}) == {"limit": 1.5}
