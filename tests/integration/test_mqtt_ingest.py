"""MQTT ingest against the real Mosquitto (our configuration): provision → publish → entities, dead letters,
metrics, commands, SIGKILL mid-stream without loss, two workers on one PostgreSQL, the embedded broker."""
from __future__ import annotations

import http.server
import json
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Middleware, free_port

PROFILE = """entity_type: AirQualityObserved
interval: 60
transports:
  mqtt:
    topics: ["city/dust/{device_id}/up"]
codec: {format: json, timestamp: {source: ts, format: epoch_ms}}
attributes:
  - {name: pm10, unitCode: GQ, range: {min: 0, max: 2000}}
  - {name: pm25, unitCode: GQ}
  - {name: temperature, unitCode: CEL}
  - {name: relativeHumidity, source: humidity, unitCode: P1}
  - {name: batteryLevel, source: battery}
  - {name: seq, type: integer}
"""
QUICK = "entity_type: AirQualityObserved\ninterval: 1\ncodec: {format: json}\nattributes:\n  - {name: pm10, unitCode: GQ}\n"


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    """Poll check() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("profiles")
    (folder / "test-dust.yaml").write_text(PROFILE)
    (folder / "test-quick.yaml").write_text(QUICK)
    return folder


def start(store: str, workdir: Path, broker_port: int, profiles: Path, **env) -> Middleware:
    """A middleware ingesting from the broker at broker_port."""
    settings = dict(CITYBRIDGE_MQTT_ENABLED="true", CITYBRIDGE_MQTT_URL=f"mqtt://127.0.0.1:{broker_port}",
                    CITYBRIDGE_PROFILES_DIR=str(profiles),
                    CITYBRIDGE_MQTT_CLIENT_ID=f"test-{uuid.uuid4().hex[:8]}", CITYBRIDGE_MQTT_EMBEDDED="never")
    settings.update(env)
    return Middleware(store, workdir, **settings)


@pytest.fixture(scope="module")
def server(mosquitto, profiles, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mqtt-ingest")
    mw = start(f"sqlite:///{workdir}/store.db", workdir, mosquitto.port, profiles,
               CITYBRIDGE_MAX_PAYLOAD_BYTES="2048")
    yield mw
    mw.stop()


class Publisher:
    """A paho client that publishes QoS-1 messages and waits for the broker's acknowledgements."""

    def __init__(self, port: int, version=mqtt.MQTTv5):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=version)
        self.client.max_inflight_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos = []

    def send(self, topic: str, payload) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.infos.append(self.client.publish(topic, body, qos=1))

    def close(self) -> None:
        for info in self.infos:
            info.wait_for_publish(30)
        self.client.disconnect()
        self.client.loop_stop()


class Scope:
    """One tenant (fiware-service) on a middleware: provisioning and NGSI-LD reads."""

    def __init__(self, url: str):
        self.url = url
        self.tenant = f"t{uuid.uuid4().hex[:10]}"
        self.apikey = f"k{uuid.uuid4().hex[:8]}"
        self.iot = {"fiware-service": self.tenant, "fiware-servicepath": "/"}

    def group(self, **fields) -> None:
        body = {"apikey": self.apikey, "entity_type": "AirQualityObserved", "resource": "", **fields}
        r = httpx.post(self.url + "/iot/services", headers=self.iot, json={"services": [body]}, timeout=30)
        assert r.status_code == 201, r.text

    def devices(self, *devices: dict) -> None:
        for start in range(0, len(devices), 500):
            chunk = [dict({"apikey": self.apikey, "entity_type": "AirQualityObserved"}, **d)
                     for d in devices[start:start + 500]]
            r = httpx.post(self.url + "/iot/devices", headers=self.iot, json={"devices": chunk}, timeout=60)
            assert r.status_code == 201, r.text

    def entity(self, entity_id: str) -> dict | None:
        r = httpx.get(f"{self.url}/ngsi-ld/v1/entities/{entity_id}", headers={"NGSILD-Tenant": self.tenant}, timeout=30)
        return r.json() if r.status_code == 200 else None

    def entities(self, etype: str = "AirQualityObserved", attrs: str = "seq") -> list[dict]:
        out, offset = [], 0
        while True:
            r = httpx.get(f"{self.url}/ngsi-ld/v1/entities", headers={"NGSILD-Tenant": self.tenant}, timeout=60,
                          params={"type": etype, "attrs": attrs, "limit": 1000, "offset": offset})
            if r.status_code != 200:
                return out
            out += r.json()
            if len(r.json()) < 1000:
                return out
            offset += 1000

    def deadletters(self) -> list[dict]:
        r = httpx.get(self.url + "/iot/deadletters", params={"limit": 1000}, timeout=30)
        return r.json()["deadletters"]


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus counter's samples (any labels) on one middleware."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def reading(seq: int, **extra) -> dict:
    return {"pm10": 40 + seq % 50, "pm25": 18.5, "temperature": 21.5, "humidity": 55, "battery": 0.87, "seq": seq,
            "ts": 1_700_000_000_000 + seq, **extra}


