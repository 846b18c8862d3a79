"""Which subscriptions an entity change triggers (clause 5.8.6), and the notifications it makes.

Subscriptions are compiled once (q, geoQ, selectors parsed; names expanded) and indexed by entity id, by
entity type and, for subscriptions without entities, by watched attribute, so an update only looks at the
subscriptions that can match it. The planner runs inside the store's write transaction (possibly on the
store's thread): it reads the index but never iterates it while it can change, and index updates replace
per-key tuples rather than mutating them.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from ..context.geo import GeoQuery, parse_geoq
from ..context.jsonld import CORE_CONTEXT_URL, TermMap, is_core_context_url
from ..context.model import NULL_URI, VALUE_MEMBER, Renderer
from ..context.query import Query, parse_q
from ..context.scopeq import parse_scopeq
from ..context.typeexpr import TypeSelection, parse_type_selection
from ..store.base import OutboxRow
from .model import parse_time

Event = tuple[dict | None, dict | None]
PREVIOUS_MEMBER = {"value": "previousValue", "object": "previousObject", "languageMap": "previousLanguageMap",
                   "valueList": "previousValueList", "objectList": "previousObjectList", "json": "previousJson",
                   "vocab": "previousVocab"}
_TIMES = ("createdAt", "modifiedAt")
_MISSING = object()


@dataclass(eq=False)
class Compiled:
    """A subscription ready for matching and rendering."""

    tenant: str
    id: str
    doc: dict
    terms: TermMap                 # expands its q and geoQ (the @context they were written with)
    out_terms: TermMap             # compacts its notifications (jsonldContext, else the creation @context)
    context_url: str               # for the Link header / metadata of application/json notifications
    context_value: Any             # for the @context of application/ld+json notifications
    selectors: list[tuple[str | None, re.Pattern | None, TypeSelection]] = field(default_factory=list)
    watched: frozenset[str] | None = None
    triggers: frozenset[str] = frozenset()
    q: Query | None = None
    geo: GeoQuery | None = None
    scope: Callable[[dict], bool] | None = None  # scopeQ (4.19)
    datasets: frozenset[str] | None = None  # datasetId (4.5.5); "@none" is the default instance
    expires: float | None = None
    last_notified: float = float("-inf")  # time.monotonic() of the last notification, for throttling

    @property
    def periodic(self) -> bool:
        """True for a timeInterval subscription."""
        return "timeInterval" in self.doc

    def active(self) -> bool:
        """Notifications are made only while the subscription is active (5.8.6)."""
        if not self.doc.get("isActive", True):
            return False
        return self.expires is None or time.time() < self.expires

    def selects(self, doc: dict) -> bool:
        """True if the entity matches one of the entity selectors (or there are none)."""
        if not self.selectors:
            return True
        for entity_id, pattern, types in self.selectors:
            if not types.matches(doc["type"]):
                continue
            if entity_id is not None:
                if entity_id == doc["id"]:
                    return True
            elif pattern is None or pattern.search(doc["id"]):
                return True
        return False

    def in_datasets(self, doc: dict | None) -> dict | None:
        """The entity with only the attribute instances of the subscription's datasetId (as it is without one)."""
        if self.datasets is None or doc is None:
            return doc
        attrs = {}
        for name, instances in doc["attrs"].items():
            kept = [inst for inst in instances if inst.get("datasetId", "@none") in self.datasets]
            if kept:
                attrs[name] = kept
        return dict(doc, attrs=attrs)

    def filters(self, doc: dict) -> bool:
        """True if q, geoQ and scopeQ hold on the entity."""
        if self.q is not None and not self.q.matches(doc):
            return False
        if self.scope is not None and not self.scope(doc):
            return False
        if self.geo is not None:
            instances = doc["attrs"].get(self.geo.geoproperty) or ()
            if not any(i["type"] == "GeoProperty" and self.geo.matches(i["value"]) for i in instances):
                return False
        return True


