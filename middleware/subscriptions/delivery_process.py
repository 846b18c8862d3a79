"""Matching and delivery in a child process of its own, so that notifications do not take the API process's CPU.

The API process commits, with each write, the changes some subscription may match (one FeedRow in the store's
change feed, see FeedPlanner); the child matches them with the Planner, claims them (the feed rows leave and
their outbox rows are queued in one transaction, in the feed's order) and sends the outbox with the Dispatcher.
The two share no interpreter lock, so on two cores notifications slow the updates that cause them less.

The API process talks to the child over its stdin, one JSON array per line, in the order it made them:
  ["feed"]                                                   feed rows of this process were committed
  ["wake", [[tenant, subscription id], ...]]                 outbox rows for these subscriptions were committed
  ["changed", n, [[tenant, subscription id, doc|null], ...]]  these subscriptions are now these stored documents
The child answers on its stdout: ["ready"] once it has loaded every subscription, ["ack", n] once it has matched
the feed committed before changed message n and holds its documents (the API process answers the request that
changed a subscription only then, so every change accepted after the answer is matched with it), and, within
20 ms of a change, ["counts", sent, failed, joined rows, joined notifications], its totals so far, which the API
process adds to its own /metrics. Its configuration comes in the environment variable CITYBRIDGE_DELIVERY_CONFIG
(not on the command line, which every local user can read); its log goes to the same stderr. The child ends when
its stdin closes (the API process stopped or died, SIGKILL included) or on SIGTERM: it matches what is left of
its feed, records what it delivered and gives its leases back. If the child dies, the API process starts
another; the feed and the outbox hold everything not yet delivered, and the new child finds it.
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
from ..context.jsonld import ContextResolver
from .matcher import Planner, SubscriptionIndex, compile_stored, link_url

log = logging.getLogger("citybridge.notify")

Key = tuple[str, str]  # (tenant, subscription id)
CONFIG_VARIABLE = "CITYBRIDGE_DELIVERY_CONFIG"
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the first, second, ... death in a row
_ACK_TIMEOUT = 10.0
_COUNTS_EVERY = 0.02
_FEED_ROWS = 64        # FeedRows matched and claimed together (each holds one write's changes: one PATCH, or a batch)
_FEED_EVENTS = 2_000   # ... but no more changes than this in one claim (the loop yields between rows)
_FEED_GATHER = 0.002   # seconds a wake waits for more FeedRows before they are matched
_FEED_BLOCKED = 0.002  # seconds before trying again when this process's rows wait behind another one's
_FEED_POLL = 1.0       # seconds between looks at the feed when the API process says nothing
_ORPHAN_AFTER = 10.0   # a FeedRow of another API process is taken by anyone once this old (that process is gone)


class DeliveryProcess:
    """The API process's end: starts the child, passes it wakes and subscription changes, adds its counts."""

    def __init__(self, store_url: str, options: dict, log_level: str = "info", contexts: dict | None = None):
        self.store_url = store_url
        self.options = options  # keyword arguments of the child's Dispatcher
        self.log_level = log_level
        self.contexts = contexts or {}  # keyword arguments of the child's ContextResolver
        self.owner = f"citybridge-{uuid.uuid4().hex}"  # of its feed rows, and of the leases it takes (periodic ones)
        # not yet written, in order: ("feed",), ("wake", {key: None}) or ("changed", {key: doc}, [futures]); runs merged
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

    def feed(self) -> None:
        """Tell the child that FeedRows of this process were committed (it matches and queues them)."""
        if not (self._messages and self._messages[-1][0] == "feed"):
            self._messages.append(("feed",))
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
            if message[0] == "feed":
                lines.append(b'["feed"]')
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
        env[CONFIG_VARIABLE] = orjson.dumps({"store": self.store_url, "options": self.options, "owner": self.owner,
                                             "contexts": self.contexts, "log_level": self.log_level}).decode()
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
    """The child's view of the subscriptions: loaded from the store, then kept as the API process says; each one's
    delivery target, and the compiled subscriptions that the change feed is matched against."""

    def __init__(self, contexts=None) -> None:
        self.by_key: dict[Key, Target] = {}
        self.failed: dict[Key, dict] = {}  # could not be compiled: tried again every _FEED_POLL s
        self.contexts = contexts  # a ContextResolver; None: delivery only, no matching
        self.index = SubscriptionIndex()

    def get(self, tenant: str, sub_id: str) -> Target | None:
        """The subscription's delivery target, None if it is not (or no longer) there."""
        return self.by_key.get((tenant, sub_id))

    async def put(self, key: Key, doc: dict | None) -> None:
        """Hold this stored document for the subscription (None: it was deleted), compiled for matching."""
        self.failed.pop(key, None)
        if doc is None:
            self.by_key.pop(key, None)
            self.index.remove(*key)
            return
        self.by_key[key] = Target(doc, link_url(doc))
        if self.contexts is None:
            return
        try:
            compiled = await compile_stored(self.contexts, key[0], doc)
        except Exception:
            log.exception("subscription %s cannot be compiled; it will not notify until it can", key[1])
            self.index.remove(*key)
            self.failed[key] = doc
            return
        if self.by_key.get(key) is None or self.by_key[key].doc is not doc:
            return  # deleted or changed again while it compiled: that later change decides
        old = self.index.get(*key)
        if old is not None:
            compiled.last_notified = old.last_notified  # throttling goes on across the change
        self.index.add(compiled)

    async def retry_failed(self) -> None:
        """Compile again the subscriptions that could not be compiled (a remote @context that did not answer)."""
        for key, doc in list(self.failed.items()):
            if self.failed.get(key) is doc:
                await self.put(key, doc)

    async def load(self, store) -> None:
        """Every stored subscription."""
        for record, _stamp in await store.all_subscriptions():
            await self.put((record.tenant, record.id), record.doc)