# ------------------------------------------------------------------------------------------------ the happy path

def test_measurement_reaches_entity_and_device_and_notifies(server, mosquitto):
    """A provisioned device publishes: the entity has units and observedAt, the Device entity is updated and a
    subscription on the entity fires."""
    scope = Scope(server.url)
    scope.group(profile="test-dust")
    scope.devices({"device_id": "s1", "profile": "test-dust"})
    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        r = httpx.post(server.url + "/ngsi-ld/v1/subscriptions", headers={"NGSILD-Tenant": scope.tenant}, json={
            "type": "Subscription", "entities": [{"type": "AirQualityObserved"}], "watchedAttributes": ["pm10"],
            "notification": {"endpoint": {"uri": f"http://127.0.0.1:{hook.server_address[1]}/n"}}})
        assert r.status_code == 201, r.text
        publisher = Publisher(mosquitto.port)
        publisher.send(f"/{scope.apikey}/s1/attrs", reading(7, pm10=42))
        publisher.close()
        entity = wait_for(lambda: scope.entity("urn:ngsi-ld:AirQualityObserved:s1"), what="the entity")
        assert entity["pm10"]["value"] == 42 and entity["pm10"]["unitCode"] == "GQ"
        assert entity["temperature"]["unitCode"] == "CEL" and entity["relativeHumidity"]["unitCode"] == "P1"
        assert entity["pm10"]["observedAt"] == "2023-11-14T22:13:20.007Z"
        device = wait_for(lambda: scope.entity("urn:ngsi-ld:Device:s1"), what="the Device entity")
        assert device["deviceState"]["value"] == "ok"
        assert device["batteryLevel"]["value"] == 0.87
        assert device["dateLastValueReported"]["value"]["@value"] == "2023-11-14T22:13:20.007Z"
        notification = wait_for(lambda: received, what="a notification")[0]
        assert notification["data"][0]["id"] == "urn:ngsi-ld:AirQualityObserved:s1"
        assert notification["data"][0]["pm10"]["value"] == 42
    finally:
        hook.shutdown()


def test_topic_variants_and_template(server, mosquitto):
    """Without the leading slash, one attribute per topic, and a profile topic template all reach the entity."""
    scope = Scope(server.url)
    scope.group(profile="test-dust")
    scope.devices({"device_id": "v1", "profile": "test-dust"}, {"device_id": "v2", "profile": "test-dust"})
    publisher = Publisher(mosquitto.port)
    publisher.send(f"{scope.apikey}/v1/attrs", reading(1, pm10=11))
    publisher.send("city/dust/v2/up", reading(2, pm10=22))
    publisher.close()
    assert wait_for(lambda: (scope.entity("urn:ngsi-ld:AirQualityObserved:v1") or {}).get("pm10"))["value"] == 11
    assert wait_for(lambda: (scope.entity("urn:ngsi-ld:AirQualityObserved:v2") or {}).get("pm10"))["value"] == 22


def test_bad_payloads_are_dead_lettered_and_counted(server, mosquitto):
    """Not JSON, out of range, too large, unknown device: each is a dead letter with its reason, and counted."""
    scope = Scope(server.url)
    scope.group(profile="test-dust", autoprovision=False)
    scope.devices({"device_id": "b1", "profile": "test-dust"})
    before = metric(server.url, "citybridge_deadletters_total")
    publisher = Publisher(mosquitto.port)
    publisher.send(f"/{scope.apikey}/b1/attrs", b"{not json")
    publisher.send(f"/{scope.apikey}/b1/attrs", reading(1, pm10=99999))
    publisher.send(f"/{scope.apikey}/b1/attrs", b'{"pm10": 1, "pad": "' + b"x" * 4096 + b'"}')
    publisher.send(f"/{scope.apikey}/nobody/attrs", reading(1))
    publisher.send(f"/{scope.apikey}/b1/attrs", reading(5, pm10=55))
    publisher.close()
    assert wait_for(lambda: (scope.entity("urn:ngsi-ld:AirQualityObserved:b1") or {}).get("pm10"))["value"] == 55

    def mine():
        letters = [d for d in scope.deadletters() if f"/{scope.apikey}/" in d["topic"]]
        return letters if len(letters) >= 4 else None
    reasons = sorted(d["reason"].split(":")[0] for d in wait_for(mine, what="4 dead letters"))
    assert reasons == ["decode-error", "decode-error", "payload-too-large", "unknown-device"]
    assert metric(server.url, "citybridge_deadletters_total") >= before + 4
    assert metric(server.url, "citybridge_uplinks_total") >= 5


