"""Integration: history forwarded to a real InfluxDB 1.x (Debian's influxd), with InfluxDB and the middleware
stopped mid-stream. Each test runs its own influxd on free ports, on SQLite and on PostgreSQL."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import PG_ADMIN_DSN, Api, Middleware, _pg, free_port

EID = "urn:ngsi-ld:Sensor:influx-1"


class Influxd:
    """An influxd process with its own folders and ports; stop() and start() keep its data."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "influxdb.conf"
        self.config.write_text(
            f'reporting-disabled = true\nbind-address = "127.0.0.1:{free_port()}"\n'
            f'[meta]\n  dir = "{workdir}/meta"\n[data]\n  dir = "{workdir}/data"\n  wal-dir = "{workdir}/wal"\n'
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n')
        self.log = workdir / "influxd.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start influxd and wait for /ping."""
        binary = shutil.which("influxd") or "/usr/bin/influxd"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([binary, "-config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ping", timeout=1).status_code == 204:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("influxd did not start")

    def stop(self) -> None:
        """Stop influxd."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    def select(self, query: str, database: str = "citybridge") -> list[dict]:
        """Rows of an InfluxQL query (epoch µs times) as dicts."""
        reply = httpx.get(self.url + "/query", params={"db": database, "q": query, "epoch": "u"}, timeout=10).json()
        series = reply["results"][0].get("series", [])
        return [dict(zip(s["columns"], values)) | s.get("tags", {}) for s in series for values in s["values"]]


@pytest.fixture
def influxd(tmp_path):
    """A private influxd."""
    server = Influxd(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh store, SQLite or PostgreSQL (a database of its own, so no other test's history is forwarded)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    name = f"citybridge_influx_{uuid.uuid4().hex[:10]}"
    _pg(f"CREATE DATABASE {name}")
    yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    _pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_middleware(store: str, workdir: Path, influxd: Influxd) -> Middleware:
    """A middleware forwarding its history to influxd."""
    return Middleware(store, workdir, CITYBRIDGE_INFLUX_URL=influxd.url, CITYBRIDGE_INFLUX_TAGS="site=busan")


def reading(api: Api, value: float, minute: int, entity_id: str = EID) -> None:
    """Update the sensor's temperature observed at 2026-01-01T00:<minute>."""
    body = {"temperature": {"type": "Property", "value": value,
                            "observedAt": f"2026-01-01T{minute // 60:02d}:{minute % 60:02d}:00Z"}}
    response = api.send_json("PATCH", f"/entities/{entity_id}/attrs", body)
    assert response.status_code == 204, response.text


def wait_for(influxd: Influxd, query: str, count: int, timeout: float = 30) -> list[dict]:
    """Poll until the query returns count rows; return them."""
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        try:
            rows = influxd.select(query)
        except (httpx.HTTPError, KeyError):
            rows = []
        if len(rows) >= count:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(rows)} of {count} points arrived: {rows[-3:]}")


def test_values_tags_and_timestamps_read_back_equal(influxd, store_url, tmp_path):
    """Numbers (as floats), booleans, strings, relationships and GeoProperty (lat/lon) arrive under the entity type."""
    middleware = start_middleware(store_url, tmp_path, influxd)
    api = Api(middleware.url, f"t{uuid.uuid4().hex[:8]}")
    try:
        response = api.post_json("/entities", {
            "id": EID, "type": "Sensor",
            "temperature": {"type": "Property", "value": 21, "observedAt": "2026-01-01T00:00:00Z"},
            "on": {"type": "Property", "value": True, "observedAt": "2026-01-01T00:00:00Z"},
            "status": {"type": "Property", "value": 'say "hi"', "observedAt": "2026-01-01T00:00:00Z"},
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:ana", "observedAt": "2026-01-01T00:00:00Z"},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [129.0756, 35.1796]},
                         "observedAt": "2026-01-01T00:00:00Z"}})
        assert response.status_code == 201, response.text
        reading(api, 21.5, 1)
        rows = wait_for(influxd, 'SELECT * FROM "Sensor"', 2)
        first, second = rows
        assert first["time"] == 1767225600000000 and second["time"] == 1767225660000000
        assert first["temperature"] == 21.0 and second["temperature"] == 21.5
        assert first["on"] is True and first["status"] == 'say "hi"' and first["owner"] == "urn:ngsi-ld:Person:ana"
        assert first["location_lat"] == pytest.approx(35.1796) and first["location_lon"] == pytest.approx(129.0756)
        assert first["entity_id"] == EID and first["tenant"] == api.tenant and first["site"] == "busan"
    finally:
        api.close()
        middleware.stop()


