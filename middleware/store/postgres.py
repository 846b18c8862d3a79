"""The shared store: PostgreSQL through asyncpg; GeoProperty bboxes in a GiST-indexed native `box` (no PostGIS needed).

Writes are set-based (one statement per kind of change, rows passed as arrays through unnest), so a batch of
1,000 entities costs a handful of round trips; every update is guarded by the row version, so several
middleware processes can share one database without losing each other's writes.
"""
from __future__ import annotations

import re

import asyncpg
import orjson

from .base import Candidates, Change, Keep, OutboxRow, Plan, Settlement, Stored, SubscriptionRecord
from .base import DeadLetterRecord, DeviceRecord, GroupRecord  # device registry (issue 4)
from .base import HistoryQuery, HistoryRow  # history (issue 5)

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
CREATE INDEX IF NOT EXISTS subscriptions_by_change ON subscriptions(changed);
CREATE TABLE IF NOT EXISTS outbox(seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, subscription_id TEXT NOT NULL,
    payload BYTEA NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS outbox_subscription ON outbox(tenant, subscription_id, seq);
CREATE TABLE IF NOT EXISTS delivery_leases(tenant TEXT NOT NULL, subscription_id TEXT NOT NULL, owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL, PRIMARY KEY(tenant, subscription_id));
-- device registry and dead letters (issue 4)
CREATE SEQUENCE IF NOT EXISTS registry_changes;
CREATE TABLE IF NOT EXISTS config_groups(created BIGSERIAL, tenant TEXT NOT NULL, service_path TEXT NOT NULL,
    apikey TEXT NOT NULL, resource TEXT NOT NULL, doc JSONB NOT NULL, changed BIGINT NOT NULL,
    PRIMARY KEY(apikey, resource));
CREATE INDEX IF NOT EXISTS config_groups_scope ON config_groups(tenant, service_path);
CREATE TABLE IF NOT EXISTS devices(created BIGSERIAL, tenant TEXT NOT NULL, service_path TEXT NOT NULL,
    device_id TEXT NOT NULL, apikey TEXT NOT NULL, doc JSONB NOT NULL, last_seen DOUBLE PRECISION,
    changed BIGINT NOT NULL, PRIMARY KEY(tenant, service_path, device_id, apikey));
CREATE INDEX IF NOT EXISTS devices_by_key ON devices(apikey, device_id);
CREATE INDEX IF NOT EXISTS devices_by_id ON devices(device_id);
CREATE TABLE IF NOT EXISTS deadletters(seq BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL,
    transport TEXT NOT NULL, topic TEXT NOT NULL, address TEXT NOT NULL, tenant TEXT, device_id TEXT,
    reason TEXT NOT NULL, payload_b64 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS deadletters_tenant ON deadletters(tenant, seq);
-- history (issue 5): one row per attribute instance written or deleted, µs timestamps
CREATE TABLE IF NOT EXISTS history(seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, entity_id TEXT NOT NULL,
    entity_type TEXT NOT NULL, attr TEXT NOT NULL, dataset_id TEXT NOT NULL, kind TEXT NOT NULL,
    observed_at BIGINT NOT NULL, created_at BIGINT NOT NULL, modified_at BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL, instance BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS history_observed ON history(tenant, entity_id, attr, observed_at);
CREATE TABLE IF NOT EXISTS history_cursors(name TEXT PRIMARY KEY, seq BIGINT NOT NULL);
"""


_RELATIONS = re.findall(r"CREATE (?:TABLE|INDEX|SEQUENCE) IF NOT EXISTS (\w+)", SCHEMA)


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
            # CREATE INDEX IF NOT EXISTS locks its table even when the index is there, and deadlocked with a write of
            # a process already running (two middleware processes, or one and its delivery process, start
            # together): when every relation of the schema exists, nothing is run (a later change of a table's
            # columns must add a check of its own here)
            if await conn.fetchval("SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest($1::text[]) AS name",
                                   _RELATIONS):
                return
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
                    outbox = [row for row in rows if isinstance(row, OutboxRow)]
                    if outbox:
                        await self._insert_outbox(conn, tenant, outbox)
                    await _insert_history(conn, tenant, [row for row in rows if isinstance(row, HistoryRow)])
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

    async def all_subscriptions(self) -> list[tuple[SubscriptionRecord, int]]:
        """Every subscription of every tenant, each with its change stamp."""
        rows = await self.pool.fetch(_SUB_COLUMNS + ", changed FROM subscriptions ORDER BY created")
        return [(_subscription(r), r[9]) for r in rows]

    async def subscription_stamps(self, since: int) -> tuple[int, list[tuple[str, str, int]]]:
        """How many subscriptions there are, and (tenant, id, change stamp) of those created or replaced after since."""
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                total = await conn.fetchval("SELECT count(*) FROM subscriptions")
                rows = await conn.fetch("SELECT tenant, id, changed FROM subscriptions WHERE changed > $1", since)
        return total, [tuple(r) for r in rows]

    async def delete_subscription(self, tenant: str, sub_id: str) -> bool:
        """Delete a subscription and its pending notifications."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                # outbox rows first, then the subscription: the order outbox_settle locks them in (the reverse
                # order deadlocked with a settlement of the same subscription)
                await conn.execute("DELETE FROM outbox WHERE tenant=$1 AND subscription_id=$2", tenant, sub_id)
                status = await conn.execute("DELETE FROM subscriptions WHERE tenant=$1 AND id=$2", tenant, sub_id)
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

    async def outbox_last(self, tenant: str, sub_id: str) -> int:
        """The seq of the subscription's newest pending notification (0 if none)."""
        last = await self.pool.fetchval("SELECT max(seq) FROM outbox WHERE tenant=$1 AND subscription_id=$2",
                                        tenant, sub_id)
        return last or 0

    async def outbox_merge(self, tenant: str, sub_id: str, owner: str,
                           merges: list[tuple[list[tuple[int, bytes]], bytes]]) -> bool:
        """In one transaction, for each (rows read, joined payload): the first row takes it, the others go."""
        read = {seq: bytes(payload) for rows, _joined in merges for seq, payload in rows}
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    # NOWAIT: a merge never waits for a lock, so it cannot take part in a deadlock (a refused
                    # merge only means the rows are sent as they are, or joined at the next read)
                    if await conn.fetchval("SELECT 1 FROM delivery_leases WHERE tenant=$1 AND subscription_id=$2 "
                                           "AND owner=$3 AND until > extract(epoch FROM clock_timestamp())::float8 "
                                           "FOR SHARE NOWAIT", tenant, sub_id, owner) is None:
                        return False
                    found = await conn.fetch("SELECT seq, payload FROM outbox WHERE seq = ANY($1::bigint[]) "
                                             "AND tenant=$2 AND subscription_id=$3 AND attempts=0 FOR UPDATE NOWAIT",
                                             list(read), tenant, sub_id)
                    if {r["seq"]: bytes(r["payload"]) for r in found} != read:
                        return False
                    await conn.executemany("UPDATE outbox SET payload=$2 WHERE seq=$1",
                                           [(rows[0][0], joined) for rows, joined in merges])
                    await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])",
                                       [seq for rows, _joined in merges for seq, _p in rows[1:]])
        except asyncpg.LockNotAvailableError:
            return False
        return True

    async def outbox_pending(self) -> list[tuple[str, str]]:
        """(tenant, subscription id) of every subscription with pending notifications."""
        rows = await self.pool.fetch("SELECT DISTINCT tenant, subscription_id FROM outbox")
        return [(r["tenant"], r["subscription_id"]) for r in rows]

    async def outbox_settle(self, settlements: list[Settlement]) -> None:
        """In one transaction: remove delivered or abandoned rows, count attempts on retried rows, update statuses."""
        done = [seq for item in settlements for seq in item.done]
        retries = [item.retry for item in settlements if item.retry is not None]
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if done:
                    await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", done)
                if retries:
                    await conn.executemany("UPDATE outbox SET attempts=$2 WHERE seq=$1", retries)
                await conn.executemany(
                    "UPDATE subscriptions SET times_sent=times_sent+$3, times_failed=times_failed+$4, "
                    "last_notification=coalesce($5, last_notification), last_success=coalesce($6, last_success), "
                    "last_failure=coalesce($7, last_failure), delivery_status=coalesce($8, delivery_status) "
                    "WHERE tenant=$1 AND id=$2",
                    [(i.tenant, i.sub_id, i.status.sent, i.status.failed, i.status.last_notification,
                      i.status.last_success, i.status.last_failure, i.status.status)
                     for i in sorted(settlements, key=lambda i: (i.tenant, i.sub_id))])  # one lock order for all

    async def acquire_leases(self, owner: str, keys: list[tuple[str, str]], ttl: float) -> set[tuple[str, str]]:
        """Take or renew delivery leases of (tenant, subscription id); return those now held by owner."""
        # the database's clock, not each process's: processes on several hosts agree on when a lease runs out
        rows = await self.pool.fetch(
            "INSERT INTO delivery_leases(tenant, subscription_id, owner, until) "
            "SELECT u.t, u.s, $3, extract(epoch FROM clock_timestamp())::float8 + $4::float8 "
            "FROM unnest($1::text[], $2::text[]) AS u(t, s) "
            "ON CONFLICT(tenant, subscription_id) DO UPDATE SET owner=excluded.owner, until=excluded.until "
            "WHERE delivery_leases.owner=excluded.owner "
            "OR delivery_leases.until < extract(epoch FROM clock_timestamp())::float8 "
            "RETURNING tenant, subscription_id",
            [k[0] for k in keys], [k[1] for k in keys], owner, ttl)
        return {(r["tenant"], r["subscription_id"]) for r in rows}

    async def release_leases(self, owner: str, keys: list[tuple[str, str]]) -> None:
        """Give delivery leases back."""
        await self.pool.execute(
            "DELETE FROM delivery_leases d USING unnest($1::text[], $2::text[]) AS u(t, s) "
            "WHERE d.tenant=u.t AND d.subscription_id=u.s AND d.owner=$3",
            [k[0] for k in keys], [k[1] for k in keys], owner)

    # ---------------------------------------------------------------- device registry and dead letters (issue 4)

    async def create_groups(self, rows: list[GroupRecord]) -> list[tuple[str, str]]:
        """Insert config groups all-or-nothing; return the (apikey, resource) keys that already exist."""
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                done = await conn.fetch(
                    "INSERT INTO config_groups(tenant, service_path, apikey, resource, doc, changed) "
                    "SELECT u.t, u.p, u.k, u.r, u.d, nextval('registry_changes') "
                    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[]) AS u(t, p, k, r, d) "
                    "ON CONFLICT DO NOTHING RETURNING apikey, resource",
                    [r.tenant for r in rows], [r.service_path for r in rows], [r.apikey for r in rows],
                    [r.resource for r in rows], [r.doc for r in rows])
                written = {(d["apikey"], d["resource"]) for d in done}
                taken = [(r.apikey, r.resource) for r in rows if (r.apikey, r.resource) not in written]
                if len(done) != len(rows) and not taken:
                    taken = [(r.apikey, r.resource) for r in rows]  # the batch repeats a key
                if taken:
                    await tx.rollback()
                    return taken
                await conn.execute("INSERT INTO tenants(name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                                   list({r.tenant for r in rows}))
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
        return []

    async def replace_group(self, row: GroupRecord) -> bool:
        """Replace the document of a config group in its scope; False if it does not exist."""
        status = await self.pool.execute(
            "UPDATE config_groups SET doc=$5, changed=nextval('registry_changes') WHERE tenant=$1 AND service_path=$2 "
            "AND apikey=$3 AND resource=$4", row.tenant, row.service_path, row.apikey, row.resource, row.doc)
        return status.endswith(" 1")

    async def get_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> GroupRecord | None:
        """One config group of a scope."""
        row = await self.pool.fetchrow(_GROUP_SELECT + " WHERE tenant=$1 AND service_path=$2 AND apikey=$3 AND resource=$4",
                                       tenant, service_path, apikey, resource)
        return GroupRecord(*row) if row else None

    async def list_groups(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                          apikey: str | None = None, resource: str | None = None) -> tuple[list[GroupRecord], int]:
        """A page of a tenant's config groups in creation order (service_path None: every path), and their total."""
        where, params = _registry_filter(tenant, service_path, apikey=apikey, resource=resource)
        total = await self.pool.fetchval("SELECT count(*) FROM config_groups" + where, *params)
        n = len(params)
        rows = await self.pool.fetch(_GROUP_SELECT + where + f" ORDER BY created LIMIT ${n + 1} OFFSET ${n + 2}",
                                     *params, limit, offset)
        return [GroupRecord(*r) for r in rows], total

    async def find_groups(self, apikey: str) -> list[GroupRecord]:
        """The config groups of an apikey across tenants, in creation order."""
        return [GroupRecord(*r) for r in await self.pool.fetch(_GROUP_SELECT + " WHERE apikey=$1 ORDER BY created",
                                                               apikey)]

    async def all_groups(self) -> list[GroupRecord]:
        """Every config group of every tenant, in creation order."""
        return [GroupRecord(*r) for r in await self.pool.fetch(_GROUP_SELECT + " ORDER BY created")]

    async def delete_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> bool:
        """Delete a config group; False if it does not exist."""
        status = await self.pool.execute("DELETE FROM config_groups WHERE tenant=$1 AND service_path=$2 AND apikey=$3 "
                                         "AND resource=$4", tenant, service_path, apikey, resource)
        return status.endswith(" 1")

    async def create_devices(self, rows: list[DeviceRecord]) -> list[str]:
        """Insert devices all-or-nothing; return the device ids that already exist (nothing written then)."""
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                done = await conn.fetch(
                    "INSERT INTO devices(tenant, service_path, device_id, apikey, doc, last_seen, changed) "
                    "SELECT u.t, u.p, u.i, u.k, u.d, u.s, nextval('registry_changes') FROM unnest($1::text[], $2::text[], "
                    "$3::text[], $4::text[], $5::jsonb[], $6::float8[]) AS u(t, p, i, k, d, s) "
                    "ON CONFLICT DO NOTHING RETURNING tenant, service_path, device_id, apikey",
                    [r.tenant for r in rows], [r.service_path for r in rows], [r.device_id for r in rows],
                    [r.apikey for r in rows], [r.doc for r in rows], [r.last_seen for r in rows])
                written = {tuple(d) for d in done}
                taken = [r.device_id for r in rows if (r.tenant, r.service_path, r.device_id, r.apikey) not in written]
                if len(done) != len(rows) and not taken:
                    taken = [r.device_id for r in rows]  # the batch repeats a key
                if taken:
                    await tx.rollback()
                    return taken
                await conn.execute("INSERT INTO tenants(name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                                   list({r.tenant for r in rows}))
            except BaseException:
                await tx.rollback()
                raise
            await tx.commit()
        return []

    async def replace_device(self, row: DeviceRecord) -> bool:
        """Replace the document of a device (same scope, id and apikey); False if it does not exist."""
        status = await self.pool.execute(
            "UPDATE devices SET doc=$5, changed=nextval('registry_changes') WHERE tenant=$1 AND service_path=$2 "
            "AND device_id=$3 AND apikey=$4", row.tenant, row.service_path, row.device_id, row.apikey, row.doc)
        return status.endswith(" 1")

    async def get_device(self, tenant: str, service_path: str, device_id: str,
                         apikey: str | None = None) -> DeviceRecord | None:
        """One device of a scope (the oldest of that id when apikey is None)."""
        if apikey is None:
            row = await self.pool.fetchrow(_DEVICE_SELECT + " WHERE tenant=$1 AND service_path=$2 AND device_id=$3 "
                                           "ORDER BY created LIMIT 1", tenant, service_path, device_id)
        else:
            row = await self.pool.fetchrow(_DEVICE_SELECT + " WHERE tenant=$1 AND service_path=$2 AND device_id=$3 "
                                           "AND apikey=$4", tenant, service_path, device_id, apikey)
        return DeviceRecord(*row) if row else None

    async def list_devices(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                           apikey: str | None = None, protocol: str | None = None) -> tuple[list[DeviceRecord], int]:
        """A page of a tenant's devices in creation order (service_path None: every path), and their total."""
        where, params = _registry_filter(tenant, service_path, apikey=apikey)
        if protocol is not None:
            params.append(protocol)
            where += f" AND doc->>'protocol'=${len(params)}"
        total = await self.pool.fetchval("SELECT count(*) FROM devices" + where, *params)
        n = len(params)
        rows = await self.pool.fetch(_DEVICE_SELECT + where + f" ORDER BY created LIMIT ${n + 1} OFFSET ${n + 2}",
                                     *params, limit, offset)
        return [DeviceRecord(*r) for r in rows], total

    async def find_device(self, apikey: str | None, device_id: str) -> DeviceRecord | None:
        """The oldest device with this apikey (any when None) and id, across tenants."""
        if apikey is None:
            row = await self.pool.fetchrow(_DEVICE_SELECT + " WHERE device_id=$1 ORDER BY created LIMIT 1", device_id)
        else:
            row = await self.pool.fetchrow(_DEVICE_SELECT + " WHERE apikey=$1 AND device_id=$2 ORDER BY created LIMIT 1",
                                           apikey, device_id)
        return DeviceRecord(*row) if row else None

    async def all_devices(self) -> list[DeviceRecord]:
        """Every device of every tenant, in creation order."""
        return [DeviceRecord(*r) for r in await self.pool.fetch(_DEVICE_SELECT + " ORDER BY created")]

    async def delete_device(self, tenant: str, service_path: str, device_id: str, apikey: str) -> bool:
        """Delete a device; False if it does not exist."""
        status = await self.pool.execute("DELETE FROM devices WHERE tenant=$1 AND service_path=$2 AND device_id=$3 "
                                         "AND apikey=$4", tenant, service_path, device_id, apikey)
        return status.endswith(" 1")

    async def touch_devices(self, seen: list[tuple[str, str, str, str, float]]) -> None:
        """Raise last_seen of (tenant, service_path, device_id, apikey, when) rows (never lowers it)."""
        if not seen:
            return
        await self.pool.execute(
            "UPDATE devices d SET last_seen = greatest(coalesce(d.last_seen, 0), u.w) "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[]) AS u(t, p, i, k, w) "
            "WHERE d.tenant=u.t AND d.service_path=u.p AND d.device_id=u.i AND d.apikey=u.k",
            [s[0] for s in seen], [s[1] for s in seen], [s[2] for s in seen], [s[3] for s in seen],
            [s[4] for s in seen])

    async def registry_fingerprint(self) -> tuple:
        """Changes whenever a config group or device is created, replaced or deleted (not on last_seen)."""
        row = await self.pool.fetchrow("SELECT (SELECT count(*) FROM config_groups), (SELECT max(changed) FROM "
                                       "config_groups), (SELECT count(*) FROM devices), (SELECT max(changed) FROM devices)")
        return tuple(row)

    async def add_deadletters(self, rows: list[DeadLetterRecord]) -> None:
        """Append dead letters in one transaction."""
        if not rows:
            return
        await self.pool.execute(
            "INSERT INTO deadletters(time, transport, topic, address, tenant, device_id, reason, payload_b64) "
            "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], "
            "$8::text[])", [r.time for r in rows], [r.transport for r in rows], [r.topic for r in rows],
            [r.address for r in rows], [r.tenant for r in rows], [r.device_id for r in rows], [r.reason for r in rows],
            [r.payload_b64 for r in rows])

    async def list_deadletters(self, limit: int, offset: int, *,
                               tenant: str | None = None) -> tuple[list[DeadLetterRecord], int]:
        """A page of dead letters, newest first (tenant None: all), and their total."""
        if tenant is None:
            total = await self.pool.fetchval("SELECT count(*) FROM deadletters")
            rows = await self.pool.fetch(_DEADLETTER_SELECT + " ORDER BY seq DESC LIMIT $1 OFFSET $2", limit, offset)
        else:
            total = await self.pool.fetchval("SELECT count(*) FROM deadletters WHERE tenant=$1", tenant)
            rows = await self.pool.fetch(_DEADLETTER_SELECT + " WHERE tenant=$1 ORDER BY seq DESC LIMIT $2 OFFSET $3",
                                         tenant, limit, offset)
        return [DeadLetterRecord(*r) for r in rows], total

    async def count_deadletters(self, tenant: str | None = None) -> int:
        """How many dead letters are kept (tenant None: all)."""
        if tenant is None:
            return await self.pool.fetchval("SELECT count(*) FROM deadletters")
        return await self.pool.fetchval("SELECT count(*) FROM deadletters WHERE tenant=$1", tenant)

    async def trim_deadletters(self, keep: int) -> int:
        """Delete all but the newest `keep` dead letters; return how many were deleted."""
        status = await self.pool.execute("DELETE FROM deadletters WHERE seq <= (SELECT seq FROM deadletters "
                                         "ORDER BY seq DESC LIMIT 1 OFFSET $1)", keep)
        return int(status.split()[-1])

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
        """History rows matching the query (see the history section at the end of this module)."""
        return await _read_history(self.pool, tenant, query)

    async def history_after(self, after: int, limit: int) -> list[tuple[str, HistoryRow]]:
        """(tenant, row) of the history rows of every tenant with seq > after, in seq order (history section)."""
        return await _history_after(self.pool, after, limit)

    async def history_max_seq(self) -> int:
        """The seq of the newest history row (0 when there is none)."""
        return await self.pool.fetchval("SELECT coalesce(max(seq), 0) FROM history")

    async def get_cursor(self, name: str) -> int:
        """The seq a history consumer has handled up to (0 before its first run)."""
        return await self.pool.fetchval("SELECT seq FROM history_cursors WHERE name=$1", name) or 0

    async def set_cursor(self, name: str, seq: int) -> None:
        """Persist the seq a history consumer has handled up to."""
        await self.pool.execute("INSERT INTO history_cursors(name, seq) VALUES ($1, $2) "
                                "ON CONFLICT(name) DO UPDATE SET seq=excluded.seq", name, seq)

_SUB_COLUMNS = ("SELECT tenant, id, doc, times_sent, times_failed, last_notification, last_success, last_failure, "
                "delivery_status")
_SUB_SELECT = _SUB_COLUMNS + " FROM subscriptions"


def _subscription(row) -> SubscriptionRecord:
    return SubscriptionRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8])


