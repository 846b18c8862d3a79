"""Turns entity changes, (old doc, new doc) pairs, into history rows: one per attribute instance written or deleted."""
from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import orjson

from ..context.model import NULL_URI, VALUE_MEMBER
from ..store.base import HistoryRow

Event = tuple[dict | None, dict | None]


@lru_cache(maxsize=4096)  # the instances of one request share a few timestamps
def to_micros(value: str) -> int:
    """An NGSI-LD DateTime → microseconds since the epoch (ValueError if unreadable)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def record(events: list[Event], now: str) -> list[HistoryRow]:
    """The history rows of a list of changes (the broker keeps those whose write commits); deletions at now."""
    rows: list[HistoryRow] = []
    for old, new in events:
        old_attrs = old["attrs"] if old is not None else {}
        entity = new if new is not None else old
        entity_type = entity["type"][0]
        new_attrs = new["attrs"] if new is not None else {}
        for attr, instances in new_attrs.items():
            before = {inst.get("datasetId"): inst for inst in old_attrs.get(attr, ())}
            for inst in instances:
                previous = before.get(inst.get("datasetId"))
                if previous != inst:
                    rows.append(_written(entity["id"], entity_type, attr, inst, now))
        for attr, instances in old_attrs.items():
            kept = {inst.get("datasetId") for inst in new_attrs.get(attr, ())}
            rows.extend(_deleted(entity["id"], entity_type, attr, inst, now)
                        for inst in instances if inst.get("datasetId") not in kept)
    return rows


def _written(entity_id: str, entity_type: str, attr: str, inst: dict, now: str) -> HistoryRow:
    """A written instance, placed at its observedAt, else its modifiedAt (now if the instance was never stamped)."""
    modified = to_micros(inst.get("modifiedAt", now))
    observed = inst.get("observedAt")
    return HistoryRow(entity_id, entity_type, attr, inst.get("datasetId", ""), inst["type"],
                      to_micros(observed) if observed else modified, to_micros(inst.get("createdAt", now)), modified,
                      False, orjson.dumps(inst))


def _deleted(entity_id: str, entity_type: str, attr: str, inst: dict, now: str) -> HistoryRow:
    """A deletion marker (clause 4.5.7 style): the instance's value member set to urn:ngsi-ld:null, with deletedAt."""
    marker = {"type": inst["type"], VALUE_MEMBER[inst["type"]]: NULL_URI, "deletedAt": now}
    if "datasetId" in inst:
        marker["datasetId"] = inst["datasetId"]
    when = to_micros(now)
    return HistoryRow(entity_id, entity_type, attr, inst.get("datasetId", ""), inst["type"], when,
                      to_micros(inst.get("createdAt", now)), when, True, orjson.dumps(marker))
