"""The /iot provisioning API, driven like FIWARE IoT Agent provisioning scripts, against the real middleware (both stores).

Config groups and devices (iotagent-node-lib doc/api.md): batch POST, GET list with count, GET one, PUT, DELETE,
duplicates, unknown ids, invalid bodies, fiware-service isolation, persistence across a restart, /iot/groups alias,
dead letters and /metrics. The pipeline's side of the registry (find, autoprovision, last seen) is exercised
in-process on the same store the middleware uses.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from middleware.devices.deadletters import DeadLetters
from middleware.devices.registry import AutoprovisionRefused, DeviceRegistry
from middleware.devices.types import Device, Uplink
from middleware.store import open_store
from tests.conftest import Middleware


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class Iota(httpx.Client):
    """An IoT Agent provisioning client: fiware-service / fiware-servicepath headers and JSON bodies."""

    def __init__(self, base_url: str, service: str | None, path: str | None = "/"):
        headers = {}
        if service is not None:
            headers["fiware-service"] = service
        if path is not None:
            headers["fiware-servicepath"] = path
        super().__init__(base_url=base_url, timeout=30, headers=headers)
        self.service = service

    def call(self, method: str, url: str, body=None, **kwargs) -> httpx.Response:
        """A request with a JSON body (application/json), as provisioning scripts send it."""
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        content = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
        return self.request(method, url, content=content, headers=headers, **kwargs)


@pytest.fixture
def iota(middleware):
    """A provisioning client on a fresh fiware-service."""
    client = Iota(middleware.url, unique("svc"))
    yield client
    client.close()


def assert_iota_error(response: httpx.Response, status: int, name: str, mentions: str | None = None) -> dict:
    """The response is an IoT Agent error {"name", "message"} (not ProblemDetails) naming `mentions`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["name"] == name, body
    assert isinstance(body["message"], str) and body["message"]
    assert "type" not in body and "title" not in body
    if mentions is not None:
        assert mentions in body["message"], body
    return body


def dust_group(apikey: str, **more) -> dict:
    """A config group of fine-dust sensors, IoT Agent style."""
    return {"apikey": apikey, "resource": "/iot/json", "entity_type": "AirQualityObserved", "protocol": "PDI-IoTA-JSON",
            "transport": "MQTT", "profile": "dust-portable", "cbHost": "http://orion:1026",
            "attributes": [{"object_id": "p10", "name": "pm10", "type": "Number",
                            "metadata": {"unitCode": {"type": "Text", "value": "GQ"}}},
                           {"object_id": "p25", "name": "pm25", "type": "Number"}],
            "static_attributes": [{"name": "source", "type": "Text", "value": "citybridge"}], **more}


def dust_device(device_id: str, **more) -> dict:
    """A fine-dust sensor device, IoT Agent style."""
    return {"device_id": device_id, "protocol": "PDI-IoTA-JSON", "transport": "MQTT", "profile": "dust-portable",
            "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
            "static_attributes": [{"name": "location", "type": "geo:json",
                                   "value": {"type": "Point", "coordinates": [126.8, 37.38]}}], **more}


# ---------------------------------------------------------------- config groups

def test_create_and_list_config_groups(iota):
    """POST /iot/services → 201; GET → {"count", "services"} with the scope written in."""
    apikey = unique("k")
    created = iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]})
    assert created.status_code == 201, created.text
    listed = iota.get("/iot/services")
    assert listed.status_code == 200
    assert listed.headers["content-type"].startswith("application/json")
    body = listed.json()
    assert body["count"] == 1
    group = body["services"][0]
    assert group["apikey"] == apikey and group["resource"] == "/iot/json"
    assert group["entity_type"] == "AirQualityObserved" and group["cbHost"] == "http://orion:1026"
    assert group["service"] == iota.service and group["subservice"] == "/"
    assert group["attributes"][0]["metadata"]["unitCode"]["value"] == "GQ"


