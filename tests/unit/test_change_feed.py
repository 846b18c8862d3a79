"""The change feed of both stores (FeedRow, feed_next, feed_claim) and the API process's FeedPlanner."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
import pytest_asyncio

from middleware.context.jsonld import ContextResolver
from middleware.store import open_store
from middleware.store.base import Change, FeedRow, OutboxRow
from middleware.subscriptions.matcher import FeedPlanner, SubscriptionIndex, compile_stored
from middleware.subscriptions.model import validate_subscription

TYPE = "https://uri.etsi.org/ngsi-ld/default-context/Sensor"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Each store kind (a PostgreSQL database of the session, so each test uses tenants of its own)."""
    return f"sqlite:///{tmp_path}/store.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest_asyncio.fixture(loop_scope="function")
async def store(store_url):
    """An open store of each kind."""
    opened = open_store(store_url)
    await opened.open()
    yield opened
    await opened.close()


def doc(entity_id: str, value: int, type_iri: str = TYPE) -> dict:
    """A stored entity document."""
    return {"id": entity_id, "type": [type_iri], "attrs": {"temperature": [{"type": "Property", "value": value}]},
            "createdAt": "2026-12-06T00:00:00Z", "modifiedAt": "2026-12-06T00:00:00Z"}


async def write_feed(store, tenant: str, owner: str, entity_id: str, value: int) -> None:
    """Create an entity with a FeedRow of owner in the same transaction."""
    new = doc(entity_id, value)
    row = FeedRow(owner, "2026-12-06T00:00:00Z", orjson.dumps([[None, new]]))
    conflicts = await store.write(tenant, [Change("insert", entity_id, new, None, new["type"])], lambda _c: [row])
    assert conflicts == []


async def test_feed_rows_are_read_by_their_owner_in_order_and_by_anyone_once_old(store):
    tenant, mine, other = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, uuid.uuid4().hex
    for n in range(3):
        await write_feed(store, tenant, mine if n < 2 else other, f"urn:ngsi-ld:Sensor:{tenant}{n}", n)
    own = [row for row in await store.feed_next(mine, 10.0, 64) if row[1] == tenant]
    assert [orjson.loads(row[3])[0][1]["attrs"]["temperature"][0]["value"] for row in own] == [0, 1]
    assert own[0][0] < own[1][0] and all(row[2] == "2026-12-06T00:00:00Z" for row in own)
    nobody = uuid.uuid4().hex
    assert [row for row in await store.feed_next(nobody, 10.0, 64) if row[1] == tenant] == []
    await asyncio.sleep(0.05)
    assert len([row for row in await store.feed_next(nobody, 0.01, 64) if row[1] == tenant]) == 3  # orphaned
    assert len(await store.feed_next(mine, 10.0, 1)) == 1


async def test_a_claim_moves_feed_rows_to_the_outbox_once(store):
    tenant, owner = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    for n in range(3):
        await write_feed(store, tenant, owner, f"urn:ngsi-ld:Sensor:{tenant}{n}", n)
    seqs = [row[0] for row in await store.feed_next(owner, 10.0, 64)]
    rows = [(tenant, OutboxRow("urn:sub:1", b'{"n": %d}' % n)) for n in range(2)]
    assert await store.feed_claim(seqs[:2], rows)
    assert [bytes(payload) for _seq, payload, _a in await store.outbox_next(tenant, "urn:sub:1", 10)] == \
        [b'{"n": 0}', b'{"n": 1}']
    assert [row[0] for row in await store.feed_next(owner, 10.0, 64)] == seqs[2:]
    # taken already, wholly or in part: nothing is done, and the row not taken stays
    assert not await store.feed_claim(seqs[:2], [(tenant, OutboxRow("urn:sub:1", b"{}"))])
    assert not await store.feed_claim(seqs[1:], [(tenant, OutboxRow("urn:sub:1", b"{}"))])
    assert len(await store.outbox_next(tenant, "urn:sub:1", 10)) == 2
    assert [row[0] for row in await store.feed_next(owner, 10.0, 64)] == seqs[2:]
    assert await store.feed_claim(seqs[2:], [])  # nothing to notify: the row just goes
    assert await store.feed_next(owner, 10.0, 64) == []


async def test_a_conflicting_write_stores_no_feed_row(store):
    tenant, owner = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await write_feed(store, tenant, owner, "urn:ngsi-ld:Sensor:once", 0)
    again = doc("urn:ngsi-ld:Sensor:once", 1)

    def plan(conflicted):
        return [FeedRow(owner, "now", orjson.dumps([[None, again]]))] if not conflicted else []
    assert await store.write(tenant, [Change("insert", again["id"], again, None, again["type"])], plan) == [again["id"]]
    assert len(await store.feed_next(owner, 10.0, 64)) == 1


async def test_the_feed_planner_keeps_only_changes_a_subscription_may_match():
    contexts = ContextResolver()
    index = SubscriptionIndex()
    planner = FeedPlanner(index, "me")
    events = [(None, doc("urn:ngsi-ld:Sensor:a", 1)), (doc("urn:ngsi-ld:Other:b", 1, "urn:Other"), None)]
    assert planner("t", events, "now") == []  # no subscription in the tenant
    core = await contexts.resolve(None)
    sub = validate_subscription({"id": "urn:sub:s", "type": "Subscription", "entities": [{"type": "Sensor"}],
                                 "notification": {"endpoint": {"uri": "http://127.0.0.1:1/n"}}}, core, None,
                                now="2026-12-06T00:00:00Z")
    index.add(await compile_stored(contexts, "t", sub))
    (row,) = planner("t", events, "now")
    assert row.owner == "me" and row.now == "now" and orjson.loads(row.events) == [[None, events[0][1]]]
    assert planner("other tenant", events, "now") == []
    by_attr = validate_subscription({"id": "urn:sub:w", "type": "Subscription", "watchedAttributes": ["temperature"],
                                     "notification": {"endpoint": {"uri": "http://127.0.0.1:1/n"}}}, core, None,
                                    now="2026-12-06T00:00:00Z")
    index.add(await compile_stored(contexts, "t", by_attr))
    (row,) = planner("t", events, "now")
    assert len(orjson.loads(row.events)) == 2  # found by watched attribute: every change is matched
    await contexts.close()
