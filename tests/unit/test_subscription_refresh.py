"""Subscriptions made by another process sharing the store reach this process's index, one change at a time."""
from __future__ import annotations

import asyncio
import sqlite3
import uuid

import orjson
import pytest
import pytest_asyncio

from middleware.context.broker import Broker
from middleware.context.jsonld import ContextResolver
from middleware.store.postgres import PostgresStore
from middleware.store.sqlite import SqliteStore
from middleware.subscriptions.service import SubscriptionService


class CountingService(SubscriptionService):
    """A SubscriptionService that counts how many subscriptions it compiles."""

    compiled = 0

    async def compile(self, tenant, doc):
        """Compile, and count it."""
        self.compiled += 1
        return await super().compile(tenant, doc)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store(request, tmp_path):
    """Where the shared store is: ("sqlite", file) or ("postgresql", DSN)."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "store.db")
    return "postgresql", request.getfixturevalue("pg_database")


@pytest_asyncio.fixture(loop_scope="function")  # the tests' own loop: the asyncpg pool must live on it
async def two_processes(shared_store):
    """Two services, each with its own handle on one store, as two middleware processes sharing it."""
    kind, where = shared_store

    def open_store():
        return SqliteStore(where) if kind == "sqlite" else PostgresStore(where)
    stores = [open_store(), open_store()]
    services = []
    for store in stores:
        await store.open()
        contexts = ContextResolver()
        service = CountingService(store, Broker(store), contexts, refresh_interval=3600)
        await service.start()
        services.append(service)
    yield services, kind
    for service, store in zip(services, stores):
        await service.close()
        await store.close()


def _subscription(n: int, **extra) -> dict:
    return {"id": f"urn:ngsi-ld:Subscription:{n}", "type": "Subscription", "entities": [{"type": "Sensor"}],
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/notify"}}, **extra}


async def test_created_changed_and_deleted_elsewhere_reach_the_index(two_processes):
    (here, there), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    core = there.contexts.core
    await there.create(tenant, _subscription(1, timeInterval=60), core, None)
    await there.create(tenant, _subscription(2, q="pm10>1"), core, None)
    await here._refresh()
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1") is not None
    assert (tenant, "urn:ngsi-ld:Subscription:1") in here.index.periodic
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:2").doc["q"] == "pm10>1"

    await there.update(tenant, "urn:ngsi-ld:Subscription:2", {"q": "pm10>2"}, core)
    await there.delete(tenant, "urn:ngsi-ld:Subscription:1")
    await here._refresh()
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:2").doc["q"] == "pm10>2"
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1") is None
    # the periodic notifications of a subscription deleted elsewhere stop here too
    assert (tenant, "urn:ngsi-ld:Subscription:1") not in here.index.periodic
    assert here.index.per_tenant[tenant] == 1


async def test_a_refresh_compiles_only_the_subscriptions_that_changed(two_processes):
    (here, there), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    core = there.contexts.core
    for n in range(200):
        await there.create(tenant, _subscription(n), core, None)
    await here._refresh()
    assert len([key for key in here.index.all if key[0] == tenant]) == 200
    here.compiled = 0
    await there.create(tenant, _subscription(200), core, None)
    await there.update(tenant, "urn:ngsi-ld:Subscription:7", {"q": "pm10>7"}, core)
    await here._refresh()
    assert here.compiled == 2
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:200") is not None
    await here._refresh()
    assert here.compiled == 2  # nothing changed since the last look: nothing is compiled again


async def test_a_change_committed_after_a_later_stamped_one_is_still_picked_up(two_processes):
    """The stamp is taken before the commit: an update stamped before the newest stamp seen, but committed after
    the last look, is found at the next look (neither the count nor the newest stamp moved)."""
    (here, there), kind = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    core = there.contexts.core
    for n in (1, 2, 3):
        await there.create(tenant, _subscription(n), core, None)
    await here._refresh()
    record = await there.store.get_subscription(tenant, "urn:ngsi-ld:Subscription:1")
    doc = dict(record.doc, q="pm10>9")
    stamps = dict(((t, i), s) for t, i, s in (await there.store.subscription_stamps(-1))[1] if t == tenant)
    # a new stamp for 1, but older than the newest stamp the last look saw (3's)
    late = stamps[(tenant, "urn:ngsi-ld:Subscription:2")]
    if kind == "sqlite":  # a raw write, as a third process would make it
        raw = sqlite3.connect(there.store.path)
        raw.execute("UPDATE subscriptions SET doc=?, changed=? WHERE tenant=? AND id=?",
                    (orjson.dumps(doc), late, tenant, "urn:ngsi-ld:Subscription:1"))
        raw.commit()
        raw.close()
    else:
        await there.store.pool.execute("UPDATE subscriptions SET doc=$1, changed=$2 WHERE tenant=$3 AND id=$4",
                                       doc, late, tenant, "urn:ngsi-ld:Subscription:1")
    await here._refresh()
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1").doc["q"] == "pm10>9"


async def test_own_creations_are_not_compiled_twice_over(two_processes):
    """A process's own creation is compiled when made, and not again when a later look finds it in the store."""
    (here, _), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    core = here.contexts.core
    here.compiled = 0
    await here.create(tenant, _subscription(1), core, None)
    for _ in range(3):
        await here._refresh()
    assert here.compiled == 1


