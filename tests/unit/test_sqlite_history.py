"""Unit: the packed SQLite history log (one row per entity and observed time), its keys and its migration."""
from __future__ import annotations

import asyncio
import sqlite3

import orjson

from middleware.store import sqlite_history
from middleware.store.base import HistoryQuery, HistoryRow
from middleware.store.sqlite import SqliteStore

T = "https://uri.etsi.org/ngsi-ld/default-context/"


def point(entity: str, attr: str, at: int, value, *, dataset: str = "", deleted: bool = False) -> HistoryRow:
    """A history row of one Property instance observed at `at` µs."""
    inst = {"type": "Property", "value": value}
    if dataset:
        inst["datasetId"] = dataset
    return HistoryRow(entity, T + "Sensor", T + attr, dataset, "Property", at, at - 5, at, deleted, orjson.dumps(inst))


def connect(tmp_path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
    return conn


def test_instances_of_one_entity_and_time_share_a_log_row_and_read_back_unpacked(tmp_path):
    """Three instances at one time and one at another give two log rows; reads give the four rows back, per attribute."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    rows = [point("urn:e:1", "a", 100, 1), point("urn:e:1", "b", 100, 2), point("urn:e:1", "a", 100, 3, dataset="urn:d"),
            point("urn:e:1", "a", 200, 4), point("urn:e:2", "a", 100, 5)]
    conn.execute("BEGIN")
    sqlite_history.append(conn, "", rows)
    conn.execute("COMMIT")
    assert conn.execute("SELECT count(*) FROM history_log").fetchone()[0] == 3
    got = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1"]))
    assert [(r.attr[len(T):], r.dataset_id, r.observed_at, orjson.loads(r.instance)["value"]) for r in got] == [
        ("a", "", 100, 1), ("a", "urn:d", 100, 3), ("a", "", 200, 4), ("b", "", 100, 2)]
    assert got[0].created_at == 95 and got[0].entity_type == T + "Sensor" and not got[0].deleted
    newest = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1"], attrs={T + "a"}, newest_first=True, per_attr=1))
    assert [orjson.loads(r.instance)["value"] for r in newest] == [4]
    ranged = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1", "urn:e:2"], start=150, end=250))
    assert [(r.entity_id, r.observed_at) for r in ranged] == [("urn:e:1", 200)]
    by_modified = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1"], timeproperty="createdAt", start=190))
    assert [r.created_at for r in by_modified] == [195]
    assert sorted(r.seq for r in got) == [1, 2, 3, 4]  # every instance has a seq of its own, without gaps
    after = sqlite_history.after(conn, 0, 10)
    assert [(row.seq, row.observed_at) for _, row in after] == [(1, 100), (2, 100), (3, 100), (4, 200), (5, 100)]
    assert [row.seq for _, row in sqlite_history.after(conn, 0, 2)] == [1, 2, 3]  # limit counts instances, rows whole
    assert [row.seq for _, row in sqlite_history.after(conn, 3, 1)] == [4]
    assert [row.seq for _, row in sqlite_history.after(conn, 2, 1)] == [3]  # a seq inside a log row: the rest of it
    assert sqlite_history.after(conn, 5, 10) == []


def test_later_writes_take_the_seqs_after_every_instance_of_earlier_ones(tmp_path):
    """A log row holds its first instance's seq; the next write starts after its last one, without gaps."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    for batch in ([point("urn:e:1", "a", 100, 1), point("urn:e:1", "b", 100, 2), point("urn:e:1", "c", 100, 3)],
                  [point("urn:e:1", "a", 200, 4)], [point("urn:e:2", "a", 300, 5), point("urn:e:2", "b", 300, 6)]):
        conn.execute("BEGIN")
        sqlite_history.append(conn, "", batch)
        conn.execute("COMMIT")
    after = sqlite_history.after(conn, 0, 100)
    assert [(row.seq, orjson.loads(row.instance)["value"]) for _, row in after] == [(n, n) for n in range(1, 7)]
    assert [row.seq for _, row in sqlite_history.after(conn, 3, 100)] == [4, 5, 6]
    assert sqlite_history.last_seq(conn) == 6


