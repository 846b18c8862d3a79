"""Forwards the history table to InfluxDB after a persisted cursor, in batches by size and age, retrying with backoff.

Rows are read in seq order after the cursor, sent as one batch, and the cursor is persisted only once InfluxDB
has accepted the batch: while InfluxDB is down nothing advances and nothing is lost; a batch resent after a crash
rewrites identical points (same measurement, tags and timestamp), which InfluxDB keeps once. The sinks are
InfluxDB 1.x (`InfluxV1`, /write line protocol) and the v2 write API (`influx_v2.InfluxV2`, influxdb-client).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

import aiohttp
import orjson

from .. import metrics
from ..store.base import HistoryRow
from .lineprotocol import instance_line, to_line

log = logging.getLogger("citybridge.history.influx")


class Retry(Exception):
    """InfluxDB could not take the batch now (down, overloaded, unauthorised): send it again later."""


V1_PRECISION = {"s": "s", "ms": "ms", "us": "u", "ns": "n"}


class InfluxV1:
    """The /write and /query endpoints of an InfluxDB 1.x server for one database."""

    def __init__(self, url: str, database: str, *, retention_policy: str = "", username: str = "",
                 password: str = "", timeout: float = 10.0, precision: str = "us"):
        self.url = url.rstrip("/")
        self.database = database
        self.precision = precision
        self.params = {"db": database, "precision": V1_PRECISION[precision]}
        if retention_policy:
            self.params["rp"] = retention_policy
        self.auth = aiohttp.BasicAuth(username, password) if username else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout, auth=self.auth)
        return self._session

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def create_database(self) -> None:
        """CREATE DATABASE (a no-op when it exists); Retry when the server does not answer."""
        try:
            async with self._client().post(self.url + "/query", data={"q": f'CREATE DATABASE "{self.database}"'}) as reply:
                if reply.status != 200:
                    raise Retry(f"CREATE DATABASE: HTTP {reply.status} {await reply.text()}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Retry(f"InfluxDB unreachable: {exc!r}") from None

    async def write(self, lines: list[str]) -> int:
        """Write points; return how many InfluxDB rejected as malformed (400). Retry for anything transient."""
        body = "\n".join(lines).encode()
        try:
            async with self._client().post(self.url + "/write", params=self.params, data=body) as reply:
                text = await reply.text()
                if reply.status == 204:
                    return 0
                if reply.status == 404 and "database not found" in text:
                    await self.create_database()
                    raise Retry("database created")
                if reply.status == 400:
                    log.error("InfluxDB rejected points of a batch of %d: %s", len(lines), text[:500])
                    return _rejected(text, len(lines))
                raise Retry(f"/write: HTTP {reply.status} {text[:200]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Retry(f"InfluxDB unreachable: {exc!r}") from None

    async def query(self, statements: str) -> list[dict]:
        """Run InfluxQL statements (chunked answers merged); the `results` list, one per statement."""
        params = {"db": self.database, "q": statements, "epoch": "u", "chunked": "true", "chunk_size": "10000"}
        if "rp" in self.params:
            params["rp"] = self.params["rp"]
        try:
            async with self._client().get(self.url + "/query", params=params) as reply:
                if reply.status != 200:
                    raise Retry(f"/query: HTTP {reply.status} {(await reply.text())[:200]}")
                results: dict[int, dict] = {}
                for line in (await reply.read()).split(b"\n"):  # one JSON document per chunk, of any length
                    if not line.strip():
                        continue
                    chunk = orjson.loads(line)
                    if "error" in chunk:
                        raise Retry(f"/query: {chunk['error']}")
                    for result in chunk.get("results", []):
                        if "error" in result:
                            raise Retry(f"/query: {result['error']}")
                        merged = results.setdefault(result.get("statement_id", 0), {"series": []})
                        merged["series"].extend(result.get("series", []))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Retry(f"InfluxDB unreachable: {exc!r}") from None
        return [results[k] for k in sorted(results)]


def _rejected(text: str, sent: int) -> int:
    """How many points a 400 answer dropped: 'dropped=N' of a partial write, else the whole batch."""
    marker = text.find("dropped=")
    if marker >= 0:
        digits = "".join(ch for ch in text[marker + 8:marker + 20] if ch.isdigit())
        if digits:
            return int(digits)
    return sent


class Forwarder:
    """Sends the history rows after its cursor to InfluxDB in batches, forever, until stopped."""

    def __init__(self, store, sink, compact: Callable[[str], str], *, name: str = "influxdb",
                 batch_size: int = 5000, interval: float = 0.5, backoff_max: float = 30.0, gap_wait: float = 30.0,
                 static_tags: dict[str, str] | None = None, instances: bool = False):
        self.store = store
        self.sink = sink  # write(lines) -> rejected count, close(), precision
        self.compact = compact
        self.name = name
        self.batch_size = batch_size
        self.interval = interval  # the flush interval: a batch smaller than batch_size waits this long at most
        self.instances = instances
        self.backoff_max = backoff_max
        self.gap_wait = gap_wait
        self.static_tags = static_tags or {}
        self.cursor: int | None = None
        self._gap_since: float | None = None
        self._pending_since: float | None = None  # when the rows of a not yet full batch were first seen
        self._devices: dict[tuple[str, str], str] = {}
        self._devices_at = float("-inf")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start forwarding in the background."""
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop forwarding (the cursor stays where the last accepted batch left it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.sink.close()

    async def run(self) -> None:
        """Forward full batches at once, smaller ones `interval` after first seen; back off while InfluxDB refuses."""
        backoff = max(self.interval, 0.5)
        while True:
            try:
                sent = await self.step()
                backoff = max(self.interval, 0.5)
                if sent < self.batch_size:
                    await asyncio.sleep(self.interval if sent or self._pending_since is None
                                        else max(0.0, self._pending_since + self.interval - time.monotonic()))
            except Retry as exc:
                log.warning("InfluxDB forwarding paused %.1f s: %s", backoff, exc)
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self.backoff_max)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("InfluxDB forwarding failed; retrying")
                await asyncio.sleep(self.backoff_max)

    async def step(self, *, flush: bool = False) -> int:
        """Send one batch of rows after the cursor and advance it; return how many rows it covered.

        A batch smaller than batch_size is held until its first rows have waited `interval` (unless flush).
        """
        if self.cursor is None:
            self.cursor = await self.store.get_cursor(self.name)
        rows = self._contiguous(await self.store.history_after(self.cursor, self.batch_size))
        if not rows:
            self._pending_since = None
            return 0
        if len(rows) < self.batch_size and not flush:
            now = time.monotonic()
            if self._pending_since is None:
                self._pending_since = now
            if now - self._pending_since < self.interval:
                return 0
        self._pending_since = None
        devices = await self._device_map()
        precision = getattr(self.sink, "precision", "us")
        lines = [line for tenant, row in rows
                 if (line := to_line(tenant, row, self.compact, devices.get((tenant, row.entity_id)),
                                     self.static_tags, precision)) is not None]
        if self.instances:
            lines.extend(instance_line(tenant, row, precision) for tenant, row in rows)
        if lines:
            rejected = await self.sink.write(lines)
            metrics.influx_points(len(lines) - rejected, ok=True)
            metrics.influx_points(rejected, ok=False)
        self.cursor = rows[-1][1].seq
        await self.store.set_cursor(self.name, self.cursor)
        return len(rows)

    def _contiguous(self, rows: list[tuple[str, HistoryRow]]) -> list[tuple[str, HistoryRow]]:
        """The rows up to the first gap in seq; a gap (a transaction not yet committed) is skipped after gap_wait."""
        expected = self.cursor + 1
        for index, (_, row) in enumerate(rows):
            if row.seq == expected:  # every history instance has a seq of its own, in both stores
                expected += 1
                continue
            if index > 0:
                self._gap_since = None
                return rows[:index]
            if self._gap_since is None:
                self._gap_since = time.monotonic()
            if time.monotonic() - self._gap_since <= self.gap_wait:
                return []
            log.warning("history seq %d..%d never committed (rolled back); skipped", expected, row.seq - 1)
            self._gap_since = None
            expected = row.seq + 1
        self._gap_since = None
        return rows

    async def _device_map(self) -> dict[tuple[str, str], str]:
        """(tenant, entity id) → device id of the provisioned devices, refreshed every 10 s."""
        if time.monotonic() - self._devices_at > 10:
            records = await self.store.all_devices()
            self._devices = {(r.tenant, r.doc["entity_name"]): r.device_id for r in records if r.doc.get("entity_name")}
            self._devices_at = time.monotonic()
        return self._devices