async def test_a_patch_of_geoq_alone_keeps_the_context_q_was_written_with(two_processes):
    """A PATCH expands the members it sets with its own @context; a q it does not set keeps the one it had."""
    (here, _), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    user = {"level": "http://example.org/level"}
    terms = await here.contexts.resolve(user)
    await here.create(tenant, _subscription(1, q="level>3"), terms, user)
    entity = {"id": "urn:ngsi-ld:Sensor:1", "type": ["https://uri.etsi.org/ngsi-ld/default-context/Sensor"],
              "attrs": {"http://example.org/level": [{"type": "Property", "value": 5}],
                        "https://uri.etsi.org/ngsi-ld/location": [
                            {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1, 1]}}]}}
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1").filters(entity)
    geoq = {"georel": "near;maxDistance==1000", "geometry": "Point", "coordinates": [1, 1]}
    await here.update(tenant, "urn:ngsi-ld:Subscription:1", {"geoQ": geoq}, here.contexts.core, None)
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1").filters(entity)  # q still means example.org/level
    here._stamps.clear()
    await here._refresh()  # and so it does when compiled again from the store
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1").filters(entity)


async def test_a_refresh_keeps_the_periodic_schedule_of_a_subscription_it_already_holds(two_processes):
    """Finding this process's own creation in the store does not make its periodic notification due again."""
    (here, _), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    await here.create(tenant, _subscription(1, timeInterval=60), here.contexts.core, None)
    key = (tenant, "urn:ngsi-ld:Subscription:1")
    here._next_periodic[key] = due = 1e12
    await here._refresh()
    assert here._next_periodic.get(key) == due


async def test_a_subscription_deleted_while_a_refresh_compiles_it_stays_out_of_the_index(two_processes):
    (here, there), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    await there.create(tenant, _subscription(1), there.contexts.core, None)
    compile_for_real = here.compile

    async def slow_compile(tenant_, doc):
        await asyncio.sleep(0.2)  # as a remote @context being fetched
        return await compile_for_real(tenant_, doc)
    here.compile = slow_compile

    async def delete_meanwhile():
        await asyncio.sleep(0.05)
        await here.delete(tenant, "urn:ngsi-ld:Subscription:1")
    await asyncio.gather(here._refresh(), delete_meanwhile())
    for _ in range(2):
        await here._refresh()
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1") is None


async def test_a_subscription_stamped_before_the_window_is_found_by_the_count(two_processes):
    """A stamp older than the window (another process's clock stepped back) still reaches the index: the count
    no longer matches, so every stamp is compared."""
    (here, there), kind = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    await there.create(f"{tenant}-other", _subscription(0), there.contexts.core, None)  # stamps move past 1
    await here._refresh()
    here._marks = type(here._marks)((at - 31, stamp) for at, stamp in here._marks)  # the window has passed
    await here._refresh()
    doc = dict(_subscription(1), createdAt="2026-01-01T00:00:00Z", modifiedAt="2026-01-01T00:00:00Z")
    assert await there.store.put_subscription(tenant, doc["id"], doc, create=True)
    if kind == "sqlite":
        raw = sqlite3.connect(there.store.path)
        raw.execute("UPDATE subscriptions SET changed=1 WHERE tenant=?", (tenant,))
        raw.commit()
        raw.close()
    else:
        await there.store.pool.execute("UPDATE subscriptions SET changed=1 WHERE tenant=$1", tenant)
    await here._refresh()
    assert here.index.get(tenant, "urn:ngsi-ld:Subscription:1") is not None