def test_influxdb_down_mid_stream_loses_nothing_and_duplicates_nothing(influxd, store_url, tmp_path):
    """Writes go on while InfluxDB is stopped; after it restarts every point arrives, each once."""
    middleware = start_middleware(store_url, tmp_path, influxd)
    api = Api(middleware.url, f"t{uuid.uuid4().hex[:8]}")
    try:
        response = api.post_json("/entities", {"id": EID, "type": "Sensor", "temperature": {
            "type": "Property", "value": 0, "observedAt": "2026-01-01T00:00:00Z"}})
        assert response.status_code == 201, response.text
        for minute in range(1, 20):
            reading(api, minute, minute)
        wait_for(influxd, 'SELECT temperature FROM "Sensor"', 20)
        influxd.stop()
        for minute in range(20, 60):
            reading(api, minute, minute)
        time.sleep(2)  # the forwarder fails and backs off meanwhile
        influxd.start()
        rows = wait_for(influxd, 'SELECT temperature FROM "Sensor"', 60, timeout=60)
        assert [row["temperature"] for row in rows] == [float(m) for m in range(60)]
        assert influxd.select('SELECT count(temperature) FROM "Sensor"')[0]["count"] == 60
    finally:
        api.close()
        middleware.stop()


def test_points_pending_at_sigkill_arrive_after_restart(influxd, store_url, tmp_path):
    """The middleware killed with SIGKILL while InfluxDB is down: the pending points are sent by the next process."""
    middleware = start_middleware(store_url, tmp_path, influxd)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    api = Api(middleware.url, tenant)
    response = api.post_json("/entities", {"id": EID, "type": "Sensor", "temperature": {
        "type": "Property", "value": 0, "observedAt": "2026-01-01T00:00:00Z"}})
    assert response.status_code == 201, response.text
    wait_for(influxd, 'SELECT temperature FROM "Sensor"', 1)
    influxd.stop()
    for minute in range(1, 30):
        reading(api, minute, minute)
    api.close()
    middleware.process.send_signal(signal.SIGKILL)
    middleware.process.wait(10)
    middleware.log.close()
    influxd.start()
    again = start_middleware(store_url, tmp_path, influxd)
    try:
        rows = wait_for(influxd, 'SELECT temperature FROM "Sensor"', 30, timeout=60)
        assert [row["temperature"] for row in rows] == [float(m) for m in range(30)]
    finally:
        again.stop()


# ------------------------------------------------------------------------------------------------ device → InfluxDB

DUST = """entity_type: AirQualityObserved
transports:
  mqtt:
    topics: ["city/dust/{device_id}/up"]
codec: {format: json, timestamp: {source: ts, format: epoch_ms}}
attributes:
  - {name: pm10, unitCode: GQ}
  - {name: temperature, unitCode: CEL}
"""


def test_device_readings_reach_influxdb_with_the_device_tag(influxd, mosquitto, tmp_path):
    """MQTT device → entity → InfluxDB: values, observedAt from the payload, entity_id, device_id and tenant tags."""
    import paho.mqtt.client as mqtt
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "dust.yaml").write_text(DUST)
    middleware = Middleware(f"sqlite:///{tmp_path}/store.db", tmp_path, CITYBRIDGE_INFLUX_URL=influxd.url,
                            CITYBRIDGE_MQTT_ENABLED="true", CITYBRIDGE_MQTT_URL=f"mqtt://127.0.0.1:{mosquitto.port}",
                            CITYBRIDGE_MQTT_EMBEDDED="never", CITYBRIDGE_PROFILES_DIR=str(profiles),
                            CITYBRIDGE_MQTT_CLIENT_ID=f"influx-{uuid.uuid4().hex[:8]}")
    tenant, apikey = f"t{uuid.uuid4().hex[:8]}", f"k{uuid.uuid4().hex[:8]}"
    iot = {"fiware-service": tenant, "fiware-servicepath": "/"}
    try:
        response = httpx.post(middleware.url + "/iot/devices", headers=iot, timeout=30, json={"devices": [
            {"device_id": "dust-7", "apikey": apikey, "entity_type": "AirQualityObserved", "profile": "dust"}]})
        assert response.status_code == 201, response.text
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        query = 'SELECT pm10, temperature, entity_id, device_id, tenant FROM "AirQualityObserved"'
        for k in range(5):  # a burst: the five readings land in one ingest batch, and each must reach InfluxDB
            client.publish("city/dust/dust-7/up", orjson.dumps(
                {"pm10": 40 + k, "temperature": 20.5 + k, "ts": 1_767_225_600_000 + k * 60_000}), qos=1)
        rows = wait_for(influxd, query, 5)
        client.disconnect()
        client.loop_stop()
        assert [(r["time"], r["pm10"], r["temperature"]) for r in rows] == [
            (1_767_225_600_000_000 + k * 60_000_000, 40.0 + k, 20.5 + k) for k in range(5)]
        assert {(r["entity_id"], r["device_id"], r["tenant"]) for r in rows} == {
            ("urn:ngsi-ld:AirQualityObserved:dust-7", "dust-7", tenant)}
    finally:
        middleware.stop()


# ------------------------------------------------------------------------------------------------ the v2 write API

