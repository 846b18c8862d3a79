"""The SQLite history layout: one row per (entity, observed time) of a change, its instances packed in one JSON array.

A change of an entity usually writes every attribute it touches at one observedAt, so packing them cuts the rows
(and the scattered index entries, which dominate an SQLite write) by the number of attributes. The entity is
named by a small integer key, so the index that temporal queries use is two integers wide::

    history_keys(key, tenant, entity_id)                     one per entity that ever had history
    history_log(seq, key, entity_type, observed_at, points)  points = [[attr, datasetId, kind, createdAt µs,
                                                                        modifiedAt µs, deleted, instance], ...]
    index history_log(key, observed_at)

Each instance keeps a seq of its own, as with one row per instance: a log row's seq is that of its first point and
the next row starts after its last one (seqs are assigned under the write lock, so they have no gaps). Readers get
HistoryRow objects as before, one per instance.
"""
from __future__ import annotations

import sqlite3
from collections import defaultdict

import orjson

from .base import HistoryQuery, HistoryRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS history_keys(key INTEGER PRIMARY KEY, tenant TEXT NOT NULL, entity_id TEXT NOT NULL,
    UNIQUE(tenant, entity_id));
CREATE TABLE IF NOT EXISTS history_log(seq INTEGER PRIMARY KEY, key INTEGER NOT NULL, entity_type TEXT NOT NULL,
    observed_at INTEGER NOT NULL, points TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_log_key ON history_log(key, observed_at);
"""

_CHUNK = 500
_KEY_CACHE_LIMIT = 1_000_000  # entity keys remembered by the writer (about 150 bytes each)
_TIME_OF = {"observedAt": lambda row: row.observed_at, "createdAt": lambda row: row.created_at,
            "modifiedAt": lambda row: row.modified_at}


class HistoryLog:
    """Appends and reads the packed history of one SQLite database (the writer's key cache lives here)."""

    def __init__(self):
        self._keys: dict[tuple[str, str], int] = {}

    def create(self, conn: sqlite3.Connection) -> None:
        """Create the tables and move rows of the earlier one-row-per-instance `history` table, if any."""
        conn.executescript(SCHEMA)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='history'").fetchone():
            _migrate(conn)

    def append(self, conn: sqlite3.Connection, tenant: str, rows: list[HistoryRow]) -> dict[tuple[str, str], int]:
        """Write rows inside the caller's transaction; return the entity keys it created (commit() adopts them)."""
        if not rows:
            return {}
        groups: dict[tuple[str, int], list] = {}
        types: dict[tuple[str, int], str] = {}
        fragment = orjson.Fragment
        for r in rows:
            slot = (r.entity_id, r.observed_at)
            points = groups.get(slot)
            if points is None:
                points = groups[slot] = []
                types[slot] = r.entity_type
            points.append((r.attr, r.dataset_id, r.kind, r.created_at, r.modified_at, r.deleted, fragment(r.instance)))
        keys, created = self._keys_for(conn, tenant, {entity_id for entity_id, _ in groups})
        dumps = orjson.dumps
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM history_log").fetchone()[0] + 1
        values = []
        for (entity_id, observed), points in groups.items():
            values.append((seq, keys[entity_id], types[(entity_id, observed)], observed, dumps(points)))
            seq += len(points)
        conn.executemany("INSERT INTO history_log(seq, key, entity_type, observed_at, points) VALUES (?,?,?,?,?)", values)
        return created

    def commit(self, tenant: str, created: dict[tuple[str, str], int]) -> None:
        """Remember the keys a committed transaction created (never those of a rolled-back one)."""
        if len(self._keys) + len(created) > _KEY_CACHE_LIMIT:
            self._keys.clear()
        self._keys.update(created)

    def _keys_for(self, conn: sqlite3.Connection, tenant: str,
                  entity_ids: set[str]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        known = self._keys
        keys: dict[str, int] = {}
        missing: list[str] = []
        for entity_id in entity_ids:
            key = known.get((tenant, entity_id))
            if key is None:
                missing.append(entity_id)
            else:
                keys[entity_id] = key
        created: dict[tuple[str, str], int] = {}
        if missing:
            conn.executemany("INSERT OR IGNORE INTO history_keys(tenant, entity_id) VALUES (?,?)",
                             [(tenant, entity_id) for entity_id in missing])
            for entity_id, key in _select_keys(conn, tenant, missing):
                keys[entity_id] = key
                created[(tenant, entity_id)] = key
        return keys, created


def _select_keys(conn: sqlite3.Connection, tenant: str, entity_ids: list[str]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for start in range(0, len(entity_ids), _CHUNK):
        chunk = entity_ids[start:start + _CHUNK]
        found.extend(conn.execute(f"SELECT entity_id, key FROM history_keys WHERE tenant=? AND entity_id IN "
                                  f"({','.join('?' * len(chunk))})", (tenant, *chunk)))
    return found


def _unpack(seq: int, entity_id: str, entity_type: str, observed_at: int, points: str) -> list[HistoryRow]:
    dumps = orjson.dumps
    return [HistoryRow(entity_id, entity_type, attr, dataset_id, kind, observed_at, created, modified, bool(deleted),
                       dumps(instance), seq + offset)
            for offset, (attr, dataset_id, kind, created, modified, deleted, instance) in enumerate(orjson.loads(points))]


def read(conn: sqlite3.Connection, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
    """The rows of a history query, per (entity, attribute) in time order, at most query.per_attr of each."""
    series: dict[tuple[str, str], list[HistoryRow]] = defaultdict(list)
    by_observed = query.timeproperty == "observedAt"  # the indexed column; the other two are checked here
    time_of = _TIME_OF[query.timeproperty]
    for start in range(0, len(query.entity_ids), _CHUNK):
        names = dict((key, entity_id) for entity_id, key in
                     _select_keys(conn, tenant, query.entity_ids[start:start + _CHUNK]))
        if not names:
            continue
        clauses = [f"key IN ({','.join('?' * len(names))})"]
        params: list = list(names)
        if by_observed and query.start is not None:
            clauses.append("observed_at >= ?")
            params.append(query.start)
        if by_observed and query.end is not None:
            clauses.append("observed_at < ?")
            params.append(query.end)
        for seq, key, entity_type, observed_at, points in conn.execute(
                f"SELECT seq, key, entity_type, observed_at, points FROM history_log WHERE {' AND '.join(clauses)}",
                params):
            for row in _unpack(seq, names[key], entity_type, observed_at, points):
                if query.attrs is not None and row.attr not in query.attrs:
                    continue
                if not by_observed:
                    moment = time_of(row)
                    if query.start is not None and moment < query.start or query.end is not None and moment >= query.end:
                        continue
                series[(row.entity_id, row.attr)].append(row)
    out: list[HistoryRow] = []
    for name in sorted(series):
        rows = series[name]
        rows.sort(key=lambda r: (time_of(r), r.seq), reverse=query.newest_first)  # stable: packed order kept
        out.extend(rows if query.per_attr is None else rows[:query.per_attr])
    return out


def after(conn: sqlite3.Connection, seq: int, limit: int) -> list[tuple[str, HistoryRow]]:
    """(tenant, row) of the instances with a seq above `seq`, oldest first, from at most `limit` log rows."""
    out: list[tuple[str, HistoryRow]] = []
    taken = 0
    for row_seq, tenant, entity_id, entity_type, observed_at, points in conn.execute(
            "SELECT h.seq, k.tenant, k.entity_id, h.entity_type, h.observed_at, h.points FROM history_log h "
            "JOIN history_keys k ON k.key=h.key WHERE h.seq >= (SELECT coalesce(max(seq), 0) FROM history_log "
            "WHERE seq <= ?) ORDER BY h.seq LIMIT ?", (seq, limit + 1)):  # from the log row holding `seq`, if any
        rows = [(tenant, row) for row in _unpack(row_seq, entity_id, entity_type, observed_at, points) if row.seq > seq]
        if rows:
            if taken == limit:
                break
            out.extend(rows)
            taken += 1
    return out


def _migrate(conn: sqlite3.Connection) -> None:
    """Move the rows of the one-row-per-instance `history` table (before 2026-12) into the log, keeping their seqs."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR IGNORE INTO history_keys(tenant, entity_id) SELECT DISTINCT tenant, entity_id FROM history")
        conn.execute(
            "INSERT INTO history_log(seq, key, entity_type, observed_at, points) "
            "SELECT h.seq, k.key, h.entity_type, h.observed_at, json_array(json_array(h.attr, h.dataset_id, h.kind, "
            "h.created_at, h.modified_at, json(CASE WHEN h.deleted THEN 'true' ELSE 'false' END), json(h.instance))) "
            "FROM history h JOIN history_keys k ON k.tenant=h.tenant AND k.entity_id=h.entity_id ORDER BY h.seq")
        conn.execute("DROP TABLE history")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
