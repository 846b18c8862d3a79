"""Profile loading: every shipped profile validates; a bad one is refused with its file, line and reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from middleware.codecs.profiles import PROFILE_DIR, ProfileError, ProfileLibrary

GOOD = """\
name: probe
entity_type: AirQualityObserved
interval: 60
transports:
  mqtt:
    topics: ["city/probe/{device_id}/up"]
codec:
  format: json
attributes:
  - {name: pm10, source: $.pm10, unitCode: GQ, range: {min: 0}}
"""


def _load_one(tmp_path: Path, text: str) -> ProfileLibrary:
    (tmp_path / "probe.yaml").write_text(text)
    return ProfileLibrary.load(tmp_path)


def test_schema_is_valid_draft_2020_12():
    schema = json.loads((PROFILE_DIR / "schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_shipped_profiles_load():
    library = ProfileLibrary.load()
    assert set(library.profiles) == {"dust-portable", "dust-vehicle", "pms5003", "sds011", "sdm630", "water-meter",
                                     "hydrant-pressure", "nbiot-tag"}
    sdm = library.get("sdm630")
    assert sdm.entity_type == "ThreePhaseAcMeasurement" and sdm.interval == 60 and sdm.format == "modbus"
    assert sdm.modbus["unit_id"] == 1 and sdm.mqtt is None
    assert library.get("nbiot-tag").attribute("batteryLevel")["source"] == "battery"
    assert library.get("nope") is None and library.get(None) is None


def test_by_topic_captures_fields_and_prefers_specific_templates(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.replace("name: probe", "name: a").replace("city/probe/{device_id}/up", "city/{kind}/{device_id}/up"))
    (tmp_path / "b.yaml").write_text(GOOD.replace("name: probe", "name: b"))
    library = ProfileLibrary.load(tmp_path)
    profile, fields = library.by_topic("city/probe/p-7/up")
    assert profile.name == "b" and fields == {"device_id": "p-7"}
    profile, fields = library.by_topic("city/odour/o-1/up")
    assert profile.name == "a" and fields == {"kind": "odour", "device_id": "o-1"}
    assert library.by_topic("city/probe/a/b/up") is None


def test_shipped_topics_and_coap_paths_route():
    library = ProfileLibrary.load()
    assert library.by_topic("city/dust/d-1/up")[0].name == "dust-portable"
    assert library.by_topic("/water/w-9") == (library.get("water-meter"), {"device_id": "w-9"})
    assert library.by_topic("/tag/t-3")[0].name == "nbiot-tag"


def test_name_defaults_to_file_name(tmp_path):
    assert _load_one(tmp_path, GOOD.replace("name: probe\n", "")).get("probe").name == "probe"


@pytest.mark.parametrize("text,line,reason", [
    (GOOD.replace("interval: 60", "interval: -5"), 3, "interval: -5 is less than or equal to the minimum of 0"),
    (GOOD.replace("format: json", "format: xml"), 8, "codec/format: 'xml' is not one of"),
    (GOOD.replace("unitCode: GQ", "unitCode: ugm3"), 10, "attributes/0/unitCode: 'ugm3' does not match"),
    (GOOD.replace("  format: json\n", "  format: json\n  colour: red\n"), 9, "Additional properties are not allowed ('colour'"),
    (GOOD.replace("entity_type: AirQualityObserved\n", ""), 1, "'entity_type' is a required property"),
    (GOOD.replace("range: {min: 0}", "expression: 'value +'"), 10, "attributes/0/expression: cannot parse expression"),
    (GOOD.replace("$.pm10", "$..pm10"), 10, "attributes/0/source: bad JSON path"),
    (GOOD + "  - {name: x, kind: Thing}\n", 11, "attributes/1/kind: 'Thing' is not one of"),
    (GOOD.replace("topics: [", "topics: [[").replace("up\"]", "up\"]]"), 6, "transports/mqtt/topics/0:"),
    (GOOD.replace("  mqtt:\n", "  mqtt:\n   bad: [\n"), 8, "not valid YAML"),
])
def test_bad_profile_names_file_line_and_reason(tmp_path, text, line, reason):
    with pytest.raises(ProfileError) as info:
        _load_one(tmp_path, text)
    error = info.value
    assert error.file == str(tmp_path / "probe.yaml")
    assert error.line == line, error
    assert reason in error.reason
    assert str(error).startswith(f"{error.file}:{line}: ")


def test_binary_source_must_be_a_field(tmp_path):
    text = """entity_type: X
codec:
  format: binary
  fields:
    - {name: a, offset: 0, type: uint8}
attributes:
  - {name: b}
"""
    with pytest.raises(ProfileError) as info:
        _load_one(tmp_path, text)
    assert info.value.line == 7 and "source 'b' is not a field of the codec (have: a)" in info.value.reason


def test_modbus_register_checks(tmp_path):
    base = "entity_type: X\ncodec:\n  format: modbus\n  registers:\n    - {name: v, kind: input, address: 0x10, type: %s}\n"
    assert _load_one(tmp_path, base % "FLOAT32").get("probe").codec["registers"][0]["address"] == 16
    with pytest.raises(ProfileError) as info:
        _load_one(tmp_path, base % "FLOAT128")
    assert info.value.line == 5 and "'FLOAT128' is not one of" in info.value.reason
    with pytest.raises(ProfileError, match="byte_order: 'ZYXW'"):
        _load_one(tmp_path, base.replace("type: %s}", "type: INT32, byte_order: ZYXW}"))


def test_serial_framing_is_required(tmp_path):
    text = "entity_type: X\ncodec:\n  format: serial\n  fields: [{name: a, offset: 0, type: uint8}]\n"
    with pytest.raises(ProfileError) as info:
        _load_one(tmp_path, text)
    assert info.value.line == 3 and "'framing' is a required property" in info.value.reason


def test_duplicate_names_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(ProfileError, match="already used"):
        ProfileLibrary.load(tmp_path)


def test_command_encodings_are_validated(tmp_path):
    text = GOOD + "commands:\n  - name: go\n    encoding: {format: binary, fields: [{type: uint8}]}\n"
    with pytest.raises(ProfileError) as info:
        _load_one(tmp_path, text)
    assert info.value.line == 13