class VictoriaMetrics:
    """A victoria-metrics process (Debian's package) on a free loopback port: it takes InfluxDB's /api/v2/write.

    Deduplication per series and millisecond (-dedup.minScrapeInterval=1ms) makes it keep one sample per series and
    time, as InfluxDB keeps one point, so "each point once" can be checked the same way.
    """

    def __init__(self, workdir: Path):
        self.binary = shutil.which("victoria-metrics")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start it and wait for /health."""
        with open(self.workdir / "victoria-metrics.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, f"-storageDataPath={self.workdir}/vm-data", f"-httpListenAddr=127.0.0.1:{self.port}",
                 "-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("victoria-metrics did not start")

    def stop(self) -> None:
        """Stop it (data kept)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    def export(self, match: str) -> dict[tuple, list[tuple[int, float]]]:
        """Its own export API: {(metric name, sorted labels): [(time ms, value), ...]} for a series selector."""
        reply = httpx.post(self.url + "/api/v1/export", data={"match[]": match, "start": "0"}, timeout=10)
        out = {}
        for line in reply.text.splitlines():
            item = orjson.loads(line)
            labels = dict(item["metric"])
            name = labels.pop("__name__")
            out[(name, tuple(sorted(labels.items())))] = sorted(zip(item["timestamps"], item["values"]))
        return out


@pytest.fixture
def victoria(tmp_path):
    """A private victoria-metrics; without Debian's package a skip on a developer's machine, a failure in CI."""
    if shutil.which("victoria-metrics") is None:
        missing = "the victoria-metrics binary is missing (apt-get install victoria-metrics; .ci/services does)"
        if os.environ.get("CI"):
            pytest.fail(missing)  # CI installs it: its absence there is a broken setup, not a reason to skip
        pytest.skip(missing)
    server = VictoriaMetrics(tmp_path)
    yield server
    server.stop()


def v2_middleware(store: str, workdir: Path, victoria: VictoriaMetrics) -> Middleware:
    """A middleware writing through influxdb-client's v2 API (org, bucket, token), millisecond precision."""
    return Middleware(store, workdir, CITYBRIDGE_INFLUX_URL=victoria.url, CITYBRIDGE_INFLUX_ORG="city",
                      CITYBRIDGE_INFLUX_BUCKET="history", CITYBRIDGE_INFLUX_TOKEN="secret-token",
                      CITYBRIDGE_INFLUX_PRECISION="ms", CITYBRIDGE_INFLUX_TAGS="site=busan")


def wait_export(victoria: VictoriaMetrics, match: str, count: int, timeout: float = 60) -> dict:
    """Poll the export API until the selected series hold count samples in all; return them."""
    deadline = time.monotonic() + timeout
    found: dict = {}
    while time.monotonic() < deadline:
        found = victoria.export(match)
        if sum(len(samples) for samples in found.values()) >= count:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{sum(len(s) for s in found.values())} of {count} samples arrived: {found}")


def test_v2_write_api_values_tags_and_timestamps(victoria, tmp_path):
    """Through /api/v2/write: numbers, booleans (1/0 there) and GeoProperty lat/lon with their tags and times (ms)."""
    middleware = v2_middleware(f"sqlite:///{tmp_path}/store.db", tmp_path, victoria)
    api = Api(middleware.url, f"t{uuid.uuid4().hex[:8]}")
    try:
        response = api.post_json("/entities", {
            "id": EID, "type": "Sensor",
            "temperature": {"type": "Property", "value": 21, "observedAt": "2026-01-01T00:00:00.123Z"},
            "on": {"type": "Property", "value": True, "observedAt": "2026-01-01T00:00:00.123Z"},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [129.0756, 35.1796]},
                         "observedAt": "2026-01-01T00:00:00.123Z"}})
        assert response.status_code == 201, response.text
        reading(api, 21.5, 1)
        found = wait_export(victoria, '{__name__=~"Sensor_.*"}', 5)
        labels = (("entity_id", EID), ("site", "busan"), ("tenant", api.tenant))
        assert found[("Sensor_temperature", labels)] == [(1767225600123, 21.0), (1767225660000, 21.5)]
        assert found[("Sensor_on", labels)] == [(1767225600123, 1.0)]
        ((_, lat),) = found[("Sensor_location_lat", labels)]
        ((_, lon),) = found[("Sensor_location_lon", labels)]
        assert lat == pytest.approx(35.1796) and lon == pytest.approx(129.0756)
    finally:
        api.close()
        middleware.stop()


def test_v2_server_down_mid_stream_every_point_once(victoria, tmp_path):
    """The v2 server stopped while writes go on: after it restarts every point has arrived, each once."""
    middleware = v2_middleware(f"sqlite:///{tmp_path}/store.db", tmp_path, victoria)
    api = Api(middleware.url, f"t{uuid.uuid4().hex[:8]}")
    match = '{__name__="Sensor_temperature"}'
    try:
        response = api.post_json("/entities", {"id": EID, "type": "Sensor", "temperature": {
            "type": "Property", "value": 0, "observedAt": "2026-01-01T00:00:00Z"}})
        assert response.status_code == 201, response.text
        for minute in range(1, 10):
            reading(api, minute, minute)
        wait_export(victoria, match, 10)
        victoria.stop()
        for minute in range(10, 30):
            reading(api, minute, minute)
        victoria.start()
        (samples,) = wait_export(victoria, match, 30).values()
        assert samples == [(1767225600000 + m * 60_000, float(m)) for m in range(30)]
    finally:
        api.close()
        middleware.stop()