def test_autoprovisioning(server, mosquitto):
    """An unknown device of a config group that allows it is provisioned and its entity appears."""
    scope = Scope(server.url)
    scope.group(profile="test-dust")
    publisher = Publisher(mosquitto.port)
    publisher.send(f"/{scope.apikey}/auto-1/attrs", reading(3, pm10=33))
    publisher.close()
    assert wait_for(lambda: (scope.entity("urn:ngsi-ld:AirQualityObserved:auto-1") or {}).get("pm10"))["value"] == 33
    r = httpx.get(server.url + "/iot/devices/auto-1", headers=scope.iot)
    assert r.status_code == 200 and r.json()["device_id"] == "auto-1"


def test_unknown_apikey_is_a_dead_letter(server, mosquitto):
    """No device and no config group: dead letter 'unknown-device', nothing written."""
    apikey = f"nokey{uuid.uuid4().hex[:6]}"
    publisher = Publisher(mosquitto.port)
    publisher.send(f"/{apikey}/ghost/attrs", reading(1))
    publisher.close()
    scope = Scope(server.url)
    letter = wait_for(lambda: [d for d in scope.deadletters() if d["topic"] == f"/{apikey}/ghost/attrs"])[0]
    assert letter["reason"].startswith("unknown-device")


def test_silent_device(server, mosquitto):
    """A device that stops reporting for two profile intervals gets deviceState 'silent'."""
    scope = Scope(server.url)
    scope.group(profile="test-quick")
    scope.devices({"device_id": "q1", "profile": "test-quick"})
    publisher = Publisher(mosquitto.port)
    publisher.send(f"/{scope.apikey}/q1/attrs", {"pm10": 5})
    publisher.close()
    wait_for(lambda: scope.entity("urn:ngsi-ld:Device:q1"), what="the Device entity")
    wait_for(lambda: (scope.entity("urn:ngsi-ld:Device:q1") or {}).get("deviceState", {}).get("value") == "silent",
             what="deviceState silent")


def test_command_downlink_and_result(server, mosquitto):
    """Updating a command attribute publishes {cmd: value} on /<apikey>/<id>/cmd; /cmdexe sets status and info."""
    scope = Scope(server.url)
    scope.group()
    scope.devices({"device_id": "lamp1", "commands": [{"name": "switch", "type": "command"}]})
    publisher = Publisher(mosquitto.port)
    publisher.send(f"/{scope.apikey}/lamp1/attrs", {"pm10": 1})
    got = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    listener.connect("127.0.0.1", mosquitto.port)
    listener.subscribe(f"/{scope.apikey}/lamp1/cmd", qos=1)
    listener.loop_start()
    try:
        entity_id = "urn:ngsi-ld:AirQualityObserved:lamp1"
        wait_for(lambda: scope.entity(entity_id), what="the entity")
        r = httpx.post(f"{server.url}/ngsi-ld/v1/entities/{entity_id}/attrs", headers={"NGSILD-Tenant": scope.tenant},
                       json={"switch": {"type": "Property", "value": "on"}})
        assert r.status_code == 204, r.text
        assert wait_for(lambda: got, what="the command")[0] == (f"/{scope.apikey}/lamp1/cmd", {"switch": "on"})
        assert wait_for(lambda: (scope.entity(entity_id) or {}).get("switch_status"))["value"] == "PENDING"
        publisher.send(f"/{scope.apikey}/lamp1/cmdexe", {"switch": "done"})
        assert wait_for(lambda: (scope.entity(entity_id) or {}).get("switch_info"))["value"] == "done"
        assert scope.entity(entity_id)["switch_status"]["value"] == "OK"
    finally:
        listener.loop_stop()
        listener.disconnect()
        publisher.close()


# ------------------------------------------------------------------------------------------------ no loss