def _box(bbox: tuple[float, float, float, float]) -> str:
    min_x, min_y, max_x, max_y = bbox
    return f"(({min_x},{min_y}),({max_x},{max_y}))"


# ---------------------------------------------------------------- device registry and dead letters (issue 4)

_GROUP_SELECT = "SELECT tenant, service_path, apikey, resource, doc FROM config_groups"
_DEVICE_SELECT = "SELECT tenant, service_path, device_id, apikey, doc, last_seen FROM devices"
_DEADLETTER_SELECT = ("SELECT seq, time, transport, topic, address, tenant, device_id, reason, payload_b64 "
                      "FROM deadletters")


def _registry_filter(tenant: str, service_path: str | None, **equal: str | None) -> tuple[str, list]:
    """The WHERE clause (and parameters) of a registry listing: tenant, optional service path and column equalities."""
    clauses, params = ["tenant=$1"], [tenant]
    if service_path is not None:
        params.append(service_path)
        clauses.append(f"service_path=${len(params)}")
    for column, value in equal.items():
        if value is not None:
            params.append(value)
            clauses.append(f"{column}=${len(params)}")
    return " WHERE " + " AND ".join(clauses), params


# ---------------------------------------------------------------- history (issue 5)

_TIME_COLUMNS = {"observedAt": "observed_at", "createdAt": "created_at", "modifiedAt": "modified_at"}
_HISTORY_COLUMNS = ("entity_id, entity_type, attr, dataset_id, kind, observed_at, created_at, modified_at, deleted, "
                    "instance, seq")