def test_tenants_are_kept_apart(tmp_path):
    """The same entity id in two tenants has two histories."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    for tenant, value in (("a", 1), ("b", 2)):
        conn.execute("BEGIN")
        sqlite_history.append(conn, tenant, [point("urn:e:1", "t", 100, value)])
        conn.execute("COMMIT")
    assert [orjson.loads(r.instance)["value"] for r in sqlite_history.read(conn, "b", HistoryQuery(["urn:e:1"]))] == [2]
    assert [tenant for tenant, _ in sqlite_history.after(conn, 0, 10)] == ["a", "b"]


def test_rows_of_another_entity_under_the_same_key_are_not_read(tmp_path, monkeypatch):
    """Keys are hashes: should two entities share one, each still reads only its own history."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    monkeypatch.setattr(sqlite_history, "entity_key", lambda tenant, entity_id: 7)  # every entity collides
    conn.execute("BEGIN")
    sqlite_history.append(conn, "", [point("urn:e:1", "t", 100, 1), point("urn:e:2", "t", 100, 2)])
    sqlite_history.append(conn, "other", [point("urn:e:1", "t", 100, 3)])
    conn.execute("COMMIT")
    assert conn.execute("SELECT DISTINCT key FROM history_log").fetchall() == [(7,)]
    got = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1"]))
    assert [(r.entity_id, orjson.loads(r.instance)["value"]) for r in got] == [("urn:e:1", 1)]


def test_keys_are_stable_63_bit_hashes():
    """The key depends only on tenant and id (the same in every process), fits SQLite's signed 64-bit integer."""
    key = sqlite_history.entity_key("", "urn:ngsi-ld:Sensor:1")
    assert key == sqlite_history.entity_key("", "urn:ngsi-ld:Sensor:1") and 0 <= key < 2 ** 63
    assert key != sqlite_history.entity_key("busan", "urn:ngsi-ld:Sensor:1")


def test_the_one_row_per_instance_table_of_earlier_versions_is_migrated_with_its_cursors(tmp_path):
    """A database with the old `history` table opens with the same history, seqs (so consumers' cursors) kept."""
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        CREATE TABLE history(seq INTEGER PRIMARY KEY, tenant TEXT NOT NULL, entity_id TEXT NOT NULL,
            entity_type TEXT NOT NULL, attr TEXT NOT NULL, dataset_id TEXT NOT NULL, kind TEXT NOT NULL,
            observed_at INTEGER NOT NULL, created_at INTEGER NOT NULL, modified_at INTEGER NOT NULL,
            deleted INTEGER NOT NULL, instance TEXT NOT NULL);
        CREATE TABLE history_cursors(name TEXT PRIMARY KEY, seq INTEGER NOT NULL);""")
    old = [("", "urn:e:1", T + "Sensor", T + "t", "", "Property", 100, 90, 100, 0, '{"type":"Property","value":1}'),
           ("", "urn:e:1", T + "Sensor", T + "t", "", "Property", 200, 90, 200, 1, '{"type":"Property","value":"urn:ngsi-ld:null"}'),
           ("x", "urn:e:2", T + "Sensor", T + "t", "", "Property", 300, 300, 300, 0, '{"type":"Property","value":3}')]
    conn.executemany("INSERT INTO history(seq, tenant, entity_id, entity_type, attr, dataset_id, kind, observed_at, "
                     "created_at, modified_at, deleted, instance) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                     [(seq, *row[:-1], row[-1].encode()) for seq, row in zip((10, 20, 30), old)])  # BLOBs, as written
    conn.execute("INSERT INTO history_cursors VALUES ('influxdb', 20)")
    conn.close()

    async def reopen():
        store = SqliteStore(str(path))
        await store.open()
        try:
            return (await store.history("", HistoryQuery(["urn:e:1"])), await store.get_cursor("influxdb"),
                    await store.history_after(0, 10))
        finally:
            await store.close()

    rows, cursor, after = asyncio.run(reopen())
    assert [(r.observed_at, r.created_at, r.deleted, orjson.loads(r.instance)["value"]) for r in rows] == [
        (100, 90, False, 1), (200, 90, True, "urn:ngsi-ld:null")]
    assert cursor == 20 and [(tenant, row.seq) for tenant, row in after] == [("", 10), ("", 20), ("x", 30)]
    tables = {name for (name,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "history" not in tables


def test_seqs_follow_the_order_rows_were_recorded_in_even_within_one_commit(tmp_path):
    """Two steps of one entity in one commit (b@300 a@500, then a@300): the second step's seqs come after the first's."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    def at(attr, observed, value):  # both steps written at modifiedAt 600: only the seq orders them
        return HistoryRow("urn:e:1", T + "Sensor", T + attr, "", "Property", observed, 100, 600, False,
                          orjson.dumps({"type": "Property", "value": value}))
    rows = [at("b", 300, "b1"), at("a", 500, "a1"), at("a", 300, "a2")]
    conn.execute("BEGIN")
    sqlite_history.append(conn, "", rows)
    conn.execute("COMMIT")
    after = sqlite_history.after(conn, 0, 10)
    assert [(row.seq, orjson.loads(row.instance)["value"]) for _, row in after] == [(1, "b1"), (2, "a1"), (3, "a2")]
    newest = sqlite_history.read(conn, "", HistoryQuery(["urn:e:1"], attrs={T + "a"}, timeproperty="modifiedAt",
                                                        newest_first=True, per_attr=1))
    assert [orjson.loads(r.instance)["value"] for r in newest] == ["a2"]  # the later write of the same modifiedAt


