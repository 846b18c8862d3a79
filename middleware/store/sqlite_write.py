"""One transaction of entity changes as a handful of set-based SQLite statements.

Python's sqlite3 releases the GIL around every sqlite3_step and has to take it back after each one. Row by row, a
1,000-entity batch made thousands of such steps, and each return waited for the event loop thread to let go of the
GIL (up to the 5 ms switch interval when it was busy parsing the next request): the writer thread spent half its
wall time waiting, and the middleware used one core of two. Here the rows of every table travel to SQLite as one
JSON array and are unpacked there (json_each), so a batch costs a few steps whatever its size, and the SQL work runs
without the GIL while the event loop goes on.

The JSON is passed as TEXT: SQLite 3.45 and later would read a BLOB given to json_each as JSONB.
"""
from __future__ import annotations

import sqlite3

import orjson

from .base import Change

GEO_SLOTS = 256  # R*Tree id of the k-th GeoProperty instance of entity seq: seq * 256 + k (k < 256)

# ?2 is the JSON list of changes, [id, start, length, version, types to index, boxes to index], and ?3 the BLOB of
# their stored documents end to end: a change's document is substr(?3, start, length), so SQLite parses no document
_DOC = "substr(?3, c.value->>'$[1]', c.value->>'$[2]')"
_INSERT_ENTITIES = (f"INSERT INTO entities(tenant, id, version, doc) SELECT ?1, c.value->>'$[0]', 1, {_DOC} "
                    f"FROM json_each(?2) AS c")
# CROSS JOIN fixes the join order (else the planner scans the tenant's entities for each element), and the
# materialised CTE keeps UPDATE ... FROM from being flattened back into that scan
_UPDATE_ENTITIES = (f"WITH u AS MATERIALIZED (SELECT e.seq AS seq, {_DOC} AS doc FROM json_each(?2) AS c "
                    f"CROSS JOIN entities e ON e.tenant=?1 AND e.id=c.value->>'$[0]') "
                    f"UPDATE entities SET version=version+1, doc=u.doc FROM u WHERE entities.seq=u.seq")
# the conflicts: ids already present (for inserts), or missing or at another version than was read (for updates)
_TAKEN = ("SELECT json_group_array(c.value->>'$[0]') FROM json_each(?2) AS c "
          "WHERE EXISTS (SELECT 1 FROM entities e WHERE e.tenant=?1 AND e.id=c.value->>'$[0]')")
_MOVED = ("SELECT json_group_array(c.value->>'$[0]') FROM json_each(?2) AS c LEFT JOIN entities e "
          "ON e.tenant=?1 AND e.id=c.value->>'$[0]' WHERE e.version IS NOT c.value->>'$[3]'")
_INSERT_TYPES = ("INSERT INTO entity_types(tenant, type, seq) SELECT ?1, t.value, e.seq FROM json_each(?2) AS c "
                 "CROSS JOIN entities e ON e.tenant=?1 AND e.id=c.value->>'$[0]' "
                 "CROSS JOIN json_each(c.value, '$[4]') AS t")
# REPLACE: an R*Tree rewrites a slot in place for less than a delete plus an insert
_INSERT_GEO = (f"INSERT OR REPLACE INTO geo_rtree(gid, min_x, max_x, min_y, max_y) "
               f"SELECT e.seq * {GEO_SLOTS} + g.key, g.value->>'$[0]', g.value->>'$[2]', g.value->>'$[1]', "
               f"g.value->>'$[3]' FROM json_each(?2) AS c CROSS JOIN entities e ON e.tenant=?1 "
               f"AND e.id=c.value->>'$[0]' CROSS JOIN json_each(c.value, '$[5]') AS g")
_SEQS = "SELECT json_group_object(id, seq) FROM entities WHERE tenant=?1 AND id IN (SELECT value FROM json_each(?2))"


def _text(rows: list) -> str:
    return orjson.dumps(rows).decode()


def _boxes(geo) -> list:
    return [list(box) for _attr, box in geo[:GEO_SLOTS]]


def end_to_end(parts: list[bytes]) -> tuple[list[tuple[int, int]], bytes]:
    """The parts joined in one BLOB, and each one's (start, length) in it for substr (1-based, in bytes)."""
    spans: list[tuple[int, int]] = []
    start = 1
    for part in parts:
        spans.append((start, len(part)))
        start += len(part)
    return spans, b"".join(parts)


def _packed(changes: list[Change], index_all: bool) -> tuple[list[list], bytes]:
    """The change list and document BLOB of ?2 and ?3; index_all False lists only types and boxes that changed."""
    dumps = orjson.dumps
    spans, docs = end_to_end([dumps(c.doc) for c in changes])
    rows = [[c.id, start, length, c.version,
             c.types if index_all or c.types != c.old_types else [],
             _boxes(c.geo) if index_all or c.geo != c.old_geo else []]
            for c, (start, length) in zip(changes, spans)]
    return rows, docs