def test_groups_alias_and_filters(iota):
    """/iot/groups takes {"groups": [...]} and answers {"groups": [...]}; both paths see the same groups."""
    first, second = unique("k"), unique("k")
    assert iota.call("POST", "/iot/groups", {"groups": [dust_group(first), dust_group(second, resource="")]}
                     ).status_code == 201
    groups = iota.get("/iot/groups").json()
    assert groups["count"] == 2 and [g["apikey"] for g in groups["groups"]] == [first, second]
    services = iota.get("/iot/services").json()
    assert services["count"] == 2 and "services" in services
    one = iota.get("/iot/services", params={"apikey": second}).json()
    assert one["count"] == 1 and one["services"][0]["resource"] == ""
    page = iota.get("/iot/groups", params={"limit": 1, "offset": 1}).json()
    assert page["count"] == 2 and [g["apikey"] for g in page["groups"]] == [second]


def test_update_and_delete_config_group(iota):
    """PUT/DELETE /iot/services?apikey=&resource= → 204; the body of PUT is merged."""
    apikey = unique("k")
    iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]})
    params = {"apikey": apikey, "resource": "/iot/json"}
    updated = iota.call("PUT", "/iot/services", {"cbHost": "http://orion-ld:1026", "autoprovision": False},
                        params=params)
    assert updated.status_code == 204, updated.text
    group = iota.get("/iot/services").json()["services"][0]
    assert group["cbHost"] == "http://orion-ld:1026" and group["autoprovision"] is False
    assert group["entity_type"] == "AirQualityObserved"
    assert iota.delete("/iot/services", params=params).status_code == 204
    assert iota.get("/iot/services").json() == {"count": 0, "services": []}
    assert_iota_error(iota.delete("/iot/services", params=params), 404, "DEVICE_GROUP_NOT_FOUND", apikey)
    assert_iota_error(iota.call("PUT", "/iot/groups", {"cbHost": "x"}, params=params), 404, "DEVICE_GROUP_NOT_FOUND")


def test_group_selector_needs_apikey(iota):
    """PUT/DELETE without ?apikey is 400 MISSING_HEADERS naming apikey."""
    assert_iota_error(iota.delete("/iot/services"), 400, "MISSING_HEADERS", "apikey")
    assert_iota_error(iota.call("PUT", "/iot/groups", {"cbHost": "x"}), 400, "MISSING_HEADERS", "apikey")


def test_duplicate_group_is_409(iota, middleware):
    """(apikey, resource) identifies a group — in the batch, in the service, and across services."""
    apikey = unique("k")
    assert iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]}).status_code == 201
    assert_iota_error(iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]}), 409, "DUPLICATE_GROUP",
                      apikey)
    twice = unique("k")
    assert_iota_error(iota.call("POST", "/iot/services", {"services": [dust_group(twice), dust_group(twice)]}),
                      409, "DUPLICATE_GROUP")
    with Iota(middleware.url, unique("svc")) as other:
        assert_iota_error(other.call("POST", "/iot/services", {"services": [dust_group(apikey)]}), 409,
                          "DUPLICATE_GROUP")
        # the same apikey with another resource is another group
        assert other.call("POST", "/iot/services", {"services": [dust_group(apikey, resource="/iot/d")]}
                          ).status_code == 201
    assert iota.get("/iot/services", params={"apikey": twice}).json()["count"] == 0   # all or nothing


@pytest.mark.parametrize("body, field", [
    ({"services": [{"resource": "/iot/json", "entity_type": "T"}]}, "services[0].apikey"),
    ({"services": [{"apikey": "a/b"}]}, "services[0].apikey"),
    ({"services": [{"apikey": "k", "attributes": {"name": "x"}}]}, "services[0].attributes"),
    ({"services": [{"apikey": "k", "attributes": [{"type": "Number"}]}]}, "services[0].attributes[0].name"),
    ({"services": [{"apikey": "k", "autoprovision": "maybe"}]}, "services[0].autoprovision"),
    ({"services": [{"apikey": "k", "profile": "../../etc/passwd"}]}, "services[0].profile"),
    ({"services": []}, "services"),
    ({"groups_": []}, "services"),
    ([1, 2], "body"),
])
def test_invalid_group_bodies_are_400_naming_the_field(iota, body, field):
    """A malformed config group is 400 WRONG_SYNTAX naming the field."""
    assert_iota_error(iota.call("POST", "/iot/services", body), 400, "WRONG_SYNTAX", field)


