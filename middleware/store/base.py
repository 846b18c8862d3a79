"""The store interface shared by the SQLite and PostgreSQL back ends, and the change records written to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..context.geo import geometry_bbox

BBox = tuple[float, float, float, float]


@dataclass(slots=True)
class Change:
    """One entity write: insert (version None), update or delete, guarded by the version that was read."""

    kind: str                      # "insert" | "update" | "delete"
    id: str
    doc: dict | None = None
    version: int | None = None     # the version read; updates and deletes succeed only if it is unchanged
    types: list[str] = field(default_factory=list)
    old_types: list[str] = field(default_factory=list)
    geo: list[tuple[str, BBox]] = field(default_factory=list)
    old_geo: list[tuple[str, BBox]] = field(default_factory=list)


@dataclass(slots=True)
class Stored:
    """An entity as read from the store, with the version that guards its next write."""

    doc: dict
    version: int


@dataclass(slots=True)
class Candidates:
    """The store-side prefilter of a query: ids, any-of types, and a bbox on one GeoProperty."""

    ids: list[str] | None = None
    types: list[str] | None = None
    geo_attr: str | None = None
    bbox: BBox | None = None


@dataclass(slots=True)
class OutboxRow:
    """A notification decided by the broker, stored with the entity change that caused it."""

    subscription_id: str
    payload: bytes


Plan = Callable[[set], list[OutboxRow]]  # given the ids whose write conflicted, the outbox rows to add
Keep = Callable[[dict], bool]  # the exact filter a query applies to each prefiltered entity


@dataclass(slots=True)
class SubscriptionRecord:
    """A stored subscription and its notification status."""

    tenant: str
    id: str
    doc: dict
    times_sent: int = 0
    times_failed: int = 0
    last_notification: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    status: str | None = None


@dataclass(slots=True)
class StatusUpdate:
    """Counters to add and timestamps to set on a subscription's notification status."""

    sent: int = 0
    failed: int = 0
    last_notification: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    status: str | None = None


def geo_entries(doc: dict) -> list[tuple[str, BBox]]:
    """The (attribute, bbox) pairs of every GeoProperty instance of a stored entity, for the spatial index."""
    entries: list[tuple[str, BBox]] = []
    for name, instances in doc["attrs"].items():
        for inst in instances:
            if inst["type"] == "GeoProperty":
                entries.append((name, geometry_bbox(inst["value"])))
    return entries


class Store(Protocol):
    """What the broker needs from a store; every method is scoped by tenant."""

    async def open(self) -> None:
        """Connect and create the schema if needed."""

    async def close(self) -> None:
        """Release connections."""

    async def tenant_exists(self, tenant: str) -> bool:
        """True once the tenant has had a write."""

    async def get(self, tenant: str, ids: list[str]) -> dict[str, Stored]:
        """The stored entities with these ids (missing ids are absent from the result)."""

    async def write(self, tenant: str, changes: list[Change], plan: Plan | None = None) -> list[str]:
        """Apply changes and the outbox rows plan() makes, in one transaction; return the ids whose version check failed."""

    async def query(self, tenant: str, candidates: Candidates, keep: Keep | None = None,
                    stop_after: int | None = None) -> list[dict]:
        """Entities passing the prefilter and keep(), in creation order; stops after stop_after kept ones."""

    async def all_docs(self, tenant: str) -> list[dict]:
        """Every entity of the tenant (for type and attribute discovery)."""

    async def put_subscription(self, tenant: str, sub_id: str, doc: dict, *, create: bool) -> bool:
        """Create (False if the id exists) or replace (False if it does not) a subscription."""

    async def get_subscription(self, tenant: str, sub_id: str) -> SubscriptionRecord | None:
        """One subscription with its notification status."""

    async def list_subscriptions(self, tenant: str, limit: int, offset: int) -> tuple[list[SubscriptionRecord], int]:
        """A page of a tenant's subscriptions in creation order, and their total."""

    async def all_subscriptions(self) -> list[SubscriptionRecord]:
        """Every subscription of every tenant."""

    async def subscriptions_fingerprint(self) -> tuple:
        """Changes whenever any subscription is created, replaced or deleted."""

    async def delete_subscription(self, tenant: str, sub_id: str) -> bool:
        """Delete a subscription and its pending notifications."""

    async def add_outbox(self, tenant: str, rows: list[OutboxRow]) -> None:
        """Queue notifications that no entity change carries (periodic ones)."""

    async def outbox_next(self, tenant: str, sub_id: str, limit: int) -> list[tuple[int, bytes, int]]:
        """The oldest pending notifications of a subscription: (seq, payload, attempts)."""

    async def outbox_pending(self) -> list[tuple[str, str]]:
        """(tenant, subscription id) of every subscription with pending notifications."""

    async def outbox_settle(self, tenant: str, sub_id: str, done: list[int], retry: tuple[int, int] | None,
                            status: StatusUpdate) -> None:
        """Remove delivered or abandoned rows, count an attempt on a retried row, update the status."""

    async def acquire_lease(self, tenant: str, sub_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the delivery lease of a subscription."""

    async def release_lease(self, tenant: str, sub_id: str, owner: str) -> None:
        """Give a delivery lease back."""
