"""Joining of a subscription's queued notifications into fewer, larger ones when delivery falls behind.

One endpoint takes notifications one request at a time (order per subscription is kept), so a subscription whose
entities change faster than its endpoint answers builds a queue that only grows. When a delivery worker's read
finds a backlog (CITYBRIDGE_NOTIFY_JOIN_BACKLOG rows, 10 by default), consecutive rows that were never sent are
joined into one Notification whose `data` holds their entities in order (a batch operation's notification looks
the same, clause 5.3.1: `data` is an array of entities). A joined notification is written to the store in place
of its rows before it is sent, so a retry after a failure or a crash sends it again under the same id.

Rows are joined only while every entity is new to the notification (one version of an entity per
notification), the rows share one shape (entity list, or GeoJSON FeatureCollection), were rendered under the
subscription's current settings, and the joined body stays under MAX_BYTES (common receivers refuse bodies over
100 kB by default: Express's body-parser, for one).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import orjson

MAX_BYTES = 64 * 1024
# A subscription change reaches every process's planner within its refresh interval (2 s); rows rendered before
# that may have the old format, attributes or @context, and are not joined with rows rendered after.
SETTLE_SECONDS = 5.0
Row = tuple[int, bytes, int]  # (seq, payload, attempts) as the store's outbox_next gives it


def _entities(notification: dict) -> tuple[str, list[dict]] | None:
    """The notification's shape and its entities (GeoJSON features for geo+json), or None if neither."""
    data = notification.get("data")
    if isinstance(data, list):
        return "list", data
    if isinstance(data, dict) and isinstance(data.get("features"), list):
        return "features", data["features"]
    return None


def rendered_after(modified_at: str | None) -> str | None:
    """The notifiedAt from which rows surely use the subscription's current settings (None: any)."""
    if not modified_at:
        return None
    try:
        moment = datetime.strptime(modified_at, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(seconds=SETTLE_SECONDS)
    except ValueError:
        return "9999"  # unknown: join nothing
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def groups(rows: list[Row], horizon: int, not_before: str | None = None,
           parsed_out: dict[int, dict] | None = None) -> list[list[Row]]:
    """Split rows (in order) into consecutive groups to send as one notification each.

    A row that may have been sent already (seq at or below horizon, or a retried one) stays alone, so it is sent
    again under its own id; so does one notified before not_before (rendered under older subscription settings).
    parsed_out, if given, receives the notifications read from the rows (by seq), for join().
    """
    out: list[list[Row]] = []
    current: list[Row] = []
    seen: set[str] = set()
    shape = None
    size = 0
    for row in rows:
        seq, payload, attempts = row
        notification = orjson.loads(payload) if seq > horizon and attempts == 0 else None
        if notification is not None and parsed_out is not None:
            parsed_out[seq] = notification
        parsed = None
        if notification is not None and (not_before is None or notification.get("notifiedAt", "") >= not_before):
            parsed = _entities(notification)
        ids = [entity.get("id") for entity in parsed[1]] if parsed is not None else []
        joinable = (parsed is not None and current and parsed[0] == shape and size + len(payload) <= MAX_BYTES
                    and not seen.intersection(ids))
        if not joinable:
            if current:
                out.append(current)
            current, seen, size = [], set(), 0
            shape = parsed[0] if parsed is not None else None
        current.append(row)
        seen.update(ids)
        size += len(payload)
        if parsed is None:  # never joined with the rows after it either
            out.append(current)
            current, seen, size, shape = [], set(), 0, None
    if current:
        out.append(current)
    return out


def join(notifications: list[dict]) -> bytes:
    """One Notification carrying the entities of these notifications in order, under a new id."""
    joined = dict(notifications[-1])  # subscriptionId, and the latest notifiedAt
    joined["id"] = f"urn:ngsi-ld:Notification:{uuid.uuid4()}"
    entities = [entity for n in notifications for entity in _entities(n)[1]]
    if isinstance(joined["data"], dict):
        joined["data"] = dict(joined["data"], features=entities)
    else:
        joined["data"] = entities
    return orjson.dumps(joined)