def test_malformed_json_is_400(iota):
    """A body that is not JSON is 400 WRONG_SYNTAX."""
    assert_iota_error(iota.call("POST", "/iot/devices", b"{not json"), 400, "WRONG_SYNTAX", "body")
    assert_iota_error(iota.call("POST", "/iot/services", b""), 400, "WRONG_SYNTAX", "body")


# ---------------------------------------------------------------- devices

def test_provision_devices_in_a_batch_with_group_defaults(iota):
    """POST /iot/devices (a batch) → 201; devices inherit apikey and entity_type; entity_name is urn:ngsi-ld:<type>:<id>."""
    apikey = unique("k")
    iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]})
    created = iota.call("POST", "/iot/devices", {"devices": [dust_device("dust-001"), dust_device("dust-002")]})
    assert created.status_code == 201, created.text
    listed = iota.get("/iot/devices").json()
    assert listed["count"] == 2
    first = listed["devices"][0]
    assert first["device_id"] == "dust-001"
    assert first["apikey"] == apikey
    assert first["entity_type"] == "AirQualityObserved"
    assert first["entity_name"] == "urn:ngsi-ld:AirQualityObserved:dust-001"
    assert first["service"] == iota.service and first["service_path"] == "/"
    assert first["profile"] == "dust-portable"
    assert first["attributes"] == [{"object_id": "t", "name": "temperature", "type": "Number"}]
    assert first["lazy"] == [] and first["commands"] == []
    one = iota.get("/iot/devices/dust-002")
    assert one.status_code == 200 and one.headers["content-type"].startswith("application/json")
    assert one.json()["entity_name"] == "urn:ngsi-ld:AirQualityObserved:dust-002"


def test_device_without_group_gets_defaults_and_keeps_extra_fields(iota):
    """No group: entity_type Device; given entity_name, timezone and unknown fields are kept as given."""
    body = {"devices": [{"device_id": "meter-7", "entity_type": "WaterConsumptionObserved", "timezone": "Asia/Seoul",
                         "internal_attributes": {"modbus": {"unit": 3}}, "vendorField": [1, 2]},
                        {"device_id": "plain", "entity_name": "urn:ngsi-ld:Thing:plain-1"}]}
    assert iota.call("POST", "/iot/devices", body).status_code == 201
    meter = iota.get("/iot/devices/meter-7").json()
    assert meter["entity_name"] == "urn:ngsi-ld:WaterConsumptionObserved:meter-7"
    assert meter["timezone"] == "Asia/Seoul" and meter["vendorField"] == [1, 2]
    assert meter["internal_attributes"] == {"modbus": {"unit": 3}}
    assert "apikey" not in meter
    plain = iota.get("/iot/devices/plain").json()
    assert plain["entity_type"] == "Device" and plain["entity_name"] == "urn:ngsi-ld:Thing:plain-1"


def test_device_list_pagination_and_filters(iota):
    """limit/offset page the list; count is the total; ?protocol= filters."""
    devices = [dust_device(f"d{n:02d}", protocol="PDI-IoTA-JSON" if n % 2 else "IoTA-UL") for n in range(5)]
    assert iota.call("POST", "/iot/devices", {"devices": devices}).status_code == 201
    page = iota.get("/iot/devices", params={"limit": 2, "offset": 1}).json()
    assert page["count"] == 5 and [d["device_id"] for d in page["devices"]] == ["d01", "d02"]
    json_only = iota.get("/iot/devices", params={"protocol": "PDI-IoTA-JSON"}).json()
    assert json_only["count"] == 2 and [d["device_id"] for d in json_only["devices"]] == ["d01", "d03"]
    assert_iota_error(iota.get("/iot/devices", params={"limit": "lots"}), 400, "WRONG_SYNTAX", "limit")
    assert_iota_error(iota.get("/iot/devices", params={"offset": "-1"}), 400, "WRONG_SYNTAX", "offset")


