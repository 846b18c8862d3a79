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


@dataclass(slots=True)
class HistoryRow:
    """One attribute instance as written (or deleted) by an accepted change: a point of the temporal evolution."""

    entity_id: str
    entity_type: str
    attr: str
    dataset_id: str                # '' for the default instance
    kind: str                      # the instance's type (Property, GeoProperty, ...)
    observed_at: int               # µs since the epoch: observedAt, else modifiedAt (deletedAt for deletions)
    created_at: int                # µs: the instance's createdAt
    modified_at: int               # µs: the instance's modifiedAt (deletedAt for deletions)
    deleted: bool
    instance: bytes                # the instance as JSON (stored form: expanded names)
    seq: int | None = None         # assigned by the store


@dataclass(slots=True)
class HistoryQuery:
    """What a temporal query reads: entities, attributes, a time range on one time column, a per-attribute cap."""

    entity_ids: list[str]
    attrs: set[str] | None = None
    timeproperty: str = "observedAt"   # observedAt | createdAt | modifiedAt
    start: int | None = None           # µs, inclusive
    end: int | None = None             # µs, exclusive
    newest_first: bool = False
    per_attr: int | None = None        # at most this many rows per (entity, attribute), in the chosen order


Plan = Callable[[set], list[OutboxRow | HistoryRow]]  # given the ids whose write conflicted, the rows to add
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


@dataclass(slots=True)
class Settlement:
    """What became of some notifications of one subscription: rows done, one row to retry, status to record."""

    tenant: str
    sub_id: str
    done: list[int]
    retry: tuple[int, int] | None   # (seq, attempts so far)
    status: StatusUpdate


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
        """Apply changes and the outbox and history rows plan() makes, in one transaction; return the ids whose version check failed."""

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

    async def all_subscriptions(self) -> list[tuple[SubscriptionRecord, int]]:
        """Every subscription of every tenant, each with its change stamp."""

    async def subscription_stamps(self, since: int) -> tuple[int, list[tuple[str, str, int]]]:
        """How many subscriptions there are, and (tenant, id, change stamp) of those created or replaced after since."""

    async def delete_subscription(self, tenant: str, sub_id: str) -> bool:
        """Delete a subscription and its pending notifications."""

    async def add_outbox(self, tenant: str, rows: list[OutboxRow]) -> None:
        """Queue notifications that no entity change carries (periodic ones)."""

    async def outbox_next(self, tenant: str, sub_id: str, limit: int) -> list[tuple[int, bytes, int]]:
        """The oldest pending notifications of a subscription: (seq, payload, attempts)."""

    async def outbox_last(self, tenant: str, sub_id: str) -> int:
        """The seq of the subscription's newest pending notification (0 if none)."""

    async def outbox_merge(self, tenant: str, sub_id: str, owner: str,
                           merges: list[tuple[list[tuple[int, bytes]], bytes]]) -> bool:
        """In one transaction, for each (rows as (seq, payload) read, joined payload): the first row takes the
        joined payload, the others go.

        False, changing nothing, unless owner holds the subscription's delivery lease and every row is still
        there as read and never attempted."""

    async def outbox_pending(self) -> list[tuple[str, str]]:
        """(tenant, subscription id) of every subscription with pending notifications."""

    async def outbox_settle(self, settlements: list[Settlement]) -> None:
        """In one transaction: remove delivered or abandoned rows, count attempts on retried rows, update statuses."""

    async def acquire_leases(self, owner: str, keys: list[tuple[str, str]], ttl: float) -> set[tuple[str, str]]:
        """Take or renew delivery leases of (tenant, subscription id); return those now held by owner."""

    async def release_leases(self, owner: str, keys: list[tuple[str, str]]) -> None:
        """Give delivery leases back."""

    async def history(self, tenant: str, query: HistoryQuery) -> list[HistoryRow]:
        """History rows matching the query, grouped by entity and attribute, in time order (newest first if asked)."""

    async def history_after(self, after: int, limit: int) -> list[tuple[str, HistoryRow]]:
        """(tenant, row) of the history rows of every tenant with seq > after, in seq order."""

    async def history_max_seq(self) -> int:
        """The seq of the newest history row (0 when there is none)."""

    async def get_cursor(self, name: str) -> int:
        """The seq a history consumer has handled up to (0 before its first run)."""

    async def set_cursor(self, name: str, seq: int) -> None:
        """Persist the seq a history consumer has handled up to."""


