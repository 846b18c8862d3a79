"""The shared store: PostgreSQL through asyncpg; GeoProperty bboxes in a GiST-indexed native `box` (no PostGIS needed).

Writes are set-based (one statement per kind of change, rows passed as arrays through unnest), so a batch of
1,000 entities costs a handful of round trips; every update is guarded by the row version, so several
middleware processes can share one database without losing each other's writes.
"""
from __future__ import annotations

import time

import asyncpg
import orjson

from .base import Candidates, Change, Keep, OutboxRow, Plan, Stored, StatusUpdate, SubscriptionRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants(name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS entities(
    seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL,
    types TEXT[] NOT NULL, doc JSONB NOT NULL, UNIQUE(tenant, id));
CREATE INDEX IF NOT EXISTS entities_types ON entities USING GIN(types);
CREATE TABLE IF NOT EXISTS geo_index(seq BIGINT NOT NULL REFERENCES entities(seq) ON DELETE CASCADE,
    tenant TEXT NOT NULL, attr TEXT NOT NULL, bbox BOX NOT NULL);
CREATE INDEX IF NOT EXISTS geo_index_bbox ON geo_index USING GIST(bbox);
CREATE INDEX IF NOT EXISTS geo_index_seq ON geo_index(seq);
CREATE SEQUENCE IF NOT EXISTS subscription_changes;
CREATE TABLE IF NOT EXISTS subscriptions(created BIGSERIAL, tenant TEXT NOT NULL, id TEXT NOT NULL, doc JSONB NOT NULL,
    changed BIGINT NOT NULL, times_sent BIGINT NOT NULL DEFAULT 0, times_failed BIGINT NOT NULL DEFAULT 0,
    last_notification TEXT, last_success TEXT, last_failure TEXT, delivery_status TEXT, PRIMARY KEY(tenant, id));
CREATE TABLE IF NOT EXISTS outbox(seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, subscription_id TEXT NOT NULL,
    payload BYTEA NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS outbox_subscription ON outbox(tenant, subscription_id, seq);
CREATE TABLE IF NOT EXISTS delivery_leases(tenant TEXT NOT NULL, subscription_id TEXT NOT NULL, owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL, PRIMARY KEY(tenant, subscription_id));
"""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                              schema="pg_catalog")


class PostgresStore:
    """Context store in PostgreSQL, shareable by several middleware processes."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10):
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Create the connection pool and the schema (serialised by an advisory lock)."""
        self.pool = await asyncpg.create_pool(self.dsn, min_size=self.min_size, max_size=self.max_size,
                                              init=_init_connection)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(421337)")
                await conn.execute(SCHEMA)

    async def close(self) -> None:
        """Close the pool."""
        if self.pool is not None:
            await self.pool.close()

    async def tenant_exists(self, tenant: str) -> bool:
        """True once the tenant has had a write."""
        return await self.pool.fetchval("SELECT EXISTS(SELECT 1 FROM tenants WHERE name=$1)", tenant)

    async def get(self, tenant: str, ids: list[str]) -> dict[str, Stored]:
        """The stored entities with these ids."""
        rows = await self.pool.fetch("SELECT id, version, doc FROM entities WHERE tenant=$1 AND id = ANY($2::text[])",
                                     tenant, ids)
        return {row["id"]: Stored(row["doc"], row["version"]) for row in rows}

    async def write(self, tenant: str, changes: list[Change], plan: Plan | None = None) -> list[str]:
        """Apply the changes in one transaction with the outbox rows plan() makes; return ids whose version check failed."""
        inserts = [c for c in changes if c.kind == "insert"]
        updates = [c for c in changes if c.kind == "update"]
        deletes = [c for c in changes if c.kind == "delete"]
        conflicts: list[str] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO tenants(name) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
                geo_rows: list[tuple[int, str, str]] = []
                clear_geo: list[int] = []
                if inserts:
                    rows = await conn.fetch(
                        "INSERT INTO entities(tenant, id, version, types, doc) "
                        "SELECT $1, u.id, 1, string_to_array(u.types, ' '), u.doc "
                        "FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS u(id, types, doc) "
                        "ON CONFLICT DO NOTHING RETURNING id, seq",
                        tenant, [c.id for c in inserts], [" ".join(c.types) for c in inserts],
                        [c.doc for c in inserts])
                    done = {row["id"]: row["seq"] for row in rows}
                    for change in inserts:
                        seq = done.get(change.id)
                        if seq is None:
                            conflicts.append(change.id)
                        else:
                            geo_rows.extend((seq, attr, _box(bbox)) for attr, bbox in change.geo)
                if updates:
                    rows = await conn.fetch(
                        "UPDATE entities e SET version = e.version + 1, types = string_to_array(u.types, ' '), doc = u.doc "
                        "FROM unnest($2::text[], $3::bigint[], $4::text[], $5::jsonb[]) AS u(id, version, types, doc) "
                        "WHERE e.tenant = $1 AND e.id = u.id AND e.version = u.version RETURNING e.id, e.seq",
                        tenant, [c.id for c in updates], [c.version for c in updates],
                        [" ".join(c.types) for c in updates], [c.doc for c in updates])
                    done = {row["id"]: row["seq"] for row in rows}
                    for change in updates:
                        seq = done.get(change.id)
                        if seq is None:
                            conflicts.append(change.id)
                            continue
                        if change.geo != change.old_geo:
                            if change.old_geo:
                                clear_geo.append(seq)
                            geo_rows.extend((seq, attr, _box(bbox)) for attr, bbox in change.geo)
                if deletes:
                    guarded = [c for c in deletes if c.version is not None]
                    free = [c for c in deletes if c.version is None]
                    gone: set[str] = set()
                    if guarded:
                        rows = await conn.fetch(
                            "DELETE FROM entities e USING unnest($2::text[], $3::bigint[]) AS u(id, version) "
                            "WHERE e.tenant=$1 AND e.id=u.id AND e.version=u.version RETURNING e.id",
                            tenant, [c.id for c in guarded], [c.version for c in guarded])
                        gone.update(row["id"] for row in rows)
                    if free:
                        rows = await conn.fetch("DELETE FROM entities WHERE tenant=$1 AND id = ANY($2::text[]) RETURNING id",
                                                tenant, [c.id for c in free])
                        gone.update(row["id"] for row in rows)
                    conflicts.extend(c.id for c in deletes if c.id not in gone)
                if clear_geo:
                    await conn.execute("DELETE FROM geo_index WHERE seq = ANY($1::bigint[])", clear_geo)
                if geo_rows:
                    await conn.execute(
                        "INSERT INTO geo_index(seq, tenant, attr, bbox) "
                        "SELECT u.seq, $1, u.attr, u.bbox::box FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(seq, attr, bbox)",
                        tenant, [r[0] for r in geo_rows], [r[1] for r in geo_rows], [r[2] for r in geo_rows])
                if plan is not None:
                    rows = plan(set(conflicts))
                    if rows:
                        await self._insert_outbox(conn, tenant, rows)
        return conflicts

    @staticmethod
    async def _insert_outbox(conn, tenant: str, rows: list[OutboxRow]) -> None:
        await conn.execute("INSERT INTO outbox(tenant, subscription_id, payload) "
                           "SELECT $1, u.s, u.p FROM unnest($2::text[], $3::bytea[]) AS u(s, p)",
                           tenant, [r.subscription_id for r in rows], [r.payload for r in rows])

    async def query(self, tenant: str, candidates: Candidates, keep: Keep | None = None,
                    stop_after: int | None = None) -> list[dict]:
        """Entities passing the prefilter and keep(), in creation order; stops after stop_after kept ones."""
        clauses = ["e.tenant = $1"]
        params: list = [tenant]
        if candidates.ids is not None:
            params.append(candidates.ids)
            clauses.append(f"e.id = ANY(${len(params)}::text[])")
        if candidates.types is not None:
            params.append(candidates.types)
            clauses.append(f"e.types && ${len(params)}::text[]")
        if candidates.bbox is not None:
            params.append(_box(candidates.bbox))
            params.append(candidates.geo_attr)
            clauses.append(f"e.seq IN (SELECT g.seq FROM geo_index g WHERE g.bbox && ${len(params) - 1}::text::box "
                           f"AND g.attr = ${len(params)} AND g.tenant = $1)")
        sql = f"SELECT doc FROM entities e WHERE {' AND '.join(clauses)} ORDER BY e.seq"
        if keep is None and stop_after is None:
            return [row["doc"] for row in await self.pool.fetch(sql, *params)]
        out: list[dict] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                async for row in conn.cursor(sql, *params, prefetch=500):
                    doc = row["doc"]
                    if keep is None or keep(doc):
                        out.append(doc)
                        if stop_after is not None and len(out) >= stop_after:
                            break
        return out

    async def all_docs(self, tenant: str) -> list[dict]:
        """Every entity of the tenant (for type and attribute discovery)."""
        return await self.query(tenant, Candidates())


    # ---------------------------------------------------------------- subscriptions and their outbox

    async def put_subscription(self, tenant: str, sub_id: str, doc: dict, *, create: bool) -> bool:
        """Create (False if the id exists) or replace (False if it does not) a subscription."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO tenants(name) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
                if create:
                    status = await conn.execute(
                        "INSERT INTO subscriptions(tenant, id, doc, changed) VALUES ($1,$2,$3,nextval('subscription_changes')) "
                        "ON CONFLICT DO NOTHING", tenant, sub_id, doc)
                else:
                    status = await conn.execute(
                        "UPDATE subscriptions SET doc=$3, changed=nextval('subscription_changes') WHERE tenant=$1 AND id=$2",
                        tenant, sub_id, doc)
        return status.endswith(" 1")

    async def get_subscription(self, tenant: str, sub_id: str) -> SubscriptionRecord | None:
        """One subscription with its notification status."""
        row = await self.pool.fetchrow(_SUB_SELECT + " WHERE tenant=$1 AND id=$2", tenant, sub_id)
        return _subscription(row) if row else None

    async def list_subscriptions(self, tenant: str, limit: int, offset: int) -> tuple[list[SubscriptionRecord], int]:
        """A page of a tenant's subscriptions in creation order, and their total."""
        total = await self.pool.fetchval("SELECT count(*) FROM subscriptions WHERE tenant=$1", tenant)
        rows = await self.pool.fetch(_SUB_SELECT + " WHERE tenant=$1 ORDER BY created LIMIT $2 OFFSET $3",
                                     tenant, limit, offset)
        return [_subscription(r) for r in rows], total

    async def all_subscriptions(self) -> list[SubscriptionRecord]:
        """Every subscription of every tenant."""
        return [_subscription(r) for r in await self.pool.fetch(_SUB_SELECT + " ORDER BY created")]

    async def subscriptions_fingerprint(self) -> tuple:
        """Changes whenever any subscription is created, replaced or deleted."""
        row = await self.pool.fetchrow("SELECT count(*), max(changed) FROM subscriptions")
        return tuple(row)

    async def delete_subscription(self, tenant: str, sub_id: str) -> bool:
        """Delete a subscription and its pending notifications."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                status = await conn.execute("DELETE FROM subscriptions WHERE tenant=$1 AND id=$2", tenant, sub_id)
                await conn.execute("DELETE FROM outbox WHERE tenant=$1 AND subscription_id=$2", tenant, sub_id)
        return status.endswith(" 1")

    async def add_outbox(self, tenant: str, rows: list[OutboxRow]) -> None:
        """Queue notifications that no entity change carries (periodic ones)."""
        async with self.pool.acquire() as conn:
            await self._insert_outbox(conn, tenant, rows)

    async def outbox_next(self, tenant: str, sub_id: str, limit: int) -> list[tuple[int, bytes, int]]:
        """The oldest pending notifications of a subscription: (seq, payload, attempts)."""
        rows = await self.pool.fetch("SELECT seq, payload, attempts FROM outbox WHERE tenant=$1 AND subscription_id=$2 "
                                     "ORDER BY seq LIMIT $3", tenant, sub_id, limit)
        return [(r["seq"], r["payload"], r["attempts"]) for r in rows]

    async def outbox_pending(self) -> list[tuple[str, str]]:
        """(tenant, subscription id) of every subscription with pending notifications."""
        rows = await self.pool.fetch("SELECT DISTINCT tenant, subscription_id FROM outbox")
        return [(r["tenant"], r["subscription_id"]) for r in rows]

    async def outbox_settle(self, tenant: str, sub_id: str, done: list[int], retry: tuple[int, int] | None,
                            status: StatusUpdate) -> None:
        """Remove delivered or abandoned rows, count an attempt on a retried row, update the status."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if done:
                    await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", done)
                if retry is not None:
                    await conn.execute("UPDATE outbox SET attempts=$2 WHERE seq=$1", retry[0], retry[1])
                await conn.execute(
                    "UPDATE subscriptions SET times_sent=times_sent+$3, times_failed=times_failed+$4, "
                    "last_notification=coalesce($5, last_notification), last_success=coalesce($6, last_success), "
                    "last_failure=coalesce($7, last_failure), delivery_status=coalesce($8, delivery_status) "
                    "WHERE tenant=$1 AND id=$2", tenant, sub_id, status.sent, status.failed, status.last_notification,
                    status.last_success, status.last_failure, status.status)

    async def acquire_lease(self, tenant: str, sub_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the delivery lease of a subscription; False while another owner holds it."""
        now = time.time()
        status = await self.pool.execute(
            "INSERT INTO delivery_leases(tenant, subscription_id, owner, until) VALUES ($1,$2,$3,$4) "
            "ON CONFLICT(tenant, subscription_id) DO UPDATE SET owner=excluded.owner, until=excluded.until "
            "WHERE delivery_leases.owner=excluded.owner OR delivery_leases.until<$5",
            tenant, sub_id, owner, now + ttl, now)
        return status.endswith(" 1")

    async def release_lease(self, tenant: str, sub_id: str, owner: str) -> None:
        """Give a delivery lease back."""
        await self.pool.execute("DELETE FROM delivery_leases WHERE tenant=$1 AND subscription_id=$2 AND owner=$3",
                                tenant, sub_id, owner)


_SUB_SELECT = ("SELECT tenant, id, doc, times_sent, times_failed, last_notification, last_success, last_failure, "
               "delivery_status FROM subscriptions")


def _subscription(row) -> SubscriptionRecord:
    return SubscriptionRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8])


def _box(bbox: tuple[float, float, float, float]) -> str:
    min_x, min_y, max_x, max_y = bbox
    return f"(({min_x},{min_y}),({max_x},{max_y}))"