def context_link(context: Any) -> str | None:
    """The one URL a Link header can name for this @context (core if none is given), or None if no URL can.

    A URL names itself; an array of URLs is named by its only non-core URL (the core context applies anyway),
    or by the core URL when it holds nothing else. An inline object, or several non-core URLs, has no name."""
    if context is None:
        return CORE_CONTEXT_URL
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(item, str) for item in context):
        urls = [item for item in context if not is_core_context_url(item)]
        if len(urls) <= 1:
            return urls[0] if urls else CORE_CONTEXT_URL
    return None


def notification_context(doc: dict) -> tuple[Any, bool]:
    """The @context a subscription's notifications are compacted with (jsonldContext, else the creation one),
    and whether it must be replaced by the core context (application/json names it by a Link it cannot have)."""
    context = doc.get("jsonldContext") or doc.get("@context")
    linked = doc["notification"]["endpoint"].get("accept", "application/json") == "application/json"
    return context, linked and context_link(context) is None


def link_url(doc: dict) -> str:
    """The @context URL that the Link header (or MQTT metadata) of a subscription's notifications names."""
    context, unlinkable = notification_context(doc)
    return CORE_CONTEXT_URL if unlinkable else context_link(context) or CORE_CONTEXT_URL


def compile_subscription(tenant: str, doc: dict, terms: TermMap, out_terms: TermMap,
                         geo_terms: TermMap | None = None) -> Compiled:
    """Parse a stored subscription's selectors, q and geoQ once (terms expand q, geo_terms geoQ, terms if None;
    out_terms compact per notification_context)."""
    context, unlinkable = notification_context(doc)
    if unlinkable:  # compacted with the core context (service.compile), so the core Link describes the data
        value = CORE_CONTEXT_URL
    else:
        value = context if context is not None else CORE_CONTEXT_URL
    compiled = Compiled(tenant, doc["id"], doc, terms, out_terms, link_url(doc), value)
    compiled.selectors = [(s.get("id"), re.compile(s["idPattern"]) if "idPattern" in s and "id" not in s else None,
                           parse_type_selection(s["type"], str)) for s in doc.get("entities", ())]  # names stored expanded
    if "watchedAttributes" in doc:
        compiled.watched = frozenset(doc["watchedAttributes"])
    triggers = set(doc.get("notificationTrigger", ()))
    if "entityUpdated" in triggers:
        triggers |= {"attributeCreated", "attributeUpdated", "attributeDeleted"}
    compiled.triggers = frozenset(triggers)
    if "q" in doc:
        compiled.q = parse_q(doc["q"], terms.expand)
    if "geoQ" in doc:
        geo = doc["geoQ"]
        compiled.geo = parse_geoq(geo["georel"], geo["geometry"], geo["coordinates"], geo.get("geoproperty"),
                                 (geo_terms or terms).expand)
    if "scopeQ" in doc:
        compiled.scope = parse_scopeq(doc["scopeQ"])
    if "datasetId" in doc:
        compiled.datasets = frozenset(doc["datasetId"])
    if "expiresAt" in doc:
        compiled.expires = parse_time(doc["expiresAt"]).timestamp()
    return compiled


