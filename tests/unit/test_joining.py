"""Joining queued notifications (middleware/subscriptions/joining.py) and the store's outbox merge, both stores."""
from __future__ import annotations

import uuid

import orjson
import pytest

from middleware.store import open_store
from middleware.store.base import OutboxRow, Settlement, StatusUpdate
from middleware.subscriptions import joining


def _note(*ids: str, notified: str = "2026-01-01T00:00:00Z") -> bytes:
    return orjson.dumps({"id": f"urn:ngsi-ld:Notification:{uuid.uuid4()}", "type": "Notification",
                         "subscriptionId": "urn:s", "notifiedAt": notified,
                         "data": [{"id": i, "type": "T", "v": n} for n, i in enumerate(ids)]})


def _geo(*ids: str) -> bytes:
    return orjson.dumps({"id": "urn:n", "type": "Notification", "subscriptionId": "urn:s", "notifiedAt": "x",
                         "data": {"type": "FeatureCollection",
                                  "features": [{"id": i, "type": "Feature", "geometry": None, "properties": {}}
                                               for i in ids]}})


def _shape(groups: list[list[tuple]]) -> list[list[int]]:
    return [[seq for seq, _payload, _attempts in group] for group in groups]


def test_consecutive_rows_of_distinct_entities_form_one_group():
    rows = [(n, _note(f"urn:e{n}"), 0) for n in range(1, 6)]
    assert _shape(joining.groups(rows, horizon=0)) == [[1, 2, 3, 4, 5]]


def test_a_repeated_entity_starts_a_new_group():
    rows = [(1, _note("urn:a"), 0), (2, _note("urn:b", "urn:c"), 0), (3, _note("urn:c"), 0), (4, _note("urn:a"), 0)]
    assert _shape(joining.groups(rows, horizon=0)) == [[1, 2], [3, 4]]


def test_rows_that_may_have_been_sent_stay_alone():
    # up to the horizon (an earlier owner may have sent them) or already attempted: sent again under their own id
    rows = [(1, _note("urn:a"), 0), (2, _note("urn:b"), 0), (3, _note("urn:c"), 2), (4, _note("urn:d"), 0),
            (5, _note("urn:e"), 0)]
    assert _shape(joining.groups(rows, horizon=2)) == [[1], [2], [3], [4, 5]]


def test_rows_rendered_before_the_subscription_last_changed_stay_alone():
    not_before = joining.rendered_after("2026-01-01T00:00:00.000Z")
    assert not_before == "2026-01-01T00:00:05.000Z"  # the settle time after a subscription change
    rows = [(1, _note("urn:a", notified="2026-01-01T00:00:04.999Z"), 0),
            (2, _note("urn:b", notified="2026-01-01T00:00:04.999Z"), 0),
            (3, _note("urn:c", notified="2026-01-01T00:00:05.000Z"), 0),
            (4, _note("urn:d", notified="2026-01-01T00:00:06.000Z"), 0)]
    assert _shape(joining.groups(rows, horizon=0, not_before=not_before)) == [[1], [2], [3, 4]]
    assert _shape(joining.groups(rows, horizon=0, not_before=joining.rendered_after("garbled"))) == [[1], [2], [3], [4]]
    assert joining.rendered_after(None) is None


