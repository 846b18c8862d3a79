"""Integration: the bound on the InfluxDB backlog (CITYBRIDGE_INFLUX_MAX_BACKLOG) with a real influxd stopped and
started again, and real Mosquitto: NGSI-LD writes get 503 + Retry-After, MQTT uplinks stay unacknowledged, the
backlog is visible in /metrics, and after recovery everything arrives once."""
from __future__ import annotations

import time
import uuid

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Api, Middleware, assert_problem
from tests.integration.test_influx import EID, Influxd, wait_for
from tests.integration.test_mqtt_ingest import metric

PROFILE = """entity_type: AirQualityObserved
transports:
  mqtt:
    topics: ["city/dust/{device_id}/up"]
codec: {format: json, timestamp: {source: ts, format: epoch_ms}}
attributes:
  - {name: pm10, unitCode: GQ}
"""


@pytest.fixture
def influxd(tmp_path):
    """A private influxd."""
    server = Influxd(tmp_path)
    yield server
    server.stop()


def poll(check, what: str, timeout: float = 90):
    """Poll check() until it is truthy; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def patch(api: Api, value: int) -> httpx.Response:
    """Write a temperature reading observed at minute `value`."""
    return api.send_json("PATCH", f"/entities/{EID}/attrs", {"temperature": {
        "type": "Property", "value": value, "observedAt": f"2026-01-01T{value // 60:02d}:{value % 60:02d}:00Z"}})


def test_backlog_bound_gives_503_holds_mqtt_and_drains_once(influxd, mosquitto, tmp_path):
    """InfluxDB down: writes are accepted up to the bound, then 503 (nothing stored) and MQTT held; the gauges show
    it; InfluxDB back: the backlog drains, writes and the held uplink go through, each point arrives once."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "dust.yaml").write_text(PROFILE)
    middleware = Middleware(f"sqlite:///{tmp_path}/store.db", tmp_path, CITYBRIDGE_INFLUX_URL=influxd.url,
                            CITYBRIDGE_INFLUX_MAX_BACKLOG="20", CITYBRIDGE_MQTT_ENABLED="true",
                            CITYBRIDGE_MQTT_URL=f"mqtt://127.0.0.1:{mosquitto.port}", CITYBRIDGE_MQTT_EMBEDDED="never",
                            CITYBRIDGE_PROFILES_DIR=str(profiles), CITYBRIDGE_MQTT_CLIENT_ID=f"bl-{uuid.uuid4().hex[:8]}")
    api = Api(middleware.url, f"t{uuid.uuid4().hex[:8]}")
    iot = {"fiware-service": api.tenant, "fiware-servicepath": "/"}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        response = httpx.post(middleware.url + "/iot/devices", headers=iot, timeout=30, json={"devices": [
            {"device_id": "dust-1", "apikey": "k1", "entity_type": "AirQualityObserved", "profile": "dust"}]})
        assert response.status_code == 201, response.text
        assert api.post_json("/entities", {"id": EID, "type": "Sensor", "temperature": {
            "type": "Property", "value": 0, "observedAt": "2026-01-01T00:00:00Z"}}).status_code == 201
        wait_for(influxd, 'SELECT temperature FROM "Sensor"', 1)
        assert metric(middleware.url, "citybridge_influx_backpressure") == 0
        influxd.stop()

        accepted, refused = [0], None
        for value in range(1, 500):
            response = patch(api, value)
            if response.status_code == 503:
                refused = response
                break
            assert response.status_code == 204, response.text
            accepted.append(value)
            time.sleep(0.02)
        assert refused is not None, "no 503 after 500 writes with a bound of 20"
        body = assert_problem(refused, 503, "InternalError")
        assert "CITYBRIDGE_INFLUX_MAX_BACKLOG" in body["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(accepted) >= 20
        stored = api.get(f"/entities/{EID}").json()  # reads still work; the refused value was not stored
        assert stored["temperature"]["value"] == accepted[-1]
        assert metric(middleware.url, "citybridge_influx_backlog_rows") >= 20
        assert metric(middleware.url, "citybridge_influx_backlog_oldest_seconds") > 0
        assert metric(middleware.url, "citybridge_influx_backpressure") == 1

        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        client.publish("city/dust/dust-1/up", orjson.dumps({"pm10": 77, "ts": 1_767_225_600_000}), qos=1).wait_for_publish(30)
        poll(lambda: metric(middleware.url, 'citybridge_backpressure_total{edge="mqtt"}') >= 1, "the uplink held back")
        held = api.get("/entities/urn:ngsi-ld:AirQualityObserved:dust-1")
        assert held.status_code == 404 or "pm10" not in held.json()  # not committed, so not acknowledged either

        influxd.start()
        poll(lambda: metric(middleware.url, "citybridge_influx_backpressure") == 0, "the backlog to drain")
        entity = poll(lambda: (r := api.get("/entities/urn:ngsi-ld:AirQualityObserved:dust-1")).status_code == 200
                      and "pm10" in r.json() and r.json(), "the held uplink to commit")
        assert entity["pm10"]["value"] == 77
        after = patch(api, 600)
        assert after.status_code == 204, after.text
        accepted.append(600)
        rows = wait_for(influxd, 'SELECT temperature FROM "Sensor"', len(accepted), timeout=60)
        assert [row["temperature"] for row in rows] == [float(v) for v in accepted]
        wait_for(influxd, 'SELECT pm10 FROM "AirQualityObserved"', 1)
        assert influxd.select('SELECT count(pm10) FROM "AirQualityObserved"')[0]["count"] == 1
    finally:
        client.loop_stop()
        api.close()
        middleware.stop()
