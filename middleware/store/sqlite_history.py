"""The SQLite history layout: one row per (entity, observed time) of a change, its instances packed in one JSON array.

A change of an entity usually writes every attribute it touches at one observedAt, so packing them cuts the rows
(and the scattered index entries, which dominate an SQLite write) by the number of attributes. The index that
temporal queries use is two integers wide: `key` is a 63-bit hash of (tenant, entity id), and readers check the
row's own tenant and entity id, so a collision costs a skipped row, never a wrong answer::

    history_log(seq, key, tenant, entity_id, entity_type, observed_at, points)
        points = [[attr, datasetId, kind, createdAt µs, modifiedAt µs, deleted, instance], ...]
    index history_log(key, observed_at)

Each instance keeps a seq of its own, as with one row per instance: a log row's seq is that of its first point and
the next row starts after its last one (seqs are assigned under the write lock, so they have no gaps). Readers get
HistoryRow objects as before, one per instance.
"""
from __future__ import annotations

import hashlib
import sqlite3
from collections import defaultdict

import orjson

from . import sqlite_write
from .base import HistoryQuery, HistoryRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS history_log(seq INTEGER PRIMARY KEY, key INTEGER NOT NULL, tenant TEXT NOT NULL,
    entity_id TEXT NOT NULL, entity_type TEXT NOT NULL, observed_at INTEGER NOT NULL, points TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_log_key ON history_log(key, observed_at);
"""

_CHUNK = 500
_TIME_POSITION = {"observedAt": None, "createdAt": 3, "modifiedAt": 4}  # where a packed point keeps that time


def entity_key(tenant: str, entity_id: str) -> int:
    """The index key of an entity's history: a signed 63-bit BLAKE2b hash of (tenant, entity id), stable everywhere."""
    digest = hashlib.blake2b(f"{tenant}\0{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def create(conn: sqlite3.Connection) -> None:
    """Create the table and move rows of the earlier one-row-per-instance `history` table, if any."""
    conn.executescript(SCHEMA)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='history'").fetchone():
        _migrate(conn)


def append(conn: sqlite3.Connection, tenant: str, rows: list[HistoryRow]) -> None:
    """Write rows inside the caller's transaction, each instance with its seq, in the order given.

    A run of consecutive rows of one entity, type and observed time is packed into one log row (the recorder
    gives an entity's instances of one change together), so seqs keep the recording order exactly.
    """
    if not rows:
        return
    fragment = orjson.Fragment
    keys: dict[str, int] = {}
    seq = last_seq(conn) + 1  # read under the write lock: no other writer can take the same seqs
    values = []
    points: list = []
    head = rows[0]
    for r in rows:
        if r.observed_at != head.observed_at or r.entity_id != head.entity_id or r.entity_type != head.entity_type:
            values.append(_log_row(seq, tenant, head, points, keys))
            seq += len(points)
            head, points = r, []
        points.append((r.attr, r.dataset_id, r.kind, r.created_at, r.modified_at, r.deleted, fragment(r.instance)))
    values.append(_log_row(seq, tenant, head, points, keys))
    # one statement for the whole list, the points end to end in one BLOB (sqlite_write says why)
    spans, blob = sqlite_write.end_to_end([row.pop() for row in values])
    for row, span in zip(values, spans):
        row.extend(span)
    conn.execute(_INSERT, (tenant, orjson.dumps(values).decode(), blob))


# ?2: [[seq, key, entity id, type, observed_at, start, length], ...]; a row's points are substr(?3, start, length)
_INSERT = ("INSERT INTO history_log(seq, key, tenant, entity_id, entity_type, observed_at, points) "
           "SELECT v.value->>'$[0]', v.value->>'$[1]', ?1, v.value->>'$[2]', v.value->>'$[3]', v.value->>'$[4]', "
           "substr(?3, v.value->>'$[5]', v.value->>'$[6]') FROM json_each(?2) AS v")


def _log_row(seq: int, tenant: str, head: HistoryRow, points: list, keys: dict[str, int]) -> list:
    key = keys.get(head.entity_id)
    if key is None:
        key = keys[head.entity_id] = entity_key(tenant, head.entity_id)
    return [seq, key, head.entity_id, head.entity_type, head.observed_at, orjson.dumps(points)]


def last_seq(conn: sqlite3.Connection) -> int:
    """The seq of the newest instance (the last log row's seq plus its points after the first), 0 when empty."""
    # points are stored as orjson's bytes (a BLOB): cast, since SQLite 3.45+ reads a BLOB given to json_* as JSONB
    row = conn.execute("SELECT seq, json_array_length(CAST(points AS TEXT)) FROM history_log "
                       "ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] + row[1] - 1 if row else 0


def _unpack(seq: int, entity_id: str, entity_type: str, observed_at: int, points: str) -> list[HistoryRow]:
    dumps = orjson.dumps
    return [HistoryRow(entity_id, entity_type, attr, dataset_id, kind, observed_at, created, modified, bool(deleted),
                       dumps(instance), seq + offset)
            for offset, (attr, dataset_id, kind, created, modified, deleted, instance) in enumerate(orjson.loads(points))]


def read(conn: sqlite3.Connection, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
    """The rows of a history query, per (entity, attribute) in time order, at most query.per_attr of each.

    Points are filtered and cut while still decoded lists; only those returned become HistoryRows. lastN of named
    attributes by observedAt reads each entity newest first through the index and stops once it has enough.
    """
    series: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    by_observed = query.timeproperty == "observedAt"  # the indexed column; the other two are checked here
    position = _TIME_POSITION[query.timeproperty]
    start, end, attrs, cap = query.start, query.end, query.attrs, query.per_attr
    early_stop = by_observed and query.newest_first and cap is not None and attrs is not None
    for first in range(0, len(query.entity_ids), _CHUNK):
        wanted = set(query.entity_ids[first:first + _CHUNK])
        owners: dict[int, list[str]] = defaultdict(list)  # key → the wanted entities under it (one, but for collisions)
        for entity_id in wanted:
            owners[entity_key(tenant, entity_id)].append(entity_id)
        keys = sorted(owners)
        clauses = ["key=?"] if early_stop else [f"key IN ({','.join('?' * len(keys))})"]
        bounds: list = []
        if by_observed and start is not None:
            clauses.append("observed_at >= ?")
            bounds.append(start)
        if by_observed and end is not None:
            clauses.append("observed_at < ?")
            bounds.append(end)
        sql = f"SELECT seq, tenant, entity_id, entity_type, observed_at, points FROM history_log WHERE {' AND '.join(clauses)}"
        if early_stop:
            sql += " ORDER BY observed_at DESC, seq DESC"
        for batch in ([key] for key in keys) if early_stop else (keys,):
            for seq, row_tenant, entity_id, entity_type, observed_at, points in conn.execute(sql, [*batch, *bounds]):
                if row_tenant != tenant or entity_id not in wanted:
                    continue  # another entity with the same key
                for offset, point in enumerate(orjson.loads(points)):
                    if attrs is not None and point[0] not in attrs:
                        continue
                    if by_observed:
                        moment = observed_at
                    else:
                        moment = point[position]
                        if start is not None and moment < start or end is not None and moment >= end:
                            continue
                    series[(entity_id, point[0])].append((moment, seq + offset, entity_type, observed_at, point))
                if early_stop and all(len(series.get((owner, attr), ())) >= cap
                                      for owner in owners[batch[0]] for attr in attrs):
                    break  # newer rows came first: the older ones cannot be among the newest `cap`
    out: list[HistoryRow] = []
    dumps = orjson.dumps
    for (entity_id, attr) in sorted(series):
        items = series[(entity_id, attr)]
        items.sort(key=_moment_and_seq, reverse=query.newest_first)
        if cap is not None:
            del items[cap:]
        out.extend(HistoryRow(entity_id, entity_type, attr, point[1], point[2], observed_at, point[3], point[4],
                              bool(point[5]), dumps(point[6]), seq)
                   for _, seq, entity_type, observed_at, point in items)
    return out


def _moment_and_seq(item: tuple) -> tuple[int, int]:
    return item[0], item[1]


def after(conn: sqlite3.Connection, seq: int, limit: int) -> list[tuple[str, HistoryRow]]:
    """(tenant, row) of the instances with a seq above `seq`, oldest first: about `limit` of them, whole log rows."""
    out: list[tuple[str, HistoryRow]] = []
    cursor = conn.execute(
        "SELECT seq, tenant, entity_id, entity_type, observed_at, points FROM history_log WHERE seq >= "
        "(SELECT coalesce(max(seq), 0) FROM history_log WHERE seq <= ?) ORDER BY seq", (seq,))  # from the row holding seq
    for row_seq, tenant, entity_id, entity_type, observed_at, points in cursor:
        out.extend((tenant, row) for row in _unpack(row_seq, entity_id, entity_type, observed_at, points)
                   if row.seq > seq)
        if len(out) >= limit:
            break
    cursor.close()
    return out


def _migrate(conn: sqlite3.Connection) -> None:
    """Move the rows of the one-row-per-instance `history` table (before 2026-12) into the log, keeping their seqs.

    One transaction: a large history holds the write lock for as long as the copy takes (other processes of the
    store wait up to their busy timeout). Another process may have migrated while this one waited for the lock.
    """
    conn.create_function("citybridge_entity_key", 2, entity_key, deterministic=True)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='history'").fetchone():
            conn.execute("COMMIT")  # done by another process meanwhile
            return
        conn.execute(
            "INSERT INTO history_log(seq, key, tenant, entity_id, entity_type, observed_at, points) "
            "SELECT seq, citybridge_entity_key(tenant, entity_id), tenant, entity_id, entity_type, observed_at, "
            "json_array(json_array(attr, dataset_id, kind, created_at, modified_at, "
            "json(CASE WHEN deleted THEN 'true' ELSE 'false' END), json(CAST(instance AS TEXT)))) FROM history "
            "ORDER BY seq")
        conn.execute("DROP TABLE history")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