class SubscriptionIndex:
    """Compiled subscriptions by (tenant, entity id), (tenant, entity type) and (tenant, watched attribute)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str, str], tuple[Compiled, ...]] = {}
        self.all: dict[tuple[str, str], Compiled] = {}
        self.periodic: dict[tuple[str, str], Compiled] = {}  # those with a timeInterval, matched by no change
        self.per_tenant: dict[str, int] = {}  # subscriptions per tenant
        self.by_attr_only: dict[str, int] = {}  # per tenant, those found only by watched attribute (no entities)

    def keys_of(self, sub: Compiled) -> list[tuple[str, str, str]]:
        """The index keys under which a subscription is found."""
        if sub.selectors:
            keys = []
            for entity_id, pattern, types in sub.selectors:
                if entity_id is not None:
                    keys.append((sub.tenant, "id", entity_id))
                else:  # a type selection is found under every type it names
                    keys.extend((sub.tenant, "type", name) for name in types.names)
            return list(dict.fromkeys(keys))
        return [(sub.tenant, "attr", name) for name in sub.watched or ()]

    def add(self, sub: Compiled) -> None:
        """Index a subscription (replacing one with the same id)."""
        self.remove(sub.tenant, sub.id)
        self.all[(sub.tenant, sub.id)] = sub
        self.per_tenant[sub.tenant] = self.per_tenant.get(sub.tenant, 0) + 1
        if not sub.selectors:
            self.by_attr_only[sub.tenant] = self.by_attr_only.get(sub.tenant, 0) + 1
        if sub.periodic:
            self.periodic[(sub.tenant, sub.id)] = sub
        for key in self.keys_of(sub):
            self.by_key[key] = self.by_key.get(key, ()) + (sub,)

    def remove(self, tenant: str, sub_id: str) -> Compiled | None:
        """Drop a subscription from the index."""
        old = self.all.pop((tenant, sub_id), None)
        self.periodic.pop((tenant, sub_id), None)
        if old is not None:
            self.per_tenant[tenant] -= 1
            if not old.selectors:
                self.by_attr_only[tenant] -= 1
            for key in self.keys_of(old):
                remaining = tuple(s for s in self.by_key.get(key, ()) if s is not old)
                if remaining:
                    self.by_key[key] = remaining
                else:
                    self.by_key.pop(key, None)
        return old

    def get(self, tenant: str, sub_id: str) -> Compiled | None:
        """A compiled subscription by id."""
        return self.all.get((tenant, sub_id))

    def candidates(self, tenant: str, doc: dict, attrs: set[str]) -> list[Compiled]:
        """The subscriptions that may match a change of this entity touching these attributes."""
        by_key = self.by_key
        found: dict[int, Compiled] = {}
        for sub in by_key.get((tenant, "id", doc["id"]), ()):
            found[id(sub)] = sub
        for type_iri in doc["type"]:
            for sub in by_key.get((tenant, "type", type_iri), ()):
                found[id(sub)] = sub
        for name in attrs:
            for sub in by_key.get((tenant, "attr", name), ()):
                found[id(sub)] = sub
        return list(found.values())


def _same_instance(a: dict, b: dict) -> bool:
    """True if two attribute instances are equal but for createdAt/modifiedAt, at any depth of sub-attributes."""
    for key, value in a.items():
        if key in _TIMES:
            continue
        other = b.get(key, _MISSING)
        if value is other or value == other:
            continue
        if not (":" in key and isinstance(value, dict) and isinstance(other, dict) and _same_instance(value, other)):
            return False
    return all(key in a or key in _TIMES for key in b)


def _same_instances(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x is y or _same_instance(x, y) for x, y in zip(a, b))


def attribute_changes(old: dict | None, new: dict | None,
                      compared: frozenset[str] | None = None) -> tuple[set[str], set[str], set[str]]:
    """(created, updated, deleted) attribute names; updated means some member has a different value (5.8.6).

    With `compared`, only those attributes are checked for an update (the ones some candidate watches)."""
    old_attrs = old["attrs"] if old else {}
    new_attrs = new["attrs"] if new else {}
    created = new_attrs.keys() - old_attrs.keys()
    deleted = old_attrs.keys() - new_attrs.keys()
    common = new_attrs.keys() & old_attrs.keys()
    if compared is not None:
        common &= compared
    updated = {name for name in common if not _same_instances(new_attrs[name], old_attrs[name])}
    return created, updated, deleted


def trigger_of(sub: Compiled, old: dict | None, new: dict | None,
               changes: tuple[set[str], set[str], set[str]]) -> str | None:
    """The notificationTrigger this change fires for the subscription, or None."""
    triggers = sub.triggers
    created, updated, deleted = changes
    if sub.watched is not None:
        created, updated, deleted = created & sub.watched, updated & sub.watched, deleted & sub.watched
    if old is None:
        if "entityCreated" in triggers:
            return "entityCreated"
        return "attributeCreated" if created and "attributeCreated" in triggers else None
    if new is None:  # the entity's attributes go with it: attributeDeleted if asked for by name, not via entityUpdated
        if "entityDeleted" in triggers:
            return "entityDeleted"
        asked = "attributeDeleted" in sub.doc.get("notificationTrigger", ())
        return "attributeDeleted" if deleted and asked else None
    if created and "attributeCreated" in triggers:
        return "attributeCreated"
    if updated and "attributeUpdated" in triggers:
        return "attributeUpdated"
    if deleted and "attributeDeleted" in triggers:
        return "attributeDeleted"
    return None


def render_for(sub: Compiled, old: dict | None, new: dict | None, deleted: set[str], now: str,
               trigger: str | None = None) -> dict:
    """One entity of a notification in the subscription's format, with deletions and showChanges (5.8.6).

    A deleted entity is {id, type, deletedAt}; with showChanges its attributes follow as deleted ones with their
    previous values, and for attributeDeleted its watched attributes do."""
    params = sub.doc["notification"]
    fmt = params["format"]
    show_changes, sys_attrs = params.get("showChanges", False), params.get("sysAttrs", False)
    attrs = set(params["attributes"]) if "attributes" in params else None
    pick_members = None
    if "pick" in params:  # (4.21) as the entity API's pick: entity members, and the attributes picked
        pick_members = {name for name in params["pick"] if name in ("id", "type", "scope")}
        attrs = {name for name in params["pick"] if name not in pick_members}
    omit = set(params.get("omit", ()))
    renderer = Renderer(sub.out_terms, fmt=fmt, sys_attrs=sys_attrs, lang=sub.doc.get("lang"), attrs=attrs,
                        omit=omit, pick_members=pick_members)
    compact = sub.out_terms.compact
    if new is None:
        types = [compact(t) for t in old["type"]]
        out: dict[str, Any] = {"id": old["id"], "type": types[0] if len(types) == 1 else types, "deletedAt": now}
        if sys_attrs:
            out["createdAt"], out["modifiedAt"] = old["createdAt"], old["modifiedAt"]
        if show_changes or trigger == "attributeDeleted":
            for name in old["attrs"]:
                if attrs is not None and name not in attrs or name in omit:
                    continue
                if trigger == "attributeDeleted" and sub.watched is not None and name not in sub.watched:
                    continue
                out[compact(name)] = _deleted_attribute(old["attrs"][name], fmt, show_changes, sys_attrs, now)
        return out
    out = renderer.entity(new)
    if old is not None:
        for name in deleted:
            if attrs is not None and name not in attrs or name in omit:
                continue
            out[compact(name)] = _deleted_attribute(old["attrs"][name], fmt, show_changes, sys_attrs, now)
        if show_changes:
            for name, instances in new["attrs"].items():
                previous = {i.get("datasetId"): i for i in old["attrs"].get(name, ())}
                key = compact(name)
                if key not in out or not any(i.get("datasetId") in previous for i in instances):
                    continue
                rendered = out[key] if isinstance(out[key], list) else [out[key]]
                for position, (inst, shown) in enumerate(zip(instances, rendered)):
                    before = previous.get(inst.get("datasetId"))
                    if before is None:
                        continue
                    if not isinstance(shown, dict):  # a concise bare value gets its object form to carry the change
                        shown = {VALUE_MEMBER[inst["type"]]: shown}
                        rendered[position] = shown
                    member = VALUE_MEMBER[before["type"]]
                    shown[PREVIOUS_MEMBER[member]] = before[member]
                out[key] = rendered[0] if len(rendered) == 1 else rendered
    return out


def _deleted_attribute(instances: list[dict], fmt: str, show_changes: bool, sys_attrs: bool, now: str) -> Any:
    """A deleted attribute (5.2.1, 5.8.6): normalized, {"type", value|object: urn:ngsi-ld:null} (languageMap
    {"@none": urn:ngsi-ld:null}); keyValues the bare null; concise the bare urn:ngsi-ld:null unless a datasetId,
    sysAttrs or showChanges need an object."""
    shown = []
    for inst in instances:
        member = VALUE_MEMBER[inst["type"]]
        null = {"@none": NULL_URI} if member == "languageMap" else NULL_URI
        if fmt == "keyValues" or fmt == "concise" and not (show_changes or sys_attrs or "datasetId" in inst):
            shown.append(null if fmt == "keyValues" else NULL_URI)
            continue
        item: dict[str, Any] = {"type": inst["type"]} if fmt == "normalized" else {}
        item[member] = null
        if "datasetId" in inst:
            item["datasetId"] = inst["datasetId"]
        if show_changes:
            item[PREVIOUS_MEMBER[member]] = inst[member]
        if sys_attrs:
            item["deletedAt"] = now
        shown.append(item)
    return shown[0] if len(shown) == 1 else shown


def notification_payload(sub: Compiled, entities: list[dict], now: str) -> bytes:
    """The Notification (5.3.1) for these rendered entities, in the endpoint's media type."""
    accept = sub.doc["notification"]["endpoint"].get("accept", "application/json")
    if accept == "application/ld+json":
        entities = [dict(e, **{"@context": sub.context_value}) for e in entities]
        data: Any = entities
    elif accept == "application/geo+json":
        data = {"type": "FeatureCollection", "features": [_feature(sub, e) for e in entities]}
    else:
        data = entities
    return orjson.dumps({"id": f"urn:ngsi-ld:Notification:{uuid.uuid4()}", "type": "Notification",
                         "subscriptionId": sub.id, "notifiedAt": now, "data": data})


