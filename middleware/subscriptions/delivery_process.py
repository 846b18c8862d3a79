"""Delivery in a child process of its own, so that sending notifications does not take the API process's CPU.

The API process decides and queues notifications (the outbox rows are committed with the entity changes, as
always); a child process runs the Dispatcher against the same store and sends them. The two share no
interpreter lock, so on two cores delivering notifications slows the updates that cause them far less.

The API process talks to the child over its stdin, one JSON array per line, in the order it made them:
  ["wake", [[tenant, subscription id], ...]]                 rows for these subscriptions were committed
  ["changed", n, [[tenant, subscription id, doc|null], ...]]  these subscriptions are now these stored documents
The child answers on its stdout: ["ready"] once it has loaded every subscription, ["ack", n] once it holds the
documents of changed message n (the API process waits for that before it renders anything with the change, so
no notification made after a change goes to the endpoint from before it), and, within 20 ms of a change,
["counts", sent, failed, joined rows, joined notifications], its totals so far, which the API process adds to
its own /metrics. Its configuration comes in the environment variable CITYBRIDGE_DELIVERY_CONFIG (not on the
command line, which every local user can read); its log goes to the same stderr. The child ends when its
stdin closes (the API process stopped or died, SIGKILL included) or on SIGTERM: it records what it delivered
and gives its leases back. If the child dies, the API process starts another; the outbox holds everything
not yet delivered, and the new child's recovery scan finds it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import orjson

from .. import metrics
from .matcher import link_url

log = logging.getLogger("citybridge.notify")

Key = tuple[str, str]  # (tenant, subscription id)
CONFIG_VARIABLE = "CITYBRIDGE_DELIVERY_CONFIG"
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the first, second, ... death in a row
_ACK_TIMEOUT = 10.0
_COUNTS_EVERY = 0.02


class DeliveryProcess:
    """The API process's end: starts the child, passes it wakes and subscription changes, adds its counts."""

    def __init__(self, store_url: str, options: dict, log_level: str = "info"):
        self.store_url = store_url
        self.options = options  # keyword arguments of the child's Dispatcher
        self.log_level = log_level
        self.owner = f"citybridge-{uuid.uuid4().hex}"  # for the leases this process takes itself (periodic ones)
        # not yet written, in order: ("wake", {key: None}) or ("changed", {key: doc}, [futures]); runs merged
        self._messages: list[tuple] = []
        self._flush_scheduled = False
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._acks: dict[int, list[asyncio.Future]] = {}  # changed messages written, not yet acknowledged
        self._next_ack = 0
        self._counted = [0, 0, 0, 0]  # the current child's totals already added to /metrics
        self._ready: asyncio.Event | None = None  # set once the first child is ready
        self._child_ready = False  # the current child said it is ready
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
            raise RuntimeError(f"the notification delivery process did not start in {timeout:.0f} s (see its log)")

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
            try:  # the child's last counts line is still to be read
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
            except Exception:  # (a timeout included)
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
        self._answer_all()

    def wake(self, tenant: str, sub_id: str) -> None:
        """Ask the child to deliver this subscription's pending rows."""
        if self._messages and self._messages[-1][0] == "wake":
            self._messages[-1][1][(tenant, sub_id)] = None
        else:
            self._messages.append(("wake", {(tenant, sub_id): None}))
        self._schedule()

    async def changed(self, tenant: str, sub_id: str, doc: dict | None) -> None:
        """Give the child a subscription's stored document (None: deleted); return once it holds it."""
        if self._process is None:
            return  # not started yet: the child loads every subscription from the store when it starts
        future = asyncio.get_running_loop().create_future()
        if self._messages and self._messages[-1][0] == "changed":
            self._messages[-1][1][(tenant, sub_id)] = doc
            self._messages[-1][2].append(future)
        else:
            self._messages.append(("changed", {(tenant, sub_id): doc}, [future]))
        self._schedule()
        try:
            await asyncio.wait_for(asyncio.shield(future), _ACK_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("the notification delivery process did not take subscription %s in %.0f s", sub_id,
                        _ACK_TIMEOUT)

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)  # what this loop turn queued goes in one write

    def _flush(self) -> None:
        self._flush_scheduled = False
        messages, self._messages = self._messages, []
        process = self._process
        live = process is not None and process.returncode is None and not process.stdin.is_closing()
        lines = []
        for message in messages:
            if message[0] == "wake":
                lines.append(orjson.dumps(["wake", list(message[1])]))
                continue
            if not live:  # no child right now: the next one loads every subscription from the store
                _answer(message[2])
                continue
            self._next_ack += 1
            self._acks[self._next_ack] = message[2]
            lines.append(orjson.dumps(["changed", self._next_ack, [[*key, doc] for key, doc in message[1].items()]]))
        if not live or not lines:
            return  # wakes without a child: its successor's recovery scan finds their rows
        try:
            process.stdin.write(b"\n".join(lines) + b"\n")
        except (ConnectionError, RuntimeError):
            self._answer_all()  # the child just died: as above

    def _answer_all(self) -> None:
        for futures in self._acks.values():
            _answer(futures)
        self._acks.clear()

    async def _run_forever(self) -> None:
        """Run a child; start another if it dies (unless closing), waiting longer after each death in a row."""
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child's counts reach /metrics through this process
        env[CONFIG_VARIABLE] = orjson.dumps({"store": self.store_url, "options": self.options,
                                             "log_level": self.log_level}).decode()
        deaths = 0
        while not self._closing:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "middleware.subscriptions.delivery_process",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20,
                    start_new_session=True)  # a signal to the whole group (Ctrl-C, `timeout`) stops the parent
                    # only: the child ends when the parent closes its stdin, not first (it would be restarted)
            except OSError:
                log.exception("the notification delivery process cannot be started")
            else:
                self._counted = [0, 0, 0, 0]
                self._child_ready = False
                try:
                    async for line in self._process.stdout:
                        try:
                            self._receive(orjson.loads(line))
                        except Exception:  # a stray line must not stop the reading (the child would block)
                            log.warning("unexpected line from the notification delivery process: %r", line[:200])
                finally:
                    code = await self._process.wait()
                    self._answer_all()
                if self._closing:
                    return
                if self._child_ready:
                    deaths = 0  # it ran: this is no crash loop
                log.error("the notification delivery process ended (exit code %s); starting another", code)
            delay = _RESTART_DELAYS[min(deaths, len(_RESTART_DELAYS) - 1)]
            deaths += 1
            await asyncio.sleep(delay)

    def _receive(self, message: list) -> None:
        kind = message[0]
        if kind == "counts":
            totals = message[1:]
            sent, failed, rows, joined = (now - before for now, before in zip(totals, self._counted))
            self._counted = totals
            metrics.notification(True, sent)
            metrics.notification(False, failed)
            if rows or joined:
                metrics.notifications_joined(rows, joined)
        elif kind == "ack":
            _answer(self._acks.pop(message[1], ()))
        elif kind == "ready":
            self._child_ready = True
            self._ready.set()
            log.info("notifications are delivered by process %d", self._process.pid)


