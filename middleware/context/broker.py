"""The context broker core: entity operations (single and batch), queries and discovery over a Store.

Every write is read-modify-write guarded by the row version, retried when another writer got there first,
so several processes sharing one PostgreSQL store never lose each other's changes. After each commit the
broker tells its listeners (subscriptions, history) what changed, as (tenant, [(old, new)]) pairs.
"""
from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import orjson

from ..history.recorder import record, to_micros
from ..store.base import Candidates, Change, Store, geo_entries
from .errors import AlreadyExists, BadRequestData, NgsiLdError, NonexistentTenant, ResourceNotFound
from .geo import GeoQuery, validate_geojson
from .model import NULL_URI, VALUE_MEMBER, now_iso, stamp
from .query import Query
from .typeexpr import TypeSelection

DEFAULT_TENANT = ""
_MAX_RETRIES = 60
_BACKOFF_START, _BACKOFF_MAX = 0.001, 0.05  # seconds, doubled per conflict, with full jitter

Listener = Callable[[str, list[tuple[dict | None, dict | None]]], Awaitable[None]]
Mutation = Callable[[dict | None, str], tuple[dict | None, Any]]
Planner = Callable[[str, list[tuple[dict | None, dict | None]], str], list]
Recorder = Callable[[list[tuple[dict | None, dict | None]], str], list]  # (events, now) -> history rows (issue 5)


@dataclass
class AttrReport:
    """Outcome of an attribute-level operation: names updated and (name, reason) not updated."""

    updated: list[str] = field(default_factory=list)
    not_updated: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class QueryResult:
    """A page of entities, the total number that matched (-1 when not counted) and whether more follow."""

    entities: list[dict]
    total: int
    more: bool = False


@dataclass
class Late:
    """A mutation's result together with history-only steps: (stored doc, doc holding the late instances) pairs."""

    result: Any
    steps: list[tuple[dict, dict]]


