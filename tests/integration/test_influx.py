"""Integration: history forwarded to a real InfluxDB 1.x (Debian's influxd), with InfluxDB and the middleware
stopped mid-stream. Each test runs its own influxd on free ports, on SQLite and on PostgreSQL."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
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
