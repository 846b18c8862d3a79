"""Prometheus metrics of the middleware and the `GET /metrics` route (prometheus-client).

Other modules only call the tiny API below; they never touch prometheus-client themselves:

    from middleware import metrics
    metrics.uplink("mqtt")          # an adapter received an uplink
    metrics.committed(42)           # 42 measurements reached the context store
    metrics.deadletter("decode-error: byte 3 out of range")   # counted under reason="decode-error"
    metrics.notification(ok=True)   # a notification was delivered (ok=False: it failed)
    metrics.influx_points(500, ok=True)  # 500 history points written to InfluxDB (ok=False: rejected)
    metrics.influx_backlog(1200, 3.5, full=False)  # 1,200 history rows unsent, the oldest 3.5 s old
    metrics.backpressure("http")    # a write refused (http: 503) or held back (mqtt) at the backlog bound

Dead-letter reasons are free text; the label is the reason's code — the text before the first ':' when it is a short
slug such as `unknown-device` or `decode-error`, else `other` — so the number of time series stays bounded.

Several processes: each uvicorn worker has its own counters, and a scrape reaches one worker. Run several workers
with the environment variable PROMETHEUS_MULTIPROC_DIR set to an empty, writable folder (prometheus-client's
multiprocess mode): every worker then writes its counters there and `GET /metrics` sums them over all workers. Without
it, scrape each process on its own port or run one worker per container.
"""
from __future__ import annotations

import os
import re

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder

UPLINKS = Counter("citybridge_uplinks", "Uplinks received from devices, per transport", ["transport"])
COMMITTED = Counter("citybridge_measurements_committed", "Measurements committed to the context store")
DEADLETTERS = Counter("citybridge_deadletters", "Uplinks dead-lettered, per reason code", ["reason"])
NOTIFICATIONS = Counter("citybridge_notifications", "Notifications sent to subscribers, per outcome", ["outcome"])
NOTIFICATIONS_JOINED = Counter("citybridge_notifications_joined", "Queued notifications joined into fewer ones "
                               "when delivery fell behind (rows: before, notifications: after)", ["unit"])
INFLUX_POINTS = Counter("citybridge_influx_points", "History points sent to InfluxDB, per outcome", ["outcome"])
INFLUX_BACKLOG = Gauge("citybridge_influx_backlog_rows", "History rows not yet written to InfluxDB",
                       multiprocess_mode="max")
INFLUX_BACKLOG_AGE = Gauge("citybridge_influx_backlog_oldest_seconds",
                           "Age of the oldest history row not yet written to InfluxDB", multiprocess_mode="max")
INFLUX_BACKPRESSURE = Gauge("citybridge_influx_backpressure",
                            "1 while the InfluxDB backlog is at its bound and writes are refused", multiprocess_mode="max")
BACKPRESSURE = Counter("citybridge_backpressure", "Writes refused (http: 503) or batches held back (mqtt) at the "
                       "InfluxDB backlog bound, per edge", ["edge"])

_CODE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

router = APIRouter()


def reason_code(reason: str) -> str:
    """The bounded label of a dead-letter reason: its leading slug before ':' (e.g. 'decode-error'), else 'other'."""
    head = reason.split(":", 1)[0].strip().lower()
    return head if _CODE.match(head) else "other"


def uplink(transport: str) -> None:
    """Count one uplink received on a transport (mqtt, coap, modbus, serial, http)."""
    UPLINKS.labels(transport=transport).inc()


def committed(n: int = 1) -> None:
    """Count n measurements committed to the context store."""
    if n > 0:
        COMMITTED.inc(n)


def deadletter(reason: str) -> None:
    """Count one dead letter under the code of its reason."""
    DEADLETTERS.labels(reason=reason_code(reason)).inc()


def notification(ok: bool, n: int = 1) -> None:
    """Count n notifications delivered (ok) or given up / failed (not ok)."""
    if n > 0:
        NOTIFICATIONS.labels(outcome="sent" if ok else "failed").inc(n)


def notifications_joined(rows: int, notifications: int) -> None:
    """Count queued notification rows joined into fewer notifications."""
    NOTIFICATIONS_JOINED.labels(unit="rows").inc(rows)
    NOTIFICATIONS_JOINED.labels(unit="notifications").inc(notifications)


def influx_points(n: int, ok: bool) -> None:
    """Count n history points written to InfluxDB (ok) or rejected by it as malformed (not ok)."""
    if n > 0:
        INFLUX_POINTS.labels(outcome="written" if ok else "rejected").inc(n)


def influx_backlog(rows: int, oldest_seconds: float, full: bool) -> None:
    """Set the InfluxDB backlog gauges: unsent rows, age of the oldest, and whether backpressure is on."""
    INFLUX_BACKLOG.set(rows)
    INFLUX_BACKLOG_AGE.set(oldest_seconds)
    INFLUX_BACKPRESSURE.set(1 if full else 0)


def backpressure(edge: str) -> None:
    """Count one write refused (edge http) or one ingest batch held back (edge mqtt) at the backlog bound."""
    BACKPRESSURE.labels(edge=edge).inc()


def registry() -> CollectorRegistry:
    """The registry to expose: the process's own, or every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    return REGISTRY


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition (body, content type): OpenMetrics when the Accept header asks for it, else Prometheus text 0.0.4."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry()), content_type


@router.get("/metrics", include_in_schema=False)
async def metrics_route(request: Request) -> Response:
    """Prometheus scrape endpoint (the InfluxDB backlog is measured afresh for each scrape)."""
    backlog = getattr(request.app.state, "backlog", None)
    if backlog is not None:
        try:
            await backlog.refresh()
        except Exception:  # the store is briefly unavailable: expose the last figures
            pass
    body, content_type = render(request.headers.get("accept"))
    return Response(body, media_type=None, headers={"Content-Type": content_type})
