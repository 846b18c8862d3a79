"""The store interface shared by the SQLite and PostgreSQL back ends, and the change records written to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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
    old_geo: bool = False


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

    async def write(self, tenant: str, changes: list[Change]) -> list[str]:
        """Apply changes in one transaction (creating the tenant); return the ids whose version check failed."""

    async def query(self, tenant: str, candidates: Candidates) -> list[dict]:
        """Entities passing the prefilter, in creation order."""

    async def all_docs(self, tenant: str) -> list[dict]:
        """Every entity of the tenant (for type and attribute discovery)."""
