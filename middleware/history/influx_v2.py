"""The v2 write API (InfluxDB 2.x, InfluxDB 3.x, and other servers that take /api/v2/write) through influxdb-client.

Same contract as `influx.InfluxV1`: `write(lines)` returns how many points the server rejected as malformed and
raises `Retry` for anything transient (down, timeout, 5xx, 401/403, 404 bucket not found), so the forwarder keeps
its cursor and tries again later.
"""
from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
from influxdb_client import WritePrecision
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException

from .influx import Retry

log = logging.getLogger("citybridge.history.influx")

PRECISIONS = {"s": WritePrecision.S, "ms": WritePrecision.MS, "us": WritePrecision.US, "ns": WritePrecision.NS}
_WRITTEN = re.compile(r"\((\d+) written\)")


class InfluxV2:
    """Writes line protocol to one bucket of an organisation with an API token (influxdb-client's async API)."""

    def __init__(self, url: str, org: str, bucket: str, token: str, *, precision: str = "us", timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self.token = token
        self.precision = precision
        self.timeout_ms = int(timeout * 1000)
        self._client: InfluxDBClientAsync | None = None

    def _api(self):
        if self._client is None:  # made on first use: the async client binds to the running event loop
            self._client = InfluxDBClientAsync(self.url, token=self.token or None, org=self.org or None,
                                               timeout=self.timeout_ms)
        return self._client.write_api()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def write(self, lines: list[str]) -> int:
        """Write points; return how many the server rejected as malformed (400, 422). Retry for anything transient."""
        try:
            await self._api().write(self.bucket, self.org or None, "\n".join(lines).encode(),
                                    write_precision=PRECISIONS[self.precision])
            return 0
        except ApiException as exc:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
            if exc.status in (400, 422):
                log.error("InfluxDB rejected points of a batch of %d: %s", len(lines), body[:500])
                written = _WRITTEN.search(body)
                return len(lines) - int(written.group(1)) if written else len(lines)
            raise Retry(f"/api/v2/write: HTTP {exc.status} {body[:200]}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Retry(f"InfluxDB unreachable: {exc!r}") from None
