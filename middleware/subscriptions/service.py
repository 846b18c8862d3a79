"""Subscriptions as a running service: CRUD over the store, the matching index, delivery and periodic notifications."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from ..context.broker import Broker
from ..context.errors import AlreadyExists, LdContextNotAvailable, ResourceNotFound
from ..context.jsonld import ContextResolver
from ..context.model import now_iso
from ..store.base import OutboxRow, Store, SubscriptionRecord
from .delivery import Dispatcher
from .delivery_process import DeliveryProcess
from .matcher import (Compiled, Planner, SubscriptionIndex, compile_subscription, notification_context,
                      notification_payload, render_for)
from .model import QUERY_CONTEXT, merge_fragment, validate_subscription

log = logging.getLogger("citybridge.subscriptions")

# A change committed this long after a later-stamped one is still picked up: each look at the store re-reads the
# subscriptions stamped within the window (a stamp is taken before its transaction commits, so commits can land out
# of stamp order: a PostgreSQL sequence value, or two processes' clocks on SQLite)
_LATE_COMMIT_WINDOW = 30.0


class SubscriptionService:
    """Owns the subscriptions of one process: keeps the index current and hands notifications to the dispatcher."""

    def __init__(self, store: Store, broker: Broker, contexts: ContextResolver, *, timeout: float = 10.0,
                 max_attempts: int = 20, backoff_max: float = 60.0, refresh_interval: float = 2.0,
                 join_backlog: int = 10, delivery_store: str | None = None, log_level: str = "info"):
        """With delivery_store (the store's URL), a child process delivers the notifications; else this one does."""
        self.store = store
        self.broker = broker
        self.contexts = contexts
        self.index = SubscriptionIndex()
        options = {"timeout": timeout, "max_attempts": max_attempts, "backoff_max": backoff_max,
                   "join_backlog": join_backlog}
        self.dispatcher: Dispatcher | DeliveryProcess
        if delivery_store:
            self.dispatcher = DeliveryProcess(delivery_store, options, log_level)
        else:
            self.dispatcher = Dispatcher(store, self.index.get, **options)
        self.refresh_interval = refresh_interval
        # what the index was built from: each subscription's change stamp, and (time, newest stamp seen) per look
        self._stamps: dict[tuple[str, str], int] = {}
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._tasks: list[asyncio.Task] = []
        self._next_periodic: dict[tuple[str, str], float] = {}

    async def start(self) -> None:
        """Load every subscription, attach the planner to the broker, start delivery and the background loops."""
        await self._load()
        self.broker.planner = Planner(self.index)
        self.broker.on_outbox = self._queued
        self.dispatcher.start()
        await self.dispatcher.ready()
        self._tasks = [asyncio.create_task(self._refresh_forever()), asyncio.create_task(self._periodic_forever())]

    async def close(self) -> None:
        """Stop the loops and the dispatcher; pending notifications stay in the store."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.close()

    def _queued(self, tenant: str, rows: list[OutboxRow]) -> None:
        for sub_id in dict.fromkeys(row.subscription_id for row in rows):
            self.dispatcher.wake(tenant, sub_id)

    # ---------------------------------------------------------------- index upkeep

    async def compile(self, tenant: str, doc: dict) -> Compiled:
        """Compile a stored subscription with its @context (and jsonldContext) resolved."""
        written = doc.get(QUERY_CONTEXT) or {}  # q and geoQ set by a PATCH: the @context each was written with
        terms = await self.contexts.resolve(written.get("q", doc.get("@context")))
        geo_terms = await self.contexts.resolve(written.get("geoQ", doc.get("@context")))
        context, unlinkable = notification_context(doc)
        out_terms = await self.contexts.resolve(None if unlinkable else context)
        return compile_subscription(tenant, doc, terms, out_terms, geo_terms)

    async def _load(self) -> None:
        """Build the index from every stored subscription."""
        started = time.monotonic()
        for record, stamp in await self.store.all_subscriptions():
            await self._index_record(record, stamp)
        self._marks.append((started, -1))  # until the window has passed, every stamp is compared again

    async def _refresh(self) -> None:
        """Bring the index up to date with the store: recompile what changed since the last look, drop what is gone."""
        now = time.monotonic()
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= now - _LATE_COMMIT_WINDOW:
            marks.popleft()  # marks[0] stays the newest look at least the window old
        since = marks[0][1] if marks else -1
        total, stamps = await self.store.subscription_stamps(since)
        await self._index_changed(stamps)
        if total != len(self._stamps):  # deleted, or stamped out of the window (a clock step): compare them all
            _, every = await self.store.subscription_stamps(-1)
            present = {(tenant, sub_id) for tenant, sub_id, _ in every}
            for key in [key for key in self._stamps if key not in present]:
                await self._forget(*key)
            await self._index_changed(every)
        marks.append((now, max((stamp for _, _, stamp in stamps), default=since)))

    async def _index_changed(self, stamps: list[tuple[str, str, int]]) -> None:
        """(Re)index the subscriptions whose stamp differs from the one the index was built from."""
        for tenant, sub_id, stamp in stamps:
            if self._stamps.get((tenant, sub_id)) != stamp:
                record = await self.store.get_subscription(tenant, sub_id)
                if record is not None:
                    await self._index_record(record, stamp)

    async def _index_record(self, record: SubscriptionRecord, stamp: int) -> None:
        """(Re)compile one stored subscription into the index, keeping when it last notified."""
        key = (record.tenant, record.id)
        self._stamps[key] = stamp
        old = self.index.get(*key)
        if old is not None and old.doc == record.doc:
            return  # this process made the change (or saw it already): nothing to compile, its schedule stands
        await self.dispatcher.changed(*key, record.doc)  # delivery holds it before anything is rendered with it
        try:
            compiled = await self.compile(record.tenant, record.doc)
        except Exception:
            log.exception("subscription %s cannot be compiled; it will not notify", record.id)
            self.index.remove(*key)
            return
        if self._stamps.get(key) != stamp:
            return  # deleted (or changed again) while it compiled: the later look decides
        old = self.index.get(*key)
        if old is not None:
            compiled.last_notified = old.last_notified
        self._next_periodic.pop(key, None)
        self.index.add(compiled)

    async def _forget(self, tenant: str, sub_id: str) -> None:
        """Drop a deleted subscription from the index (and from delivery)."""
        self._stamps.pop((tenant, sub_id), None)
        self._next_periodic.pop((tenant, sub_id), None)
        self.index.remove(tenant, sub_id)
        await self.dispatcher.changed(tenant, sub_id, None)

    async def _refresh_forever(self) -> None:
        """Pick up subscriptions created, changed or deleted by other processes sharing the store."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self._refresh()
            except Exception:
                log.exception("subscription refresh failed")

    # ---------------------------------------------------------------- CRUD

    async def create(self, tenant: str, body: dict, terms, context) -> str:
        """Validate, store and index a new subscription; return its id."""
        doc = validate_subscription(body, terms, context, now=now_iso())
        compiled = await self._compile_checked(tenant, doc)
        if not await self.store.put_subscription(tenant, doc["id"], doc, create=True):
            raise AlreadyExists(f"subscription {doc['id']} already exists")
        await self.dispatcher.changed(tenant, doc["id"], doc)  # delivery holds it before anything is rendered
        self.index.add(compiled)
        return doc["id"]

    async def get(self, tenant: str, sub_id: str) -> SubscriptionRecord:
        """One subscription with its status; ResourceNotFound if absent."""
        record = await self.store.get_subscription(tenant, sub_id)
        if record is None:
            await self.broker.check_tenant(tenant)
            raise ResourceNotFound(f"subscription {sub_id} not found")
        return record

    async def update(self, tenant: str, sub_id: str, fragment: dict, terms, context: Any = None) -> None:
        """Merge a fragment into a subscription (5.8.2) and re-index it; a q or geoQ given is expanded with the
        request's @context (context), like every other name of the fragment."""
        record = await self.get(tenant, sub_id)
        merged = merge_fragment(record.doc, fragment)
        if "expiresAt" not in fragment:
            merged.pop("expiresAt", None)
            doc = validate_subscription(merged, terms, record.doc.get("@context"), now=now_iso(), sub_id=sub_id)
            if "expiresAt" in record.doc:
                doc["expiresAt"] = record.doc["expiresAt"]
        else:
            doc = validate_subscription(merged, terms, record.doc.get("@context"), now=now_iso(), sub_id=sub_id)
        doc["createdAt"] = record.doc["createdAt"]
        written = dict(record.doc.get(QUERY_CONTEXT) or {})  # per member: q and geoQ keep their own @context
        for member in ("q", "geoQ"):
            if member in fragment:
                written[member] = context
            if member not in doc or written.get(member, doc["@context"]) == doc["@context"]:
                written.pop(member, None)
        if written:
            doc[QUERY_CONTEXT] = written
        compiled = await self._compile_checked(tenant, doc)
        if not await self.store.put_subscription(tenant, sub_id, doc, create=False):
            raise ResourceNotFound(f"subscription {sub_id} not found")
        await self.dispatcher.changed(tenant, sub_id, doc)  # delivery holds it before anything is rendered with it
        old = self.index.get(tenant, sub_id)
        if old is not None:
            compiled.last_notified = old.last_notified
        self.index.add(compiled)
        self._next_periodic.pop((tenant, sub_id), None)

    async def delete(self, tenant: str, sub_id: str) -> None:
        """Delete a subscription and its pending notifications."""
        if not await self.store.delete_subscription(tenant, sub_id):
            await self.broker.check_tenant(tenant)
            raise ResourceNotFound(f"subscription {sub_id} not found")
        await self._forget(tenant, sub_id)

    async def _compile_checked(self, tenant: str, doc: dict) -> Compiled:
        try:
            return await self.compile(tenant, doc)
        except LdContextNotAvailable:
            raise
        except Exception as exc:
            raise LdContextNotAvailable(f"the subscription's @context cannot be used: {exc}") from exc

    # ---------------------------------------------------------------- periodic notifications (timeInterval)

    async def _periodic_forever(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for key, sub in list(self.index.periodic.items()):
                if not sub.active():
                    continue
                due = self._next_periodic.get(key)
                if due is None:
                    due = now  # first notification right away, then every timeInterval
                if now < due:
                    continue
                interval = float(sub.doc["timeInterval"])
                self._next_periodic[key] = now + interval
                try:
                    await self._periodic(sub, interval)
                except Exception:
                    log.exception("periodic notification of %s failed", sub.id)

    async def _periodic(self, sub: Compiled, interval: float) -> None:
        lease = (sub.tenant, f"{sub.id}#periodic")  # one process of those sharing the store sends each period
        if not await self.store.acquire_leases(self.dispatcher.owner, [lease], interval * 0.9):
            return
        matched: dict[str, dict] = {}
        for entity_id, pattern, types in sub.selectors:
            result = await self.broker.query(sub.tenant, ids=[entity_id] if entity_id else None,
                                             id_pattern=pattern.pattern if pattern else None, types=types,
                                             q=sub.q, geo=sub.geo, scope=sub.scope, limit=10_000)
            for doc in result.entities:
                matched.setdefault(doc["id"], doc)
        if not matched:
            return  # no matching entities: no notification (5.8.6)
        now = now_iso()
        entities = [render_for(sub, None, sub.in_datasets(doc), set(), now) for doc in matched.values()]
        await self.store.add_outbox(sub.tenant, [OutboxRow(sub.id, notification_payload(sub, entities, now))])
        self.dispatcher.wake(sub.tenant, sub.id)
