"""Delivery leases (middleware/subscriptions/delivery.py): a worker stops sending before its lease can run out."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from aiohttp import web

from middleware.store.base import OutboxRow
from middleware.store.sqlite import SqliteStore
from middleware.subscriptions.delivery import Dispatcher


class RenewalsFail(SqliteStore):
    """A store whose delivery leases can be taken once; every later take or renewal fails (a store outage)."""

    takes = 0
    taken_at = 0.0

    async def acquire_leases(self, owner, keys, ttl):
        """Take the leases the first time; raise afterwards."""
        self.takes += 1
        if self.takes > 1:
            raise OSError("the store is unreachable")
        self.taken_at = time.monotonic()
        return await super().acquire_leases(owner, keys, ttl)


async def test_a_worker_whose_lease_renewals_fail_stops_sending_before_the_lease_can_run_out(tmp_path, unused_tcp_port):
    arrivals: list[float] = []

    async def notify(request):
        await request.read()
        arrivals.append(time.monotonic())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/notify", notify)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    store = RenewalsFail(str(tmp_path / "store.db"))
    await store.open()
    endpoint = {"uri": f"http://127.0.0.1:{unused_tcp_port}/notify", "accept": "application/json"}
    sub = SimpleNamespace(doc={"notification": {"endpoint": endpoint}}, context_url="http://example.org/ctx.jsonld")
    ttl = 0.9
    dispatcher = Dispatcher(store, lambda tenant, sub_id: sub, lease_ttl=ttl, linger=10.0, join_backlog=0)
    dispatcher.start(recovery_interval=60)
    try:
        await store.put_subscription("t", "s", {"id": "s", "type": "Subscription"}, create=True)
        started = time.monotonic()
        queued = 0
        while time.monotonic() - started < 2 * ttl:  # one notification every 20 ms, for twice the lease time
            await store.add_outbox("t", [OutboxRow("s", b'{"data": [{"id": "urn:e:%d"}]}' % queued)])
            queued += 1
            dispatcher.wake("t", "s")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert arrivals, "nothing was delivered while the lease was held"
        # every send began before two thirds of the lease time had passed since the lease was taken (the
        # store wrote it after taken_at, so it runs out later still); 0.1 s allows for a send in flight
        assert store.taken_at and max(arrivals) - store.taken_at < ttl * 2 / 3 + 0.1
        assert len(arrivals) < queued
        # afterwards each wake asks the failing store again, but a tenth of the ttl apart, not in a loop
        assert store.takes < 2 * ttl / (ttl / 10) + 5
        left = await store.outbox_next("t", "s", queued + 1)
        assert len(left) + len(arrivals) >= queued  # what was not sent is still queued
    finally:
        await dispatcher.close()
        await store.close()
        await runner.cleanup()


async def test_a_lease_held_elsewhere_is_asked_for_again_only_now_and_then(tmp_path):
    """While another process holds a subscription's lease, waking it does not make a loop of lease requests."""
    store = SqliteStore(str(tmp_path / "store.db"))
    await store.open()
    requests = 0
    original = store.acquire_leases

    async def counting(owner, keys, ttl):
        nonlocal requests
        requests += 1
        return await original(owner, keys, ttl)

    store.acquire_leases = counting
    sub = SimpleNamespace(doc={"notification": {"endpoint": {"uri": "http://127.0.0.1:9/"}}}, context_url="")
    dispatcher = Dispatcher(store, lambda tenant, sub_id: sub, lease_ttl=3.0)
    try:
        assert await original("another-process", [("t", "s")], 60) == {("t", "s")}
        for _ in range(5):
            dispatcher.wake("t", "s")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert 1 <= requests <= 5  # one ask per lease_ttl / 10 (0.3 s) over 1 s, not one per loop turn
        asked = requests
        await asyncio.sleep(1.0)
        assert requests == asked  # no wake, no asking: the recovery scan looks again later
    finally:
        await dispatcher.close()
        await store.close()


async def test_a_lease_given_back_and_taken_again_before_the_flush_stays_taken(tmp_path):
    """A worker ends (its lease queued for release) and the next one takes the lease before the settler runs:
    the lease stays in the store, so no other process may deliver the subscription meanwhile."""
    store = SqliteStore(str(tmp_path / "store.db"))
    await store.open()
    key = ("t", "s")
    dispatcher = Dispatcher(store, lambda tenant, sub_id: None, linger=0.05, settle_every=3600)
    try:
        dispatcher.wake(*key)
        for _ in range(100):  # the first worker takes the lease, finds nothing and ends
            await asyncio.sleep(0.02)
            if key not in dispatcher.workers and key in dispatcher._releases:
                break
        assert key in dispatcher._releases and key not in dispatcher.held
        dispatcher.wake(*key)  # the next worker takes the lease again
        for _ in range(100):
            await asyncio.sleep(0.01)
            if key in dispatcher.held:
                break
        assert key in dispatcher.held
        await dispatcher._flush()
        assert await store.acquire_leases("another-process", [key], 60) == set()
    finally:
        await dispatcher.close()
        await store.close()
