"""Regenerate the binary/register golden payloads (run by hand: python tests/unit/codec_cases/make_cases.py).

Expected values are written here from the numbers we encode, never from the codec under test.
"""
from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

HERE = Path(__file__).parent


def case(name: str, payload: bytes | str | dict | None = None, ext: str = "hex", expected: dict | None = None,
         profile: str | None = None, profile_yaml: str | None = None, device: dict | None = None, uplink: dict | None = None):
    d = HERE / name
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    if profile:
        (d / "profile.txt").write_text(profile + "\n")
    if profile_yaml:
        (d / "profile.yaml").write_text(profile_yaml)
    if device:
        (d / "device.json").write_text(json.dumps(device, indent=2) + "\n")
    if uplink:
        (d / "uplink.json").write_text(json.dumps(uplink, indent=2) + "\n")
    if ext == "hex":
        (d / "payload.hex").write_text(payload.hex(" ").upper() + "\n")
    elif ext == "json":
        (d / "payload.json").write_text(payload if isinstance(payload, str) else json.dumps(payload) + "\n")
    else:
        (d / f"payload.{ext}").write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    (d / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")


def pms_frame(words: list[int], header=b"\x42\x4d") -> bytes:
    body = header + struct.pack(">H", 28) + struct.pack(">13H", *words)
    return body + struct.pack(">H", sum(body) & 0xFFFF)


def sds_frame(pm25: int, pm10: int, ident: bytes = b"\xa1\x60") -> bytes:
    data = struct.pack("<HH", pm25, pm10) + ident
    return b"\xaa\xc0" + data + bytes([sum(data) & 0xFF]) + b"\xab"


def order(data: bytes, byte_order: str) -> list[int]:
    """Big-endian bytes → register words as a device with that byte order sends them."""
    if byte_order == "DCBA":
        data = data[::-1]
    elif byte_order == "BADC":
        data = b"".join(data[i:i + 2][::-1] for i in range(0, len(data), 2))
    elif byte_order == "CDAB":
        data = b"".join(data[i:i + 2] for i in range(len(data) - 2, -1, -2))
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def regs(block: dict) -> dict:
    out: dict = {}
    for (kind, address), words in block.items():
        for i, w in enumerate(words):
            out.setdefault(kind, {})[str(address + i)] = w
    return out


MODBUS_TYPES = [  # name, address, type, big-endian bytes, expected value
    ("i16", 0, "INT16", struct.pack(">h", -1234), -1234),
    ("u16", 1, "UINT16", struct.pack(">H", 54321), 54321),
    ("i32", 2, "INT32", struct.pack(">i", -123456789), -123456789),
    ("u32", 4, "UINT32", struct.pack(">I", 3000000000), 3000000000),
    ("i64", 6, "INT64", struct.pack(">q", -1234567890123), -1234567890123),
    ("u64", 10, "UINT64", struct.pack(">Q", 12345678901234567890), 12345678901234567890),
    ("f16", 14, "FLOAT16", struct.pack(">e", 1.5), 1.5),
    ("f32", 15, "FLOAT32", struct.pack(">f", -273.15), -273.15),
    ("f64", 17, "FLOAT64", struct.pack(">d", 3.141592653589793), 3.141592653589793),
    ("scaled", 21, "UINT16", struct.pack(">H", 2345), 224.5),
]


def modbus_types_profile(byte_order: str) -> str:
    lines = [f"entity_type: DeviceMeasurement\ncodec:\n  format: modbus\n  byte_order: {byte_order}\n  registers:"]
    for name, address, rtype, _, _ in MODBUS_TYPES:
        extra = ", scale: 0.1, offset: -10" if name == "scaled" else ""
        lines.append(f"    - {{name: {name}, kind: holding, address: {address}, type: {rtype}{extra}}}")
    lines.append("attributes:")
    lines += [f"  - {{name: {name}}}" for name, *_ in MODBUS_TYPES]
    return "\n".join(lines) + "\n"


def main() -> None:
    t0 = 1714564800  # 2024-05-01T12:00:00Z
    obs = "2024-05-01T12:00:00.000Z"
    # --- JSON dust sensors
    case("dust-portable", {"ts": t0, "pm1": 8, "pm25": 12.5, "pm10": 28, "temp": 21.4, "hum": 55, "bat": 87}, "json",
         {"values": {"pm1": 8, "pm25": 12.5, "pm10": 28, "temperature": 21.4, "relativeHumidity": 55, "batteryLevel": 0.87},
          "observed_at": obs}, profile="dust-portable")
    case("dust-portable-range", {"ts": t0, "pm25": 12.5, "pm10": -5}, "json",
         {"error": "pm10=-5 outside the valid range [0, 2000]"}, profile="dust-portable")
    case("dust-portable-not-json", "pm10=3", "txt", {"error": "payload is not JSON"}, profile="dust-portable")
    case("dust-vehicle", {"time": "2024-05-01T21:00:00+09:00", "pm": {"pm1": 5, "pm25": 40, "pm10": 85},
                          "env": {"t": 18.2, "rh": 61}, "gps": {"lat": 35.0912, "lon": 128.8641, "speed": 32.5}}, "json",
         {"values": {"pm1": 5, "pm25": 40, "pm10": 85, "temperature": 18.2, "relativeHumidity": 61,
                     "latitude": 35.0912, "longitude": 128.8641, "speed": 32.5}, "observed_at": obs}, profile="dust-vehicle")
    # --- serial frames
    words = [10, 14, 17, 9, 13, 16, 1500, 450, 80, 8, 2, 1, 0x9700]
    good = pms_frame(words)
    case("pms5003", good, "hex", {"values": {"pm1": 9, "pm25": 13, "pm10": 16}, "observed_at": obs}, profile="pms5003")
    bad = good[:-1] + bytes([(good[-1] + 1) & 0xFF])
    case("pms5003-bad-checksum", bad, "hex", {"error": "bad checksum"}, profile="pms5003")
    case("pms5003-bad-header", pms_frame(words, b"\x42\x4e"), "hex", {"error": "does not start with 424D"}, profile="pms5003")
    case("pms5003-short", good[:20], "hex", {"error": "frame is 20 bytes, expected 32"}, profile="pms5003")
    s = sds_frame(1236, 2618)
    case("sds011", s, "hex", {"values": {"pm25": 123.6, "pm10": 261.8}, "observed_at": obs}, profile="sds011")
    case("sds011-bad-checksum", s[:8] + bytes([(s[8] + 1) & 0xFF]) + s[9:], "hex", {"error": "bad checksum"}, profile="sds011")
    case("sds011-bad-tail", s[:9] + b"\xac", "hex", {"error": "does not end with AB"}, profile="sds011")
    # --- Modbus: SDM630
    sdm = {"voltage_l1": (0x00, 230.1), "voltage_l2": (0x02, 231.2), "voltage_l3": (0x04, 229.8),
           "current_l1": (0x06, 5.0), "current_l2": (0x08, 4.5), "current_l3": (0x0A, 6.25),
           "power_l1": (0x0C, 1150.0), "power_l2": (0x0E, 1040.0), "power_l3": (0x10, 1436.0),
           "pf_l1": (0x1E, 0.98), "pf_l2": (0x20, 0.97), "pf_l3": (0x22, 0.99), "total_power": (0x34, 3626.0),
           "frequency": (0x46, 50.02), "import_kwh": (0x48, 12345.5), "export_kwh": (0x4A, 12.25), "total_kwh": (0x156, 12357.75)}
    block = {("input", a): order(struct.pack(">f", v), "ABCD") for a, v in sdm.values()}
    case("sdm630", regs(block), "json", {"values": {
        "phaseVoltage": {"L1": 230.1, "L2": 231.2, "L3": 229.8}, "current": {"L1": 5.0, "L2": 4.5, "L3": 6.25},
        "activePower": {"L1": 1150.0, "L2": 1040.0, "L3": 1436.0}, "powerFactor": {"L1": 0.98, "L2": 0.97, "L3": 0.99},
        "totalActivePower": 3626.0, "frequency": 50.02, "totalActiveEnergyImport": 12345.5,
        "totalActiveEnergyExport": 12.25, "totalActiveEnergy": 12357.75}, "observed_at": obs}, profile="sdm630")
    missing = dict(block)
    del missing[("input", 0x156)]
    case("sdm630-missing-register", regs(missing), "json", {"error": "register input 342 (0x0156) for total_kwh was not read"},
         profile="sdm630")
    # --- Modbus: every type in every byte order
    for bo in ("ABCD", "DCBA", "BADC", "CDAB"):
        blk = {("holding", a): order(data, bo) for _, a, _, data, _ in MODBUS_TYPES}
        case(f"modbus-types-{bo.lower()}", regs(blk), "json",
             {"values": {n: e for n, _, _, _, e in MODBUS_TYPES}, "observed_at": obs}, profile_yaml=modbus_types_profile(bo))
    case("modbus-8bit-and-bits", {"holding": {"0": 0xFE85, "1": 0b1000, "2": 0x00A0}, "coil": {"0": 1}, "discrete": {"5": 0}}, "json",
         {"values": {"i8h": -2, "u8h": 254, "i8l": -123, "u8l": 133, "bit3": True, "nibble": 10, "valve": True, "door": False},
          "observed_at": obs}, profile_yaml="""entity_type: DeviceMeasurement
codec:
  format: modbus
  registers:
    - {name: i8h, kind: holding, address: 0, type: INT8H}
    - {name: u8h, kind: holding, address: 0, type: UINT8H}
    - {name: i8l, kind: holding, address: 0, type: INT8L}
    - {name: u8l, kind: holding, address: 0, type: UINT8L}
    - {name: bit3, kind: holding, address: 1, type: UINT16, bit: 3}
    - {name: nibble, kind: holding, address: 2, type: UINT16, bits: {start: 4, length: 4}}
    - {name: valve, kind: coil, address: 0}
    - {name: door, kind: discrete, address: 5}
attributes: [{name: i8h}, {name: u8h}, {name: i8l}, {name: u8l}, {name: bit3}, {name: nibble}, {name: valve}, {name: door}]
""")
    # --- water meter
    case("water-meter", {"ts": t0, "vol": 123.456, "flow": 0.012, "st": 5, "bat": 3.6}, "json",
         {"values": {"waterConsumption": 123.456, "flow": 0.012, "alarmStopsLeaks": 1, "alarmTamper": 0, "alarmBackflow": 1,
                     "alarmInProgress": 1, "batteryVoltage": 3.6}, "observed_at": obs}, profile="water-meter")
    case("water-meter-tamper", {"ts": t0, "vol": 7, "st": 2}, "json",
         {"values": {"waterConsumption": 7, "alarmStopsLeaks": 0, "alarmTamper": 1, "alarmBackflow": 0, "alarmInProgress": 1},
          "observed_at": obs}, profile="water-meter")
    case("water-meter-missing-volume", {"ts": t0, "flow": 0.1}, "json",
         {"error": "waterConsumption: required value '$.vol' is missing"}, profile="water-meter")
    # --- hydrant
    hyd = struct.pack(">BHhBHii", 1, 3520, -250, 0b0101, 3610, 351795543, 1290756416)
    case("hydrant-pressure", hyd, "bin", {"values": {"pressure": 3.52, "temperature": -2.5, "frozen": True, "heater": "off",
                                                      "externalPower": True, "flowDetected": False, "batteryVoltage": 3.61,
                                                      "latitude": 35.1795543, "longitude": 129.0756416}, "observed_at": obs},
         profile="hydrant-pressure")
    case("hydrant-pressure-short", hyd[:10], "bin", {"error": "payload is 10 bytes, the profile needs at least 16"}, profile="hydrant-pressure")
    case("hydrant-pressure-range", struct.pack(">BHhBHii", 1, 30000, 100, 0, 3600, 0, 0), "bin",
         {"error": "pressure=30.0 outside the valid range [0, 25]"}, profile="hydrant-pressure")
    # --- NB-IoT tag
    case("nbiot-tag", struct.pack(">BBiiBb", 1, 0b10, 37566535, 126977969, 76, -97), "bin",
         {"values": {"messageType": "periodic", "sos": False, "latitude": 37.566535, "longitude": 126.977969,
                     "batteryLevel": 0.76, "rssi": -97}, "observed_at": obs}, profile="nbiot-tag")
    case("nbiot-tag-sos-nofix", struct.pack(">BBiiBb", 2, 0b01, 0, 0, 15, -110), "bin",
         {"values": {"messageType": "sos", "sos": True, "batteryLevel": 0.15, "rssi": -110}, "observed_at": obs},
         profile="nbiot-tag")
    # --- wrapping
    small = "entity_type: DeviceMeasurement\ncodec:\n  format: binary\n  wrapping: {wrap}\n  fields:\n    - {{name: temperature, offset: 0, type: int16, scale: 0.1}}\nattributes:\n  - {{name: temperature, unitCode: CEL}}\n"
    case("wrap-hex", "00D7", "txt", {"values": {"temperature": 21.5}, "observed_at": obs}, profile_yaml=small.format(wrap="hex"))
    case("wrap-base64", base64.b64encode(b"\xff\x9c").decode(), "txt", {"values": {"temperature": -10.0}, "observed_at": obs},
         profile_yaml=small.format(wrap="base64"))
    case("wrap-base64-envelope", {"uplink_message": {"frm_payload": base64.b64encode(b"\x00\xd7").decode()}}, "json",
         {"values": {"temperature": 21.5}, "observed_at": obs},
         profile_yaml=small.format(wrap="{encoding: base64, path: $.uplink_message.frm_payload}"))
    case("wrap-bad-hex", "zz", "txt", {"error": "payload is not valid hex"}, profile_yaml=small.format(wrap="hex"))
    case("expression-error", {"v": 3}, "json", {"error": "x: expression 'value / 0': ZeroDivisionError"},
         profile_yaml="entity_type: DeviceMeasurement\ncodec: {format: json}\nattributes:\n  - {name: x, source: $.v, expression: value / 0}\n")
    # --- IoT Agent JSON (no profile)
    dev = {"device_id": "dev1", "entity_type": "Room", "entity_name": "urn:ngsi-ld:Room:dev1", "apikey": "key1",
           "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"},
                          {"object_id": "h", "name": "relativeHumidity", "type": "Number", "expression": "h * 100"}]}
    up = {"transport": "mqtt", "topic": "/key1/dev1/attrs"}
    case("iota-attrs", {"t": 21.5, "h": 0.55, "x": 3}, "json",
         {"values": {"temperature": 21.5, "relativeHumidity": 55.00000000000001, "x": 3}, "observed_at": obs}, device=dev, uplink=up)
    case("iota-explicit-attrs", {"t": 21.5, "x": 3}, "json", {"values": {"temperature": 21.5}, "observed_at": obs},
         device={**dev, "explicit_attrs": True}, uplink=up)
    case("iota-single-attr", "21.5", "txt", {"values": {"temperature": 21.5}, "observed_at": obs}, device=dev,
         uplink={"transport": "mqtt", "topic": "/key1/dev1/attrs/t"})
    case("iota-single-text", "open", "txt", {"values": {"door": "open"}, "observed_at": obs}, device=dev,
         uplink={"transport": "mqtt", "topic": "key1/dev1/attrs/door"})
    case("iota-timeinstant", {"t": 20, "TimeInstant": "2024-05-01T13:30:00+09:00"}, "json",
         {"values": {"temperature": 20}, "observed_at": "2024-05-01T04:30:00.000Z"}, device={**dev, "timestamp": True}, uplink=up)
    case("iota-timeinstant-ignored", {"t": 20, "TimeInstant": "2024-05-01T13:30:00+09:00"}, "json",
         {"values": {"temperature": 20, "TimeInstant": "2024-05-01T13:30:00+09:00"}, "observed_at": obs}, device=dev, uplink=up)
    jexl = {**dev, "attributes": [
        {"object_id": "t", "name": "temperature", "type": "Number", "expression": "t * 100"},
        {"object_id": "s", "name": "state", "type": "Text", "expression": 's > 30 ? "hot" : "ok"'},
        {"object_id": "d", "name": "doorClosed", "type": "Boolean", "expression": "!d"},
        {"object_id": "l", "name": "label", "type": "Text", "expression": '"room-" + l + "/" + s'},
        {"object_id": "f", "name": "alarm", "type": "Boolean", "expression": "f && s > 10 || false"},
        {"object_id": "r", "name": "rounded", "type": "Number", "expression": "r|round(1)"}]}
    case("iota-jexl", {"t": 0.25, "s": 31, "d": True, "l": 7, "f": True, "r": 2.345}, "json",
         {"values": {"temperature": 25.0, "state": "hot", "doorClosed": False, "label": "room-7/31", "alarm": True, "rounded": 2.3},
          "observed_at": obs}, device=jexl, uplink=up)
    case("iota-geo-point", {"p": "37.5665, 126.978"}, "json",
         {"values": {"location": {"type": "Point", "coordinates": [126.978, 37.5665]}}, "observed_at": obs},
         device={**dev, "attributes": [{"object_id": "p", "name": "location", "type": "geo:point"}]}, uplink=up)
    case("iota-cmdexe", {"ping": "pong"}, "json", {"values": {"ping_info": "pong", "ping_status": "OK"}, "observed_at": obs},
         device=dev, uplink={"transport": "mqtt", "topic": "/key1/dev1/cmdexe"})
    case("iota-bad-json", "{t: 1", "txt", {"error": "payload is not JSON"}, device=dev, uplink=up)
    case("iota-wrong-device", {"t": 1}, "json", {"error": "topic names device 'dev2'"}, device=dev,
         uplink={"transport": "mqtt", "topic": "/key1/dev2/attrs"})
    case("iota-not-object", [1, 2], "json", {"error": "is a JSON object"}, device=dev, uplink=up)


if __name__ == "__main__":
    main()