def influx_version(settings) -> str:
    """'1' or '2': the influx_version setting, or for auto '2' when a token or a bucket is configured."""
    if settings.influx_version != "auto":
        return settings.influx_version
    return "2" if settings.influx_token or settings.influx_bucket else "1"


def sink_from_settings(settings):
    """The InfluxDB client the influx_* settings describe: InfluxV1, or InfluxV2 (influxdb-client)."""
    if influx_version(settings) == "2":
        from .influx_v2 import InfluxV2
        return InfluxV2(settings.influx_url, settings.influx_org, settings.influx_bucket or settings.influx_database,
                        settings.influx_token, precision=settings.influx_precision)
    return InfluxV1(settings.influx_url, settings.influx_database, retention_policy=settings.influx_retention_policy,
                    username=settings.influx_username, password=settings.influx_password,
                    precision=settings.influx_precision)


def forwarder_from_settings(settings, store, compact: Callable[[str], str]) -> Forwarder | None:
    """The forwarder the influx_* settings ask for (None when influx_url is empty or influx_forward is off)."""
    if not settings.influx_url or not settings.influx_forward:
        return None
    tags = dict(pair.split("=", 1) for pair in settings.influx_tags.split(",") if "=" in pair)
    instances = settings.influx_instances or settings.temporal_source == "influxdb"
    return Forwarder(store, sink_from_settings(settings), compact, batch_size=settings.influx_batch_size,
                     interval=settings.influx_flush_interval, static_tags=tags, instances=instances)
