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
from middleware.subscriptions.delivery_process import CLAIMED, NONE, match_feed
from middleware.subscriptions.matcher import FeedPlanner, Planner, SubscriptionIndex, compile_stored
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


@pytest_asyncio.fixture(loop_scope="function")
async def empty(store):
    """The store with an empty change feed (the PostgreSQL database is shared by the session's tests)."""
    while rows := await store.feed_next("", 0.0, 1000):  # every row, as an orphan
        assert await store.feed_claim([row[0] for row in rows], [])
    yield store


def value_of(row) -> int:
    """The temperature of a FeedRow's only new entity."""
    return orjson.loads(row[3])[0][1]["attrs"]["temperature"][0]["value"]


async def test_feed_rows_are_read_by_their_owner_in_order_up_to_another_owners_row(empty):
    """An owner reads its own rows in order, up to the first row another owner is to take; old rows are anyone's."""
    store = empty
    tenant, mine, other = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, uuid.uuid4().hex
    for n, owner in enumerate([mine, mine, other, mine]):
        await write_feed(store, tenant, owner, f"urn:ngsi-ld:Sensor:{tenant}{n}", n)
    own = await store.feed_next(mine, 10.0, 64)
    assert [value_of(row) for row in own] == [0, 1]  # not 3: the other owner's row 2 comes first
    assert own[0][0] < own[1][0] and all(row[1] == tenant and row[2] == "2026-12-06T00:00:00Z" for row in own)
    assert await store.feed_next(other, 10.0, 64) == []  # its row waits behind mine
    assert await store.feed_waiting(other) and not await store.feed_waiting(uuid.uuid4().hex)
    assert len(await store.feed_next(mine, 10.0, 1)) == 1
    assert len(await store.feed_next(mine, 10.0, 64, up_to=own[0][0])) == 1
    nobody = uuid.uuid4().hex
    assert await store.feed_next(nobody, 10.0, 64) == []
    await asyncio.sleep(0.05)
    assert len(await store.feed_next(nobody, 0.01, 64)) == 4  # orphaned: anyone takes them, in order
    assert await store.feed_last() == max(row[0] for row in await store.feed_next(nobody, 0.01, 64))


async def test_a_claim_keeps_the_feeds_order(empty):
    """A claim that would leave an older row behind is refused; once the older row is claimed, it goes through."""
    store = empty
    tenant, first, second = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, uuid.uuid4().hex
    await write_feed(store, tenant, first, f"urn:ngsi-ld:Sensor:{tenant}a", 0)
    await write_feed(store, tenant, second, f"urn:ngsi-ld:Sensor:{tenant}b", 1)
    seqs = [row[0] for row in await store.feed_next("", 0.0, 64)]
    assert not await store.feed_claim(seqs[1:], [])
    assert await store.feed_claim(seqs[:1], []) and await store.feed_claim(seqs[1:], [])


async def test_a_claim_moves_feed_rows_to_the_outbox_once(empty):
    """Claimed rows leave the feed and their outbox rows are queued, for subscriptions that exist; a second claim
    of any of them does nothing."""
    store = empty
    tenant, owner = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    assert await store.put_subscription(tenant, "urn:sub:1", {"id": "urn:sub:1"}, create=True)
    for n in range(3):
        await write_feed(store, tenant, owner, f"urn:ngsi-ld:Sensor:{tenant}{n}", n)
    seqs = [row[0] for row in await store.feed_next(owner, 10.0, 64)]
    rows = [(tenant, OutboxRow("urn:sub:1", b'{"n": %d}' % n)) for n in range(2)]
    rows.append((tenant, OutboxRow("urn:sub:deleted", b"{}")))  # deleted meanwhile: not queued
    assert await store.feed_claim(seqs[:2], rows)
    assert await store.outbox_next(tenant, "urn:sub:deleted", 10) == []
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


async def test_a_conflicting_write_stores_no_feed_row(empty):
    """A write whose version check fails stores no FeedRow for that change."""
    store = empty
    tenant, owner = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await write_feed(store, tenant, owner, "urn:ngsi-ld:Sensor:once", 0)
    again = doc("urn:ngsi-ld:Sensor:once", 1)

    def plan(conflicted):
        return [FeedRow(owner, "now", orjson.dumps([[None, again]]))] if not conflicted else []
    assert await store.write(tenant, [Change("insert", again["id"], again, None, again["type"])], plan) == [again["id"]]
    assert len(await store.feed_next(owner, 10.0, 64)) == 1


async def test_the_feed_planner_keeps_only_changes_a_subscription_may_match():
    """No subscription in the tenant: no row; subscriptions by type: the changes of that type; a subscription found
    by watched attribute only: every change."""
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


class Wakes:
    """A delivery stand-in that records which subscriptions were woken (match_feed's only use of it)."""

    def __init__(self):
        self.woken: list[tuple[str, str]] = []

    def wake(self, tenant: str, sub_id: str) -> None:
        """Record the wake."""
        self.woken.append((tenant, sub_id))


async def test_match_feed_queues_notifications_throttles_across_rows_and_skips_a_broken_row(empty):
    """match_feed plans the rows in order with the delivery process's Planner; a subscription's throttling holds
    across the rows of one claim; a row that cannot be matched is dropped (logged) and the feed goes on."""
    store = empty
    tenant, owner = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    contexts = ContextResolver()
    core = await contexts.resolve(None)
    sub = validate_subscription({"id": "urn:sub:throttled", "type": "Subscription", "entities": [{"type": "Sensor"}],
                                 "throttling": 3600, "notification": {"endpoint": {"uri": "http://127.0.0.1:1/n"}}},
                                core, None, now="2026-12-06T00:00:00Z")
    assert await store.put_subscription(tenant, sub["id"], sub, create=True)
    index = SubscriptionIndex()
    index.add(await compile_stored(contexts, tenant, sub))
    await write_feed(store, tenant, owner, "urn:ngsi-ld:Sensor:first", 1)
    broken = doc("urn:ngsi-ld:Sensor:broken", 2)
    await store.write(tenant, [Change("insert", broken["id"], broken, None, broken["type"])],
                      lambda _c: [FeedRow(owner, "now", b"not json")])
    await write_feed(store, tenant, owner, "urn:ngsi-ld:Sensor:third", 3)
    planner, wakes = Planner(index, defer_throttling=True), Wakes()
    assert await match_feed(store, owner, planner, wakes) == CLAIMED
    assert await match_feed(store, owner, planner, wakes) == NONE
    queued = await store.outbox_next(tenant, sub["id"], 10)
    assert [item["id"] for _seq, payload, _a in queued for item in orjson.loads(payload)["data"]] == \
        ["urn:ngsi-ld:Sensor:first"]  # the third is within the throttling time of the first
    assert wakes.woken == [(tenant, sub["id"])] and index.get(tenant, sub["id"]).last_notified > 0
    await contexts.close()