def apply(conn: sqlite3.Connection, tenant: str, changes: list[Change]) -> list[str]:
    """Apply the changes inside the caller's transaction; return the ids whose version check failed."""
    inserts = [c for c in changes if c.kind == "insert"]
    updates = [c for c in changes if c.kind == "update"]
    deletes = [c for c in changes if c.kind == "delete"]
    conflicts: list[str] = []
    if inserts:
        conflicts += _insert(conn, tenant, *_packed(inserts, True))
    if updates:
        conflicts += _update(conn, tenant, updates, *_packed(updates, False))
    if deletes:
        conflicts += _delete(conn, tenant, deletes)
    return conflicts


def _insert(conn: sqlite3.Connection, tenant: str, rows: list[list], docs: bytes) -> list[str]:
    payload = _text(rows)
    existing = set(orjson.loads(conn.execute(_TAKEN, (tenant, payload)).fetchone()[0]))
    kept: list[list] = []
    seen: set[str] = set()
    taken: list[str] = []
    for row in rows:  # an id created by another writer since it was read, or listed twice (the second), conflicts
        if row[0] in existing or row[0] in seen:
            taken.append(row[0])
        else:
            seen.add(row[0])
            kept.append(row)
    if taken:
        payload = _text(kept)
    conn.execute(_INSERT_ENTITIES, (tenant, payload, docs))
    conn.execute(_INSERT_TYPES, (tenant, payload))
    if any(row[5] for row in rows):
        conn.execute(_INSERT_GEO, (tenant, payload))
    return taken


def _update(conn: sqlite3.Connection, tenant: str, updates: list[Change], rows: list[list], docs: bytes) -> list[str]:
    payload = _text(rows)
    moved = orjson.loads(conn.execute(_MOVED, (tenant, payload)).fetchone()[0])
    kept = updates
    if moved:  # rare: changed or deleted by another writer since it was read
        lost = set(moved)
        kept = [c for c in updates if c.id not in lost]
        payload = _text([row for row in rows if row[0] not in lost])
    conn.execute(_UPDATE_ENTITIES, (tenant, payload, docs))
    retyped = [c for c in kept if c.types != c.old_types]
    moved_geo = [c for c in kept if c.geo != c.old_geo]
    seqs = _seqs(conn, tenant, [c.id for c in retyped + moved_geo]) if retyped or moved_geo else {}
    if retyped:
        conn.executemany("DELETE FROM entity_types WHERE tenant=? AND type=? AND seq=?",
                         [(tenant, t, seqs[c.id]) for c in retyped for t in c.old_types])
        conn.execute(_INSERT_TYPES, (tenant, payload))
    if moved_geo:
        # the new boxes replace the old ones slot by slot; only surplus old slots are deleted
        surplus = [(seqs[c.id] * GEO_SLOTS + k,) for c in moved_geo
                   for k in range(min(len(c.geo), GEO_SLOTS), min(len(c.old_geo), GEO_SLOTS))]
        if surplus:
            conn.executemany("DELETE FROM geo_rtree WHERE gid=?", surplus)
        conn.execute(_INSERT_GEO, (tenant, payload))
    return moved


def _delete(conn: sqlite3.Connection, tenant: str, deletes: list[Change]) -> list[str]:
    conflicts: list[str] = []
    stale_types: list[tuple] = []
    stale_geo: list[tuple] = []
    for change in deletes:
        query = "DELETE FROM entities WHERE tenant=? AND id=?"
        params: tuple = (tenant, change.id)
        if change.version is not None:
            query += " AND version=?"
            params += (change.version,)
        row = conn.execute(query + " RETURNING seq", params).fetchone()
        if row is None:
            conflicts.append(change.id)
            continue
        seq = row[0]
        stale_types.extend((tenant, t, seq) for t in change.old_types)
        stale_geo.extend((seq * GEO_SLOTS + k,) for k in range(min(len(change.old_geo), GEO_SLOTS)))
    if stale_types:
        conn.executemany("DELETE FROM entity_types WHERE tenant=? AND type=? AND seq=?", stale_types)
    if stale_geo:
        conn.executemany("DELETE FROM geo_rtree WHERE gid=?", stale_geo)
    return conflicts


def _seqs(conn: sqlite3.Connection, tenant: str, ids: list[str]) -> dict[str, int]:
    return orjson.loads(conn.execute(_SEQS, (tenant, _text(ids))).fetchone()[0])
