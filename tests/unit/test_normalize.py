"""Normalize: Measurement → NGSI-LD entity fragment and Device fragment."""
from __future__ import annotations

import struct

import pytest

from middleware.codecs import ProfileLibrary, decode
from middleware.codecs.grades import pm_grade
from middleware.devices.types import Device, Measurement, Uplink
from middleware.normalize import to_fragments

LIBRARY = ProfileLibrary.load()
OBS = "2024-05-01T12:00:00.000Z"


def _device(device_id="d1", entity_type="AirQualityObserved", **kw) -> Device:
    return Device("", "/", device_id, f"urn:ngsi-ld:{entity_type}:{device_id}", entity_type, **kw)


def _fragments(profile_name, values, entity_type=None):
    profile = LIBRARY.get(profile_name)
    device = _device(entity_type=entity_type or profile.entity_type)
    return to_fragments(Measurement(device, values, OBS), profile)


def test_dust_entity_has_units_observed_at_and_grade():
    entity, device = _fragments("dust-portable", {"pm1": 8, "pm25": 12.5, "pm10": 28, "temperature": 21.4,
                                                  "relativeHumidity": 55, "batteryLevel": 0.87})
    assert entity["id"] == "urn:ngsi-ld:AirQualityObserved:d1" and entity["type"] == "AirQualityObserved"
    assert entity["pm25"] == {"type": "Property", "value": 12.5, "observedAt": OBS, "unitCode": "GQ"}
    assert entity["temperature"]["unitCode"] == "CEL" and entity["relativeHumidity"]["unitCode"] == "P1"
    assert entity["airQualityLevel"] == {"type": "Property", "value": "good", "observedAt": OBS}
    assert entity["dateObserved"] == {"type": "Property", "value": {"@type": "DateTime", "@value": OBS}}
    assert "batteryLevel" not in entity
    assert device == {
        "id": "urn:ngsi-ld:Device:d1", "type": "Device",
        "dateLastValueReported": {"type": "Property", "value": {"@type": "DateTime", "@value": OBS}},
        "deviceState": {"type": "Property", "value": "ok"},
        "batteryLevel": {"type": "Property", "value": 0.87, "observedAt": OBS},
        "controlledAsset": {"type": "Relationship", "object": "urn:ngsi-ld:AirQualityObserved:d1"},
    }


@pytest.mark.parametrize("pm10,grade", [(0, "good"), (30, "good"), (31, "moderate"), (80, "moderate"), (81, "bad"),
                                        (150, "bad"), (151, "very bad"), (400, "very bad")])
def test_pm10_grade_boundaries(pm10, grade):
    entity, _ = _fragments("dust-portable", {"pm10": pm10})
    assert entity["airQualityLevel"]["value"] == grade


@pytest.mark.parametrize("pm25,grade", [(15, "good"), (16, "moderate"), (35, "moderate"), (36, "bad"), (75, "bad"),
                                        (76, "very bad")])
def test_pm25_grade_boundaries(pm25, grade):
    entity, _ = _fragments("dust-portable", {"pm25": pm25})
    assert entity["airQualityLevel"]["value"] == grade


def test_grade_is_the_worse_of_the_two():
    assert pm_grade(pm10=20, pm25=40) == "bad"
    assert pm_grade(pm10=151, pm25=3) == "very bad"
    assert pm_grade(pm10=30.4, pm25=None) == "good" and pm_grade(pm10=30.5) == "moderate"
    assert pm_grade() is None


def test_no_grade_without_pm():
    entity, _ = _fragments("dust-portable", {"temperature": 20})
    assert "airQualityLevel" not in entity


def test_vehicle_lat_lon_become_location_point():
    entity, _ = _fragments("dust-vehicle", {"pm10": 85, "latitude": 35.0912, "longitude": 128.8641, "speed": 32.5})
    assert entity["location"] == {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [128.8641, 35.0912]},
                                  "observedAt": OBS}
    assert "latitude" not in entity and "longitude" not in entity
    assert entity["speed"]["unitCode"] == "KMH"
    assert entity["typeofLocation"] == {"type": "Property", "value": "outdoor"}      # static, no observedAt
    assert entity["airQualityLevel"]["value"] == "bad"


def test_no_gps_fix_means_no_location():
    entity, _ = _fragments("dust-vehicle", {"pm10": 10, "latitude": 0, "longitude": 0})
    assert "location" not in entity


