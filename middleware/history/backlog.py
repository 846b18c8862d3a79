"""The bound on the InfluxDB backlog: how many history rows wait unsent, and backpressure when too many do.

The backlog is max(seq) − the forwarder's persisted cursor, read from the store (so every process on one store
sees the same figure, whichever one forwards), refreshed every `ttl` seconds in the background and at each
/metrics scrape; the edges only read the cached flag:

 * NGSI-LD writes (`Backpressure`, an ASGI guard) get 503 ProblemDetails with Retry-After;
 * MQTT ingest (`Backlog.wait_clear`, awaited before each batch commits) stops acknowledging, so the broker keeps
   the messages, until the backlog is below the bound again.

Between two refreshes writes are not counted, so the table may pass the bound by what is accepted in `ttl`.
"""
from __future__ import annotations

import asyncio
import logging
import time

import orjson

from .. import metrics
from ..context.errors import NgsiLdError

log = logging.getLogger("citybridge.history.backlog")

WRITE_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
GUARDED = ("/ngsi-ld/v1/entities", "/ngsi-ld/v1/entityOperations/", "/ngsi-ld/v1/temporal/entities")
UNGUARDED = ("/ngsi-ld/v1/entityOperations/query",)  # reads by POST


class HistoryBacklogFull(NgsiLdError):
    """The history backlog to InfluxDB is at its bound: writes are refused until it drains (HTTP 503)."""

    type_name = "InternalError"  # NGSI-LD defines no error type for an unavailable service; the status says 503
    status = 503


async def max_seq(store, floor: int) -> int:
    """The highest history seq (at least floor), from the store."""
    return max(floor, await store.history_max_seq())


class Backlog:
    """Rows after the cursor `name`, the age of the oldest, and whether they reached `limit` (0: never)."""

    def __init__(self, store, *, name: str = "influxdb", limit: int = 0, ttl: float = 0.25, retry_after: int = 2):
        self.store = store
        self.name = name
        self.limit = limit
        self.ttl = ttl
        self.retry_after = retry_after
        self.rows = 0
        self.oldest_age = 0.0
        self.full = False
        self._clear = asyncio.Event()
        self._clear.set()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Measure once, then keep measuring every ttl seconds in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._forever())

    async def stop(self) -> None:
        """Stop measuring (and release anyone waiting for the backlog to clear)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._clear.set()

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # store briefly unavailable: keep the last figures
                log.warning("history backlog not measured: %s: %s", exc.__class__.__name__, exc)

    async def refresh(self) -> None:
        """Measure the backlog now and update the flag, the waiters and the /metrics gauges."""
        async with self._lock:
            cursor = await self.store.get_cursor(self.name)
            top = await max_seq(self.store, cursor)
            self.rows = top - cursor
            oldest = await self.store.history_after(cursor, 1) if self.rows else []
            self.oldest_age = max(0.0, time.time() - oldest[0][1].modified_at / 1e6) if oldest else 0.0
            full = self.limit > 0 and self.rows >= self.limit
            if full != self.full:
                log.warning("history backlog %s: %d rows unsent to InfluxDB (bound %d)",
                            "full, refusing writes" if full else "below the bound again, accepting writes",
                            self.rows, self.limit)
            self.full = full
            if full:
                self._clear.clear()
            else:
                self._clear.set()
            metrics.influx_backlog(self.rows, self.oldest_age, full)

    async def wait_clear(self) -> None:
        """Return once the backlog is below its bound (at once when it is)."""
        if self.full:
            metrics.backpressure("mqtt")
            await self._clear.wait()

    def problem(self) -> HistoryBacklogFull:
        """The 503 error NGSI-LD writes get while the backlog is full."""
        return HistoryBacklogFull(f"{self.rows} history rows wait to be written to InfluxDB (bound "
                                  f"{self.limit}, CITYBRIDGE_INFLUX_MAX_BACKLOG): retry after {self.retry_after} s")


def backlog_from_settings(settings, store) -> Backlog | None:
    """The backlog monitor when history is forwarded to InfluxDB (influx_url set), else None."""
    if not settings.influx_url or not settings.history:
        return None
    return Backlog(store, limit=settings.influx_max_backlog)


class Backpressure:
    """ASGI guard: NGSI-LD entity writes get 503 ProblemDetails with Retry-After while app.state.backlog is full."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in WRITE_METHODS:
            path = scope["path"]
            if path.startswith(GUARDED) and not path.startswith(UNGUARDED):
                backlog = getattr(scope["app"].state, "backlog", None) if "app" in scope else None
                if backlog is not None and backlog.full:
                    metrics.backpressure("http")
                    return await self._refuse(send, backlog)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, backlog: Backlog) -> None:
        body = orjson.dumps(backlog.problem().problem())
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(backlog.retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
