"""The embedded store: SQLite in WAL mode, an R*Tree for GeoProperties, one writer thread and one reader thread."""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson

from .base import Candidates, Change, Keep, OutboxRow, Plan, Settlement, Stored, SubscriptionRecord
from .base import DeadLetterRecord, DeviceRecord, GroupRecord  # device registry (issue 4)
from .base import HistoryQuery, HistoryRow  # history (issue 5)
from . import sqlite_history, sqlite_write

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants(name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS entities(
    seq INTEGER PRIMARY KEY, tenant TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
    UNIQUE(tenant, id));
CREATE TABLE IF NOT EXISTS entity_types(tenant TEXT NOT NULL, type TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY(tenant, type, seq)) WITHOUT ROWID;
-- the R*Tree holds bare boxes: tenant and attribute are checked on the entity row (auxiliary columns cost 40% more per insert)
CREATE VIRTUAL TABLE IF NOT EXISTS geo_rtree USING rtree(gid, min_x, max_x, min_y, max_y);
CREATE TABLE IF NOT EXISTS subscriptions(tenant TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL,
    changed INTEGER NOT NULL, times_sent INTEGER NOT NULL DEFAULT 0, times_failed INTEGER NOT NULL DEFAULT 0,
    last_notification TEXT, last_success TEXT, last_failure TEXT, delivery_status TEXT, PRIMARY KEY(tenant, id));
CREATE INDEX IF NOT EXISTS subscriptions_by_change ON subscriptions(changed);
-- AUTOINCREMENT: a seq is never given again (a plain rowid is, once the highest rows are deleted), so a late
-- settlement or merge of a deleted subscription's rows can never touch another notification
CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
    subscription_id TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS outbox_subscription ON outbox(tenant, subscription_id, seq);
CREATE TABLE IF NOT EXISTS delivery_leases(tenant TEXT NOT NULL, subscription_id TEXT NOT NULL, owner TEXT NOT NULL,
    until REAL NOT NULL, PRIMARY KEY(tenant, subscription_id));
-- device registry and dead letters (issue 4)
CREATE TABLE IF NOT EXISTS config_groups(tenant TEXT NOT NULL, service_path TEXT NOT NULL, apikey TEXT NOT NULL,
    resource TEXT NOT NULL, doc TEXT NOT NULL, changed INTEGER NOT NULL, PRIMARY KEY(apikey, resource));
CREATE INDEX IF NOT EXISTS config_groups_scope ON config_groups(tenant, service_path);
CREATE TABLE IF NOT EXISTS devices(tenant TEXT NOT NULL, service_path TEXT NOT NULL, device_id TEXT NOT NULL,
    apikey TEXT NOT NULL, doc TEXT NOT NULL, last_seen REAL, changed INTEGER NOT NULL,
    PRIMARY KEY(tenant, service_path, device_id, apikey));
CREATE INDEX IF NOT EXISTS devices_by_key ON devices(apikey, device_id);
CREATE INDEX IF NOT EXISTS devices_by_id ON devices(device_id);
CREATE TABLE IF NOT EXISTS deadletters(seq INTEGER PRIMARY KEY, time REAL NOT NULL, transport TEXT NOT NULL,
    topic TEXT NOT NULL, address TEXT NOT NULL, tenant TEXT, device_id TEXT, reason TEXT NOT NULL,
    payload_b64 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS deadletters_tenant ON deadletters(tenant, seq);
-- history (issue 5): the packed log of sqlite_history.py, and where each consumer of it has got to
CREATE TABLE IF NOT EXISTS history_cursors(name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

log = logging.getLogger("citybridge.store.sqlite")

_CHECKPOINT_EVERY = 0.25  # seconds between the background checkpoints of the WAL
# The background checkpoints rarely finish while the writer keeps appending, and only a finished one lets the WAL
# start over: the writer checkpoints by itself past this many pages (32 MB; cheap, as most frames are copied
# already), and the file is cut back to _WAL_LIMIT after it starts over. Unbounded, it grew to 200 MB and stayed.
_WRITER_CHECKPOINT_PAGES = 8_000
_WAL_LIMIT = 64 * 1024 * 1024


class Checkpointer:
    """Copies the WAL back into the database from a thread of its own, so commits never wait for it.

    A checkpoint (page copies and the fsync of synchronous=NORMAL) was 30-40% of the writer thread's time when the
    writer ran it itself; here it runs on the other core, with the GIL released inside SQLite.
    """

    def __init__(self, connect):
        self._connect = connect
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        """Start checkpointing every _CHECKPOINT_EVERY seconds."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last checkpoint."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("the WAL checkpoint thread could not connect; the writer checkpoints by itself")
            return
        try:
            while True:
                stopping = self._stop.wait(_CHECKPOINT_EVERY)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # busy or locked: the next round tries again
                if stopping:
                    return
        finally:
            conn.close()


@dataclass(slots=True)
class _Pending:
    """A write waiting for the writer thread, and the future its caller awaits."""

    tenant: str
    changes: list[Change]
    plan: Plan | None
    future: asyncio.Future
    planned: tuple | None = None  # (conflicts, rows) of plan's last call: a retry reuses them (plan has side effects)


def _outbox_autoincrement(conn: sqlite3.Connection) -> None:
    """Rebuild an outbox table made before its seq was AUTOINCREMENT (rows and their seqs kept)."""
    def outbox_sql() -> str:
        return conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='outbox'").fetchone()[0]
    if "AUTOINCREMENT" in outbox_sql().upper():
        return  # migrated already: no write lock taken
    conn.execute("BEGIN IMMEDIATE")  # checked again inside: of two processes opening at once, one migrates
    try:
        sql = outbox_sql()
        if "AUTOINCREMENT" not in sql.upper():
            rebuilt = sql.replace("outbox(", "outbox_new(", 1).replace("seq INTEGER PRIMARY KEY",
                                                                       "seq INTEGER PRIMARY KEY AUTOINCREMENT", 1)
            if "AUTOINCREMENT" not in rebuilt:
                raise RuntimeError(f"unexpected outbox table, not migrated: {sql}")
            conn.execute(rebuilt)
            conn.execute("INSERT INTO outbox_new(seq, tenant, subscription_id, payload, attempts) "
                         "SELECT seq, tenant, subscription_id, payload, attempts FROM outbox")
            conn.execute("DROP TABLE outbox")
            conn.execute("ALTER TABLE outbox_new RENAME TO outbox")
            conn.execute("CREATE INDEX IF NOT EXISTS outbox_subscription ON outbox(tenant, subscription_id, seq)")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _rounds(group: list[_Pending]) -> list[list[_Pending]]:
    """Split a group, in order, into runs of one tenant whose writes touch distinct entities (applied together)."""
    rounds: list[list[_Pending]] = []
    seen: set[str] = set()
    for pending in group:
        ids = {c.id for c in pending.changes}
        if rounds and rounds[-1][0].tenant == pending.tenant and seen.isdisjoint(ids):
            rounds[-1].append(pending)
            seen |= ids
        else:
            rounds.append([pending])
            seen = set(ids)
    return rounds


class SqliteStore:
    """Context store in one SQLite file (the embedded default)."""

    def __init__(self, path: str):
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lconn: sqlite3.Connection | None = None  # point lookups made on the event loop itself
        self._checkpointer: Checkpointer | None = None
        self._waiting: list[_Pending] = []  # writes waiting for the writer thread (committed as one group)
        self._committer: asyncio.Task | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")  # first: switching to WAL waits for other processes too
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    async def open(self) -> None:
        """Open the database file (creating its folder) and the schema."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        loop = asyncio.get_running_loop()

        def setup() -> None:
            self._wconn = self._connect()
            self._wconn.execute(f"PRAGMA wal_autocheckpoint={_WRITER_CHECKPOINT_PAGES}")
            self._wconn.executescript(SCHEMA)
            _outbox_autoincrement(self._wconn)
            sqlite_history.create(self._wconn)

        await loop.run_in_executor(self._writer, setup)
        self._rconn = await loop.run_in_executor(self._reader, self._connect)
        self._lconn = self._connect()
        self._checkpointer = Checkpointer(self._connect)
        self._checkpointer.start()

    async def close(self) -> None:
        """Close both connections and stop the threads."""
        loop = asyncio.get_running_loop()
        if self._committer is not None and not self._committer.done():
            await asyncio.gather(self._committer, return_exceptions=True)  # let waiting writes commit
        if self._checkpointer is not None:
            await loop.run_in_executor(None, self._checkpointer.stop)
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        if self._lconn is not None:
            self._lconn.close()
        self._writer.shutdown()
        self._reader.shutdown()

    async def _read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def tenant_exists(self, tenant: str) -> bool:
        """True once the tenant has had a write."""
        def run() -> bool:
            return self._rconn.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone() is not None
        return await self._read(run)

    async def get(self, tenant: str, ids: list[str]) -> dict[str, Stored]:
        """The stored entities with these ids."""
        def run(conn: sqlite3.Connection) -> dict[str, Stored]:
            # one row holding them all: one sqlite3_step, so one return of the GIL (sqlite_write says why)
            (joined,) = conn.execute(_GET_MANY, (tenant, orjson.dumps(ids).decode())).fetchone()
            if joined is None:
                return {}
            flat = orjson.loads(joined)
            return {head[0]: Stored(doc, head[1]) for head, doc in zip(flat[::2], flat[1::2])}
        if len(ids) == 1:
            return run(self._lconn)  # a primary-key lookup costs less than the hop to the reader thread
        return await self._read(run, self._rconn)

    async def write(self, tenant: str, changes: list[Change], plan: Plan | None = None) -> list[str]:
        """Apply the changes in one transaction with the outbox rows plan() makes; return ids whose version check failed.

        Writes that arrive while the writer thread is busy wait together and are then committed as one group
        (see _write_group): a thousand PATCHes a second cost tens of transactions, not a thousand.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(_Pending(tenant, changes, plan, future))
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_waiting())
        return await future

    async def _commit_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            group = [pending for pending in self._waiting if not pending.future.cancelled()]  # cancelled: not written
            self._waiting = []
            if not group:
                continue
            try:
                outcomes = await loop.run_in_executor(self._writer, self._write_group, group)
            except asyncio.CancelledError:
                for pending in group + self._waiting:
                    pending.future.cancel()
                self._waiting = []
                raise
            except Exception as error:  # the executor itself failed (shut down): every caller hears of it
                outcomes = [error] * len(group)
            for pending, outcome in zip(group, outcomes):
                if pending.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    def _write_group(self, group: list[_Pending]) -> list:
        """Commit the group in one transaction; if that fails, each write alone, so one bad write fails only itself."""
        if len(group) > 1:
            try:
                return self._in_transaction(lambda conn: [conflicts for rnd in _rounds(group)
                                                          for conflicts in self._apply_round(conn, rnd)])
            except Exception:
                log.debug("a group of %d writes failed; committing them one by one", len(group), exc_info=True)
        outcomes: list = []
        for pending in group:
            try:
                outcomes.append(self._in_transaction(lambda conn, p=pending: self._apply_round(conn, [p])[0]))
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def _in_transaction(self, fn):
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    @staticmethod
    def _apply_round(conn: sqlite3.Connection, round_: list[_Pending]) -> list[list[str]]:
        """Apply writes of one tenant touching distinct entities as one set of statements; each one's conflicts."""
        tenant = round_[0].tenant
        conn.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", (tenant,))
        changes = round_[0].changes if len(round_) == 1 else [c for p in round_ for c in p.changes]
        lost = set(sqlite_write.apply(conn, tenant, changes))
        outcomes: list[list[str]] = []
        outbox: list[OutboxRow] = []
        history: list[HistoryRow] = []
        for pending in round_:
            mine = [c.id for c in pending.changes if c.id in lost] if lost else []
            outcomes.append(mine)
            if pending.plan is not None:
                # the planner records what it decided (throttling): when a failed group is retried one by one,
                # the rows planned for the same conflicts are reused instead of planning again
                if pending.planned is None or pending.planned[0] != mine:
                    pending.planned = (mine, pending.plan(set(mine)))
                for row in pending.planned[1]:
                    (outbox if isinstance(row, OutboxRow) else history).append(row)
        if outbox:
            conn.executemany("INSERT INTO outbox(tenant, subscription_id, payload) VALUES (?,?,?)",
                             [(tenant, row.subscription_id, row.payload) for row in outbox])
        sqlite_history.append(conn, tenant, history)
        return outcomes

    async def query(self, tenant: str, candidates: Candidates, keep: Keep | None = None,
                    stop_after: int | None = None) -> list[dict]:
        """Entities passing the prefilter and keep(), in creation order; stops after stop_after kept ones."""
        def run() -> list[dict]:
            params: list = []
            if candidates.bbox is not None:
                min_x, min_y, max_x, max_y = candidates.bbox
                # drive from the R*Tree: a geo-query touches few rows, whatever the size of the tenant; the tenant is
                # checked on the entity row and the GeoProperty's name by keep() (the tree holds bare boxes)
                source = ("(SELECT DISTINCT r.gid >> 8 AS seq FROM geo_rtree r WHERE r.min_x<=? AND r.max_x>=? "
                          "AND r.min_y<=? AND r.max_y>=?) g CROSS JOIN entities e ON e.seq=g.seq")
                params.extend([max_x, min_x, max_y, min_y])
            else:
                source = "entities e"
            clauses = ["e.tenant=?"]
            params.append(tenant)
            if candidates.ids is not None:
                clauses.append(f"e.id IN ({','.join('?' * len(candidates.ids))})")
                params.extend(candidates.ids)
            if candidates.types is not None:
                marks = ",".join("?" * len(candidates.types))
                if candidates.bbox is not None or candidates.ids is not None:
                    # already narrowed: check each candidate's types through the (tenant, type, seq) key
                    clauses.append(f"EXISTS (SELECT 1 FROM entity_types t WHERE t.tenant=? AND t.type IN ({marks}) "
                                   "AND t.seq=e.seq)")
                else:
                    clauses.append(f"e.seq IN (SELECT seq FROM entity_types WHERE tenant=? AND type IN ({marks}))")
                params.append(tenant)
                params.extend(candidates.types)
            sql = f"SELECT e.doc FROM {source} WHERE {' AND '.join(clauses)} ORDER BY e.seq"
            return _collect(self._rconn.execute(sql, params), keep, stop_after)
        return await self._read(run)

    async def all_docs(self, tenant: str) -> list[dict]:
        """Every entity of the tenant (for type and attribute discovery)."""
        return await self.query(tenant, Candidates())

    # ---------------------------------------------------------------- subscriptions and their outbox

    async def _write_op(self, fn, *args):
        def run():
            conn = self._wconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return await asyncio.get_running_loop().run_in_executor(self._writer, run)

    async def put_subscription(self, tenant: str, sub_id: str, doc: dict, *, create: bool) -> bool:
        """Create (False if the id exists) or replace (False if it does not) a subscription."""
        def run(conn):
            conn.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", (tenant,))
            if create:
                cur = conn.execute("INSERT INTO subscriptions(tenant, id, doc, changed) VALUES (?,?,?,?) "
                                   "ON CONFLICT DO NOTHING", (tenant, sub_id, orjson.dumps(doc), time.time_ns()))
            else:
                cur = conn.execute("UPDATE subscriptions SET doc=?, changed=? WHERE tenant=? AND id=?",
                                   (orjson.dumps(doc), time.time_ns(), tenant, sub_id))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def get_subscription(self, tenant: str, sub_id: str) -> SubscriptionRecord | None:
        """One subscription with its notification status."""
        def run():
            row = self._rconn.execute(_SUB_SELECT + " WHERE tenant=? AND id=?", (tenant, sub_id)).fetchone()
            return _subscription(row) if row else None
        return await self._read(run)

    async def list_subscriptions(self, tenant: str, limit: int, offset: int) -> tuple[list[SubscriptionRecord], int]:
        """A page of a tenant's subscriptions in creation order, and their total."""
        def run():
            total = self._rconn.execute("SELECT count(*) FROM subscriptions WHERE tenant=?", (tenant,)).fetchone()[0]
            rows = self._rconn.execute(_SUB_SELECT + " WHERE tenant=? ORDER BY rowid LIMIT ? OFFSET ?",
                                       (tenant, limit, offset)).fetchall()
            return [_subscription(r) for r in rows], total
        return await self._read(run)

    async def all_subscriptions(self) -> list[tuple[SubscriptionRecord, int]]:
        """Every subscription of every tenant, each with its change stamp."""
        def run():
            return [(_subscription(r), r[9])
                    for r in self._rconn.execute(_SUB_COLUMNS + ", changed FROM subscriptions ORDER BY rowid")]
        return await self._read(run)

    async def subscription_stamps(self, since: int) -> tuple[int, list[tuple[str, str, int]]]:
        """How many subscriptions there are, and (tenant, id, change stamp) of those created or replaced after since."""
        def run():
            total = self._rconn.execute("SELECT count(*) FROM subscriptions").fetchone()[0]
            return total, self._rconn.execute("SELECT tenant, id, changed FROM subscriptions WHERE changed > ?",
                                              (since,)).fetchall()
        return await self._read(run)

    async def delete_subscription(self, tenant: str, sub_id: str) -> bool:
        """Delete a subscription and its pending notifications; False if it does not exist."""
        def run(conn):
            cur = conn.execute("DELETE FROM subscriptions WHERE tenant=? AND id=?", (tenant, sub_id))
            conn.execute("DELETE FROM outbox WHERE tenant=? AND subscription_id=?", (tenant, sub_id))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def add_outbox(self, tenant: str, rows: list[OutboxRow]) -> None:
        """Queue notifications that no entity change carries (periodic ones)."""
        def run(conn):
            conn.executemany("INSERT INTO outbox(tenant, subscription_id, payload) VALUES (?,?,?)",
                             [(tenant, r.subscription_id, r.payload) for r in rows])
        await self._write_op(run)

    async def outbox_next(self, tenant: str, sub_id: str, limit: int) -> list[tuple[int, bytes, int]]:
        """The oldest pending notifications of a subscription: (seq, payload, attempts)."""
        # an indexed read of at most `limit` rows, on the loop's own connection: it costs less than the hop to the
        # reader thread, and a delivery worker makes one per batch it sends
        return self._lconn.execute("SELECT seq, payload, attempts FROM outbox WHERE tenant=? AND subscription_id=? "
                                   "ORDER BY seq LIMIT ?", (tenant, sub_id, limit)).fetchall()

    async def outbox_last(self, tenant: str, sub_id: str) -> int:
        """The seq of the subscription's newest pending notification (0 if none)."""
        (last,) = self._lconn.execute("SELECT max(seq) FROM outbox WHERE tenant=? AND subscription_id=?",
                                      (tenant, sub_id)).fetchone()
        return last or 0

    async def outbox_merge(self, tenant: str, sub_id: str, owner: str,
                           merges: list[tuple[list[tuple[int, bytes]], bytes]]) -> bool:
        """In one transaction, for each (rows read, joined payload): the first row takes it, the others go."""
        read = {seq: bytes(payload) for rows, _joined in merges for seq, payload in rows}

        def run(conn):
            if conn.execute("SELECT 1 FROM delivery_leases WHERE tenant=? AND subscription_id=? AND owner=? "
                            "AND until>?", (tenant, sub_id, owner, time.time())).fetchone() is None:
                return False
            # the payloads too: the joined notification must carry exactly what its rows held
            found = conn.execute("SELECT seq, payload FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) "
                                 "AND tenant=? AND subscription_id=? AND attempts=0",
                                 (orjson.dumps(list(read)).decode(), tenant, sub_id)).fetchall()
            if {seq: bytes(payload) for seq, payload in found} != read:
                return False
            conn.executemany("UPDATE outbox SET payload=? WHERE seq=?", [(joined, rows[0][0]) for rows, joined in merges])
            conn.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                         (orjson.dumps([seq for rows, _joined in merges for seq, _p in rows[1:]]).decode(),))
            return True
        return await self._write_op(run)

    async def outbox_pending(self) -> list[tuple[str, str]]:
        """(tenant, subscription id) of every subscription with pending notifications."""
        def run():
            return self._rconn.execute("SELECT DISTINCT tenant, subscription_id FROM outbox").fetchall()
        return await self._read(run)

    async def outbox_settle(self, settlements: list[Settlement]) -> None:
        """In one transaction: remove delivered or abandoned rows, count attempts on retried rows, update statuses."""
        statuses: dict[tuple[str, str], list] = {}  # one row per subscription: counts added, the last stamps kept
        for item in settlements:
            row = statuses.setdefault((item.tenant, item.sub_id), [item.tenant, item.sub_id, 0, 0, None, None, None, None])
            st = item.status
            row[2] += st.sent
            row[3] += st.failed
            for position, value in ((4, st.last_notification), (5, st.last_success), (6, st.last_failure), (7, st.status)):
                if value is not None:
                    row[position] = value

        def run(conn):
            done = [seq for item in settlements for seq in item.done]
            if done:
                conn.execute(_SETTLE_DONE, (orjson.dumps(done).decode(),))
            retries = [(item.retry[1], item.retry[0]) for item in settlements if item.retry is not None]
            if retries:
                conn.executemany("UPDATE outbox SET attempts=? WHERE seq=?", retries)
            conn.execute(_SETTLE_STATUS, (orjson.dumps(list(statuses.values())).decode(),))
        await self._write_op(run)

    async def acquire_leases(self, owner: str, keys: list[tuple[str, str]], ttl: float) -> set[tuple[str, str]]:
        """Take or renew delivery leases of (tenant, subscription id); return those now held by owner."""
        def run(conn):
            now = time.time()
            listed = orjson.dumps(keys).decode()
            conn.execute(_TAKE_LEASES, (owner, now + ttl, listed, now))
            (held,) = conn.execute(_HELD_LEASES, (owner, listed)).fetchone()
            return {(tenant, sub_id) for tenant, sub_id in orjson.loads(held)}
        return await self._write_op(run)

    async def release_leases(self, owner: str, keys: list[tuple[str, str]]) -> None:
        """Give delivery leases back."""
        def run(conn):
            conn.execute(_RELEASE_LEASES, (owner, orjson.dumps(keys).decode()))
        await self._write_op(run)

    # ---------------------------------------------------------------- device registry and dead letters (issue 4)

    async def create_groups(self, rows: list[GroupRecord]) -> list[tuple[str, str]]:
        """Insert config groups all-or-nothing; return the (apikey, resource) keys that already exist."""
        def run(conn):
            stamp = time.time_ns()
            taken = []
            for row in rows:
                cur = conn.execute("INSERT INTO config_groups(tenant, service_path, apikey, resource, doc, changed) "
                                   "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                   (row.tenant, row.service_path, row.apikey, row.resource, orjson.dumps(row.doc), stamp))
                if cur.rowcount != 1:
                    taken.append((row.apikey, row.resource))
            if taken:
                raise _Rollback(taken)
            for tenant in {row.tenant for row in rows}:
                conn.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", (tenant,))
            return []
        try:
            return await self._write_op(run)
        except _Rollback as rollback:
            return rollback.args[0]

    async def replace_group(self, row: GroupRecord) -> bool:
        """Replace the document of a config group in its scope; False if it does not exist."""
        def run(conn):
            cur = conn.execute("UPDATE config_groups SET doc=?, changed=? WHERE tenant=? AND service_path=? AND apikey=? "
                               "AND resource=?", (orjson.dumps(row.doc), time.time_ns(), row.tenant, row.service_path,
                                                  row.apikey, row.resource))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def get_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> GroupRecord | None:
        """One config group of a scope."""
        def run():
            row = self._rconn.execute(_GROUP_SELECT + " WHERE tenant=? AND service_path=? AND apikey=? AND resource=?",
                                      (tenant, service_path, apikey, resource)).fetchone()
            return _group(row) if row else None
        return await self._read(run)

    async def list_groups(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                          apikey: str | None = None, resource: str | None = None) -> tuple[list[GroupRecord], int]:
        """A page of a tenant's config groups in creation order (service_path None: every path), and their total."""
        where, params = _registry_filter(tenant, service_path, apikey=apikey, resource=resource)

        def run():
            total = self._rconn.execute("SELECT count(*) FROM config_groups" + where, params).fetchone()[0]
            rows = self._rconn.execute(_GROUP_SELECT + where + " ORDER BY rowid LIMIT ? OFFSET ?",
                                       (*params, limit, offset)).fetchall()
            return [_group(r) for r in rows], total
        return await self._read(run)

    async def find_groups(self, apikey: str) -> list[GroupRecord]:
        """The config groups of an apikey across tenants, in creation order."""
        def run():
            return [_group(r) for r in self._rconn.execute(_GROUP_SELECT + " WHERE apikey=? ORDER BY rowid", (apikey,))]
        return await self._read(run)

    async def all_groups(self) -> list[GroupRecord]:
        """Every config group of every tenant, in creation order."""
        def run():
            return [_group(r) for r in self._rconn.execute(_GROUP_SELECT + " ORDER BY rowid")]
        return await self._read(run)

    async def delete_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> bool:
        """Delete a config group; False if it does not exist."""
        def run(conn):
            cur = conn.execute("DELETE FROM config_groups WHERE tenant=? AND service_path=? AND apikey=? AND resource=?",
                               (tenant, service_path, apikey, resource))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def create_devices(self, rows: list[DeviceRecord]) -> list[str]:
        """Insert devices all-or-nothing; return the device ids that already exist (nothing written then)."""
        def run(conn):
            stamp = time.time_ns()
            taken = []
            for row in rows:
                cur = conn.execute("INSERT INTO devices(tenant, service_path, device_id, apikey, doc, last_seen, changed) "
                                   "VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                   (row.tenant, row.service_path, row.device_id, row.apikey, orjson.dumps(row.doc),
                                    row.last_seen, stamp))
                if cur.rowcount != 1:
                    taken.append(row.device_id)
            if taken:
                raise _Rollback(taken)
            for tenant in {row.tenant for row in rows}:
                conn.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", (tenant,))
            return []
        try:
            return await self._write_op(run)
        except _Rollback as rollback:
            return rollback.args[0]

    async def replace_device(self, row: DeviceRecord) -> bool:
        """Replace the document of a device (same scope, id and apikey); False if it does not exist."""
        def run(conn):
            cur = conn.execute("UPDATE devices SET doc=?, changed=? WHERE tenant=? AND service_path=? AND device_id=? "
                               "AND apikey=?", (orjson.dumps(row.doc), time.time_ns(), row.tenant, row.service_path,
                                                row.device_id, row.apikey))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def get_device(self, tenant: str, service_path: str, device_id: str,
                         apikey: str | None = None) -> DeviceRecord | None:
        """One device of a scope (the oldest of that id when apikey is None)."""
        def run():
            sql = _DEVICE_SELECT + " WHERE tenant=? AND service_path=? AND device_id=?"
            params: tuple = (tenant, service_path, device_id)
            if apikey is not None:
                sql += " AND apikey=?"
                params += (apikey,)
            row = self._rconn.execute(sql + " ORDER BY rowid LIMIT 1", params).fetchone()
            return _device(row) if row else None
        return await self._read(run)

    async def list_devices(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                           apikey: str | None = None, protocol: str | None = None) -> tuple[list[DeviceRecord], int]:
        """A page of a tenant's devices in creation order (service_path None: every path), and their total."""
        where, params = _registry_filter(tenant, service_path, apikey=apikey)
        if protocol is not None:
            where += " AND json_extract(CAST(doc AS TEXT), '$.protocol')=?"  # a BLOB would be read as JSONB (3.45+)
            params.append(protocol)

        def run():
            total = self._rconn.execute("SELECT count(*) FROM devices" + where, params).fetchone()[0]
            rows = self._rconn.execute(_DEVICE_SELECT + where + " ORDER BY rowid LIMIT ? OFFSET ?",
                                       (*params, limit, offset)).fetchall()
            return [_device(r) for r in rows], total
        return await self._read(run)

    async def find_device(self, apikey: str | None, device_id: str) -> DeviceRecord | None:
        """The oldest device with this apikey (any when None) and id, across tenants."""
        def run():
            if apikey is None:
                row = self._rconn.execute(_DEVICE_SELECT + " WHERE device_id=? ORDER BY rowid LIMIT 1",
                                          (device_id,)).fetchone()
            else:
                row = self._rconn.execute(_DEVICE_SELECT + " WHERE apikey=? AND device_id=? ORDER BY rowid LIMIT 1",
                                          (apikey, device_id)).fetchone()
            return _device(row) if row else None
        return await self._read(run)

    async def all_devices(self) -> list[DeviceRecord]:
        """Every device of every tenant, in creation order."""
        def run():
            return [_device(r) for r in self._rconn.execute(_DEVICE_SELECT + " ORDER BY rowid")]
        return await self._read(run)

    async def delete_device(self, tenant: str, service_path: str, device_id: str, apikey: str) -> bool:
        """Delete a device; False if it does not exist."""
        def run(conn):
            cur = conn.execute("DELETE FROM devices WHERE tenant=? AND service_path=? AND device_id=? AND apikey=?",
                               (tenant, service_path, device_id, apikey))
            return cur.rowcount == 1
        return await self._write_op(run)

    async def touch_devices(self, seen: list[tuple[str, str, str, str, float]]) -> None:
        """Raise last_seen of (tenant, service_path, device_id, apikey, when) rows (never lowers it)."""
        def run(conn):
            conn.executemany("UPDATE devices SET last_seen=max(coalesce(last_seen, 0), ?) WHERE tenant=? "
                             "AND service_path=? AND device_id=? AND apikey=?",
                             [(when, tenant, path, device_id, apikey) for tenant, path, device_id, apikey, when in seen])
        if seen:
            await self._write_op(run)

    async def registry_fingerprint(self) -> tuple:
        """Changes whenever a config group or device is created, replaced or deleted (not on last_seen)."""
        def run():
            groups = self._rconn.execute("SELECT count(*), max(changed) FROM config_groups").fetchone()
            devices = self._rconn.execute("SELECT count(*), max(changed) FROM devices").fetchone()
            return (*groups, *devices)
        return await self._read(run)

    async def add_deadletters(self, rows: list[DeadLetterRecord]) -> None:
        """Append dead letters in one transaction."""
        def run(conn):
            conn.executemany("INSERT INTO deadletters(time, transport, topic, address, tenant, device_id, reason, "
                             "payload_b64) VALUES (?,?,?,?,?,?,?,?)",
                             [(r.time, r.transport, r.topic, r.address, r.tenant, r.device_id, r.reason, r.payload_b64)
                              for r in rows])
        if rows:
            await self._write_op(run)

    async def list_deadletters(self, limit: int, offset: int, *,
                               tenant: str | None = None) -> tuple[list[DeadLetterRecord], int]:
        """A page of dead letters, newest first (tenant None: all), and their total."""
        where, params = (" WHERE tenant=?", (tenant,)) if tenant is not None else ("", ())

        def run():
            total = self._rconn.execute("SELECT count(*) FROM deadletters" + where, params).fetchone()[0]
            rows = self._rconn.execute(_DEADLETTER_SELECT + where + " ORDER BY seq DESC LIMIT ? OFFSET ?",
                                       (*params, limit, offset)).fetchall()
            return [DeadLetterRecord(*r) for r in rows], total
        return await self._read(run)

    async def count_deadletters(self, tenant: str | None = None) -> int:
        """How many dead letters are kept (tenant None: all)."""
        def run():
            if tenant is None:
                return self._rconn.execute("SELECT count(*) FROM deadletters").fetchone()[0]
            return self._rconn.execute("SELECT count(*) FROM deadletters WHERE tenant=?", (tenant,)).fetchone()[0]
        return await self._read(run)

    async def trim_deadletters(self, keep: int) -> int:
        """Delete all but the newest `keep` dead letters; return how many were deleted."""
        def run(conn):
            cur = conn.execute("DELETE FROM deadletters WHERE seq <= (SELECT seq FROM deadletters ORDER BY seq DESC "
                               "LIMIT 1 OFFSET ?)", (keep,))
            return cur.rowcount
        return await self._write_op(run)

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
        """History rows matching the query (see the history section at the end of this module)."""
        return await self._read(sqlite_history.read, self._rconn, tenant, query)

    async def history_after(self, after: int, limit: int) -> list[tuple[str, HistoryRow]]:
        """(tenant, row) of the history rows of every tenant with seq > after, in seq order (history section)."""
        return await self._read(sqlite_history.after, self._rconn, after, limit)

    async def history_max_seq(self) -> int:
        """The seq of the newest history instance (0 when there is none)."""
        return await self._read(sqlite_history.last_seq, self._rconn)

    async def get_cursor(self, name: str) -> int:
        """The seq a history consumer has handled up to (0 before its first run)."""
        def run():
            row = self._rconn.execute("SELECT seq FROM history_cursors WHERE name=?", (name,)).fetchone()
            return row[0] if row else 0
        return await self._read(run)

    async def set_cursor(self, name: str, seq: int) -> None:
        """Persist the seq a history consumer has handled up to."""
        await self._write_op(lambda conn: conn.execute(
            "INSERT INTO history_cursors(name, seq) VALUES (?,?) ON CONFLICT(name) DO UPDATE SET seq=excluded.seq",
            (name, seq)))

# The outbox and lease statements take their rows as one JSON list (json_each), like sqlite_write: a settlement
# or a lease round of hundreds of subscriptions is then a few sqlite3_steps, not one (and one GIL return) per row.
_SETTLE_DONE = "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?1))"
_SETTLE_STATUS = (
    "WITH s AS MATERIALIZED (SELECT c.value->>'$[0]' AS tenant, c.value->>'$[1]' AS id, c.value->>'$[2]' AS sent, "
    "c.value->>'$[3]' AS failed, c.value->>'$[4]' AS last_notification, c.value->>'$[5]' AS last_success, "
    "c.value->>'$[6]' AS last_failure, c.value->>'$[7]' AS status FROM json_each(?1) AS c) "
    "UPDATE subscriptions SET times_sent=times_sent+s.sent, times_failed=times_failed+s.failed, "
    "last_notification=coalesce(s.last_notification, subscriptions.last_notification), "
    "last_success=coalesce(s.last_success, subscriptions.last_success), "
    "last_failure=coalesce(s.last_failure, subscriptions.last_failure), "
    "delivery_status=coalesce(s.status, subscriptions.delivery_status) "
    "FROM s WHERE subscriptions.tenant=s.tenant AND subscriptions.id=s.id")
_TAKE_LEASES = (
    "INSERT INTO delivery_leases(tenant, subscription_id, owner, until) "
    "SELECT c.value->>'$[0]', c.value->>'$[1]', ?1, ?2 FROM json_each(?3) AS c WHERE true "
    "ON CONFLICT(tenant, subscription_id) DO UPDATE SET owner=excluded.owner, until=excluded.until "
    "WHERE delivery_leases.owner=excluded.owner OR delivery_leases.until<?4")
_HELD_LEASES = (
    "SELECT json_group_array(json_array(l.tenant, l.subscription_id)) FROM json_each(?2) AS c "
    "CROSS JOIN delivery_leases l ON l.tenant=c.value->>'$[0]' AND l.subscription_id=c.value->>'$[1]' "
    "WHERE l.owner=?1")
_RELEASE_LEASES = ("DELETE FROM delivery_leases WHERE owner=?1 AND (tenant, subscription_id) IN "
                   "(SELECT value->>'$[0]', value->>'$[1]' FROM json_each(?2))")
# [[id, version], doc, [id, version], doc, ...] of the ids in ?2 (the stored JSON documents joined as they are)
_GET_MANY = ("SELECT '[' || group_concat(json_array(id, version) || ',' || doc, ',') || ']' FROM entities "
             "WHERE tenant=?1 AND id IN (SELECT value FROM json_each(?2))")

_SUB_COLUMNS = ("SELECT tenant, id, doc, times_sent, times_failed, last_notification, last_success, last_failure, "
                "delivery_status")
_SUB_SELECT = _SUB_COLUMNS + " FROM subscriptions"


def _subscription(row) -> SubscriptionRecord:
    doc = row[2]
    return SubscriptionRecord(row[0], row[1], orjson.loads(doc), row[3], row[4], row[5], row[6], row[7], row[8])


def _collect(rows, keep: Keep | None, stop_after: int | None) -> list[dict]:
    """Decode rows, keep those keep() accepts, stop once stop_after are kept."""
    loads = orjson.loads
    out: list[dict] = []
    for (raw,) in rows:
        doc = loads(raw)
        if keep is None or keep(doc):
            out.append(doc)
            if stop_after is not None and len(out) >= stop_after:
                break
    return out


# ---------------------------------------------------------------- device registry and dead letters (issue 4)

class _Rollback(Exception):
    """Raised inside a write operation to roll it back and hand its argument to the caller."""


_GROUP_SELECT = "SELECT tenant, service_path, apikey, resource, doc FROM config_groups"
_DEVICE_SELECT = "SELECT tenant, service_path, device_id, apikey, doc, last_seen FROM devices"
_DEADLETTER_SELECT = ("SELECT seq, time, transport, topic, address, tenant, device_id, reason, payload_b64 "
                      "FROM deadletters")


def _group(row) -> GroupRecord:
    return GroupRecord(row[0], row[1], row[2], row[3], orjson.loads(row[4]))


def _device(row) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], row[2], row[3], orjson.loads(row[4]), row[5])


def _registry_filter(tenant: str, service_path: str | None, **equal: str | None) -> tuple[str, list]:
    """The WHERE clause (and parameters) of a registry listing: tenant, optional service path and column equalities."""
    clauses, params = ["tenant=?"], [tenant]
    if service_path is not None:
        clauses.append("service_path=?")
        params.append(service_path)
    for column, value in equal.items():
        if value is not None:
            clauses.append(f"{column}=?")
            params.append(value)
    return " WHERE " + " AND ".join(clauses), params