def test_hydrant_from_bytes_to_entity():
    profile = LIBRARY.get("hydrant-pressure")
    payload = struct.pack(">BHhBHii", 1, 3520, -250, 0b0101, 3610, 351795543, 1290756416)
    device = _device("h1", "FireHydrant")
    entity, dev = to_fragments(decode(Uplink("coap", "1.2.3.4", "/hydrant/h1", payload, 1714564800.0), device, profile), profile)
    assert entity["pressure"] == {"type": "Property", "value": 3.52, "observedAt": OBS, "unitCode": "BAR"}
    assert entity["temperature"]["value"] == -2.5 and entity["temperature"]["unitCode"] == "CEL"
    assert entity["frozen"]["value"] is True and entity["heater"]["value"] == "off"
    assert entity["batteryVoltage"]["unitCode"] == "VLT"
    assert entity["location"]["value"]["coordinates"] == pytest.approx([129.0756416, 35.1795543])
    assert entity["status"]["value"] == "frozen"
    assert dev["controlledAsset"]["object"] == "urn:ngsi-ld:FireHydrant:h1"


def test_tag_is_its_own_device_entity():
    entity, dev = _fragments("nbiot-tag", {"messageType": "sos", "sos": True, "latitude": 37.5, "longitude": 127.0,
                                           "batteryLevel": 0.76, "rssi": -97})
    assert dev == {}
    assert entity["id"] == "urn:ngsi-ld:Device:d1" and entity["type"] == "Device"
    assert entity["batteryLevel"]["value"] == 0.76 and entity["rssi"]["value"] == -97
    assert entity["sos"]["value"] is True and entity["deviceState"]["value"] == "ok"
    assert entity["location"]["value"] == {"type": "Point", "coordinates": [127.0, 37.5]}
    assert entity["category"]["value"] == ["tracker"]
    assert "controlledAsset" not in entity


def test_meter_object_values_keep_units():
    entity, _ = _fragments("sdm630", {"phaseVoltage": {"L1": 230.1, "L2": 231.0, "L3": 229.0}, "totalActiveEnergy": 12.5})
    assert entity["phaseVoltage"]["value"]["L2"] == 231.0 and entity["phaseVoltage"]["unitCode"] == "VLT"
    assert entity["totalActiveEnergy"]["unitCode"] == "KWH"
    assert "dateObserved" not in entity        # ThreePhaseAcMeasurement is not an *Observed type


def test_iota_device_without_profile():
    device = _device("r1", "Room", attributes=[
        {"object_id": "t", "name": "temperature", "type": "Number", "metadata": {"unitCode": {"type": "Text", "value": "CEL"}}},
        {"object_id": "p", "name": "position", "type": "geo:point"},
        {"object_id": "b", "name": "refBuilding", "type": "Relationship"}],
        static_attributes=[{"name": "floor", "type": "Number", "value": 3},
                           {"name": "refStore", "type": "Relationship", "value": "urn:ngsi-ld:Store:s1"}])
    values = {"temperature": 21, "position": {"type": "Point", "coordinates": [127, 37.5]}, "refBuilding": "urn:ngsi-ld:Building:b1"}
    entity, dev = to_fragments(Measurement(device, values, OBS, {"temperature": device.attributes[0]["metadata"]}), None)
    assert entity["temperature"] == {"type": "Property", "value": 21, "observedAt": OBS, "unitCode": "CEL"}
    assert entity["position"]["type"] == "GeoProperty"
    assert entity["refBuilding"] == {"type": "Relationship", "object": "urn:ngsi-ld:Building:b1", "observedAt": OBS}
    assert entity["floor"] == {"type": "Property", "value": 3}
    assert entity["refStore"] == {"type": "Relationship", "object": "urn:ngsi-ld:Store:s1"}
    assert dev["id"] == "urn:ngsi-ld:Device:r1" and dev["controlledAsset"]["object"] == "urn:ngsi-ld:Room:r1"


def test_iota_air_quality_gets_grade_without_profile():
    entity, _ = to_fragments(Measurement(_device(), {"pm10": 31, "pm25": 15}, OBS), None)
    assert entity["airQualityLevel"]["value"] == "moderate"
    assert entity["pm10"] == {"type": "Property", "value": 31, "observedAt": OBS}
