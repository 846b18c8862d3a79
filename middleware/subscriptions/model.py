"""Subscriptions (ETSI GS CIM 009 v1.8 clause 5.2.12): validate bodies into the stored form and render them back.

Stored form: the members of 5.2.12 with attribute names and entity types expanded, plus "@context" (the
@context the subscription was made with, used to expand its q and to compact its notifications when no
jsonldContext is given), "@queryContext" (only after a PATCH that set q or geoQ: the @context of that request,
which then expands them), createdAt and modifiedAt. Read-only members sent by clients are ignored (5.2.12).
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from ..context.errors import BadRequestData, OperationNotSupported
from ..context.geo import parse_geoq
from ..context.jsonld import TermMap
from ..context.model import NULL_URI, check_datetime, check_name, check_uri
from ..context.query import parse_q
from ..context.projection import check_dataset_ids, projection
from ..context.scopeq import parse_scopeq
from ..context.typeexpr import parse_type_selection, rename_type_names

TRIGGERS = ("entityCreated", "entityUpdated", "entityDeleted", "attributeCreated", "attributeUpdated", "attributeDeleted")
DEFAULT_TRIGGERS = ["attributeCreated", "attributeUpdated"]
FORMATS = ("normalized", "keyValues", "simplified", "concise")
ACCEPTS = ("application/json", "application/ld+json", "application/geo+json")
SCHEMES = ("http", "https", "mqtt", "mqtts")
READ_ONLY = frozenset({"status", "createdAt", "modifiedAt", "deletedAt"})
NOTIFICATION_READ_ONLY = frozenset({"status", "timesSent", "timesFailed", "lastNotification", "lastFailure", "lastSuccess"})
_KNOWN = frozenset({"id", "type", "subscriptionName", "description", "entities", "watchedAttributes",
                    "notificationTrigger", "timeInterval", "throttling", "q", "geoQ", "scopeQ", "csf", "isActive",
                    "expiresAt", "notification", "jsonldContext", "lang", "localOnly", "temporalQ", "datasetId",
                    "@context"}) | READ_ONLY


QUERY_CONTEXT = "@queryContext"  # {"q"|"geoQ": the @context a PATCH wrote it with}, when not the creation one


def new_subscription_id() -> str:
    """A fresh subscription id."""
    return f"urn:ngsi-ld:Subscription:{uuid.uuid4()}"


def _positive_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise BadRequestData(f"{what} must be a number greater than 0, got {value!r}")
    return value


def _names(value: Any, what: str, terms: TermMap) -> list[str]:
    if not isinstance(value, list) or not value:
        raise BadRequestData(f"{what} must be a non-empty array of names")
    return [terms.expand(check_name(v, what)) for v in value]


def _key_values(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRequestData(f"{what} must be an array of {{key, value}} objects")
    for pair in value:
        scalar = isinstance(pair, dict) and isinstance(pair.get("value"), (str, int, float)) \
            and not isinstance(pair.get("value"), bool)
        if not scalar or not isinstance(pair.get("key"), str) or not pair["key"]:
            raise BadRequestData(f"each {what} item must be an object with string key and value, got {pair!r}")
    # KeyValuePair values are strings (5.2.22); numbers (as ETSI's MQTT-QoS tests send) are kept as their text
    return [{"key": p["key"], "value": p["value"] if isinstance(p["value"], str) else str(p["value"])} for p in value]


def validate_endpoint(endpoint: Any) -> dict:
    """Validate notification.endpoint (5.2.15): uri with an http(s) or mqtt(s) scheme, accept, timeout, infos."""
    if not isinstance(endpoint, dict):
        raise BadRequestData("notification.endpoint must be an object with a uri")
    uri = endpoint.get("uri")
    check_uri(uri, "notification.endpoint.uri")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise BadRequestData(f"notification.endpoint.uri scheme {parts.scheme!r} is not supported: use http, https, mqtt or mqtts")
    if not parts.hostname:
        raise BadRequestData(f"notification.endpoint.uri {uri!r} has no host")
    if parts.scheme.startswith("mqtt") and parts.path.strip("/") == "":
        raise BadRequestData(f"notification.endpoint.uri {uri!r} names no MQTT topic")
    out: dict[str, Any] = {"uri": uri}
    accept = endpoint.get("accept", "application/json")
    if accept not in ACCEPTS:
        raise BadRequestData(f"notification.endpoint.accept must be one of {', '.join(ACCEPTS)}, got {accept!r}")
    out["accept"] = accept
    for key in ("timeout", "cooldown"):
        if key in endpoint:
            out[key] = _positive_number(endpoint[key], f"notification.endpoint.{key}")
    if "receiverInfo" in endpoint:
        out["receiverInfo"] = _key_values(endpoint["receiverInfo"], "receiverInfo")
    if "notifierInfo" in endpoint:
        info = _key_values(endpoint["notifierInfo"], "notifierInfo")
        for pair in info:
            if pair["key"] == "MQTT-QoS" and pair["value"] not in ("0", "1", "2"):
                raise BadRequestData(f"notifierInfo MQTT-QoS must be 0, 1 or 2, got {pair['value']!r}")
            if pair["key"] == "MQTT-Version" and pair["value"] not in ("mqtt3.1.1", "mqtt5.0"):
                raise BadRequestData(f"notifierInfo MQTT-Version must be mqtt3.1.1 or mqtt5.0, got {pair['value']!r}")
        out["notifierInfo"] = info
    return out


def validate_subscription(body: Any, terms: TermMap, context: Any, *, now: str, sub_id: str | None = None) -> dict:
    """Validate a whole subscription (create, or the result of a patch) into the stored form."""
    if not isinstance(body, dict):
        raise BadRequestData("a subscription must be a JSON object")
    if body.get("type") != "Subscription":
        raise BadRequestData('a subscription needs "type": "Subscription"')
    unknown = set(body) - _KNOWN
    if unknown:
        raise BadRequestData(f"unknown subscription member(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {"id": check_uri(body["id"], "subscription id") if "id" in body else (sub_id or new_subscription_id()),
                           "type": "Subscription"}
    for key in ("subscriptionName", "description", "scopeQ", "lang", "csf"):
        if key in body:
            if not isinstance(body[key], str):
                raise BadRequestData(f"{key} must be a string")
            out[key] = body[key]
    if "scopeQ" in out:
        parse_scopeq(out["scopeQ"])  # 4.19, as the query API parses it
    if "entities" in body:
        selectors = body["entities"]
        if not isinstance(selectors, list) or not selectors:
            raise BadRequestData("entities must be a non-empty array of entity selectors")
        out["entities"] = [_selector(s, terms) for s in selectors]
    if "watchedAttributes" in body:
        out["watchedAttributes"] = _names(body["watchedAttributes"], "watchedAttributes", terms)
    if "entities" not in out and "watchedAttributes" not in out and body.get("localOnly") is not True:
        raise BadRequestData("a subscription needs entities or watchedAttributes (5.2.12)")
    triggers = body.get("notificationTrigger", DEFAULT_TRIGGERS)
    if not isinstance(triggers, list) or not triggers or any(t not in TRIGGERS for t in triggers):
        raise BadRequestData(f"notificationTrigger must be a non-empty array of {', '.join(TRIGGERS)}")
    out["notificationTrigger"] = list(dict.fromkeys(triggers))
    if "timeInterval" in body:
        out["timeInterval"] = _positive_number(body["timeInterval"], "timeInterval")
        if "watchedAttributes" in out or "throttling" in body:
            raise BadRequestData("timeInterval excludes watchedAttributes and throttling (5.2.12)")
        if "entities" not in out:
            raise BadRequestData("a periodic subscription (timeInterval) needs entities (5.2.12)")
    if "throttling" in body:
        out["throttling"] = _positive_number(body["throttling"], "throttling")
    if "q" in body:
        if not isinstance(body["q"], str):
            raise BadRequestData("q must be a string")
        parse_q(body["q"], terms.expand)
        out["q"] = body["q"]
    if "geoQ" in body:
        geo = body["geoQ"]
        if not isinstance(geo, dict):
            raise BadRequestData("geoQ must be an object with geometry, coordinates and georel")
        for key in ("geometry", "coordinates", "georel"):
            if key not in geo:
                raise BadRequestData(f"geoQ needs {key} (5.2.13)")
        parse_geoq(geo["georel"], geo["geometry"], geo["coordinates"], geo.get("geoproperty"), terms.expand)
        out["geoQ"] = {k: geo[k] for k in ("geometry", "coordinates", "georel", "geoproperty") if k in geo}
    if "isActive" in body:  # stored only when given (GET returns what the client sent); the default true applies
        if not isinstance(body["isActive"], bool):
            raise BadRequestData("isActive must be true or false")
        out["isActive"] = body["isActive"]
    if "expiresAt" in body:
        expires = check_datetime(body["expiresAt"], "expiresAt")
        if parse_time(expires) <= datetime.now(timezone.utc):
            raise BadRequestData("expiresAt is in the past")
        out["expiresAt"] = expires
    if "jsonldContext" in body:
        out["jsonldContext"] = check_uri(body["jsonldContext"], "jsonldContext")
    if "localOnly" in body:
        out["localOnly"] = bool(body["localOnly"])
    if "datasetId" in body:
        value = body["datasetId"]  # an array of URIs (a single string is one item)
        out["datasetId"] = check_dataset_ids([value] if isinstance(value, str) else value)
    out["notification"] = _notification(body.get("notification"), terms)
    out["@context"] = context
    out["createdAt"] = body.get("createdAt", now) if sub_id else now
    out["modifiedAt"] = now
    return out


def _selector(selector: Any, terms: TermMap) -> dict:
    if not isinstance(selector, dict):
        raise BadRequestData("an entity selector must be an object")
    if not isinstance(selector.get("type"), str):
        raise BadRequestData("an entity selector needs a type (5.2.33)")
    def expand(name: str) -> str:
        return terms.expand(check_name(name, "entity type"))

    parse_type_selection(selector["type"], expand)  # a name, or a type selection (4.17): (A|B), A,B, A;B
    out = {"type": rename_type_names(selector["type"], expand)}
    if "id" in selector:
        out["id"] = check_uri(selector["id"], "entity selector id")
    if "idPattern" in selector:
        if not isinstance(selector["idPattern"], str):
            raise BadRequestData("idPattern must be a string")
        try:
            re.compile(selector["idPattern"])
        except re.error as exc:
            raise BadRequestData(f"idPattern is not a valid regular expression: {exc}") from None
        out["idPattern"] = selector["idPattern"]
    return out


_ENTITY_MEMBERS = ("id", "type", "scope")  # members pick/omit may name besides attributes (4.21)


def _projection(value: Any, what: str, terms: TermMap) -> list[str]:
    """notification.pick / omit (4.21, as the query API parses them): entity members and expanded attribute names."""
    names = projection(value, what) if value is not None else None
    if names is None:
        raise BadRequestData(f"{what} must be a string or a non-empty array of names")
    return [name if name in _ENTITY_MEMBERS else terms.expand(name) for name in names]


def _notification(params: Any, terms: TermMap) -> dict:
    if not isinstance(params, dict):
        raise BadRequestData("a subscription needs a notification object with an endpoint")
    if "endpoint" not in params:
        raise BadRequestData("notification.endpoint is missing")
    out: dict[str, Any] = {}
    if "attributes" in params:
        out["attributes"] = _names(params["attributes"], "notification.attributes", terms)
    for key in ("pick", "omit"):
        if key in params:
            if "attributes" in params:
                raise BadRequestData(f"notification.{key} excludes notification.attributes (4.21)")
            out[key] = _projection(params[key], f"notification.{key}", terms)
    if set(out.get("pick", ())) & set(out.get("omit", ())):
        raise BadRequestData("notification.pick and notification.omit name the same member(s): "
                             + ", ".join(sorted(set(out["pick"]) & set(out["omit"]))))
    for key in ("join", "joinLevel"):
        if key in params:
            raise OperationNotSupported(f"notification.{key} (linked entity retrieval, 4.5.23) is not supported")
    fmt = params.get("format", "normalized")
    if fmt not in FORMATS:
        raise BadRequestData(f"notification.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out["format"] = "keyValues" if fmt == "simplified" else fmt
    for key in ("showChanges", "sysAttrs"):  # stored only when given; both default to false
        if key in params:
            if not isinstance(params[key], bool):
                raise BadRequestData(f"notification.{key} must be true or false")
            out[key] = params[key]
    if out.get("showChanges") and out["format"] == "keyValues":
        raise BadRequestData("notification.showChanges cannot be true with the keyValues format (5.2.14)")
    out["endpoint"] = validate_endpoint(params["endpoint"])
    return out


def merge_fragment(stored: dict, fragment: Any) -> dict:
    """The subscription body after a PATCH fragment (5.5.8: top-level members replaced, NGSI-LD Null deletes)."""
    if not isinstance(fragment, dict) or not fragment:
        raise BadRequestData("a subscription fragment must be a non-empty JSON object")
    if "id" in fragment and fragment["id"] != stored["id"]:
        raise BadRequestData("the subscription id cannot be changed")
    if "type" in fragment and fragment["type"] != "Subscription":
        raise BadRequestData('a subscription fragment\'s type must be "Subscription"')
    merged = {k: v for k, v in stored.items() if k not in ("@context", QUERY_CONTEXT, "modifiedAt")}
    for key, value in fragment.items():
        if key in READ_ONLY or key == "@context":
            continue
        if value == NULL_URI or value is None:
            merged.pop(key, None)
        else:
            merged[key] = value  # the whole member, notification included: no deep merge (5.5.8)
    return merged


def to_body(stored: dict, terms: TermMap) -> dict:
    """The stored form back as a request-like body with names compacted by terms (for patches and rendering)."""
    compact = terms.compact
    body = {k: v for k, v in stored.items() if k not in ("@context", QUERY_CONTEXT)}
    if "entities" in stored:
        body["entities"] = [dict(s, type=rename_type_names(s["type"], compact)) for s in stored["entities"]]
    if "watchedAttributes" in stored:
        body["watchedAttributes"] = [compact(a) for a in stored["watchedAttributes"]]
    notification = dict(stored["notification"])
    if "attributes" in notification:
        notification["attributes"] = [compact(a) for a in notification["attributes"]]
    for key in ("pick", "omit"):
        if key in notification:
            notification[key] = [a if a in _ENTITY_MEMBERS else compact(a) for a in notification[key]]
    body["notification"] = notification
    return body


def status_of(stored: dict) -> str:
    """active, paused or expired (5.2.12 table 5.2.12-2)."""
    expires = stored.get("expiresAt")
    if expires and parse_time(expires) <= datetime.now(timezone.utc):
        return "expired"
    return "active" if stored.get("isActive", True) else "paused"


def render(record, terms: TermMap, *, sys_attrs: bool) -> dict:
    """A subscription as returned by GET (5.8.3): compacted names, status, notification status members."""
    body = to_body(record.doc, terms)
    if not sys_attrs:
        body.pop("createdAt", None)
        body.pop("modifiedAt", None)
    body["status"] = status_of(record.doc)
    notification = body["notification"]
    notification["timesSent"] = record.times_sent
    notification["timesFailed"] = record.times_failed
    for key, value in (("lastNotification", record.last_notification), ("lastSuccess", record.last_success),
                       ("lastFailure", record.last_failure), ("status", record.status)):
        if value is not None:
            notification[key] = value
    return body


def parse_time(value: str) -> datetime:
    """An NGSI-LD DateTime as an aware datetime (UTC when no offset is given)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