class Broker:
    """Entity operations, queries and discovery for every tenant of one store.

    listeners hear about committed changes; the planner runs inside the write transaction and returns the
    outbox rows (notifications) that must be committed together with the change.
    """

    def __init__(self, store: Store):
        self.store = store
        self.listeners: list[Listener] = []
        self.planner: Planner | None = None  # decides, inside the write transaction, the outbox rows of a change
        self.on_outbox: Callable[[str, list], None] | None = None  # told after commit which rows were queued
        self.recorder: Recorder | None = record  # history rows of a change, written in its transaction (issue 5)

    # ---------------------------------------------------------------- tenants

    async def check_tenant(self, tenant: str) -> None:
        """Raise NonexistentTenant for a named tenant that has never been written to."""
        if tenant != DEFAULT_TENANT and not await self.store.tenant_exists(tenant):
            raise NonexistentTenant(f"tenant {tenant!r} does not exist")

    # ---------------------------------------------------------------- the write engine

    async def mutate(self, tenant: str, ops: list[tuple[str, Mutation]], now: str | None = None) -> list[Any]:
        """Apply mutations (entity id, fn(stored doc or None, now) -> (new doc or None, result)) atomically per try.

        fn may raise NgsiLdError, which becomes that operation's result. Several ops on one id apply in order.
        `now` is the request's time (the one its fragments were stamped with), else the time of each try.
        """
        request_now = now
        results: list[Any] = [None] * len(ops)
        pending = list(range(len(ops)))
        backoff = _BACKOFF_START
        for attempt in range(_MAX_RETRIES):
            if attempt:
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, _BACKOFF_MAX)
            ids = list(dict.fromkeys(ops[i][0] for i in pending))
            stored = await self.store.get(tenant, ids)
            now = request_now or now_iso()
            state: dict[str, tuple[dict | None, int | None, dict | None]] = {}
            trail: dict[str, list[dict | None]] = {}  # the states an entity passed through between ops of this call
            late_steps: list[tuple[dict, dict]] = []  # history-only changes (Late)
            for entity_id in ids:
                found = stored.get(entity_id)
                state[entity_id] = (found.doc, found.version, found.doc) if found else (None, None, None)
            for index in pending:
                entity_id, fn = ops[index]
                original, version, current = state[entity_id]
                try:
                    copy_first = current is not None and current is original and not getattr(fn, "builds_new", False)
                    working = orjson.loads(orjson.dumps(current)) if copy_first else current
                    new_doc, result = fn(working, now)
                except NgsiLdError as error:
                    results[index] = error
                    continue
                if isinstance(result, Late):  # readings older than the stored ones: recorded, not applied
                    late_steps.extend(result.steps)
                    result = result.result
                results[index] = result
                if current is not original and new_doc is not current:  # (an op editing in place returns current)
                    trail.setdefault(entity_id, []).append(current)  # an earlier op's state: history keeps it too
                state[entity_id] = (original, version, new_doc)
            changes: list[Change] = []
            events: list[tuple[dict | None, dict | None]] = []
            steps: list[tuple[dict | None, dict | None]] = []  # for history: every op's change, not just the net one
            for entity_id in ids:
                original, version, current = state[entity_id]
                if current is original:
                    continue
                passed = trail.get(entity_id)
                if passed:
                    chain = [original, *passed, current]
                    steps.extend(zip(chain, chain[1:]))
                else:
                    steps.append((original, current))
                if original is None:
                    changes.append(Change("insert", entity_id, current, None, current["type"], [], geo_entries(current)))
                elif current is None:
                    changes.append(Change("delete", entity_id, None, version, [], original["type"], [],
                                          geo_entries(original)))
                else:
                    changes.append(Change("update", entity_id, current, version, current["type"], original["type"],
                                          geo_entries(current), geo_entries(original)))
                events.append((original, current))
            if not changes and not (late_steps and self.recorder is not None):
                return results
            planned: list = []

            steps.extend(late_steps)
            recorded = self.recorder(steps, now) if self.recorder is not None else []  # before the write locks

            def plan(conflicted: set, events=events, planned=planned, now=now, recorded=recorded) -> list:
                kept = [e for e in events if (e[0] or e[1])["id"] not in conflicted]
                # assigned, not extended: the store may call plan again when it retries a failed group one by one
                planned[:] = self.planner(tenant, kept, now) if kept and self.planner is not None else ()
                return planned + [row for row in recorded if row.entity_id not in conflicted]
            planning = self.planner is not None or self.recorder is not None
            conflicts = set(await self.store.write(tenant, changes, plan if planning else None))
            if conflicts:
                events = [e for e in events if (e[0] or e[1])["id"] not in conflicts]
            if planned and self.on_outbox is not None:
                self.on_outbox(tenant, planned)
            await self._notify(tenant, events)
            if not conflicts:
                return results
            pending = [i for i in pending if ops[i][0] in conflicts]
        raise NgsiLdError(f"could not apply the change after {_MAX_RETRIES} concurrent-write retries")

    async def _notify(self, tenant: str, events: list[tuple[dict | None, dict | None]]) -> None:
        if events:
            for listener in self.listeners:
                await listener(tenant, events)

    async def mutate_one(self, tenant: str, entity_id: str, fn: Mutation) -> Any:
        """Run one mutation and raise its error, if any."""
        (result,) = await self.mutate(tenant, [(entity_id, fn)])
        if isinstance(result, NgsiLdError):
            raise result
        return result

    # ---------------------------------------------------------------- entity operations (as mutations)

    @staticmethod
    def create_op(fragment: dict) -> Mutation:
        """Create an entity; AlreadyExists if its id is taken."""
        def fn(doc, now):
            if doc is not None:
                raise AlreadyExists(f"entity {fragment['id']} already exists")
            return new_entity(fragment, now), fragment["id"]
        fn.builds_new = True  # reads the stored doc but never changes it: no copy needed
        return fn

    @staticmethod
    def replace_op(fragment: dict, *, must_exist: bool) -> Mutation:
        """Replace an entity wholly (its createdAt is kept); with must_exist False, create it when absent."""
        def fn(doc, now):
            if doc is None:
                if must_exist:
                    raise ResourceNotFound(f"entity {fragment['id']} not found")
                return new_entity(fragment, now), "created"
            fresh = new_entity(fragment, now)
            fresh["createdAt"] = doc["createdAt"]
            if "type" not in fragment:
                fresh["type"] = list(doc["type"])
            return fresh, "updated"
        fn.builds_new = True
        return fn

    @staticmethod
    def append_op(fragment: dict, *, no_overwrite: bool, must_exist: bool, only_existing: bool = False,
                  keep_newer: bool = False) -> Mutation:
        """Append attributes (overwriting unless no_overwrite); only_existing gives update semantics (null deletes).

        keep_newer (device readings): an instance observed before the stored one it would replace is late: it goes
        to the history only, and the stored one stays (see late_instances)."""
        def fn(stored, now):
            if stored is None:
                if must_exist:
                    raise ResourceNotFound(f"entity {fragment['id']} not found")
                return new_entity(fragment, now), "created"
            attrs = fragment["attrs"]
            late: dict[str, list[dict]] = {}
            if keep_newer:
                attrs, late = late_instances(stored, attrs)
            doc = editable(stored)
            report = AttrReport()
            for name, instances in attrs.items():
                existing = doc["attrs"].get(name)
                if only_existing and existing is None:
                    report.not_updated.append((name, "attribute does not exist"))
                    continue
                if existing is not None and no_overwrite:
                    kept = {inst.get("datasetId") for inst in existing}
                    fresh = [inst for inst in instances if inst.get("datasetId") not in kept]
                    if not fresh:
                        report.not_updated.append((name, "attribute exists and options=noOverwrite"))
                        continue
                    instances = fresh
                if only_existing:
                    known = {inst.get("datasetId") for inst in existing}
                    missing = [inst for inst in instances if inst.get("datasetId") not in known]
                    if missing:
                        report.not_updated.append((name, f"no instance with datasetId {missing[0].get('datasetId')}"))
                        continue
                    deleted = {inst.get("datasetId") for inst in instances if _is_null(inst)}
                    existing = [old for old in existing if old.get("datasetId") not in deleted]
                    instances = [strip_nulls(inst) for inst in instances if not _is_null(inst)]
                merged = put_instances(existing or [], instances, now, stamped=fragment.get("stampedAt") == now)
                if merged:
                    doc["attrs"][name] = merged
                else:
                    doc["attrs"].pop(name, None)
                report.updated.append(name)
            if "type" in fragment:
                for type_iri in fragment["type"]:
                    if type_iri not in doc["type"]:
                        doc["type"].append(type_iri)
            if "scope" in fragment:  # clause 4.18: noOverwrite adds scopes, update never gives an entity one
                if only_existing and "scope" not in doc:
                    report.not_updated.append(("scope", "the entity has no scope"))
                elif no_overwrite:
                    old = doc.get("scope", [])
                    doc["scope"] = old + [item for item in fragment["scope"] if item not in old]
                else:
                    doc["scope"] = fragment["scope"]
            if report.updated or "type" in fragment:
                doc["modifiedAt"] = now
            if not late:
                return doc, report
            held = editable(stored)
            for name, instances in late.items():
                held["attrs"][name] = put_instances(stored["attrs"][name], instances, now,
                                                    stamped=fragment.get("stampedAt") == now)
            changed = attrs or doc["type"] != stored["type"] or "scope" in fragment
            return (doc if changed else stored), Late(report, [(stored, held)])
        fn.builds_new = True
        return fn

    @staticmethod
    def merge_op(fragment: dict) -> Mutation:
        """Merge-patch an entity (clause 5.6.17): attributes merged member by member, urn:ngsi-ld:null deletes."""
        def fn(doc, now):
            if doc is None:
                raise ResourceNotFound(f"entity {fragment['id']} not found")
            doc = editable(doc)
            for name, instances in fragment["attrs"].items():
                existing = doc["attrs"].get(name)
                for inst in instances:
                    dataset = inst.get("datasetId")
                    if _is_null(inst):
                        if existing is not None:
                            existing = [old for old in existing if old.get("datasetId") != dataset]
                        continue
                    match = next((old for old in existing or [] if old.get("datasetId") == dataset), None)
                    if match is None:
                        existing = (existing or []) + [stamp(strip_nulls(inst), now)]
                    else:
                        merged = merge_instance(match, inst, now)
                        existing = [merged if old is match else old for old in existing]
                if existing:
                    doc["attrs"][name] = existing
                else:
                    doc["attrs"].pop(name, None)
            if "type" in fragment:
                for type_iri in fragment["type"]:
                    if type_iri not in doc["type"]:
                        doc["type"].append(type_iri)
            if "scope" in fragment:
                doc["scope"] = fragment["scope"]
            doc["modifiedAt"] = now
            return doc, None
        fn.builds_new = True
        return fn

    @staticmethod
    def delete_op(entity_id: str) -> Mutation:
        """Delete an entity; ResourceNotFound if absent."""
        def fn(doc, now):
            if doc is None:
                raise ResourceNotFound(f"entity {entity_id} not found")
            return None, entity_id
        fn.builds_new = True
        return fn

    @staticmethod
    def attr_patch_op(entity_id: str, name: str, instances: list[dict], *, replace: bool, typed: bool = True) -> Mutation:
        """Partially update (merge, urn:ngsi-ld:null deletes) or replace one attribute's instances by datasetId; 404 if
        absent. typed: the fragment named its type (else it takes the attribute's, e.g. {"value": ...} of a GeoProperty)."""
        def fn(doc, now):
            if doc is None:
                raise ResourceNotFound(f"entity {entity_id} not found")
            existing = doc["attrs"].get(name)
            if existing is None:
                raise ResourceNotFound(f"entity {entity_id} has no attribute {name}")
            for inst in instances:
                dataset = inst.get("datasetId")
                match = next((old for old in existing if old.get("datasetId") == dataset), None)
                if match is None:
                    raise ResourceNotFound(f"attribute {name} has no instance with datasetId {dataset}")
                if not replace and _is_null(inst):
                    existing = [old for old in existing if old is not match]
                    continue
                if not replace and inst["type"] != match["type"]:  # 5.6.4.4: a partial update keeps the type
                    if typed or VALUE_MEMBER[inst["type"]] != VALUE_MEMBER[match["type"]]:
                        raise BadRequestData(f"attribute {name} is a {match['type']}: a partial update cannot make it "
                                             f"a {inst['type']} (replace the attribute instead)")
                    inst = dict(inst, type=match["type"])  # an untyped fragment keeps the attribute's type
                    if inst["type"] == "GeoProperty":
                        validate_geojson(inst["value"])
                new = stamp(inst, now, match["createdAt"]) if replace else merge_instance(match, inst, now)
                existing = [new if old is match else old for old in existing]
            if existing:
                doc["attrs"][name] = existing
            else:
                del doc["attrs"][name]
            doc["modifiedAt"] = now
            return doc, None
        return fn

    @staticmethod
    def attr_delete_op(entity_id: str, name: str, dataset_id: str | None, delete_all: bool) -> Mutation:
        """Delete one attribute instance (default, by datasetId, or all); 404 if absent."""
        def fn(doc, now):
            if doc is None:
                raise ResourceNotFound(f"entity {entity_id} not found")
            existing = doc["attrs"].get(name)
            if existing is None:
                raise ResourceNotFound(f"entity {entity_id} has no attribute {name}")
            if delete_all:
                remaining = []
            else:
                remaining = [inst for inst in existing if inst.get("datasetId") != dataset_id]
                if len(remaining) == len(existing):
                    what = f"datasetId {dataset_id}" if dataset_id else "default instance (no datasetId)"
                    raise ResourceNotFound(f"attribute {name} has no {what}")
            if remaining:
                doc["attrs"][name] = remaining
            else:
                del doc["attrs"][name]
            doc["modifiedAt"] = now
            return doc, None
        return fn

    # ---------------------------------------------------------------- reads

    async def retrieve(self, tenant: str, entity_id: str) -> dict:
        """One stored entity; ResourceNotFound if absent."""
        found = (await self.store.get(tenant, [entity_id])).get(entity_id)
        if found is None:
            await self.check_tenant(tenant)
            raise ResourceNotFound(f"entity {entity_id} not found")
        return found.doc

    async def query(self, tenant: str, *, ids: list[str] | None = None, id_pattern: str | None = None,
                    types: TypeSelection | None = None, attrs: set[str] | None = None, q: Query | None = None,
                    geo: GeoQuery | None = None, scope: Callable[[dict], bool] | None = None,
                    limit: int = 20, offset: int = 0, count: bool = True) -> QueryResult:
        """Entities matching every given filter, nearest first for `near`, else in creation order.

        Without count (and without `near`, which must see every match to sort them) the scan stops once the
        page is full; total is then -1.
        """
        await self.check_tenant(tenant)
        candidates = Candidates(ids=ids, types=types.names if types else None)
        if geo is not None:
            candidates.geo_attr = geo.geoproperty
            candidates.bbox = geo.index_bbox()
        pattern = _compile_pattern(id_pattern) if id_pattern else None
        near = geo is not None and geo.georel == "near"
        distances: dict[str, float] = {}

        def keep(doc: dict) -> bool:
            if pattern is not None and not pattern.search(doc["id"]):
                return False
            if types is not None and not types.matches(doc["type"]):
                return False
            if attrs is not None and not any(a in doc["attrs"] for a in attrs):
                return False
            if q is not None and not q.matches(doc):
                return False
            if scope is not None and not scope(doc):
                return False
            if geo is not None:
                instances = doc["attrs"].get(geo.geoproperty)
                hits = [inst for inst in instances or () if inst["type"] == "GeoProperty" and geo.matches(inst["value"])]
                if not hits:
                    return False
                if near:
                    distances[doc["id"]] = min(geo.distance(inst["value"]) for inst in hits)
            return True

        full = count or near
        matched = await self.store.query(tenant, candidates, keep, None if full else offset + limit + 1)
        if near:
            matched.sort(key=lambda d: distances[d["id"]])
        return QueryResult(matched[offset:offset + limit], len(matched) if full else -1, len(matched) > offset + limit)

    async def all_entities(self, tenant: str) -> list[dict]:
        """Every entity of a tenant (discovery)."""
        await self.check_tenant(tenant)
        return await self.store.all_docs(tenant)