NONE, CLAIMED, BLOCKED = "none", "claimed", "blocked"  # what match_feed found


async def match_feed(store, owner: str, planner: Planner, dispatcher, up_to: int | None = None) -> str:
    """Match the oldest FeedRows this process may take (seq <= up_to), queue their notifications and wake their
    delivery: CLAIMED; NONE when there were none; BLOCKED when its own rows wait behind another process's.

    The matching runs outside any transaction (the API process's writes never wait for it), yielding between rows;
    the claim then deletes the rows and inserts the outbox rows in one, and if another process took a row first,
    nothing is queued here (and the throttling times of what was planned are dropped).
    """
    rows = await store.feed_next(owner, _ORPHAN_AFTER, _FEED_ROWS, up_to)
    if not rows:
        return BLOCKED if await store.feed_waiting(owner) else NONE
    taken, planned, events_seen = [], [], 0
    for seq, tenant, now, events in rows:
        try:
            changes = orjson.loads(events)
            planned.extend((tenant, row) for row in planner(tenant, changes, now))
        except Exception:  # a bug must not stop the feed: this row's notifications are lost, and logged
            log.exception("feed row %d (tenant %r) could not be matched; its notifications are dropped", seq, tenant)
            changes = ()
        taken.append(seq)
        events_seen += len(changes)
        if events_seen >= _FEED_EVENTS:
            break
        await asyncio.sleep(0)  # deliveries and lease renewals go on between rows
    if await store.feed_claim(taken, planned):
        planner.commit_throttling()
        for tenant, sub_id in dict.fromkeys((tenant, row.subscription_id) for tenant, row in planned):
            dispatcher.wake(tenant, sub_id)
        return CLAIMED
    planner.notified.clear()
    return BLOCKED


async def _child(config: dict, out) -> None:
    """The child's life: load, deliver what the API process says (and what the recovery scan finds), then end."""
    from ..store import open_store
    from .delivery import Dispatcher

    loop = asyncio.get_running_loop()
    store = open_store(config["store"])
    await store.open()
    contexts = ContextResolver(**config.get("contexts", {}))
    targets = Targets(contexts)
    await targets.load(store)
    dispatcher = Dispatcher(store, targets.get, **config["options"])
    dispatcher.start()
    planner = Planner(targets.index, defer_throttling=True)
    gc.collect()  # as the API process does (app.py): a FeedRow of a 1,000-entity batch loads as ~100,000 objects,
    gc.freeze()   # and the default thresholds made that load take 2 to 3 times as long
    gc.set_threshold(50_000, 20, 10)
    fed = asyncio.Event()
    matching = asyncio.Lock()  # one match_feed at a time (claims keep the feed's order); taken per batch of rows

    async def match(up_to: int | None = None, deadline: float | None = None) -> None:
        """Match until nothing this process may take is left (seq <= up_to), or the deadline (loop.time())."""
        delay = _FEED_BLOCKED
        while deadline is None or loop.time() < deadline:
            async with matching:
                found = await match_feed(store, config["owner"], planner, dispatcher, up_to)
            if found == NONE:
                return
            if found == BLOCKED:  # another process's rows come first: it claims them soon (or they age out)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
            else:
                delay = _FEED_BLOCKED

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
                # the changes committed before it are matched with the subscriptions as they were (bounded: the
                # rows written meanwhile are matched with the new ones)
                try:
                    await match(up_to=await store.feed_last(), deadline=loop.time() + _ACK_TIMEOUT / 2)
                except Exception:
                    log.exception("matching the change feed failed")
                for tenant, sub_id, doc in message[2]:
                    await targets.put((tenant, sub_id), doc)
                write(["ack", message[1]])
            elif message[0] == "feed":
                fed.set()
            else:
                for tenant, sub_id in message[1]:
                    dispatcher.wake(tenant, sub_id)

    async def match_forever() -> None:
        while True:  # on each message of the API process, and every _FEED_POLL s for rows of a process gone
            fed.clear()
            try:
                await match()
            except Exception:
                log.exception("matching the change feed failed; trying again")
            try:
                await asyncio.wait_for(fed.wait(), _FEED_POLL)
            except asyncio.TimeoutError:
                await targets.retry_failed()
                continue
            await asyncio.sleep(_FEED_GATHER)  # the writes of the next few ms come along: fewer, larger claims

    tasks = [asyncio.create_task(report_forever()), asyncio.create_task(obey()), asyncio.create_task(stop.wait()),
             asyncio.create_task(match_forever())]
    try:
        await asyncio.wait(tasks[1:3], return_when=asyncio.FIRST_COMPLETED)
        if tasks[1].done() and tasks[1].exception() is not None:
            log.error("reading the API process's messages failed", exc_info=tasks[1].exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # what the API process committed is matched now, not by another process 10 s from now
            await match(deadline=loop.time() + 5)
        except Exception:
            log.exception("matching the change feed at the end failed; the next process matches it")
        await dispatcher.close()
        write(["counts", *_counts()])
        await contexts.close()
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