def publish_stream(port: int, topics: list[str], done: list, pause_every: int = 200) -> None:
    """Publish one QoS-1 message per topic (seq = index), paced, all acknowledged by the broker."""
    publisher = Publisher(port)
    for n, topic in enumerate(topics):
        publisher.send(topic, reading(n))
        if n % pause_every == pause_every - 1:
            time.sleep(0.05)
    publisher.close()
    done.append(len(topics))


def test_sigkill_mid_stream_loses_nothing(mosquitto, profiles, tmp_path):
    """The middleware is killed (SIGKILL) while a publisher keeps going; after a restart every message is there."""
    store = f"sqlite:///{tmp_path}/store.db"
    client_id = f"kill-{uuid.uuid4().hex[:6]}"
    mw = start(store, tmp_path, mosquitto.port, profiles, CITYBRIDGE_MQTT_CLIENT_ID=client_id)
    try:
        scope = Scope(mw.url)
        scope.group(profile="test-dust")
        total = 3000
        scope.devices(*({"device_id": f"k{n}", "profile": "test-dust"} for n in range(total)))
        topics = [f"/{scope.apikey}/k{n}/attrs" for n in range(total)]
        done: list = []
        feeder = threading.Thread(target=publish_stream, args=(mosquitto.port, topics, done, 50))
        feeder.start()
        wait_for(lambda: len(scope.entities()) >= 300, what="the first entities")
        mw.process.send_signal(signal.SIGKILL)
        mw.process.wait()
        mw.log.close()
        mw = start(store, tmp_path, mosquitto.port, profiles, CITYBRIDGE_MQTT_CLIENT_ID=client_id)
        scope.url = mw.url
        feeder.join(120)
        assert done == [total]
        entities = wait_for(lambda: (lambda e: e if len(e) >= total else None)(scope.entities()), timeout=120,
                            what=f"{total} entities")
        seqs = {e["id"].rsplit(":", 1)[-1]: e["seq"]["value"] for e in entities}
        assert seqs == {f"k{n}": n for n in range(total)}
    finally:
        mw.stop()


@pytest.mark.postgres
def test_two_workers_share_the_load_once(mosquitto, profiles, pg_database, tmp_path):
    """Two processes, one PostgreSQL, one shared subscription group: every message's value is there, and the
    two committed counters add up to exactly what was sent (each message processed once)."""
    group = f"g{uuid.uuid4().hex[:6]}"
    env = dict(CITYBRIDGE_MQTT_SHARED_GROUP=group, CITYBRIDGE_MQTT_CLIENT_ID=f"pair-{uuid.uuid4().hex[:6]}")
    workers = [start(pg_database, tmp_path, mosquitto.port, profiles, **env) for _ in range(2)]
    try:
        scope = Scope(workers[0].url)
        scope.group(profile="test-dust")
        total = 2000
        scope.devices(*({"device_id": f"w{n}", "profile": "test-dust"} for n in range(total)))
        time.sleep(3)  # both workers' registries pick up the devices (they also ask the store on a miss)
        before = [metric(w.url, "citybridge_measurements_committed_total") for w in workers]
        done: list = []
        publish_stream(mosquitto.port, [f"/{scope.apikey}/w{n}/attrs" for n in range(total)], done)

        def committed():
            counts = [metric(w.url, "citybridge_measurements_committed_total") - b for w, b in zip(workers, before)]
            return counts if sum(counts) >= total else None
        counts = wait_for(committed, timeout=120, what="all measurements committed")
        assert sum(counts) == total and all(c > 0 for c in counts), counts
        entities = scope.entities()
        assert {e["id"].rsplit(":", 1)[-1]: e["seq"]["value"] for e in entities} == {f"w{n}": n for n in range(total)}
    finally:
        for w in workers:
            w.stop()


# ------------------------------------------------------------------------------------------------ embedded broker

def test_embedded_broker_when_none_answers(profiles, tmp_path):
    """No broker at the configured port: the middleware starts amqtt there, says so, and a publish arrives."""
    port = free_port()
    mw = start(f"sqlite:///{tmp_path}/store.db", tmp_path, port, profiles, CITYBRIDGE_MQTT_EMBEDDED="auto")
    try:
        assert "embedded broker" in Path(mw.log.name).read_text()
        scope = Scope(mw.url)
        scope.group(profile="test-dust")
        publisher = Publisher(port, version=mqtt.MQTTv311)
        publisher.send(f"/{scope.apikey}/e1/attrs", reading(9, pm10=19))
        publisher.close()
        assert wait_for(lambda: (scope.entity("urn:ngsi-ld:AirQualityObserved:e1") or {}).get("pm10"))["value"] == 19
    finally:
        mw.stop()