def test_update_device(iota):
    """PUT /iot/devices/{id} → 204 and merges the body; the entity link cannot change."""
    iota.call("POST", "/iot/devices", {"devices": [dust_device("dust-9", entity_type="AirQualityObserved")]})
    new_attrs = [{"object_id": "h", "name": "relativeHumidity", "type": "Number"}]
    updated = iota.call("PUT", "/iot/devices/dust-9", {"attributes": new_attrs, "endpoint": "http://10.0.0.9:80"})
    assert updated.status_code == 204, updated.text
    device = iota.get("/iot/devices/dust-9").json()
    assert device["attributes"] == new_attrs and device["endpoint"] == "http://10.0.0.9:80"
    assert device["profile"] == "dust-portable"
    # a script that PUTs back what it read works: the same id, name, type and scope are accepted
    assert iota.call("PUT", "/iot/devices/dust-9", device).status_code == 204
    assert_iota_error(iota.call("PUT", "/iot/devices/dust-9", {"entity_name": "urn:ngsi-ld:X:other"}), 400,
                      "WRONG_SYNTAX", "entity_name")
    assert_iota_error(iota.call("PUT", "/iot/devices/dust-9", {"attributes": "pm10"}), 400, "WRONG_SYNTAX",
                      "attributes")
    assert_iota_error(iota.call("PUT", "/iot/devices/nobody", {"endpoint": "x"}), 404, "DEVICE_NOT_FOUND", "nobody")


def test_delete_device(iota):
    """DELETE → 204, then GET and DELETE are 404 DEVICE_NOT_FOUND."""
    iota.call("POST", "/iot/devices", {"devices": [dust_device("gone")]})
    assert iota.delete("/iot/devices/gone").status_code == 204
    assert_iota_error(iota.get("/iot/devices/gone"), 404, "DEVICE_NOT_FOUND", "gone")
    assert_iota_error(iota.delete("/iot/devices/gone"), 404, "DEVICE_NOT_FOUND")
    assert iota.get("/iot/devices").json() == {"count": 0, "devices": []}


def test_batch_delete(iota):
    """POST /iot/op/delete removes the listed devices; a missing one is 404 but the others are removed."""
    iota.call("POST", "/iot/devices", {"devices": [dust_device("a1", apikey="ka"), dust_device("a2", apikey="ka"),
                                                   dust_device("a3")]})
    removed = iota.call("POST", "/iot/op/delete", {"devices": [{"deviceId": "a1", "apikey": "ka"},
                                                               {"deviceId": "a3"}]})
    assert removed.status_code == 204, removed.text
    assert [d["device_id"] for d in iota.get("/iot/devices").json()["devices"]] == ["a2"]
    assert_iota_error(iota.call("POST", "/iot/op/delete", {"devices": [{"deviceId": "a2"}, {"deviceId": "zz"}]}),
                      404, "DEVICE_NOT_FOUND", "zz")
    assert iota.get("/iot/devices").json()["count"] == 0


def test_duplicate_device_is_409_and_the_batch_is_all_or_nothing(iota):
    """A device id already provisioned (same apikey) is 409 DUPLICATE_DEVICE_ID; nothing of the batch is written."""
    assert iota.call("POST", "/iot/devices", {"devices": [dust_device("dup", apikey="k1")]}).status_code == 201
    clash = iota.call("POST", "/iot/devices", {"devices": [dust_device("fresh"), dust_device("dup", apikey="k1")]})
    assert_iota_error(clash, 409, "DUPLICATE_DEVICE_ID", "dup")
    assert_iota_error(iota.get("/iot/devices/fresh"), 404, "DEVICE_NOT_FOUND")
    assert_iota_error(iota.call("POST", "/iot/devices", {"devices": [dust_device("x"), dust_device("x")]}), 409,
                      "DUPLICATE_DEVICE_ID", "x")
    # the same id with another apikey is another device (doc/api.md: uniqueness is service, path, id and apikey)
    assert iota.call("POST", "/iot/devices", {"devices": [dust_device("dup", apikey="k2")]}).status_code == 201
    assert iota.get("/iot/devices/dup", params={"apikey": "k2"}).json()["apikey"] == "k2"


