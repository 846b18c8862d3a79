"""The ingest stage without a network: batching, merging, dead letters, acks after commit, silent devices;
and the MQTT adapter's pure helpers."""
from __future__ import annotations

import time
import uuid

import orjson
import pytest
import pytest_asyncio

from adapters.mqtt import IOTA_TOPICS, Endpoint, claim_client_id, shared
from middleware.codecs import ProfileLibrary
from middleware.context.broker import Broker
from middleware.context.jsonld import ContextResolver
from middleware.devices.ingest import IOTA_TOPIC, Ingest
from middleware.devices.southbound import Profiles, mqtt_filters
from middleware.devices.types import Device, Uplink
from middleware.store import open_store
from middleware.store.base import HistoryQuery

PROFILE = ("entity_type: AirQualityObserved\ninterval: 0.2\ntransports: {mqtt: {topics: ['dust/{device_id}/up']}}\n"
           "codec: {format: json, timestamp: {source: ts, format: epoch_ms}}\nattributes:\n  - {name: pm10, unitCode: GQ}\n  - {name: seq, type: integer}\n")


class Registry:
    """Knows devices d*; everything else is unknown and has no group."""

    def __init__(self):
        self.touched = []

    async def find(self, apikey, device_id):
        if not device_id.startswith("d"):
            return None
        return Device("", "/", device_id, f"urn:ngsi-ld:AirQualityObserved:{device_id}", "AirQualityObserved",
                      apikey="k", profile="dust")

    async def group_for(self, apikey, resource=None):
        return None

    def touch(self, device, when):
        self.touched.append(device.device_id)


class Letters:
    def __init__(self):
        self.letters = []

    async def add(self, uplink, reason, device=None):
        self.letters.append((uplink.topic, reason))


class Recorder:
    """Acks in the order they are called."""

    def __init__(self):
        self.acked = []

    def uplink(self, topic: str, payload, n: int) -> Uplink:
        async def ack():
            self.acked.append(n)
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return Uplink("mqtt", "test", topic, body, time.time(), ack)


async def _parts(tmp_path, url: str):
    (tmp_path / "dust.yaml").write_text(PROFILE)
    store = open_store(url)
    await store.open()
    broker = Broker(store)
    registry, letters = Registry(), Letters()
    ingest = Ingest(broker, registry, Profiles(ProfileLibrary.load(tmp_path).profiles), letters,
                    ContextResolver().core, max_payload=200)
    return ingest, broker, registry, letters


@pytest.fixture
async def parts(tmp_path):
    """The ingest stage on a fresh SQLite store."""
    made = await _parts(tmp_path, f"sqlite:///{tmp_path}/store.db")
    yield made
    await made[1].store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh SQLite file, then the session's PostgreSQL database."""
    return f"sqlite:///{tmp_path}/store.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest_asyncio.fixture(loop_scope="function")  # the test's own loop: the asyncpg pool must live on it
async def both(store_url, tmp_path):
    """The ingest stage on each store, and a device id of its own (the PostgreSQL database is shared)."""
    made = await _parts(tmp_path, store_url)
    yield (*made, "d" + uuid.uuid4().hex[:8])
    await made[1].store.close()


async def run(ingest: Ingest, uplinks: list[Uplink]) -> None:
    await ingest.commit(await ingest.prepare(uplinks))


async def test_one_write_per_entity_and_acks_after_commit(parts):
    """Many readings of one device in a batch become one upsert holding the last; every uplink is acked, in order."""
    ingest, broker, registry, letters = parts
    writes = []
    original = broker.store.write

    async def counting(tenant, changes, plan=None):
        writes.append(len(changes))
        return await original(tenant, changes, plan)
    broker.store.write = counting
    rec = Recorder()
    await run(ingest, [rec.uplink("/k/d1/attrs", {"pm10": n, "seq": n}, n) for n in range(50)])
    assert writes == [2]                                   # the data entity and the Device entity, once
    doc = await broker.retrieve("", "urn:ngsi-ld:AirQualityObserved:d1")
    assert doc["attrs"][ingest.terms.expand("seq")][0]["value"] == 49
    assert rec.acked == list(range(50))
    assert registry.touched.count("d1") == 50 and letters.letters == []


