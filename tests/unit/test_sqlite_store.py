"""Unit: the SQLite store's WAL checkpoint thread, its group commit, delivery leases and outbox settlements."""
from __future__ import annotations

import asyncio
import os

from middleware.store.base import Candidates, Change
from middleware.store.sqlite import SqliteStore


async def test_the_checkpoint_thread_copies_the_wal_back_and_stops_on_close(tmp_path):
    """Writes land in the WAL; the thread copies them into the database file; close() joins the thread."""
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    size_before = os.path.getsize(path)
    doc = {"id": "urn:e:1", "type": ["T"], "createdAt": "x", "modifiedAt": "x", "attrs": {"a": [{"type": "Property",
                                                                                                 "value": "v" * 20000}]}}
    await store.write("", [Change("insert", "urn:e:1", doc, None, ["T"], [], [])])
    thread = store._checkpointer._thread
    assert thread.is_alive()
    for _ in range(100):  # the thread runs every 0.25 s; the writer itself would not checkpoint below 8,000 pages
        if os.path.getsize(path) > size_before + 20000:
            break
        await asyncio.sleep(0.05)
    assert os.path.getsize(path) > size_before + 20000  # the 20 kB document is in the database file itself
    await store.close()
    assert not thread.is_alive()


def _doc(entity_id: str, value, lon: float = 127.0) -> dict:
    return {"id": entity_id, "type": ["T"], "createdAt": "x", "modifiedAt": "x",
            "attrs": {"a": [{"type": "Property", "value": value}],
                      "location": [{"type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, 37.0]}}]}}


def _insert(entity_id: str, value, lon: float = 127.0) -> Change:
    return Change("insert", entity_id, _doc(entity_id, value, lon), None, ["T"], [],
                  [("location", (lon, 37.0, lon, 37.0))])


async def test_concurrent_writes_commit_as_one_group_each_with_its_own_conflicts(store):
    """Writes waiting together share a transaction; a stale version conflicts only for its own caller."""
    await store.write("", [_insert("urn:e:0", 0)])
    transactions = []
    original = store._in_transaction
    store._in_transaction = lambda fn: transactions.append(1) or original(fn)
    stale = Change("update", "urn:e:0", _doc("urn:e:0", "stale"), 5, ["T"], ["T"], [], [])
    writes = [store.write("", [_insert(f"urn:e:{i}", i, 127.0 + i / 100)]) for i in range(1, 40)]
    writes.append(store.write("", [stale]))
    writes.append(store.write("", [_insert("urn:e:1", "twice")]))  # same id as an earlier write of the group
    results = await asyncio.gather(*writes)
    assert results[:39] == [[]] * 39
    assert results[39] == ["urn:e:0"]  # version 5 was never read: only this write conflicts
    assert results[40] == ["urn:e:1"]  # applied after the first insert of urn:e:1, in the same transaction
    assert len(transactions) < 10  # 41 writes, a handful of transactions
    stored = await store.get("", [f"urn:e:{i}" for i in range(40)])
    assert sorted(stored) == sorted(f"urn:e:{i}" for i in range(40))
    assert stored["urn:e:1"].doc["attrs"]["a"][0]["value"] == 1 and stored["urn:e:0"].version == 1
    in_box = await store.query("", Candidates(types=["T"], geo_attr="location", bbox=(127.095, 36.9, 127.205, 37.1)))
    assert sorted(d["id"] for d in in_box) == [f"urn:e:{i}" for i in range(10, 21)]


async def test_a_failing_write_in_a_group_fails_alone(store):
    """When a grouped transaction fails, the writes are retried one by one: only the bad one raises."""
    def bad_plan(conflicted):
        raise RuntimeError("planner broke")
    calls: list[int] = []

    def counting_plan(i):
        return lambda conflicted: calls.append(i) or []
    writes = [store.write("", [_insert(f"urn:e:{i}", i)], counting_plan(i)) for i in range(5)]
    writes.insert(2, store.write("", [_insert("urn:e:bad", 0)], bad_plan))
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert isinstance(results[2], RuntimeError)
    assert [r for k, r in enumerate(results) if k != 2] == [[]] * 5
    assert sorted(calls) == [0, 1, 2, 3, 4]  # planned once each: the retry reuses what the group planned
    stored = await store.get("", [f"urn:e:{i}" for i in range(5)] + ["urn:e:bad"])
    assert sorted(stored) == [f"urn:e:{i}" for i in range(5)]  # the bad write was rolled back, the rest kept


async def test_a_write_cancelled_while_waiting_is_not_committed(store):
    """A caller that gives up before its write reaches the writer thread leaves nothing behind."""
    first = asyncio.ensure_future(store.write("", [_insert("urn:e:1", 1)]))
    await asyncio.sleep(0)  # the committer has taken urn:e:1; urn:e:2 waits for the next group
    second = asyncio.ensure_future(store.write("", [_insert("urn:e:2", 2)]))
    await asyncio.sleep(0)
    second.cancel()
    assert await first == []
    await asyncio.sleep(0.05)
    assert second.cancelled()
    assert sorted(await store.get("", ["urn:e:1", "urn:e:2"])) == ["urn:e:1"]


async def test_leases_are_taken_renewed_refused_and_given_back_in_one_round(store):
    keys = [("t", f"urn:ngsi-ld:Subscription:{n}") for n in range(300)]
    assert await store.acquire_leases("a", keys[:200], ttl=60) == set(keys[:200])
    # b gets only the free ones; a renews its own, duplicates in one round are harmless
    assert await store.acquire_leases("b", keys + keys[250:], ttl=60) == set(keys[200:])
    assert await store.acquire_leases("a", keys[:10], ttl=60) == set(keys[:10])
    await store.release_leases("a", keys[:100] + keys[200:210])  # only a's own are given back
    assert await store.acquire_leases("b", keys[:100] + keys[100:110], ttl=60) == set(keys[:100])
    assert await store.acquire_leases("a", keys[200:201], ttl=-1) == set()
    # an expired lease is taken over
    await store.acquire_leases("c", [("t", "x")], ttl=-1)
    assert await store.acquire_leases("d", [("t", "x")], ttl=60) == {("t", "x")}


async def test_a_settlement_removes_its_rows_and_adds_up_each_subscriptions_status(store):
    from middleware.store.base import OutboxRow, Settlement, StatusUpdate
    for n in range(3):
        assert await store.put_subscription("t", f"s{n}", {"id": f"s{n}", "type": "Subscription"}, create=True)
    await store.add_outbox("t", [OutboxRow(f"s{n % 3}", b'{"n": %d}' % n) for n in range(9)])
    rows = {n: await store.outbox_next("t", f"s{n}", 10) for n in range(3)}
    assert [len(r) for r in rows.values()] == [3, 3, 3]
    ok = StatusUpdate(sent=2, last_notification="2026-01-01T00:00:01Z", last_success="2026-01-01T00:00:01Z",
                      status="ok")
    later = StatusUpdate(sent=1, failed=1, last_notification="2026-01-01T00:00:02Z",
                         last_failure="2026-01-01T00:00:02Z", status="failed")
    await store.outbox_settle([
        Settlement("t", "s0", [rows[0][0][0], rows[0][1][0]], None, ok),
        Settlement("t", "s0", [], (rows[0][2][0], 1), later),
        Settlement("t", "s1", [seq for seq, _, _ in rows[1]], None, StatusUpdate(sent=3, status="ok")),
    ])
    assert [(seq, attempts) for seq, _, attempts in await store.outbox_next("t", "s0", 10)] == [(rows[0][2][0], 1)]
    assert await store.outbox_next("t", "s1", 10) == []
    assert len(await store.outbox_next("t", "s2", 10)) == 3
    s0, s1, s2 = [await store.get_subscription("t", f"s{n}") for n in range(3)]
    assert (s0.times_sent, s0.times_failed) == (3, 1)
    assert (s0.last_notification, s0.last_success, s0.last_failure) == (
        "2026-01-01T00:00:02Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z")
    assert s0.status == "failed" and s1.status == "ok" and s1.times_sent == 3
    assert (s2.times_sent, s2.status, s2.last_success) == (0, None, None)


async def test_outbox_seqs_are_never_given_again_and_an_old_outbox_is_migrated(tmp_path):
    """A settlement of deleted rows can never remove another notification: seqs are not reused."""
    import sqlite3
    from middleware.store.base import OutboxRow
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)  # the outbox as earlier versions made it: seq a plain rowid
    old.executescript("CREATE TABLE outbox(seq INTEGER PRIMARY KEY, tenant TEXT NOT NULL, subscription_id TEXT "
                      "NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);")
    old.execute("INSERT INTO outbox VALUES (7, 't', 's', ?, 2)", (b'{"n": 7}',))
    old.commit()
    old.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert [(seq, bytes(p), a) for seq, p, a in await store.outbox_next("t", "s", 10)] == [(7, b'{"n": 7}', 2)]
        await store.put_subscription("t", "s", {"id": "s", "type": "Subscription"}, create=True)
        await store.add_outbox("t", [OutboxRow("s", b"{}")])
        (_, (eight, _p, _a)) = await store.outbox_next("t", "s", 10)
        assert eight == 8
        assert await store.delete_subscription("t", "s")  # its rows go, the highest seq among them
        await store.add_outbox("t", [OutboxRow("other", b"{}")])
        assert [seq for seq, _p, _a in await store.outbox_next("t", "other", 10)] == [9]
    finally:
        await store.close()
    reopened = SqliteStore(path)  # opening again changes nothing
    await reopened.open()
    assert [seq for seq, _p, _a in await reopened.outbox_next("t", "other", 10)] == [9]
    await reopened.close()
