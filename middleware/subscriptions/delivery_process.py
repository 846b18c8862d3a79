"""Delivery in a child process of its own, so that sending notifications does not take the API process's CPU.

The API process decides and queues notifications (the outbox rows are committed with the entity changes, as
always); a child process runs the Dispatcher against the same store and sends them. With one Python process
per core-hungry job the two share no interpreter lock: on two cores, delivering the notifications of 10,000
subscriptions no longer slows the updates that cause them.

The API process talks to the child over its stdin, one JSON array per line, in the order it made them:
  ["wake", [[tenant, subscription id], ...]]     rows for these subscriptions were committed
  ["changed", [[tenant, subscription id], ...]]  these subscriptions were created, changed or deleted here
The child answers on its stdout: ["ready"] once it has loaded every subscription, then, within 20 ms of
a change, ["counts", sent, failed, joined rows, joined notifications], its totals so far, which the API process adds to
its own /metrics. Its log goes to the same stderr. The child ends when its stdin closes (the API process
stopped or died, SIGKILL included): it records what it delivered and gives its leases back. If the child dies,
the API process starts another; the outbox holds everything not yet delivered, and the new child's recovery
scan finds it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import orjson

from .. import metrics

log = logging.getLogger("citybridge.notify")

Key = tuple[str, str]  # (tenant, subscription id)
_RESTART_DELAY = 1.0
_COUNTS_EVERY = 0.02
_REFRESH_EVERY = 2.0


class DeliveryProcess:
    """The API process's end: starts the child, passes it wakes and subscription changes, adds its counts."""

    def __init__(self, store_url: str, options: dict, log_level: str = "info"):
        self.store_url = store_url
        self.options = options  # keyword arguments of the child's Dispatcher
        self.log_level = log_level
        self.owner = f"citybridge-{uuid.uuid4().hex}"  # for the leases this process takes itself (periodic ones)
        self._messages: list[tuple[str, dict[Key, None]]] = []  # in order; consecutive ones of a kind merged
        self._flush_scheduled = False
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._counted = [0, 0, 0, 0]  # the current child's totals already added to /metrics
        self._ready: asyncio.Event | None = None
        self._closing = False

    def start(self) -> None:
        """Start the child in the background (as Dispatcher.start does); ready() waits for it."""
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._run_forever())

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until the first child has loaded the subscriptions (an error if it cannot start)."""
        waiting = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({waiting, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            if self._reader in done:
                self._reader.result()  # raises what stopped it
            raise RuntimeError(f"the notification delivery process did not start in {timeout:.0f} s")

    async def close(self) -> None:
        """Close the child's stdin and wait for it to record its deliveries and end (killed after 15 s)."""
        self._closing = True
        self._flush()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                process.stdin.close()
                await asyncio.wait_for(process.wait(), 15)
            except (asyncio.TimeoutError, ConnectionError):
                log.warning("the notification delivery process did not end in time; killed")
                process.kill()
                await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def wake(self, tenant: str, sub_id: str) -> None:
        """Ask the child to deliver this subscription's pending rows."""
        self._send("wake", (tenant, sub_id))

    def changed(self, tenant: str, sub_id: str) -> None:
        """Tell the child that this subscription was created, changed or deleted (before any later wake)."""
        self._send("changed", (tenant, sub_id))

    def _send(self, kind: str, key: Key) -> None:
        if self._messages and self._messages[-1][0] == kind:
            self._messages[-1][1][key] = None
        else:
            self._messages.append((kind, {key: None}))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)  # what this loop turn queued goes in one write

    def _flush(self) -> None:
        self._flush_scheduled = False
        messages, self._messages = self._messages, []
        process = self._process
        if not messages or process is None or process.returncode is not None or process.stdin.is_closing():
            return  # no child right now: the next one's recovery scan finds the rows, and it loads every subscription
        try:
            process.stdin.write(b"".join(orjson.dumps([kind, list(keys)]) + b"\n" for kind, keys in messages))
        except (ConnectionError, RuntimeError):
            pass  # the child just died: as above

    async def _run_forever(self) -> None:
        """Run a child; start another if it dies (unless closing)."""
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child's counts reach /metrics through this process
        config = orjson.dumps({"store": self.store_url, "options": self.options, "log_level": self.log_level})
        while not self._closing:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "middleware.subscriptions.delivery_process", config.decode(),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20)
            except OSError:
                log.exception("the notification delivery process cannot be started; trying again")
                await asyncio.sleep(_RESTART_DELAY)
                continue
            self._counted = [0, 0, 0, 0]
            try:
                async for line in self._process.stdout:
                    self._receive(orjson.loads(line))
            finally:
                code = await self._process.wait()
            if self._closing:
                return
            log.error("the notification delivery process ended (exit code %s); starting another", code)
            await asyncio.sleep(_RESTART_DELAY)

    def _receive(self, message: list) -> None:
        if message[0] == "ready":
            self._ready.set()
            log.info("notifications are delivered by process %d", self._process.pid)
        elif message[0] == "counts":
            totals = message[1:]
            sent, failed, rows, joined = (now - before for now, before in zip(totals, self._counted))
            self._counted = totals
            metrics.notification(True, sent)
            metrics.notification(False, failed)
            if rows or joined:
                metrics.notifications_joined(rows, joined)


