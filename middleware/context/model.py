"""The entity model: validate NGSI-LD input (normalized or concise) into the stored form, and render it back.

Stored form (what the store keeps and every other module reads)::

    {"id": "urn:...", "type": [expanded type IRIs], "createdAt": ts, "modifiedAt": ts,
     "scope": [...]?,                       # optional, as given
     "attrs": {expanded attribute IRI: [instance, ...]}}   # one instance per datasetId

    instance = {"type": "Property"|"GeoProperty"|"Relationship"|"LanguageProperty"|"ListProperty"
                        |"ListRelationship"|"JsonProperty"|"VocabProperty",
                "value"|"object"|"objectList"|"languageMap"|"valueList"|"json"|"vocab": ...,
                "datasetId"?, "observedAt"?, "unitCode"?, "objectType"?, "createdAt", "modifiedAt",
                expanded sub-attribute IRI: instance (without datasetId), ...}
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

from .errors import BadRequestData
from .geo import validate_geojson
from .jsonld import TermMap

NULL_URI = "urn:ngsi-ld:null"
LANGUAGE_NULL = {"@none": NULL_URI}  # the NGSI-LD Null of a LanguageProperty's languageMap (clause 5.2.1)
ATTRIBUTE_TYPES = ("Property", "GeoProperty", "Relationship", "LanguageProperty", "ListProperty",
                   "ListRelationship", "JsonProperty", "VocabProperty")
VALUE_MEMBER = {"Property": "value", "GeoProperty": "value", "Relationship": "object", "LanguageProperty": "languageMap",
                "ListProperty": "valueList", "ListRelationship": "objectList", "JsonProperty": "json",
                "VocabProperty": "vocab"}
_INFER_FROM_MEMBER = {"value": "Property", "object": "Relationship", "languageMap": "LanguageProperty",
                      "valueList": "ListProperty", "objectList": "ListRelationship", "json": "JsonProperty",
                      "vocab": "VocabProperty"}
SYSTEM_MEMBERS = frozenset({"createdAt", "modifiedAt", "deletedAt", "instanceId"})
CORE_MEMBERS = frozenset({"type", "value", "object", "objectList", "languageMap", "valueList", "json", "vocab",
                          "datasetId", "observedAt", "unitCode", "objectType", "lang", "@context",
                          "previousValue", "previousObject", "previousLanguageMap", "previousValueList",
                          "previousObjectList", "previousJson", "previousVocab"}) | SYSTEM_MEMBERS
ENTITY_MEMBERS = frozenset({"id", "type", "@context", "scope", "createdAt", "modifiedAt", "deletedAt"})
GEOJSON_TYPES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon"})
_FORBIDDEN_NAME = re.compile(r"[<>\"'=;()\s\x00-\x1f]")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"{}|\\^`]+$")
# clause 4.6.3: every component, seconds with at most six decimals (a comma allowed in requests), always "Z"
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}([.,]\d{1,6})?Z$")


def now_iso() -> str:
    """The current UTC time as an NGSI-LD DateTime with milliseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_uri(value: Any) -> bool:
    """True if value is a string that is an absolute URI (scheme ':' rest)."""
    return isinstance(value, str) and _URI.match(value) is not None


def _naming(what: str, owner: str | None) -> str:
    return f"{what} of {owner!r}" if owner is not None else what


def check_uri(value: Any, what: str, owner: str | None = None) -> str:
    """Return value if it is an absolute URI, else raise BadRequestData naming what (of owner)."""
    if not is_uri(value):
        raise BadRequestData(f"{_naming(what, owner)} must be a URI, got {value!r}")
    return value


_VALID_TIMES: dict[str, str] = {}  # DateTimes already checked, as stored (readings of one batch share a few)
_VALID_NAMES: set[str] = set()      # names already checked


