"""The ingest stage: Uplink → device → decode → normalize → one batched commit → acks. Nothing is dropped silently.

Uplinks are gathered into batches (up to `batch_max`, or `batch_wait` seconds after the first one arrived); a batch
is resolved and decoded while the previous one commits, measurements of one entity that set different attributes
are merged into one upsert (later readings of the same attribute stay upserts of their own, so history keeps every
reading), and every uplink is acknowledged (MQTT PUBACK) only after its batch is committed or its dead letter is
stored. A commit that fails (store down) is retried with backoff, never acknowledged before it succeeds.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from datetime import datetime

import orjson

from .. import metrics
from ..codecs import decode
from ..context.broker import Broker
from ..context.errors import NgsiLdError
from ..context.model import EntityParser, now_iso
from ..normalize import device_entity_id, to_fragments
from .registry import AutoprovisionRefused
from .types import DecodeError, Device, Uplink

log = logging.getLogger("citybridge.ingest")

# /<apikey>/<device_id>/attrs[/<attr>] and /<apikey>/<device_id>/cmdexe, with or without the leading slash
IOTA_TOPIC = re.compile(r"^/?(?P<apikey>[^/$][^/]*)/(?P<device_id>[^/]+)/(?:attrs(?:/(?P<attr>[^/]+))?|(?P<cmdexe>cmdexe))$")
SILENT_AFTER_INTERVALS = 2.0    # a device is "silent" once this many profile intervals pass without data
INGESTING = contextvars.ContextVar("citybridge_ingesting", default=False)  # set while the ingest commits


class Rejected(Exception):
    """An uplink that goes to the dead letters: reason (starts with a code, e.g. 'decode-error: ...') and device."""

    def __init__(self, reason: str, device: Device | None = None):
        super().__init__(reason)
        self.reason, self.device = reason, device


@dataclass
class Route:
    """Who sent an uplink and what it is: the device, its profile (or None) and 'attrs' or 'cmdexe'."""

    device: Device
    profile: object | None
    kind: str = "attrs"


@dataclass
class Prepared:
    """A decoded batch: merged entity bodies per tenant, the owners of each body, dead letters, routed devices."""

    uplinks: list[Uplink]
    bodies: dict[str, dict[str, list[list]]] = field(default_factory=dict)  # tenant → entity id → [[body, {owners}]]
    dead: dict[int, tuple[str, Device | None]] = field(default_factory=dict)
    devices: dict[int, Device] = field(default_factory=dict)
    watch: dict[tuple[str, str], float] = field(default_factory=dict)       # (tenant, Device entity id) → interval

    def add(self, tenant: str, body: dict, owner: int) -> None:
        """Queue a normalized body; merged into the previous body of that entity when it sets other attributes only."""
        items = self.bodies.setdefault(tenant, {}).setdefault(body["id"], [])
        if items and _mergeable(items[-1][0], body):
            items[-1][0].update(body)
            items[-1][1].add(owner)
        else:
            items.append([dict(body), {owner}])

    def reject(self, owners, reason: str) -> None:
        """Dead-letter these uplinks (unless they already are)."""
        for index in owners:
            if index not in self.dead:
                self.dead[index] = (reason, self.devices.get(index))


def _mergeable(into: dict, body: dict) -> bool:
    """True if body only adds attributes that `into` lacks: then one upsert writes both and no reading is lost.

    A body that sets an attribute `into` already sets is a later reading of it: it stays an upsert of its own
    (applied in order in the same commit), so history and InfluxDB get every reading, not just the last.
    """
    if into.get("type") != body.get("type") or into.get("@context") != body.get("@context"):
        return False
    for name, value in body.items():
        if name in ("id", "type", "@context"):
            continue
        if name in into or not isinstance(value, dict) or "datasetId" in value:
            return False
    return True


class Ingest:
    """Turns Uplinks into committed entities, in batches; `submit` is called by adapters on the event loop."""

    def __init__(self, broker: Broker, registry, profiles, deadletters, terms, *, batch_max: int = 1000,
                 batch_wait: float = 0.02, max_payload: int = 64 * 1024, silent_check: float = 5.0):
        self.broker = broker
        self.registry = registry
        self.profiles = profiles
        self.deadletters = deadletters
        self.terms = terms
        self.batch_max = batch_max
        self.batch_wait = batch_wait
        self.max_payload = max_payload
        self.silent_check = silent_check
        self._queue: list[Uplink] = []
        self._wake = asyncio.Event()
        self._prepared: asyncio.Queue[Prepared] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task] = []
        self._watch: dict[tuple[str, str], tuple[float, float]] = {}  # (tenant, id) → (interval, last commit time)
        self.on_device: Callable[[Device], None] | None = None        # told of every device an uplink came from
        self._received: dict[str, int] = {}                           # uplinks per transport, not yet counted
        self.hold: Callable[[], Awaitable[None]] | None = None        # awaited before each commit (backpressure)

    # ---------------------------------------------------------------- lifecycle

    def submit(self, uplink: Uplink) -> None:
        """Accept one uplink (never blocks, never raises)."""
        self._received[uplink.transport] = self._received.get(uplink.transport, 0) + 1
        self._queue.append(uplink)
        if len(self._queue) == 1 or len(self._queue) >= self.batch_max:
            self._wake.set()

    def backlog(self) -> int:
        """How many submitted uplinks wait for a batch."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching, committing and silent-device tasks."""
        self._tasks = [asyncio.create_task(self._gather_forever()), asyncio.create_task(self._commit_forever()),
                       asyncio.create_task(self._silent_forever())]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking batches, let the one being committed finish (its uplinks are acked), then stop."""
        gatherer, committer, silent = self._tasks or (None, None, None)
        for task in (gatherer, silent):
            if task is not None:
                task.cancel()
        if committer is not None:
            deadline = time.monotonic() + timeout
            while not self._prepared.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            committer.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ---------------------------------------------------------------- batching

    async def _next_batch(self) -> list[Uplink]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        while len(self._queue) < self.batch_max:
            remaining = self.batch_wait - (time.time() - self._queue[0].received_at)
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch, self._queue = self._queue[:self.batch_max], self._queue[self.batch_max:]
        received, self._received = self._received, {}
        for transport, n in received.items():  # counted per batch: prometheus labels() costs ~10 µs a call
            metrics.UPLINKS.labels(transport=transport).inc(n)
        return batch

    async def _gather_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._prepared.put(await self.prepare(batch))

    async def _commit_forever(self) -> None:
        while True:
            prepared = await self._prepared.get()
            try:
                if self.hold is not None:  # e.g. the InfluxDB backlog at its bound: no commit, so no acks
                    await self.hold()
                await self.commit(prepared)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop ingestion; these uplinks stay unacknowledged (redelivered)
                log.exception("a batch of %d uplinks could not be committed", len(prepared.uplinks))

    # ---------------------------------------------------------------- stage 1: route, decode, normalize

    async def prepare(self, batch: list[Uplink]) -> Prepared:
        """Route, decode and normalize a batch; failures become dead letters of the batch."""
        prepared = Prepared(batch)
        cache: dict = {}
        for index, uplink in enumerate(batch):
            try:
                route = await self.route(uplink, cache)
                prepared.devices[index] = route.device
                bodies = self.bodies(uplink, route)
            except Rejected as rejected:
                prepared.dead[index] = (rejected.reason, rejected.device)
                continue
            except Exception as exc:
                log.exception("uplink on %s could not be processed", uplink.topic)
                prepared.dead[index] = (f"internal-error: {exc.__class__.__name__}: {exc}", prepared.devices.get(index))
                continue
            tenant = route.device.tenant
            for body in bodies:
                prepared.add(tenant, body, index)
            interval = getattr(route.profile, "interval", None)
            device_entity = device_entity_id(route.device.device_id)
            if interval and any(body["id"] == device_entity for body in bodies):
                prepared.watch[(tenant, device_entity)] = float(interval)
        return prepared

    async def route(self, uplink: Uplink, cache: dict | None = None) -> Route:
        """Who sent the uplink: a profile topic template, else an IoT Agent topic; Rejected when nobody is known."""
        if len(uplink.payload) > self.max_payload:
            raise Rejected(f"payload-too-large: {len(uplink.payload)} bytes, the limit is {self.max_payload} "
                           "(CITYBRIDGE_MAX_PAYLOAD_BYTES)")
        hit = self.profiles.by_topic(uplink.topic) if self.profiles is not None else None
        if hit is not None:
            profile, captured = hit
            if not captured.get("device_id"):
                raise Rejected(f"no-route: the topic template of profile {profile.name} captures no device_id")
            device = await self.device(captured.get("apikey"), captured["device_id"], cache)
            return Route(device, self.profiles.get(device.profile) or profile)
        match = IOTA_TOPIC.match(uplink.topic)
        if match is None:
            raise Rejected(f"no-route: topic {uplink.topic!r} is neither an IoT Agent topic nor a profile template")
        device = await self.device(match["apikey"], match["device_id"], cache)
        profile = self.profiles.get(device.profile) if self.profiles is not None and device.profile else None
        return Route(device, profile, "cmdexe" if match["cmdexe"] else "attrs")

    async def device(self, apikey: str | None, device_id: str, cache: dict | None = None) -> Device:
        """The registered device, autoprovisioned from its config group when allowed; Rejected otherwise."""
        key = (apikey, device_id)
        if cache is not None and key in cache:
            return cache[key]
        device = await self.registry.find(apikey, device_id)
        if device is None:
            group = await self.registry.group_for(apikey) if apikey is not None else None
            if group is None:
                raise Rejected(f"unknown-device: no device {device_id!r} with apikey {apikey!r} and no config group")
            try:
                device = await self.registry.autoprovision(group, device_id)
            except AutoprovisionRefused as exc:
                raise Rejected(f"unknown-device: no device {device_id!r} with apikey {apikey!r} ({exc})") from None
        if cache is not None:
            cache[key] = device
        if self.on_device is not None:
            self.on_device(device)
        return device

    def bodies(self, uplink: Uplink, route: Route) -> list[dict]:
        """The NGSI-LD bodies an uplink writes: the data entity and the Device entity, or a command reply."""
        profile = None if route.kind == "cmdexe" else route.profile  # command results: IoT Agent JSON
        try:
            measurement = decode(uplink, route.device, profile)
        except DecodeError as exc:
            raise Rejected(f"decode-error: {exc}", route.device) from None
        entity, device_entity = to_fragments(measurement, profile)
        return [body for body in (entity, device_entity) if body]

    # ---------------------------------------------------------------- stage 2: commit, dead letters, acks

    async def commit(self, prepared: Prepared) -> None:
        """Upsert every body of the batch (one mutate per tenant), store dead letters, then ack in arrival order."""
        began = time.perf_counter()
        now = now_iso()
        parser = EntityParser(self.terms, now)
        token = INGESTING.set(True)
        try:
            for tenant, entities in prepared.bodies.items():
                ops, owners = [], []
                for items in entities.values():
                    for body, who in items:
                        try:
                            fragment = parser.entity(body)
                        except NgsiLdError as exc:
                            prepared.reject(who, f"invalid-entity: {exc}")
                            continue
                        ops.append((fragment["id"], Broker.append_op(fragment, no_overwrite=False, must_exist=False,
                                                                          keep_newer=True)))
                        owners.append(who)
                results = await _retrying(f"commit of {len(ops)} entities", self.broker.mutate, tenant, ops, now)
                for result, who in zip(results, owners):
                    if isinstance(result, NgsiLdError):
                        prepared.reject(who, f"invalid-entity: {result}")
        finally:
            INGESTING.reset(token)
        letters = [(prepared.uplinks[i], reason, device) for i, (reason, device) in sorted(prepared.dead.items())]
        if letters:
            await asyncio.gather(*(_retrying("dead letter", self.deadletters.add, *letter) for letter in letters))
        wall = time.time()
        measured = 0
        for index, device in prepared.devices.items():
            if index not in prepared.dead:
                measured += 1
                touched = self.registry.touch(device, wall)
                if inspect.isawaitable(touched):
                    await touched
        metrics.committed(measured)
        for key, interval in prepared.watch.items():
            self._watch[key] = (interval, time.monotonic())
        for uplink in prepared.uplinks:
            if uplink.ack is not None:
                await uplink.ack()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d uplinks (%d entities, %d dead letters) committed in %.1f ms, %d waiting",
                      len(prepared.uplinks), sum(len(e) for e in prepared.bodies.values()), len(prepared.dead),
                      (time.perf_counter() - began) * 1000, len(self._queue))

    # ---------------------------------------------------------------- silent devices

    async def _silent_forever(self) -> None:
        while True:
            await asyncio.sleep(self._silent_period())
            try:
                await self.mark_silent()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the silent-device check failed")

    def _silent_period(self) -> float:
        intervals = [interval for interval, _ in self._watch.values()]
        return max(0.2, min([self.silent_check, *(i / 2 for i in intervals)]))

    async def mark_silent(self) -> int:
        """Set deviceState "silent" on Device entities whose profile interval passed twice without data; how many."""
        now = time.monotonic()
        due: dict[str, list[tuple[str, float]]] = {}
        for (tenant, entity_id), (interval, seen) in self._watch.items():
            if now - seen > interval * SILENT_AFTER_INTERVALS:
                due.setdefault(tenant, []).append((entity_id, interval))
        marked = 0
        for tenant, entries in due.items():
            ops = [(entity_id, self._silent_op(entity_id, interval)) for entity_id, interval in entries]
            results = await self.broker.mutate(tenant, ops)
            for (entity_id, _), result in zip(entries, results):
                self._watch.pop((tenant, entity_id), None)
                if result == "silent":
                    marked += 1
                    log.info("device %s is silent", entity_id)
        return marked

    def _silent_op(self, entity_id: str, interval: float):
        """A mutation that sets deviceState silent only if the stored last value is still older than allowed."""
        last_iri = self.terms.expand("dateLastValueReported")
        state_iri = self.terms.expand("deviceState")

        def fn(doc, now):
            if doc is None:
                return None, None
            state = (doc["attrs"].get(state_iri) or [{}])[0]
            if state.get("value") == "silent":
                return doc, None
            last = (doc["attrs"].get(last_iri) or [{}])[0].get("modifiedAt") or doc["modifiedAt"]
            if _age(last, now) <= interval * SILENT_AFTER_INTERVALS:
                return doc, None
            fragment = EntityParser(self.terms, now).entity(
                {"id": entity_id, "type": "Device", "deviceState": {"type": "Property", "value": "silent"}},
                require_type=False)
            fragment.pop("type", None)
            new_doc, _ = Broker.append_op(fragment, no_overwrite=False, must_exist=True)(orjson.loads(orjson.dumps(doc)), now)
            return new_doc, "silent"
        fn.builds_new = True
        return fn


def _age(stamp: str, now: str) -> float:
    """Seconds between two NGSI-LD DateTimes."""
    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parse(now) - parse(stamp)).total_seconds()


async def _retrying(what: str, fn, *args):
    """Await fn(*args), retrying with backoff (up to 5 s apart) until it succeeds; the store may be down a while."""
    delay = 0.05
    while True:
        try:
            return await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed (%s: %s); retrying in %.2f s", what, exc.__class__.__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