@dataclass(slots=True)
class Target:
    """What delivery needs of a subscription: its stored document and the @context URL its Link names."""

    doc: dict
    context_url: str


class Targets:
    """The child's view of the subscriptions, kept current from the API process's messages and the store."""

    def __init__(self, store):
        self.store = store
        self.by_key: dict[Key, Target] = {}
        self.stamps: dict[Key, int] = {}
        self._lock = asyncio.Lock()  # a refresh never puts back a document older than one a reload just read

    def get(self, tenant: str, sub_id: str) -> Target | None:
        """The subscription's delivery target, None if it is not (or no longer) there."""
        return self.by_key.get((tenant, sub_id))

    async def load(self) -> None:
        """Every stored subscription."""
        for record, stamp in await self.store.all_subscriptions():
            self._put((record.tenant, record.id), record.doc, stamp)

    async def reload(self, keys: list[Key]) -> None:
        """Read these subscriptions again (changed by the API process)."""
        async with self._lock:
            await self._reload(keys)

    async def _reload(self, keys: list[Key]) -> None:
        for key in keys:
            record = await self.store.get_subscription(*key)
            if record is None:
                self.by_key.pop(key, None)
                self.stamps.pop(key, None)
            else:
                self._put(key, record.doc, None)  # no stamp: the next refresh reads it once more, which is harmless

    async def refresh(self) -> None:
        """Pick up subscriptions changed by other processes sharing the store (compared by change stamp)."""
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        _, stamps = await self.store.subscription_stamps(-1)
        present = set()
        for tenant, sub_id, stamp in stamps:
            key = (tenant, sub_id)
            present.add(key)
            if self.stamps.get(key) != stamp:
                record = await self.store.get_subscription(tenant, sub_id)
                if record is not None:
                    self._put(key, record.doc, stamp)
        for key in [key for key in self.by_key if key not in present]:
            self.by_key.pop(key, None)
            self.stamps.pop(key, None)

    def _put(self, key: Key, doc: dict, stamp: int | None) -> None:
        from .matcher import link_url
        self.by_key[key] = Target(doc, link_url(doc))
        if stamp is None:
            self.stamps.pop(key, None)
        else:
            self.stamps[key] = stamp


async def _child(config: dict) -> None:
    """The child's life: load, deliver what the API process says (and what the recovery scan finds), end at EOF."""
    from ..store import open_store
    from .delivery import Dispatcher

    store = open_store(config["store"])
    await store.open()
    targets = Targets(store)
    await targets.load()
    dispatcher = Dispatcher(store, targets.get, **config["options"])
    dispatcher.start()
    out = sys.stdout.buffer
    out.write(orjson.dumps(["ready"]) + b"\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def report_forever() -> None:
        last = None
        while True:
            await asyncio.sleep(_COUNTS_EVERY)
            counts = _counts()
            if counts != last:
                out.write(orjson.dumps(["counts", *counts]) + b"\n")
                out.flush()
                last = counts

    async def refresh_forever() -> None:
        while True:
            await asyncio.sleep(_REFRESH_EVERY)
            try:
                await targets.refresh()
            except Exception:
                log.exception("reading the subscriptions again failed")

    tasks = [asyncio.create_task(report_forever()), asyncio.create_task(refresh_forever())]
    try:
        while line := await reader.readline():
            kind, keys = orjson.loads(line)
            keys = [tuple(key) for key in keys]
            if kind == "changed":
                await targets.reload(keys)  # before any wake that follows: those rows are rendered after the change
            else:
                for key in keys:
                    dispatcher.wake(*key)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dispatcher.close()
        try:
            out.write(orjson.dumps(["counts", *_counts()]) + b"\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the API process is gone: nobody to count for
        await store.close()


def _counts() -> list[int]:
    """This process's notification counters: sent, failed, joined rows, joined notifications."""
    values = {(sample.name, tuple(sample.labels.values())): sample.value
              for metric in (metrics.NOTIFICATIONS, metrics.NOTIFICATIONS_JOINED) for family in metric.collect()
              for sample in family.samples}
    return [int(values.get(key, 0)) for key in (("citybridge_notifications_total", ("sent",)),
                                                 ("citybridge_notifications_total", ("failed",)),
                                                 ("citybridge_notifications_joined_total", ("rows",)),
                                                 ("citybridge_notifications_joined_total", ("notifications",)))]


def main() -> None:
    """Entry point of the child: python -m middleware.subscriptions.delivery_process '<json config>'."""
    from ..logs import setup_logging
    config = orjson.loads(sys.argv[1])
    setup_logging(config.get("log_level", "info"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the child ends when its stdin does
    import uvloop
    uvloop.run(_child(config))


if __name__ == "__main__":
    main()