async def test_every_reading_of_a_batch_reaches_the_history(parts):
    """Readings of one device in one batch (one entity write) give one history point each, in arrival order."""
    ingest, broker, registry, letters = parts
    rec = Recorder()
    await run(ingest, [rec.uplink("/k/d1/attrs", {"pm10": n, "seq": n}, n) for n in range(20)])
    rows = await broker.store.history("", HistoryQuery(["urn:ngsi-ld:AirQualityObserved:d1"],
                                                       attrs={ingest.terms.expand("seq")}))
    assert [orjson.loads(row.instance)["value"] for row in rows] == list(range(20))
    assert [row.seq for row in rows] == sorted(row.seq for row in rows) and len({row.seq for row in rows}) == 20


def _values(rows) -> list:
    return [orjson.loads(row.instance)["value"] for row in sorted(rows, key=lambda row: row.observed_at)]


async def test_a_late_reading_goes_to_the_history_only(both):
    """A reading observed before the one the entity holds (two workers, a device's buffer) is acked and kept in the
    history, but the entity keeps the newer values and its dateObserved, changes no version and notifies nobody."""
    ingest, broker, registry, letters, device = both
    rec = Recorder()
    entity_id = f"urn:ngsi-ld:AirQualityObserved:{device}"
    pm10, date = ingest.terms.expand("pm10"), ingest.terms.expand("dateObserved")
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": 2, "ts": 1_700_000_002_000}, 0)])
    before = await broker.store.get("", [entity_id])
    heard = []

    async def listener(tenant, events):
        heard.extend(events)
    broker.listeners.append(listener)
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": 1, "ts": 1_700_000_001_000}, 1)])
    after = await broker.store.get("", [entity_id])
    assert after[entity_id].version == before[entity_id].version
    assert after[entity_id].doc == before[entity_id].doc
    assert after[entity_id].doc["attrs"][pm10][0]["value"] == 2
    assert after[entity_id].doc["attrs"][date][0]["value"]["@value"] == "2023-11-14T22:13:22.000Z"
    assert [new["id"] for _old, new in heard if new["type"][0].endswith("AirQualityObserved")] == []
    rows = await broker.store.history("", HistoryQuery([entity_id], attrs={pm10}))
    assert _values(rows) == [1, 2]
    assert rec.acked == [0, 1] and letters.letters == []


async def test_a_late_reading_still_sets_what_the_entity_lacks(both):
    """Only instances older than the stored ones are held back: an attribute the entity does not have yet is set."""
    ingest, broker, _registry, _letters, device = both
    rec = Recorder()
    entity_id = f"urn:ngsi-ld:AirQualityObserved:{device}"
    pm10, seq, date = (ingest.terms.expand(name) for name in ("pm10", "seq", "dateObserved"))
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": 2, "ts": 1_700_000_002_000}, 0)])
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": 1, "seq": 7, "ts": 1_700_000_001_000}, 1)])
    doc = (await broker.store.get("", [entity_id]))[entity_id].doc
    assert doc["attrs"][pm10][0]["value"] == 2 and doc["attrs"][seq][0]["value"] == 7
    assert doc["attrs"][date][0]["value"]["@value"] == "2023-11-14T22:13:22.000Z"  # of the newest reading
    assert _values(await broker.store.history("", HistoryQuery([entity_id], attrs={pm10}))) == [1, 2]


async def test_readings_out_of_order_in_one_batch_and_at_the_same_time(both):
    """In one batch too the newest observation wins; a reading at the same observedAt replaces the stored one."""
    ingest, broker, _registry, _letters, device = both
    rec = Recorder()
    entity_id = f"urn:ngsi-ld:AirQualityObserved:{device}"
    pm10 = ingest.terms.expand("pm10")
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": n, "ts": ts}, n)
                       for n, ts in ((3, 1_700_000_003_000), (1, 1_700_000_001_000), (2, 1_700_000_002_000))])
    doc = (await broker.store.get("", [entity_id]))[entity_id].doc
    assert doc["attrs"][pm10][0]["value"] == 3
    await run(ingest, [rec.uplink(f"/k/{device}/attrs", {"pm10": 30, "ts": 1_700_000_003_000}, 3)])
    doc = (await broker.store.get("", [entity_id]))[entity_id].doc
    assert doc["attrs"][pm10][0]["value"] == 30
    assert _values(await broker.store.history("", HistoryQuery([entity_id], attrs={pm10}))) == [1, 2, 3, 30]
    assert rec.acked == [3, 1, 2, 3]