def _feature(sub: Compiled, entity: dict) -> dict:
    location = entity.get(sub.out_terms.compact("https://uri.etsi.org/ngsi-ld/location"))
    geometry = location.get("value") if isinstance(location, dict) and "value" in location else location
    if not (isinstance(geometry, dict) and "coordinates" in geometry):
        geometry = None
    return {"id": entity["id"], "type": "Feature", "geometry": geometry,
            "properties": {k: v for k, v in entity.items() if k != "id"}}


class Planner:
    """Decides the notifications of a batch of committed-to-be changes: one per subscription, all its entities."""

    def __init__(self, index: SubscriptionIndex):
        self.index = index

    def __call__(self, tenant: str, events: list[Event], now: str) -> list[OutboxRow]:
        """Outbox rows for these events (called inside the store transaction)."""
        index = self.index
        if not index.per_tenant.get(tenant):
            return []  # no subscriptions: no change needs comparing
        by_attr = bool(index.by_attr_only.get(tenant))
        per_sub: dict[int, tuple[Compiled, list[dict]]] = {}
        clock = time.monotonic()
        for old, new in events:
            doc = new if new is not None else old
            changes = None
            if by_attr:  # some subscriptions are found by the attributes a change touches: compare them all
                changes = attribute_changes(old, new)
                found = index.candidates(tenant, doc, changes[0] | changes[1] | changes[2])
            else:
                found = index.candidates(tenant, doc, ())
            subs = [sub for sub in found if not sub.periodic and sub.active() and sub.selects(doc)]
            if not subs:
                continue  # nobody watches this entity
            if changes is None:  # found by id or type alone: compare only what the candidates watch
                watched = [sub.watched for sub in subs]
                changes = attribute_changes(old, new, None if None in watched else frozenset().union(*watched))
            for sub in subs:
                sub_old, sub_new, sub_changes = old, new, changes
                if sub.datasets is not None:  # only the instances of its datasetId count, and are shown
                    sub_old, sub_new = sub.in_datasets(old), sub.in_datasets(new)
                    sub_changes = attribute_changes(sub_old, sub_new)
                trigger = trigger_of(sub, sub_old, sub_new, sub_changes)
                if trigger is None or not sub.filters(doc):
                    continue
                throttling = sub.doc.get("throttling")
                entry = per_sub.get(id(sub))
                if entry is None:
                    if throttling and clock - sub.last_notified < throttling:
                        continue  # throttled: this notification is not sent (5.8.6)
                    entry = per_sub[id(sub)] = (sub, [])
                entry[1].append(render_for(sub, sub_old, sub_new, sub_changes[2], now, trigger))
        rows = []
        for sub, entities in per_sub.values():
            sub.last_notified = clock
            rows.append(OutboxRow(sub.id, notification_payload(sub, entities, now)))
        return rows