@pytest.mark.parametrize("body, field", [
    ({"devices": [{"entity_type": "T"}]}, "devices[0].device_id"),
    ({"devices": [{"device_id": ""}]}, "devices[0].device_id"),
    ({"devices": [{"device_id": "has space"}]}, "devices[0].device_id"),
    ({"devices": [{"device_id": "ok"}, {"device_id": 5}]}, "devices[1].device_id"),
    ({"devices": [{"device_id": "ok", "entity_name": "no uri"}]}, "devices[0].entity_name"),
    ({"devices": [{"device_id": "ok", "attributes": [{"object_id": "t"}]}]}, "devices[0].attributes[0].name"),
    ({"devices": [{"device_id": "ok", "attributes": [{"name": "t", "type": 3}]}]}, "devices[0].attributes[0].type"),
    ({"devices": [{"device_id": "ok", "static_attributes": [{"value": 1}]}]}, "devices[0].static_attributes[0].name"),
    ({"devices": [{"device_id": "ok", "commands": {}}]}, "devices[0].commands"),
    ({"devices": [{"device_id": "ok", "timestamp": "often"}]}, "devices[0].timestamp"),
    ({"devices": [{"device_id": "ok", "protocol": 7}]}, "devices[0].protocol"),
    ({"devices": [{"device_id": "ok", "profile": "a/b"}]}, "devices[0].profile"),
    ({"devices": "dust"}, "devices"),
    ({"device": []}, "devices"),
])
def test_invalid_device_bodies_are_400_naming_the_field(iota, body, field):
    """A malformed device is 400 WRONG_SYNTAX naming the field, and nothing is provisioned."""
    assert_iota_error(iota.call("POST", "/iot/devices", body), 400, "WRONG_SYNTAX", field)
    assert iota.get("/iot/devices").json()["count"] == 0


def test_invalid_scope_headers_are_400(middleware):
    """A fiware-service or fiware-servicepath that cannot be a tenant / path is 400 naming the header."""
    with Iota(middleware.url, "bad service!") as bad:
        assert_iota_error(bad.get("/iot/devices"), 400, "WRONG_SYNTAX", "fiware-service")
    with Iota(middleware.url, unique("svc"), "no-slash") as bad:
        assert_iota_error(bad.call("POST", "/iot/devices", {"devices": [{"device_id": "x"}]}), 400, "WRONG_SYNTAX",
                          "fiware-servicepath")


def test_fiware_service_and_servicepath_isolate(middleware):
    """Devices of one fiware-service (tenant) or service path are invisible from another; '/*' lists every path."""
    service = unique("svc")
    with Iota(middleware.url, service, "/north") as north, Iota(middleware.url, service, "/south") as south, \
            Iota(middleware.url, unique("svc"), "/north") as stranger, Iota(middleware.url, service, "/*") as every:
        assert north.call("POST", "/iot/devices", {"devices": [dust_device("n1")]}).status_code == 201
        assert south.call("POST", "/iot/devices", {"devices": [dust_device("s1"), dust_device("n1")]}).status_code == 201
        assert [d["device_id"] for d in north.get("/iot/devices").json()["devices"]] == ["n1"]
        assert south.get("/iot/devices").json()["count"] == 2
        assert north.get("/iot/devices/n1").json()["service_path"] == "/north"
        assert_iota_error(north.get("/iot/devices/s1"), 404, "DEVICE_NOT_FOUND")
        assert_iota_error(stranger.get("/iot/devices/n1"), 404, "DEVICE_NOT_FOUND")
        assert stranger.get("/iot/devices").json() == {"count": 0, "devices": []}
        assert every.get("/iot/devices").json()["count"] == 3
        north.delete("/iot/devices/n1")
        assert south.get("/iot/devices/n1").status_code == 200


def test_missing_fiware_service_is_the_default_tenant(middleware):
    """Without fiware-service the default tenant '' is used; without fiware-servicepath, '/'."""
    device_id = unique("dev")
    with Iota(middleware.url, None, None) as anonymous:
        assert anonymous.call("POST", "/iot/devices", {"devices": [dust_device(device_id)]}).status_code == 201
        device = anonymous.get(f"/iot/devices/{device_id}").json()
        assert device["service"] == "" and device["service_path"] == "/"
        anonymous.delete(f"/iot/devices/{device_id}")


def test_about(iota):
    """GET /iot/about answers like an IoT Agent."""
    about = iota.get("/iot/about").json()
    assert {"libVersion", "port", "baseRoot", "version"} <= set(about)


# ---------------------------------------------------------------- persistence