def check_datetime(value: Any, what: str, owner: str | None = None) -> str:
    """Return value as an NGSI-LD DateTime (clause 4.6.3: YYYY-MM-DDThh:mm:ss[.ssssss]Z, in UTC; a decimal comma
    becomes a point), else raise BadRequestData."""
    if isinstance(value, str):
        known = _VALID_TIMES.get(value)
        if known is not None:
            return known
    if not isinstance(value, str) or not _DATETIME.match(value):
        raise BadRequestData(f"{_naming(what, owner)} must be a DateTime in UTC, YYYY-MM-DDThh:mm:ss[.ssssss]Z "
                             f"(clause 4.6.3), got {value!r}")
    normal = value.replace(",", ".")
    try:
        datetime.fromisoformat(normal.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequestData(f"{_naming(what, owner)} is not a valid DateTime: {value!r}") from None
    if len(_VALID_TIMES) > 10_000:
        _VALID_TIMES.clear()
    _VALID_TIMES[value] = normal
    return normal


def check_name(name: Any, what: str = "attribute name") -> str:
    """Return name if it is a valid NGSI-LD name (clause 4.6.2), else raise BadRequestData."""
    if name in _VALID_NAMES if isinstance(name, str) else False:
        return name
    if not isinstance(name, str) or not name or _FORBIDDEN_NAME.search(name) or name[0] == "@":
        raise BadRequestData(f"invalid {what} {name!r}: names must be non-empty, not start with @ (a JSON-LD keyword) "
                             "and contain none of < > \" ' = ; ( ) or whitespace")
    if len(_VALID_NAMES) > 50_000:
        _VALID_NAMES.clear()
    _VALID_NAMES.add(name)
    return name


def expand_types(value: Any, terms: TermMap) -> list[str]:
    """Validate an entity 'type' member (string or non-empty array) and return the expanded type IRIs."""
    names = value if isinstance(value, list) else [value]
    if not names:
        raise BadRequestData("entity type must not be empty")
    result: list[str] = []
    for name in names:
        check_name(name, "entity type")
        iri = terms.expand(name)
        if iri not in result:
            result.append(iri)
    return result


class EntityParser:
    """Turns request bodies (normalized or concise NGSI-LD) into stored-form fragments, with one term map."""

    def __init__(self, terms: TermMap, now: str | None = None):
        self.terms = terms
        self.now = now  # when given, instances are stamped createdAt = modifiedAt = now as they are built

    def entity(self, body: Any, *, require_id: bool = True, require_type: bool = True) -> dict:
        """Validate a whole entity body; return {'id', 'type', 'attrs', 'scope'?} in stored form.

        With a parser made with `now`, instances carry createdAt/modifiedAt and the fragment "stampedAt": now.
        """
        if not isinstance(body, dict):
            raise BadRequestData("an entity must be a JSON object")
        entity: dict[str, Any] = {}
        if "id" in body:
            entity["id"] = check_uri(body["id"], "entity id")
        elif require_id:
            raise BadRequestData("entity id is missing")
        if "type" in body:
            entity["type"] = expand_types(body["type"], self.terms)
        elif require_type:
            raise BadRequestData("entity type is missing")
        if "scope" in body:
            entity["scope"] = self._scope(body["scope"])
        entity["attrs"] = self.attributes(body)
        if self.now is not None:
            entity["stampedAt"] = self.now
        return entity

    def attributes(self, body: dict, *, allow_null: bool = False) -> dict[str, list[dict]]:
        """Validate the attribute members of a fragment; return {expanded name: [instances]}."""
        attrs: dict[str, list[dict]] = {}
        expand = self.terms.expand
        instance = self.instance
        for name, raw in body.items():
            if name in ENTITY_MEMBERS:
                continue
            if name not in _VALID_NAMES:
                check_name(name)
            iri = expand(name)
            if iri in attrs:
                raise BadRequestData(f"attribute {name!r} is given twice")
            if isinstance(raw, list):
                attrs[iri] = self.attribute(name, raw, allow_null=allow_null)
            else:
                attrs[iri] = [instance(name, raw, allow_null=allow_null)]
        return attrs

    def attribute(self, name: str, raw: Any, *, allow_null: bool = False) -> list[dict]:
        """Validate one attribute (single instance or an array of instances) into a list of instances."""
        if isinstance(raw, list) and raw and all(isinstance(item, dict) and _looks_like_instance(item) for item in raw):
            instances = [self.instance(name, item, allow_null=allow_null) for item in raw]
            seen: set = set()
            for inst in instances:
                key = inst.get("datasetId")
                if key in seen:
                    raise BadRequestData(f"attribute {name!r} has two instances with datasetId {key!r}")
                seen.add(key)
            return instances
        return [self.instance(name, raw, allow_null=allow_null)]

    def instance(self, name: str, raw: Any, *, sub: bool = False, allow_null: bool = False) -> dict:
        """Validate one attribute instance (normalized or concise) into its stored form."""
        if not isinstance(raw, dict):
            if raw is None:
                raise BadRequestData(f"attribute {name!r} must not be null")
            if raw == NULL_URI and not allow_null:
                raise BadRequestData(f"attribute {name!r}: urn:ngsi-ld:null is only allowed in merge and partial updates")
            return self._property(raw)
        kind = raw.get("type")
        member = VALUE_MEMBER.get(kind)
        if member is None:
            if kind is None:
                kind = _infer_kind(raw)
                if kind is None:
                    return self._property(raw)
            elif kind in GEOJSON_TYPES and "coordinates" in raw:
                raw = {"type": "GeoProperty", "value": raw}
                kind = "GeoProperty"
            else:
                raise BadRequestData(f"attribute {name!r} has an unknown type {kind!r}")
            member = VALUE_MEMBER[kind]
        if member not in raw:
            raise BadRequestData(f"attribute {name!r} of type {kind} needs a {member!r} member")
        value = raw[member]
        if value is None:
            raise BadRequestData(f"attribute {name!r}: {member!r} must not be null")
        if member == "languageMap" and value == LANGUAGE_NULL:
            value = NULL_URI  # stored like every other NGSI-LD Null, so updates and merges delete with it
        if value == NULL_URI:
            if not allow_null:
                raise BadRequestData(f"attribute {name!r}: an NGSI-LD Null (urn:ngsi-ld:null, or {{\"@none\": "
                                     f"\"urn:ngsi-ld:null\"}} as a languageMap) is only allowed in merge and partial updates")
        elif kind != "Property":
            value = self._value(name, kind, value)
        out: dict[str, Any] = {"type": kind, member: value}
        for key, item in raw.items():
            action = _MEMBER_ACTION.get(key)
            if action is None:
                if key not in _VALID_NAMES:
                    check_name(key, "sub-attribute name")
                if allow_null and item == NULL_URI:
                    out[self.terms.expand(key)] = {"type": "Property", "value": NULL_URI}
                else:
                    out[self.terms.expand(key)] = self.instance(key, item, sub=True, allow_null=allow_null)
            elif action is _SKIP:
                continue
            elif action is _OBSERVED_AT:
                out["observedAt"] = (_VALID_TIMES.get(item) if item.__class__ is str else None) or \
                    check_datetime(item, "observedAt", name)
            elif action is _UNIT_CODE:
                if not isinstance(item, str) or not item:
                    raise BadRequestData(f"unitCode of {name!r} must be a non-empty string")
                out["unitCode"] = item
            elif action is _DATASET_ID:
                if sub:
                    raise BadRequestData(f"sub-attribute {name!r} must not have a datasetId")
                if item == NULL_URI:
                    raise BadRequestData(f"datasetId of {name!r} must not be urn:ngsi-ld:null")
                out["datasetId"] = check_uri(item, "datasetId", name)
            elif kind == "Relationship" or kind == "ListRelationship":  # objectType
                out["objectType"] = self.terms.expand(item) if isinstance(item, str) else item
        if self.now is not None:
            out["createdAt"] = out["modifiedAt"] = self.now
        return out

    def _property(self, value: Any) -> dict:
        """A concise Property instance (stamped like every instance the parser builds)."""
        out = {"type": "Property", "value": value}
        if self.now is not None:
            out["createdAt"] = out["modifiedAt"] = self.now
        return out

    def _value(self, name: str, kind: str, value: Any) -> Any:
        if kind == "GeoProperty":
            validate_geojson(value)
            return value
        if kind == "Relationship":
            if isinstance(value, list):
                if not value:
                    raise BadRequestData(f"relationship {name!r} has an empty object")
                return [check_uri(v, "object", name) for v in value]
            return check_uri(value, "object", name)
        if kind == "ListRelationship":
            if not isinstance(value, list):
                raise BadRequestData(f"objectList of {name!r} must be an array")
            for item in value:
                target = item.get("object") if isinstance(item, dict) else item
                check_uri(target, f"objectList item of {name!r}")
            return value
        if kind == "LanguageProperty":
            if not isinstance(value, dict) or not value:
                raise BadRequestData(f"languageMap of {name!r} must be a non-empty object")
            for lang, text in value.items():
                texts = text if isinstance(text, list) else [text]
                if not isinstance(lang, str) or not all(isinstance(t, str) for t in texts):
                    raise BadRequestData(f"languageMap of {name!r} must map language tags to strings")
            return value
        if kind == "ListProperty":
            if not isinstance(value, list):
                raise BadRequestData(f"valueList of {name!r} must be an array")
            return value
        if kind == "JsonProperty":
            if not isinstance(value, (dict, list)):
                raise BadRequestData(f"json of {name!r} must be a JSON object or array")
            return value
        if kind == "VocabProperty":
            items = value if isinstance(value, list) else [value]
            if not items or not all(isinstance(v, str) and v for v in items):
                raise BadRequestData(f"vocab of {name!r} must be a string or an array of strings")
            expanded = [self.terms.expand(v) for v in items]
            return expanded if isinstance(value, list) else expanded[0]
        return value  # a Property's value may be any JSON value (instance() does not even call this for it)

    def _scope(self, value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str) or not re.match(r"^/[^\s/]+(/[^\s/]+)*$", item):
                raise BadRequestData(f"invalid scope {item!r}: scopes look like /Madrid/Gardens")
        return items


_SKIP, _DATASET_ID, _OBSERVED_AT, _UNIT_CODE, _OBJECT_TYPE = "skip", "datasetId", "observedAt", "unitCode", "objectType"
# what instance() does with each core member of its input (any other key is a sub-attribute); the value member
# and the system members are not taken from here, objectType only on relationships
_MEMBER_ACTION = {**dict.fromkeys(CORE_MEMBERS, _SKIP), "datasetId": _DATASET_ID, "observedAt": _OBSERVED_AT,
                  "unitCode": _UNIT_CODE, "objectType": _OBJECT_TYPE}


def _looks_like_instance(item: dict) -> bool:
    return "type" in item and item["type"] in ATTRIBUTE_TYPES or any(m in item for m in _INFER_FROM_MEMBER)


def _infer_kind(raw: dict) -> str | None:
    for member, kind in _INFER_FROM_MEMBER.items():
        if member in raw:
            return kind
    return None


def stamp(instance: dict, now: str, created: str | None = None) -> dict:
    """Set createdAt/modifiedAt on an instance and its sub-attributes (created keeps an earlier createdAt)."""
    instance["createdAt"] = created or now
    instance["modifiedAt"] = now
    for key, item in instance.items():
        if ":" in key and isinstance(item, dict):
            stamp(item, now, created=None)
    return instance


# ---------------------------------------------------------------------------------------------------------------
# rendering


class Renderer:
    """Renders stored entities for one request: compaction, format (normalized/keyValues/concise), sysAttrs, lang,
    projection (attrs, pick, omit) and the datasetId selection of instances."""

    def __init__(self, terms: TermMap, *, fmt: str = "normalized", sys_attrs: bool = False,
                 lang: str | None = None, attrs: set[str] | None = None, omit: set[str] | None = None,
                 pick_members: set[str] | None = None, dataset_ids: set[str] | None = None):
        self.terms = terms
        self.fmt = fmt
        self.sys_attrs = sys_attrs
        self.langs = _parse_lang(lang) if lang else None
        self.attrs = attrs
        self.omit = omit or set()
        self.pick_members = pick_members
        self.dataset_ids = dataset_ids  # only the instances with these datasetIds ("@none": the default instance)
        self._compact: Callable[[str], str] = terms.compact

    def entity(self, entity: dict) -> dict:
        """Render one stored entity."""
        out: dict[str, Any] = {}
        pick = self.pick_members
        if (pick is None or "id" in pick) and "id" not in self.omit:
            out["id"] = entity["id"]
        if (pick is None or "type" in pick) and "type" not in self.omit:
            types = [self._compact(t) for t in entity["type"]]
            out["type"] = types[0] if len(types) == 1 else types
        if "scope" in entity and (pick is None or "scope" in pick) and "scope" not in self.omit:
            scope = entity["scope"]
            out["scope"] = scope[0] if len(scope) == 1 else scope
        if self.sys_attrs and self.fmt in ("normalized", "concise"):
            out["createdAt"] = entity["createdAt"]
            out["modifiedAt"] = entity["modifiedAt"]
        wanted = self.attrs
        for iri, instances in entity["attrs"].items():
            if wanted is not None and iri not in wanted:
                continue
            if iri in self.omit:
                continue
            if self.dataset_ids is not None:
                instances = [inst for inst in instances if inst.get("datasetId", "@none") in self.dataset_ids]
                if not instances:
                    continue
            name = self._compact(iri)
            rendered = [self.instance(inst) for inst in instances]
            out[name] = rendered[0] if len(rendered) == 1 else rendered
        return out

    def instance(self, inst: dict) -> Any:
        """Render one attribute instance in the request's format."""
        kind = inst["type"]
        fmt = self.fmt
        if fmt == "keyValues":
            return self._simple_value(inst)
        out: dict[str, Any] = {}
        if fmt == "normalized":
            out["type"] = kind
        if kind == "LanguageProperty" and self.langs is not None:
            text, tag = _pick_lang(inst["languageMap"], self.langs)
            if fmt == "normalized":
                out["type"] = "Property"
            out["value"] = text
            out["lang"] = tag
        else:
            member = VALUE_MEMBER[kind]
            value = inst[member]
            if kind == "VocabProperty":
                value = [self._compact(v) for v in value] if isinstance(value, list) else self._compact(value)
            elif kind == "Relationship" and "objectType" in inst:
                pass
            if fmt == "concise" and kind in ("Property", "GeoProperty") and not _has_extras(inst, self.sys_attrs):
                return value
            out[member] = value
        for key, item in inst.items():
            if key in ("type", "value", "object", "objectList", "languageMap", "valueList", "json", "vocab"):
                continue
            if key in ("createdAt", "modifiedAt"):
                if self.sys_attrs:
                    out[key] = item
                continue
            if key == "objectType":
                out[key] = self._compact(item) if isinstance(item, str) else item
            elif ":" in key:
                out[self._compact(key)] = self.instance(item)
            else:
                out[key] = item
        return out

    def _simple_value(self, inst: dict) -> Any:
        kind = inst["type"]
        if kind == "LanguageProperty":
            if self.langs is not None:
                return _pick_lang(inst["languageMap"], self.langs)[0]
            return {"languageMap": inst["languageMap"]}
        if kind == "VocabProperty":
            value = inst["vocab"]
            return [self._compact(v) for v in value] if isinstance(value, list) else self._compact(value)
        if kind == "JsonProperty":
            return {"json": inst["json"]}
        if kind == "ListProperty":
            return inst["valueList"]
        if kind == "ListRelationship":
            return inst["objectList"]
        return inst[VALUE_MEMBER[kind]]


def _has_extras(inst: dict, sys_attrs: bool) -> bool:
    for key in inst:
        if key in ("type", "value"):
            continue
        if key in ("createdAt", "modifiedAt") and not sys_attrs:
            continue
        return True
    return False


def _parse_lang(lang: str) -> list[str]:
    weighted = []
    for index, part in enumerate(lang.split(",")):
        tag, _, params = part.strip().partition(";")
        weight = 1.0
        if params.strip().startswith("q="):
            try:
                weight = float(params.strip()[2:])
            except ValueError:
                raise BadRequestData(f"invalid lang parameter {lang!r}") from None
        if tag:
            weighted.append((-weight, index, tag))
    return [tag for _, _, tag in sorted(weighted)]


def _pick_lang(language_map: dict, langs: list[str]) -> tuple[Any, str]:
    for tag in langs:
        if tag == "*":
            break
        if tag in language_map:
            return language_map[tag], tag
        for key in language_map:
            if key.split("-")[0] == tag.split("-")[0]:
                return language_map[key], key
    if "@none" in language_map:
        return language_map["@none"], "@none"
    key = next(iter(language_map))
    return language_map[key], key