# ---------------------------------------------------------------- device registry and dead letters (issue 4)

@dataclass(slots=True)
class GroupRecord:
    """A stored config group (IoT Agent "service"): its scope, its (apikey, resource) key and its JSON document."""

    tenant: str
    service_path: str
    apikey: str
    resource: str
    doc: dict


@dataclass(slots=True)
class DeviceRecord:
    """A stored device: its scope, its key (device_id, apikey; '' when none), its JSON document and last uplink time."""

    tenant: str
    service_path: str
    device_id: str
    apikey: str
    doc: dict
    last_seen: float | None = None


@dataclass(slots=True)
class DeadLetterRecord:
    """An uplink that could not be processed: where it came from, why, and its raw bytes (base64)."""

    seq: int | None
    time: float
    transport: str
    topic: str
    address: str
    tenant: str | None
    device_id: str | None
    reason: str
    payload_b64: str


class RegistryStore(Protocol):
    """What the device registry and the dead letters need from a store (both back ends implement it)."""

    async def create_groups(self, rows: list[GroupRecord]) -> list[tuple[str, str]]:
        """Insert config groups all-or-nothing; return the (apikey, resource) keys that already exist (nothing written then)."""

    async def replace_group(self, row: GroupRecord) -> bool:
        """Replace the document of a config group in its scope; False if it does not exist."""

    async def get_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> GroupRecord | None:
        """One config group of a scope."""

    async def list_groups(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                          apikey: str | None = None, resource: str | None = None) -> tuple[list[GroupRecord], int]:
        """A page of a tenant's config groups in creation order (service_path None: every path), and their total."""

    async def find_groups(self, apikey: str) -> list[GroupRecord]:
        """The config groups of an apikey across tenants, in creation order."""

    async def all_groups(self) -> list[GroupRecord]:
        """Every config group of every tenant."""

    async def delete_group(self, tenant: str, service_path: str, apikey: str, resource: str) -> bool:
        """Delete a config group; False if it does not exist."""

    async def create_devices(self, rows: list[DeviceRecord]) -> list[str]:
        """Insert devices all-or-nothing; return the device ids that already exist (nothing written then)."""

    async def replace_device(self, row: DeviceRecord) -> bool:
        """Replace the document of a device (same scope, id and apikey); False if it does not exist."""

    async def get_device(self, tenant: str, service_path: str, device_id: str,
                         apikey: str | None = None) -> DeviceRecord | None:
        """One device of a scope (the oldest of that id when apikey is None)."""

    async def list_devices(self, tenant: str, service_path: str | None, limit: int, offset: int, *,
                           apikey: str | None = None, protocol: str | None = None) -> tuple[list[DeviceRecord], int]:
        """A page of a tenant's devices in creation order (service_path None: every path), and their total."""

    async def find_device(self, apikey: str | None, device_id: str) -> DeviceRecord | None:
        """The oldest device with this apikey (any when None) and id, across tenants (MQTT topics carry no tenant)."""

    async def all_devices(self) -> list[DeviceRecord]:
        """Every device of every tenant, in creation order."""

    async def delete_device(self, tenant: str, service_path: str, device_id: str, apikey: str) -> bool:
        """Delete a device; False if it does not exist."""

    async def touch_devices(self, seen: list[tuple[str, str, str, str, float]]) -> None:
        """Raise last_seen of (tenant, service_path, device_id, apikey, when) rows (never lowers it)."""

    async def registry_fingerprint(self) -> tuple:
        """Changes whenever a config group or device is created, replaced or deleted (not on last_seen)."""

    async def add_deadletters(self, rows: list[DeadLetterRecord]) -> None:
        """Append dead letters in one transaction."""

    async def list_deadletters(self, limit: int, offset: int, *,
                               tenant: str | None = None) -> tuple[list[DeadLetterRecord], int]:
        """A page of dead letters, newest first (tenant None: all), and their total."""

    async def count_deadletters(self, tenant: str | None = None) -> int:
        """How many dead letters are kept (tenant None: all)."""

    async def trim_deadletters(self, keep: int) -> int:
        """Delete all but the newest `keep` dead letters; return how many were deleted."""