@pytest.fixture(params=["sqlite", "postgresql"])
def own_store(request, tmp_path):
    """A store URL of this test's own (a SQLite file, or the session's PostgreSQL database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("pg_database")


def test_provisioning_survives_a_restart(own_store, tmp_path):
    """Groups and devices are in the store: a restarted middleware serves them unchanged."""
    service, apikey = unique("svc"), unique("k")
    server = Middleware(own_store, tmp_path)
    try:
        with Iota(server.url, service) as client:
            assert client.call("POST", "/iot/services", {"services": [dust_group(apikey)]}).status_code == 201
            assert client.call("POST", "/iot/devices", {"devices": [dust_device("keep-1")]}).status_code == 201
            before = client.get("/iot/devices/keep-1").json()
    finally:
        server.stop()
    server = Middleware(own_store, tmp_path)
    try:
        with Iota(server.url, service) as client:
            assert client.get("/iot/devices/keep-1").json() == before
            assert client.get("/iot/services").json()["services"][0]["apikey"] == apikey
    finally:
        server.stop()


def test_profile_names_are_checked_against_an_attached_library(tmp_path):
    """With a profile library loaded, an unknown profile is 400 naming the field; a known one is accepted."""
    profiles = Path(__file__).resolve().parents[2] / "device-profiles"
    server = Middleware(f"sqlite:///{tmp_path}/profiles.db", tmp_path, CITYBRIDGE_PROFILES_DIR=str(profiles))
    try:
        with Iota(server.url, unique("svc")) as client:
            assert_iota_error(client.call("POST", "/iot/devices", {"devices": [dust_device("p1", profile="nope")]}),
                              400, "WRONG_SYNTAX", "devices[0].profile")
            assert_iota_error(client.call("POST", "/iot/services",
                                          {"services": [dust_group(unique("k"), profile="nope")]}),
                              400, "WRONG_SYNTAX", "services[0].profile")
            assert client.call("POST", "/iot/devices", {"devices": [dust_device("p1")]}).status_code == 201
            assert_iota_error(client.call("PUT", "/iot/devices/p1", {"profile": "nope"}), 400, "WRONG_SYNTAX",
                              "profile")
    finally:
        server.stop()


# ---------------------------------------------------------------- the pipeline's side, on the middleware's store

async def test_registry_finds_provisioned_devices_with_group_inheritance(iota, middleware):
    """A device provisioned over HTTP is found in-process by (apikey, device_id), group attributes merged in."""
    apikey = unique("k")
    iota.call("POST", "/iot/services", {"services": [dust_group(apikey)]})
    iota.call("POST", "/iot/devices", {"devices": [dust_device("pipe-1")]})
    store = open_store(middleware.store)
    await store.open()
    registry = DeviceRegistry(store)
    await registry.start()
    try:
        device = await registry.find(apikey, "pipe-1")
        assert device is not None
        assert (device.tenant, device.service_path) == (iota.service, "/")
        assert device.entity_name == "urn:ngsi-ld:AirQualityObserved:pipe-1"
        assert device.profile == "dust-portable" and device.transport == "MQTT"
        assert [a["name"] for a in device.attributes] == ["pm10", "pm25", "temperature"]
        assert {a["name"] for a in device.static_attributes} == {"source", "location"}
        assert "cbHost" not in device.extra and "resource" not in device.extra   # group settings, not device fields
        assert await registry.find(apikey, "nobody") is None
        assert await registry.find("other-key", "pipe-1") is None
        assert (await registry.find(None, "pipe-1")).device_id == "pipe-1"
        registry.touch(device, 1_700_000_000.5)
        await registry.flush_seen()
        assert iota.get("/iot/devices/pipe-1").json()["last_seen"] == "2023-11-14T22:13:20.500Z"
    finally:
        await registry.close()
        await store.close()


async def test_autoprovision_from_a_group(iota, middleware):
    """An unknown device of a group that allows it is provisioned (and listed over HTTP); a refusing group raises."""
    open_key, closed_key = unique("k"), unique("k")
    iota.call("POST", "/iot/services", {"services": [dust_group(open_key),
                                                     dust_group(closed_key, autoprovision=False)]})
    store = open_store(middleware.store)
    await store.open()
    registry = DeviceRegistry(store)
    await registry.start()
    try:
        assert await registry.group_for(unique("nokey")) is None
        group = await registry.group_for(open_key, "/iot/json")
        assert group is not None and group["service"] == iota.service
        assert await registry.group_for(open_key, "/other") is None
        device = await registry.autoprovision(group, "newcomer")
        assert device.entity_name == "urn:ngsi-ld:AirQualityObserved:newcomer" and device.apikey == open_key
        assert device.profile == "dust-portable"
        again = await registry.autoprovision(group, "newcomer")   # idempotent (e.g. two processes at once)
        assert again.entity_name == device.entity_name
        assert (await registry.find(open_key, "newcomer")).tenant == iota.service
        listed = iota.get("/iot/devices").json()
        assert [d["device_id"] for d in listed["devices"]] == ["newcomer"]
        with pytest.raises(AutoprovisionRefused, match="autoprovision-refused"):
            await registry.autoprovision(await registry.group_for(closed_key), "intruder")
    finally:
        await registry.close()
        await store.close()


async def test_registry_sees_devices_provisioned_later_through_another_process(iota, middleware):
    """A registry started before the provisioning finds the device (store lookup on a miss) and drops deleted ones."""
    store = open_store(middleware.store)
    await store.open()
    registry = DeviceRegistry(store, refresh_interval=0.2)
    await registry.start()
    try:
        apikey = unique("k")
        iota.call("POST", "/iot/devices", {"devices": [dust_device("late", apikey=apikey)]})
        deadline = time.monotonic() + 5
        device = None
        while device is None and time.monotonic() < deadline:
            device = await registry.find(apikey, "late")
        assert device is not None and device.tenant == iota.service
        iota.delete("/iot/devices/late", params={"apikey": apikey})
        while await registry.find(apikey, "late") is not None:
            assert time.monotonic() < deadline, "the deletion never reached the registry"
            await asyncio.sleep(0.1)
    finally:
        await registry.close()
        await store.close()


# ---------------------------------------------------------------- dead letters and metrics

async def test_dead_letters_are_listed_over_http(middleware):
    """Dead letters written through DeadLetters on the middleware's store are listed, newest first, with count."""
    service = unique("svc")
    store = open_store(middleware.store)
    await store.open()
    letters = DeadLetters(store)
    try:
        device = Device(tenant=service, service_path="/", device_id="dust-x", entity_name="urn:ngsi-ld:A:dust-x",
                        entity_type="A")
        await letters.add(Uplink("mqtt", "10.0.0.5:51234", f"/json/{service}/dust-x/attrs", b"\x00\xffnot json",
                                 1_700_000_000.0), "decode-error: not JSON", device)
        await letters.add(Uplink("coap", "10.0.0.6:5683", "/t", b"{}", 1_700_000_001.0), "unknown-device: no 't'",
                          device)
    finally:
        await letters.close()
        await store.close()
    with Iota(middleware.url, service) as client:
        listed = client.get("/iot/deadletters")
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert body["count"] == 2
        newest, oldest = body["deadletters"]
        assert newest["transport"] == "coap" and newest["reason"] == "unknown-device: no 't'"
        assert oldest["payload_b64"] == "AP9ub3QganNvbg==" and oldest["device_id"] == "dust-x"
        assert oldest["time"] == "2023-11-14T22:13:20.000Z" and oldest["service"] == service
        assert oldest["topic"] == f"/json/{service}/dust-x/attrs" and oldest["address"] == "10.0.0.5:51234"
        page = client.get("/iot/deadletters", params={"limit": 1, "offset": 1}).json()
        assert page["count"] == 2 and page["deadletters"][0]["transport"] == "mqtt"
        assert_iota_error(client.get("/iot/deadletters", params={"limit": "x"}), 400, "WRONG_SYNTAX", "limit")
    with Iota(middleware.url, unique("svc")) as other:
        assert other.get("/iot/deadletters").json() == {"count": 0, "deadletters": []}
    everything = httpx.get(middleware.url + "/iot/deadletters", params={"limit": 1000}).json()
    assert everything["count"] >= 2


def test_metrics_exposition(middleware):
    """GET /metrics is Prometheus text by default and OpenMetrics when asked."""
    text = httpx.get(middleware.url + "/metrics")
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert "# TYPE citybridge_measurements_committed_total counter" in text.text
    assert "# HELP citybridge_uplinks_total" in text.text
    assert "# TYPE citybridge_deadletters_total counter" in text.text
    open_metrics = httpx.get(middleware.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.rstrip().endswith("# EOF")