# -------------------------------------------------------------------- stored-form helpers


def new_entity(fragment: dict, now: str) -> dict:
    """A stored entity built from a validated fragment, every instance stamped with now (unless the parser did)."""
    if fragment.get("stampedAt") == now:
        attrs = fragment["attrs"]
    else:
        attrs = {name: [stamp(inst, now) for inst in instances] for name, instances in fragment["attrs"].items()}
    doc = {"id": fragment["id"], "type": list(fragment["type"]), "createdAt": now, "modifiedAt": now, "attrs": attrs}
    if "scope" in fragment:
        doc["scope"] = fragment["scope"]
    return doc


def late_instances(stored: dict, attrs: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Split a fragment's attributes into (to apply, late): an instance is late when it was observed before the
    stored instance of the same datasetId. An instance without observedAt (dateObserved, say) belongs to its reading:
    it is late, if the entity has it, when the fragment's newest observedAt is older than the newest stored one of
    the attributes the fragment sets."""
    observed = _observed_micros
    stored_attrs = stored["attrs"]
    verdicts: dict[tuple[str, str | None], bool] = {}
    untimed: list[tuple[str, dict]] = []
    newest_stored = newest_fragment = None
    for name, instances in attrs.items():
        previous = {old.get("datasetId"): old for old in stored_attrs.get(name, ())}
        for inst in instances:
            when = observed(inst)
            if when is None:
                untimed.append((name, inst))
                continue
            newest_fragment = when if newest_fragment is None else max(newest_fragment, when)
            old = previous.get(inst.get("datasetId"))
            before = observed(old) if old is not None else None
            if before is not None:
                newest_stored = before if newest_stored is None else max(newest_stored, before)
            verdicts[(name, inst.get("datasetId"))] = before is not None and when < before
    if not any(verdicts.values()):
        return attrs, {}
    older = newest_stored is not None and newest_fragment < newest_stored  # the reading is older than the entity's
    for name, inst in untimed:
        stored_has = any(old.get("datasetId") == inst.get("datasetId") for old in stored_attrs.get(name, ()))
        verdicts[(name, inst.get("datasetId"))] = older and stored_has
    apply: dict[str, list[dict]] = {}
    late: dict[str, list[dict]] = {}
    for name, instances in attrs.items():
        for inst in instances:
            (late if verdicts[(name, inst.get("datasetId"))] else apply).setdefault(name, []).append(inst)
    return apply, late


def _observed_micros(inst: dict) -> int | None:
    value = inst.get("observedAt")
    if value is None:
        return None
    try:
        return to_micros(value)
    except ValueError:
        return None


def editable(doc: dict) -> dict:
    """A copy of a stored entity with its own top level, type list and attrs mapping; instances stay shared (replace, never change them)."""
    copy = dict(doc)
    copy["type"] = list(doc["type"])
    copy["attrs"] = dict(doc["attrs"])
    return copy


def put_instances(existing: list[dict], instances: Iterable[dict], now: str, *, stamped: bool = False) -> list[dict]:
    """Replace the instances with the same datasetId (keeping their createdAt) and add the others.

    stamped: the instances and their sub-attributes were built at now (a fragment parsed at now): only the
    instance's own createdAt needs setting.
    """
    result = list(existing)
    for inst in instances:
        dataset = inst.get("datasetId")
        position = next((i for i, old in enumerate(result) if old.get("datasetId") == dataset), None)
        created = result[position]["createdAt"] if position is not None else now
        if stamped:
            inst["createdAt"] = created
        else:
            stamp(inst, now, created)
        if position is None:
            result.append(inst)
        else:
            result[position] = inst
    return result


def merge_instance(old: dict, new: dict, now: str) -> dict:
    """Merge-patch one instance: members of new replace old ones, sub-attributes merge, urn:ngsi-ld:null removes."""
    if new["type"] != old["type"]:
        return stamp(strip_nulls(new), now, old["createdAt"])
    merged = dict(old)
    for key, value in new.items():
        if ":" in key and isinstance(value, dict):
            if _is_null(value):
                merged.pop(key, None)
            elif key in merged and merged[key].get("type") == value.get("type"):
                merged[key] = merge_instance(merged[key], value, now)
            else:
                merged[key] = stamp(strip_nulls(value), now)
        else:
            merged[key] = value
    merged["modifiedAt"] = now
    return merged


def strip_nulls(inst: dict) -> dict:
    """Drop sub-attributes whose value is urn:ngsi-ld:null (nothing to delete in a new instance)."""
    return {k: v for k, v in inst.items() if not (":" in k and isinstance(v, dict) and _is_null(v))}


def _is_null(inst: dict) -> bool:
    for member in ("value", "object", "languageMap", "valueList", "objectList", "json", "vocab"):
        if member in inst:
            return inst[member] == NULL_URI
    return False


def _compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadRequestData(f"idPattern {pattern!r} is not a valid regular expression: {exc}") from None
