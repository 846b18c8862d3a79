"""Delivery of queued notifications: at least once, in order per subscription, retried with backoff.

The store's outbox is the queue. Each subscription with pending notifications gets one worker task that
holds the subscription's delivery lease (so of several processes sharing a store only one delivers a given
subscription, keeping its order). The worker reads the oldest pending rows, skips those it already sent
whose removal is not yet recorded, sends the rest one by one and hands the outcome to the settler, which
records delivered rows and statuses for many subscriptions in one store transaction every few
milliseconds (and before a lease is given back, so another process never re-sends them). Having sent all
that a read returned, a worker waits for the next wake() rather than reading again. A backlog of rows is
sent joined into fewer notifications (joining.py). A failed row is recorded at once and retried after a
backoff before any later row of its subscription (order is kept); after the retry budget it is dropped and
counted in the subscription status. An idle worker lingers a moment, keeping its lease, so a steady flow
costs no lease traffic; leases are taken, renewed and given back in bulk, and a worker stops sending well
before its lease could run out (even if renewals fail), so no other process sends the same rows meanwhile.
A slow endpoint only ever holds its own subscription's worker, sends share a bounded number of slots, and
ingest never waits for delivery.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Callable

from .. import metrics
from ..context.model import now_iso
from ..store.base import Settlement, StatusUpdate, Store
from . import joining
from .matcher import Compiled
from .senders import Delivery, DeliveryFailed, HttpSender, MqttSender

log = logging.getLogger("citybridge.notify")

_BATCH = 100
Key = tuple[str, str]  # (tenant, subscription id)
Row = joining.Row


class Dispatcher:
    """Delivers the outbox; wake() after rows are committed; a recovery scan finds rows of earlier runs."""

    def __init__(self, store: Store, lookup: Callable[[str, str], Compiled | None], *, timeout: float = 10.0,
                 max_attempts: int = 20, backoff_start: float = 0.5, backoff_max: float = 60.0,
                 lease_ttl: float = 10.0, linger: float = 2.0, concurrency: int = 128, settle_every: float = 0.02,
                 join_backlog: int = 10):
        self.store = store
        self.lookup = lookup
        self.max_attempts = max_attempts
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.lease_ttl = lease_ttl
        self.linger = linger
        self.settle_every = settle_every
        self.join_backlog = join_backlog  # queued rows a read must find before they are joined (0: never)
        self.owner = f"citybridge-{uuid.uuid4().hex}"
        self.http = HttpSender(timeout)
        self.mqtt = MqttSender(timeout)
        self.workers: dict[Key, asyncio.Task] = {}
        self.signals: dict[Key, asyncio.Event] = {}
        self.held: set[Key] = set()
        self.deadlines: dict[Key, float] = {}  # monotonic time until which a held lease is surely still ours
        self.sent: dict[Key, set[int]] = {}  # delivered rows whose removal from the store is not yet recorded
        self._slots = asyncio.Semaphore(concurrency)
        self._acquiring: set[Key] = set()
        self._acquired: asyncio.Future | None = None
        self._settlements: list[Settlement] = []
        self._releases: list[Key] = []
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    def start(self, recovery_interval: float = 5.0) -> None:
        """Start the recovery scan, the settler and the lease keeper."""
        self._tasks = [asyncio.create_task(self._recover_forever(recovery_interval)),
                       asyncio.create_task(self._settle_forever()),
                       asyncio.create_task(self._keep_leases_forever())]

    async def close(self) -> None:
        """Stop workers (undelivered rows stay in the outbox), record what was delivered, close connections."""
        self._closing = True
        tasks = list(self.workers.values()) + self._tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._releases.extend(self.held)
        self.held.clear()  # (a held key is not given back by _flush)
        try:
            await self._flush()
        except Exception:
            log.exception("recording the last deliveries failed; they will be sent again (same ids)")
        await self.http.close()
        await self.mqtt.close()

    def wake(self, tenant: str, sub_id: str) -> None:
        """Make sure a worker delivers this subscription's pending rows."""
        if self._closing:
            return
        key = (tenant, sub_id)
        signal = self.signals.get(key)
        if signal is None:
            signal = self.signals[key] = asyncio.Event()
            self.workers[key] = asyncio.create_task(self._work(key, signal))
        signal.set()

    async def ready(self) -> None:
        """Nothing to wait for: delivery runs in this process (DeliveryProcess.ready waits for its child)."""

    async def changed(self, tenant: str, sub_id: str, doc: dict | None) -> None:
        """A subscription changed: nothing to do here, as lookup reads the index that holds the change."""

    # ---------------------------------------------------------------- background loops

    async def _recover_forever(self, interval: float) -> None:
        while True:
            try:
                for tenant, sub_id in await self.store.outbox_pending():
                    self.wake(tenant, sub_id)
            except Exception:  # the store may be briefly unavailable; try again next round
                log.exception("outbox recovery scan failed")
            await asyncio.sleep(interval)

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settle_every)
            try:
                await self._flush()
            except Exception:  # kept for the next round; a crash meanwhile only means re-sending (same ids)
                log.exception("recording deliveries failed; retrying")

    async def _flush(self) -> None:
        """Record settlements, then give back leases (a lease outlives the record of what it delivered)."""
        # a lease given back by a worker and taken again by the next one before this flush stays taken
        releases, self._releases = [key for key in self._releases if key not in self.held], []
        if self._settlements:
            settlements, self._settlements = self._settlements, []
            try:
                await self.store.outbox_settle(settlements)
            except BaseException:
                self._settlements[:0] = settlements
                self._releases[:0] = releases
                raise
            for item in settlements:
                sent = self.sent.get((item.tenant, item.sub_id))
                if sent is not None:
                    sent.difference_update(item.done)
                    if not sent:
                        del self.sent[(item.tenant, item.sub_id)]
        if releases:
            await self.store.release_leases(self.owner, releases)

    async def _keep_leases_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if not self.held:
                continue
            keys = list(self.held)
            started = time.monotonic()
            try:
                renewed = await self.store.acquire_leases(self.owner, keys, self.lease_ttl)
            except Exception:  # the leases still have time left; workers stop by themselves when they run out
                log.exception("renewing delivery leases failed")
                continue
            self._held_until(renewed & self.held, started)  # (a worker may have given its lease back meanwhile)
            for key in set(keys) - renewed:
                log.warning("delivery lease of %s was taken over; its worker here stops", key[1])
                self.held.discard(key)
                self.deadlines.pop(key, None)

    async def _acquire(self, key: Key) -> bool:
        """Take a lease, together with the other workers starting in the same moment (one store write)."""
        self._acquiring.add(key)
        if self._acquired is None:
            self._acquired = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._acquire_batch()))
        held = await asyncio.shield(self._acquired)
        return key in held

    async def _acquire_batch(self) -> None:
        keys, future = list(self._acquiring), self._acquired
        self._acquiring, self._acquired = set(), None
        started = time.monotonic()
        try:
            held = await self.store.acquire_leases(self.owner, keys, self.lease_ttl)
        except Exception as exc:
            future.set_exception(exc)
            return
        self._held_until(held, started)
        future.set_result(held)

    def _held_until(self, keys: set[Key], started: float) -> None:
        """Record leases taken or renewed by a store call made at `started`.

        Another process may take a lease over once it runs out (lease_ttl after the store wrote it, later than
        `started`); a worker stops sending a third of the ttl before that, so two processes never send one
        subscription's rows at the same time, even when renewals fail."""
        self.held |= keys
        deadline = started + self.lease_ttl * 2 / 3
        for key in keys:
            self.deadlines[key] = deadline

    def _holds(self, key: Key) -> bool:
        """True while this process surely holds the subscription's lease."""
        return key in self.held and time.monotonic() < self.deadlines.get(key, 0.0)

    # ---------------------------------------------------------------- one subscription's worker

    async def _work(self, key: Key, signal: asyncio.Event) -> None:
        tenant, sub_id = key
        try:
            signal.clear()  # a wake from now on restarts the worker if it ends without the lease
            if key not in self.held and not await self._acquire(key):
                # another process delivers this subscription. A wake that comes meanwhile asks again, a while
                # later rather than at once (not a loop of store writes); without one, the recovery scan does.
                await asyncio.sleep(self.lease_ttl / 10)
                return
            horizon: int | None = None  # rows up to this seq may have been sent by an earlier owner: never joined
            while self._holds(key):
                signal.clear()
                sent = set(self.sent.get(key, ()))  # a copy from before the read: the settler may shrink the set
                limit = _BATCH + len(sent)
                rows = await self.store.outbox_next(tenant, sub_id, limit)
                if horizon is None:
                    # every row an earlier owner can have sent was committed before this lease was taken
                    full = len(rows) == limit
                    horizon = await self.store.outbox_last(tenant, sub_id) if full else max((r[0] for r in rows),
                                                                                          default=0)
                fresh = [row for row in rows if row[0] not in sent]
                if fresh:
                    batch = fresh[:_BATCH]
                    if self.join_backlog and len(batch) >= self.join_backlog:
                        batch = await self._join(key, batch, horizon)
                    if batch is None:
                        continue  # the rows changed under the merge: read them again
                    complete = await self._deliver(key, batch)
                    if not complete or len(fresh) > _BATCH or len(rows) == _BATCH + len(sent):
                        # a row to retry, or more rows than one read takes: read again at once, after letting
                        # the loop run (an outbox read on SQLite does not yield, nor does dropping the rows
                        # of a deleted subscription, and the settler must get to record what was sent)
                        await asyncio.sleep(0)
                        continue
                # Every row pending at the read is sent (or was, its removal being recorded); a row committed
                # since came with wake(), which set the signal cleared before the read, so waiting misses none.
                try:
                    await asyncio.wait_for(signal.wait(), self.linger)
                except asyncio.TimeoutError:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery worker for %s failed; the recovery scan will restart it", sub_id)
            await asyncio.sleep(self.lease_ttl / 10)  # a store outage: no loop of attempts and tracebacks
        finally:
            self.workers.pop(key, None)
            self.signals.pop(key, None)
            if key in self.held and not self._closing:
                self.held.discard(key)
                self.deadlines.pop(key, None)
                self._releases.append(key)
            if signal.is_set() and not self._closing:
                self.wake(tenant, sub_id)  # rows arrived while this worker was finishing

    async def _join(self, key: Key, rows: list[Row], horizon: int) -> list[Row] | None:
        """The rows with each run of joinable ones replaced by one joined row, recorded in the store first.

        The rows as they are if the store refused the merge (a row changed meanwhile, or the lease is lost); None,
        to read them again, if the store failed."""
        sub = self.lookup(*key)
        if sub is None or not self._holds(key):
            return rows  # deleted (its rows are dropped) or no longer ours (nothing more is sent)
        changed = sub.doc.get("modifiedAt") if sub.doc.get("modifiedAt") != sub.doc.get("createdAt") else None
        parsed: dict[int, dict] = {}
        grouped = joining.groups(rows, horizon, joining.rendered_after(changed), parsed)
        if len(grouped) == len(rows):
            return rows
        merges = [([(seq, payload) for seq, payload, _attempts in group],
                   joining.join([parsed[row[0]] for row in group])) for group in grouped if len(group) > 1]
        try:
            merged = await self.store.outbox_merge(key[0], key[1], self.owner, merges)
        except Exception:  # nothing was merged, or the next read shows that it was
            log.warning("joining queued notifications of %s failed; reading them again", key[1], exc_info=True)
            merged = None
        if merged is False:
            return rows  # refused, nothing changed: sent as they are
        if not merged:
            await asyncio.sleep(0.05)
            return None
        metrics.notifications_joined(sum(len(parts) for parts, _ in merges), len(merges))
        joined = {parts[0][0]: payload for parts, payload in merges}
        return [group[0] if len(group) == 1 else (group[0][0], joined[group[0][0]], 0) for group in grouped]

    async def _deliver(self, key: Key, rows: list[tuple[int, bytes, int]]) -> bool:
        """Send rows in order, stopping at a failed one (retried after a backoff, before any later row).

        True when every row was handled (delivered, dropped after its retry budget, or of a deleted subscription)."""
        tenant, sub_id = key
        done: list[int] = []
        for seq, payload, attempts in rows:
            if not self._holds(key):
                self._record_success(tenant, sub_id, done)
                return False
            sub = self.lookup(tenant, sub_id)
            if sub is None:  # deleted meanwhile: its notifications go with it
                done.append(seq)
                continue
            endpoint = sub.doc["notification"]["endpoint"]
            sender = self.mqtt if endpoint["uri"].startswith("mqtt") else self.http
            try:
                async with self._slots:
                    await sender.send(Delivery(tenant, endpoint, bytes(payload), sub.context_url))
            except DeliveryFailed as failure:
                metrics.notification(False)
                self._record_success(tenant, sub_id, done)
                done = []
                attempts += 1
                now = now_iso()
                failed = StatusUpdate(sent=1, failed=1, last_notification=now, last_failure=now, status="failed")
                cooldown = endpoint.get("cooldown", 0) / 1000  # 5.2.15: no attempt within cooldown ms of a failure
                if attempts >= self.max_attempts:
                    log.warning("notification for %s dropped after %d attempts: %s", sub_id, attempts, failure)
                    await self.store.outbox_settle([Settlement(tenant, sub_id, [seq], None, failed)])
                    await asyncio.sleep(cooldown)
                    continue
                await self.store.outbox_settle([Settlement(tenant, sub_id, [], (seq, attempts), failed)])
                log.info("notification for %s failed (attempt %d): %s", sub_id, attempts, failure)
                delay = min(self.backoff_max, self.backoff_start * 2 ** (attempts - 1))
                await asyncio.sleep(max(cooldown, random.uniform(delay / 2, delay)))
                return False
            metrics.notification(True)
            done.append(seq)
        self._record_success(tenant, sub_id, done)
        return True

    def _record_success(self, tenant: str, sub_id: str, done: list[int]) -> None:
        if done:
            self.sent.setdefault((tenant, sub_id), set()).update(done)
            now = now_iso()
            self._settlements.append(Settlement(tenant, sub_id, done, None, StatusUpdate(
                sent=len(done), last_notification=now, last_success=now, status="ok")))