def test_a_migration_another_process_already_did_is_a_no_op(tmp_path):
    """A process that waited for the lock while another migrated finds no old table and leaves the log alone."""
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    conn.execute("BEGIN")
    sqlite_history.append(conn, "", [point("urn:e:1", "t", 100, 1)])
    conn.execute("COMMIT")
    sqlite_history._migrate(conn)  # as if create() had seen the old table just before the other process dropped it
    assert [row.seq for _, row in sqlite_history.after(conn, 0, 10)] == [1]


def test_last_n_of_named_attributes_stops_early_and_equals_the_full_answer(tmp_path):
    """lastN by observedAt with attrs reads newest first and stops; the answer is that of sorting every point."""
    import random
    conn = connect(tmp_path)
    sqlite_history.create(conn)
    rng = random.Random(7)
    written = []
    for step in range(300):  # out-of-order and repeated observed times, one to three attributes per change
        at = rng.randrange(0, 50) * 10
        rows = [point(entity, attr, at, step) for entity in ("urn:e:1", "urn:e:2")
                for attr in rng.sample(["a", "b", "c"], rng.randint(1, 3))]
        conn.execute("BEGIN")
        sqlite_history.append(conn, "", rows)
        conn.execute("COMMIT")
        written.extend(rows)
    seqs = {id(r): n + 1 for n, r in enumerate(written)}  # seqs follow the order rows were appended
    for start, end in ((None, None), (100, 400)):
        query = HistoryQuery(["urn:e:1", "urn:e:2"], attrs={T + "a", T + "b"}, start=start, end=end,
                             newest_first=True, per_attr=4)
        got = [(r.entity_id, r.attr, r.observed_at, r.seq) for r in sqlite_history.read(conn, "", query)]
        expected = []
        for name in sorted({(r.entity_id, r.attr) for r in written if r.attr in query.attrs}):
            points = sorted(((r.observed_at, seqs[id(r)]) for r in written if (r.entity_id, r.attr) == name
                             and (start is None or r.observed_at >= start) and (end is None or r.observed_at < end)),
                            reverse=True)[:4]
            expected.extend((*name, at, seq) for at, seq in points)
        assert got == expected