def test_shapes_do_not_mix_and_the_size_is_capped():
    rows = [(1, _note("urn:a"), 0), (2, _geo("urn:b"), 0), (3, _geo("urn:c"), 0), (4, _note("urn:d"), 0)]
    assert _shape(joining.groups(rows, horizon=0)) == [[1], [2, 3], [4]]
    big = [(n, _note(*[f"urn:e{n}-{k}" for k in range(200)]), 0) for n in range(1, 8)]
    per_row = len(big[0][1])
    grouped = joining.groups(big, horizon=0)
    assert all(sum(len(p) for _s, p, _a in group) <= joining.MAX_BYTES for group in grouped)
    assert len(grouped) == -(-len(big) // (joining.MAX_BYTES // per_row))


def test_join_keeps_the_entities_in_order_under_a_new_id():
    first, second = _note("urn:a", "urn:b"), _note("urn:c", notified="2026-01-01T00:00:09Z")
    joined = orjson.loads(joining.join([orjson.loads(first), orjson.loads(second)]))
    assert [e["id"] for e in joined["data"]] == ["urn:a", "urn:b", "urn:c"]
    assert joined["id"] not in (orjson.loads(first)["id"], orjson.loads(second)["id"])
    assert joined["id"].startswith("urn:ngsi-ld:Notification:") and joined["type"] == "Notification"
    assert (joined["subscriptionId"], joined["notifiedAt"]) == ("urn:s", "2026-01-01T00:00:09Z")
    geo = orjson.loads(joining.join([orjson.loads(_geo("urn:a")), orjson.loads(_geo("urn:b"))]))
    assert geo["data"]["type"] == "FeatureCollection"
    assert [f["id"] for f in geo["data"]["features"]] == ["urn:a", "urn:b"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The URL of a fresh store of each kind (PostgreSQL: the session's database, its own tenant per test)."""
    return f"sqlite:///{tmp_path}/store.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")


async def test_outbox_merge_replaces_rows_in_place_or_changes_nothing(store_url):
    store = open_store(store_url)
    await store.open()
    try:
        await _merge_checks(store)
    finally:
        await store.close()


async def _merge_checks(store) -> None:
    tenant, sub = f"t{uuid.uuid4().hex[:8]}", "urn:s"
    await store.put_subscription(tenant, sub, {"id": sub, "type": "Subscription"}, create=True)
    assert await store.outbox_last(tenant, sub) == 0
    await store.add_outbox(tenant, [OutboxRow(sub, _note(f"urn:e{n}")) for n in range(6)])
    rows = [(seq, bytes(payload)) for seq, payload, _a in await store.outbox_next(tenant, sub, 10)]
    seqs = [seq for seq, _p in rows]
    assert await store.outbox_last(tenant, sub) == seqs[-1]
    merges = [(rows[0:3], b'{"joined": 1}'), (rows[4:6], b'{"joined": 2}')]
    assert not await store.outbox_merge(tenant, sub, "me", merges)  # no lease: refused
    assert await store.acquire_leases("other", [(tenant, sub)], ttl=60) == {(tenant, sub)}
    assert not await store.outbox_merge(tenant, sub, "me", merges)  # another owner's lease: refused
    await store.release_leases("other", [(tenant, sub)])
    assert await store.acquire_leases("me", [(tenant, sub)], ttl=60) == {(tenant, sub)}
    # a payload that differs from the one read (SQLite may give a deleted row's seq to a new row): refused
    stale = [([(seqs[0], b'{"other": 0}'), rows[1]], b'{"x": 0}')]
    assert not await store.outbox_merge(tenant, sub, "me", stale)
    assert len(await store.outbox_next(tenant, sub, 10)) == 6
    assert await store.outbox_merge(tenant, sub, "me", merges)
    after = [(seq, bytes(p)) for seq, p, _a in await store.outbox_next(tenant, sub, 10)]
    assert after == [(seqs[0], b'{"joined": 1}'), rows[3], (seqs[4], b'{"joined": 2}')]
    # a row that is gone or was attempted: nothing changes
    assert not await store.outbox_merge(tenant, sub, "me", [(rows[0:2], b'{"x": 1}')])
    await store.outbox_settle([Settlement(tenant, sub, [], (seqs[3], 1), StatusUpdate(sent=1, failed=1))])
    assert not await store.outbox_merge(tenant, sub, "me", [([after[0], after[2]], b'{"x": 2}')] +
                                        [([after[1]], b'{"x": 3}')])
    assert [(seq, bytes(p)) for seq, p, _a in await store.outbox_next(tenant, sub, 10)] == after