async def _insert_history(conn: asyncpg.Connection, tenant: str, rows: list[HistoryRow]) -> None:
    """Append history rows inside the caller's transaction (one statement)."""
    if rows:
        await conn.execute(
            "INSERT INTO history(tenant, entity_id, entity_type, attr, dataset_id, kind, observed_at, created_at, "
            "modified_at, deleted, instance) SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], "
            "$6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::boolean[], $11::bytea[]) AS u",
            tenant, [r.entity_id for r in rows], [r.entity_type for r in rows], [r.attr for r in rows],
            [r.dataset_id for r in rows], [r.kind for r in rows], [r.observed_at for r in rows],
            [r.created_at for r in rows], [r.modified_at for r in rows], [r.deleted for r in rows],
            [r.instance for r in rows])


async def _read_history(pool: asyncpg.Pool, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
    """The rows of a history query, per (entity, attribute) in time order, at most query.per_attr of each."""
    column = _TIME_COLUMNS[query.timeproperty]
    order = "DESC" if query.newest_first else "ASC"
    clauses = ["tenant = $1", "entity_id = ANY($2::text[])"]
    params: list = [tenant, query.entity_ids]
    if query.attrs is not None:
        params.append(sorted(query.attrs))
        clauses.append(f"attr = ANY(${len(params)}::text[])")
    if query.start is not None:
        params.append(query.start)
        clauses.append(f"{column} >= ${len(params)}")
    if query.end is not None:
        params.append(query.end)
        clauses.append(f"{column} < ${len(params)}")
    ranked = (f"SELECT {_HISTORY_COLUMNS}, row_number() OVER (PARTITION BY entity_id, attr "
              f"ORDER BY {column} {order}, seq {order}) AS rank FROM history WHERE {' AND '.join(clauses)}")
    sql = f"SELECT {_HISTORY_COLUMNS} FROM ({ranked}) ranked"
    if query.per_attr is not None:
        params.append(query.per_attr)
        sql += f" WHERE rank <= ${len(params)}"
    sql += f" ORDER BY entity_id, attr, {column} {order}, seq {order}"
    return [HistoryRow(*row) for row in await pool.fetch(sql, *params)]


async def _history_after(pool: asyncpg.Pool, after: int, limit: int) -> list[tuple[str, HistoryRow]]:
    """Rows of every tenant after a seq, oldest first, for consumers such as the InfluxDB forwarder."""
    rows = await pool.fetch(f"SELECT tenant, {_HISTORY_COLUMNS} FROM history WHERE seq > $1 ORDER BY seq LIMIT $2",
                            after, limit)
    return [(row[0], HistoryRow(*tuple(row)[1:])) for row in rows]
