"""Delivery of queued notifications: at least once, in order per subscription, retried with backoff.

The store's outbox is the queue. Each subscription with pending notifications gets one worker task that
holds the subscription's delivery lease (so of several processes sharing a store only one delivers a given
subscription, keeping its order), reads the oldest rows, sends them, and settles them in the store: a
delivered row is deleted, a failed one is retried after a backoff (later rows of the same subscription
wait, so order is kept), and after the retry budget it is dropped and counted in the subscription status.
A slow endpoint only ever holds its own subscription's worker: ingest never waits for delivery.
"""
from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Callable

from ..context.model import now_iso
from ..store.base import StatusUpdate, Store
from .matcher import Compiled
from .senders import Delivery, DeliveryFailed, HttpSender, MqttSender

log = logging.getLogger("citybridge.notify")

_BATCH = 100


class Dispatcher:
    """Delivers the outbox; wake() after rows are committed, recover() for rows from earlier runs."""

    def __init__(self, store: Store, lookup: Callable[[str, str], Compiled | None], *, timeout: float = 10.0,
                 max_attempts: int = 20, backoff_start: float = 0.5, backoff_max: float = 60.0, lease_ttl: float = 10.0):
        self.store = store
        self.lookup = lookup
        self.max_attempts = max_attempts
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.lease_ttl = lease_ttl
        self.owner = f"citybridge-{uuid.uuid4().hex}"
        self.http = HttpSender(timeout)
        self.mqtt = MqttSender(timeout)
        self.workers: dict[tuple[str, str], asyncio.Task] = {}
        self.dirty: set[tuple[str, str]] = set()
        self._recovery: asyncio.Task | None = None
        self._closing = False

    def start(self, recovery_interval: float = 5.0) -> None:
        """Start the loop that picks up rows left by earlier runs or by processes that died."""
        self._recovery = asyncio.create_task(self._recover_forever(recovery_interval))

    async def close(self) -> None:
        """Stop workers (rows stay in the outbox for the next run) and close connections."""
        self._closing = True
        tasks = list(self.workers.values()) + ([self._recovery] if self._recovery else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.http.close()
        await self.mqtt.close()

    def wake(self, tenant: str, sub_id: str) -> None:
        """Make sure a worker delivers this subscription's pending rows."""
        if self._closing:
            return
        key = (tenant, sub_id)
        self.dirty.add(key)
        if key not in self.workers:
            self.workers[key] = asyncio.create_task(self._work(key))

    async def _recover_forever(self, interval: float) -> None:
        while True:
            try:
                for tenant, sub_id in await self.store.outbox_pending():
                    self.wake(tenant, sub_id)
            except Exception:  # the store may be briefly unavailable; try again next round
                log.exception("outbox recovery scan failed")
            await asyncio.sleep(interval)

    async def _work(self, key: tuple[str, str]) -> None:
        tenant, sub_id = key
        try:
            if not await self.store.acquire_lease(tenant, sub_id, self.owner, self.lease_ttl):
                return  # another process delivers this subscription
            lost = asyncio.Event()
            heartbeat = asyncio.create_task(self._keep_lease(tenant, sub_id, lost))
            try:
                while not lost.is_set():
                    self.dirty.discard(key)
                    rows = await self.store.outbox_next(tenant, sub_id, _BATCH)
                    if not rows:
                        if key in self.dirty:
                            continue
                        return
                    await self._deliver(tenant, sub_id, rows, lost)
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                if not self._closing and not lost.is_set():
                    await self.store.release_lease(tenant, sub_id, self.owner)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery worker for %s failed; the recovery scan will restart it", sub_id)
        finally:
            self.workers.pop(key, None)
            if key in self.dirty and not self._closing:
                self.wake(tenant, sub_id)

    async def _keep_lease(self, tenant: str, sub_id: str, lost: asyncio.Event) -> None:
        """Renew the delivery lease while the worker runs (sends and backoff sleeps may outlast it)."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if not await self.store.acquire_lease(tenant, sub_id, self.owner, self.lease_ttl):
                    log.warning("delivery lease of %s was taken over; this worker stops", sub_id)
                    lost.set()
                    return
            except Exception:  # the store may be briefly unavailable; the lease still has time left
                log.exception("renewing the delivery lease of %s failed", sub_id)

    async def _deliver(self, tenant: str, sub_id: str, rows: list[tuple[int, bytes, int]], lost: asyncio.Event) -> None:
        delivered: list[int] = []
        for seq, payload, attempts in rows:
            if lost.is_set():
                break
            sub = self.lookup(tenant, sub_id)
            if sub is None:  # deleted meanwhile: its notifications go with it
                delivered.append(seq)
                continue
            endpoint = sub.doc["notification"]["endpoint"]
            sender = self.mqtt if endpoint["uri"].startswith("mqtt") else self.http
            try:
                await sender.send(Delivery(tenant, endpoint, bytes(payload), sub.context_url))
            except DeliveryFailed as failure:
                now = now_iso()
                attempts += 1
                if attempts >= self.max_attempts:
                    log.warning("notification for %s dropped after %d attempts: %s", sub_id, attempts, failure)
                    await self.store.outbox_settle(tenant, sub_id, delivered + [seq], None, StatusUpdate(
                        sent=len(delivered) + 1, failed=1, last_notification=now, last_failure=now, status="failed",
                        last_success=now if delivered else None))
                    delivered = []
                    continue
                await self.store.outbox_settle(tenant, sub_id, delivered, (seq, attempts), StatusUpdate(
                    sent=len(delivered) + 1, failed=1, last_notification=now, last_failure=now, status="failed",
                    last_success=now if delivered else None))
                log.info("notification for %s failed (attempt %d): %s", sub_id, attempts, failure)
                delay = min(self.backoff_max, self.backoff_start * 2 ** (attempts - 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                return
            delivered.append(seq)
        if delivered:
            now = now_iso()
            await self.store.outbox_settle(tenant, sub_id, delivered, None, StatusUpdate(
                sent=len(delivered), last_notification=now, last_success=now, status="ok"))