async def test_failures_are_dead_letters_and_still_acked(parts):
    """Unknown device, no route, decode error and oversize payloads are dead-lettered; the good one commits."""
    ingest, broker, registry, letters = parts
    rec = Recorder()
    batch = [rec.uplink("/k/x9/attrs", {"pm10": 1}, 0), rec.uplink("no/route", {"pm10": 1}, 1),
             rec.uplink("/k/d2/attrs", b"{oops", 2), rec.uplink("/k/d2/attrs", {"pm10": "x" * 300}, 3),
             rec.uplink("dust/d3/up", {"pm10": 3}, 4)]
    await run(ingest, batch)
    codes = [reason.split(":")[0] for _, reason in letters.letters]
    assert codes == ["unknown-device", "no-route", "decode-error", "payload-too-large"]
    assert rec.acked == [0, 1, 2, 3, 4]
    assert (await broker.retrieve("", "urn:ngsi-ld:AirQualityObserved:d3"))["id"].endswith("d3")


async def test_a_failed_commit_is_retried_before_any_ack(parts):
    """The store refuses twice: nothing is acked until the third try commits."""
    ingest, broker, registry, letters = parts
    original = broker.store.write
    failures = [RuntimeError("disk gone"), RuntimeError("still gone")]

    async def flaky(tenant, changes, plan=None):
        if failures:
            assert rec.acked == []
            raise failures.pop(0)
        return await original(tenant, changes, plan)
    broker.store.write = flaky
    rec = Recorder()
    await run(ingest, [rec.uplink("/k/d4/attrs", {"pm10": 4}, 0)])
    assert failures == [] and rec.acked == [0]


async def test_silent_after_two_intervals(parts):
    """A device whose profile interval passes twice without data is marked silent on its Device entity."""
    ingest, broker, registry, letters = parts
    await run(ingest, [Recorder().uplink("/k/d5/attrs", {"pm10": 5}, 0)])
    assert await ingest.mark_silent() == 0
    time.sleep(0.5)
    assert await ingest.mark_silent() == 1
    doc = await broker.retrieve("", "urn:ngsi-ld:Device:d5")
    assert doc["attrs"][ingest.terms.expand("deviceState")][0]["value"] == "silent"


async def test_batches_fill_up_to_the_limit(parts):
    """submit + the gathering loop: a burst larger than batch_max is split into full batches."""
    ingest, *_ = parts
    ingest.batch_max = 10
    rec = Recorder()
    for n in range(25):
        ingest.submit(rec.uplink("/k/d6/attrs", {"pm10": n}, n))
    sizes = [len(await ingest._next_batch()) for _ in range(3)]
    assert sizes == [10, 10, 5]


def test_iota_topics():
    """The IoT Agent JSON topics, with and without the leading slash."""
    m = IOTA_TOPIC.match("/key/dev-1/attrs")
    assert (m["apikey"], m["device_id"], m["attr"], m["cmdexe"]) == ("key", "dev-1", None, None)
    assert IOTA_TOPIC.match("key/dev-1/attrs/pm10")["attr"] == "pm10"
    assert IOTA_TOPIC.match("/key/dev-1/cmdexe")["cmdexe"] == "cmdexe"
    assert IOTA_TOPIC.match("/key/dev-1/cmd") is None and IOTA_TOPIC.match("$SYS/a/attrs") is None


def test_filters_cover_templates_once():
    """Profile templates become + filters; one already covered by an IoT Agent filter is not added twice."""
    class P:
        def __init__(self, *topics):
            self.mqtt = {"topics": list(topics)}
    filters = mqtt_filters([P("city/dust/{device_id}/up", "{apikey}/{device_id}/attrs")])
    assert filters == [*IOTA_TOPICS, "city/dust/+/up"]
    assert shared("/+/+/attrs", "g1") == "$share/g1//+/+/attrs" and shared("a/b", None) == "a/b"


def test_endpoint_and_client_ids():
    """URLs parse into host, port, TLS and credentials; client ids are unique per process and broker."""
    e = Endpoint.parse("mqtts://user:p%40ss@broker.example:8884")
    assert (e.host, e.port, e.tls, e.username, e.password) == ("broker.example", 8884, True, "user", "p@ss")
    assert Endpoint.parse("mqtt://10.0.0.1").port == 1883
    with pytest.raises(ValueError):
        Endpoint.parse("http://x")
    base = f"unit-{time.time_ns()}"
    assert claim_client_id(base, "h:1") == base
    assert claim_client_id(base, "h:1") == f"{base}-1"
    assert claim_client_id(base, "h:2") == base