def _answer(futures) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


@dataclass(slots=True)
class Target:
    """What delivery needs of a subscription: its stored document and the @context URL its Link names."""

    doc: dict
    context_url: str


class Targets:
    """The child's view of the subscriptions: loaded from the store, then kept as the API process says."""

    def __init__(self) -> None:
        self.by_key: dict[Key, Target] = {}

    def get(self, tenant: str, sub_id: str) -> Target | None:
        """The subscription's delivery target, None if it is not (or no longer) there."""
        return self.by_key.get((tenant, sub_id))

    def put(self, key: Key, doc: dict | None) -> None:
        """Hold this stored document for the subscription (None: it was deleted)."""
        if doc is None:
            self.by_key.pop(key, None)
        else:
            self.by_key[key] = Target(doc, link_url(doc))

    async def load(self, store) -> None:
        """Every stored subscription."""
        for record, _stamp in await store.all_subscriptions():
            self.put((record.tenant, record.id), record.doc)


async def _child(config: dict, out) -> None:
    """The child's life: load, deliver what the API process says (and what the recovery scan finds), then end."""
    from ..store import open_store
    from .delivery import Dispatcher

    loop = asyncio.get_running_loop()
    store = open_store(config["store"])
    await store.open()
    targets = Targets()
    await targets.load(store)
    dispatcher = Dispatcher(store, targets.get, **config["options"])
    dispatcher.start()
    gc.collect()  # as the API process does (app.py): what was loaded at start leaves the collector's generations,
    gc.freeze()   # and young collections run every 50,000 allocations, not 700
    gc.set_threshold(50_000, 20, 10)
    write = _line_writer(out)
    write(["ready"])
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # as the end of stdin: record, give leases back, end

    async def report_forever() -> None:
        last = None
        while True:
            await asyncio.sleep(_COUNTS_EVERY)
            counts = _counts()
            if counts != last:
                write(["counts", *counts])
                last = counts

    async def obey() -> None:
        while line := await reader.readline():
            message = orjson.loads(line)
            if message[0] == "changed":
                for tenant, sub_id, doc in message[2]:
                    targets.put((tenant, sub_id), doc)
                write(["ack", message[1]])
            else:
                for tenant, sub_id in message[1]:
                    dispatcher.wake(tenant, sub_id)

    tasks = [asyncio.create_task(report_forever()), asyncio.create_task(obey()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
        if tasks[1].done() and tasks[1].exception() is not None:
            log.error("reading the API process's messages failed", exc_info=tasks[1].exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dispatcher.close()
        write(["counts", *_counts()])
        await store.close()


def _line_writer(out):
    """A function writing one JSON line to out; once the API process is gone, writing is a no-op."""
    def write(message: list) -> None:
        try:
            out.write(orjson.dumps(message) + b"\n")
            out.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # nobody reads any more: the API process is gone, and stdin's end follows
    return write


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
    """Entry point of the child: python -m middleware.subscriptions.delivery_process (config in the environment)."""
    from ..logs import setup_logging
    config = orjson.loads(os.environ.pop(CONFIG_VARIABLE))
    setup_logging(config.get("log_level", "info"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child ends when its stdin does
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the protocol's own copy of stdout
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print from a library goes to the log instead
    import uvloop
    uvloop.run(_child(config, out))


if __name__ == "__main__":
    main()
