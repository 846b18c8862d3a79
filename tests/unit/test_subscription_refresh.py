"""Subscriptions made by another process sharing the store reach this process's index, one change at a time."""
from __future__ import annotations

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
    """A process's own creation is compiled when made and once more at the next look, never at every look."""
    (here, _), _ = two_processes
    tenant = f"t{uuid.uuid4().hex[:8]}"
    core = here.contexts.core
    here.compiled = 0
    await here.create(tenant, _subscription(1), core, None)
    for _ in range(3):
        await here._refresh()
    assert here.compiled == 2
