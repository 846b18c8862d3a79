"""NGSI-LD entity routes (ETSI GS CIM 009 v1.8 clauses 5.6 and 5.7): create, retrieve, query, replace, merge, attrs."""
from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..context.broker import AttrReport, Broker, QueryResult
from ..context.errors import BadRequestData, OperationNotSupported, ResourceNotFound, TooManyResults
from ..context.geo import parse_geoq
from ..context.projection import check_dataset_ids, projection
from ..context.model import ENTITY_MEMBERS, EntityParser, Renderer, check_name, check_uri, expand_types
from ..context.query import parse_q
from ..context.scopeq import parse_scopeq
from ..context.typeexpr import parse_type_selection
from .common import GEOJSON, Ctx, context_for, int_param, options_of, page_links, read_body, respond, split_list

router = APIRouter(prefix="/ngsi-ld/v1")


def _broker(request: Request) -> Broker:
    return request.app.state.broker


def renderer_for(request: Request, ctx: Ctx, *, attrs: set[str] | None = None, body: dict | None = None) -> Renderer:
    """The Renderer asked for by options=, format=, lang=, pick=, omit= and datasetId= (a Query body's members first)."""
    options = options_of(request)
    fmt = request.query_params.get("format")
    if fmt is None:
        chosen = options & {"keyValues", "simplified", "concise", "normalized"}
        if len(chosen - {"normalized"}) > 1 or ({"keyValues", "simplified"} & chosen and "concise" in chosen):
            raise BadRequestData("options keyValues and concise exclude each other")
        fmt = next(iter(chosen - {"normalized"}), "normalized")
    if fmt == "simplified":
        fmt = "keyValues"
    if fmt not in ("normalized", "keyValues", "concise"):
        raise BadRequestData(f"format must be normalized, keyValues, simplified or concise, got {fmt!r}")
    given = {name: body[name] if body is not None and name in body else request.query_params.get(name)
             for name in ("pick", "omit", "lang", "datasetId", "join", "joinLevel")}
    refuse_join(given["join"], given["joinLevel"])
    pick = projection(given["pick"], "pick")
    omit = projection(given["omit"], "omit")
    if pick is not None and omit is not None:
        raise BadRequestData("pick and omit exclude each other")
    if attrs is not None and (pick is not None or omit is not None):
        raise BadRequestData("attrs cannot be combined with pick or omit (clause 4.21): use pick alone")
    pick_members = None
    if pick is not None:
        pick_members = {p for p in pick if p in ("id", "type", "scope")}
        attrs = {ctx.terms.expand(p) for p in pick if p not in ("id", "type", "scope")}
    omitted = None
    if omit is not None:
        omitted = {p if p in ("id", "type", "scope") else ctx.terms.expand(p) for p in omit}
    lang = given["lang"]
    if lang is not None and not isinstance(lang, str):
        raise BadRequestData("lang must be a string of language tags")
    return Renderer(ctx.terms, fmt=fmt, sys_attrs="sysAttrs" in options, lang=lang, attrs=attrs, omit=omitted,
                    pick_members=pick_members, dataset_ids=dataset_ids(given["datasetId"]))


def refuse_join(join: Any, join_level: Any) -> None:
    """Refuse join=flat|inline (4.5.23, not implemented): OperationNotSupported; a malformed join/joinLevel: 400."""
    if join is not None and join not in ("flat", "inline", "@none"):
        raise BadRequestData(f"join must be flat, inline or @none, got {join!r}")
    if join_level is not None and not re.fullmatch(r"[1-9][0-9]*", str(join_level)):
        raise BadRequestData(f"joinLevel must be a positive integer, got {join_level!r}")
    if join in ("flat", "inline"):
        raise OperationNotSupported(f"join={join} (linked-entity retrieval, clause 4.5.23) is not supported")


def dataset_ids(value: Any) -> set[str] | None:
    """The datasetId selection of a query (a comma-separated list, or a Query body's array)."""
    if value is None:
        return None
    return set(check_dataset_ids(split_list(value) if isinstance(value, str) else value))


def attrs_param(request: Request, ctx: Ctx) -> set[str] | None:
    """The expanded names of the attrs parameter."""
    attrs = split_list(request.query_params.get("attrs"))
    return attr_names(attrs, ctx) if attrs is not None else None


def attr_names(names: list[str], ctx: Ctx) -> set[str]:
    """Expand the attribute names of attrs; entity members (id, type, scope, createdAt, ...) are BadRequestData."""
    return {attribute_iri(name, ctx) for name in names}


def attribute_iri(name: str, ctx: Ctx) -> str:
    """The expanded name of an attribute named in a request (attrs, an attribute URL); an entity member, however
    it is written (scope, ngsi-ld:scope, its IRI), is BadRequestData."""
    iri = ctx.terms.expand(check_name(name))
    if iri.startswith("@") or iri in {ctx.terms.expand(member) for member in ENTITY_MEMBERS}:
        raise BadRequestData(f"{name!r} is an entity member (id, type, scope, createdAt, ...), not an attribute")
    return iri


def as_geojson(request: Request, ctx: Ctx, rendered: dict, doc: dict) -> dict:
    """One entity as a GeoJSON Feature (clause 4.5.16), geometry from geometryProperty (default location)."""
    geometry_name = request.query_params.get("geometryProperty", "location")
    instances = doc["attrs"].get(ctx.terms.expand(geometry_name)) or []
    geometry = next((inst["value"] for inst in instances if inst["type"] == "GeoProperty"), None)
    properties = {k: v for k, v in rendered.items() if k != "id"}
    return {"id": doc["id"], "type": "Feature", "geometry": geometry, "properties": properties}


@router.post("/entities")
@router.post("/entities/")
async def create_entity(request: Request) -> Response:
    """Create an entity (5.6.1): 201 with Location, 409 AlreadyExists."""
    body, media = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequestData("the body must be one entity (a JSON object); use /entityOperations/create for arrays")
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    fragment = EntityParser(ctx.terms).entity(body)
    await _broker(request).mutate_one(ctx.tenant, fragment["id"], Broker.create_op(fragment))
    return Response(status_code=201, headers={"Location": f"/ngsi-ld/v1/entities/{fragment['id']}"})


@router.get("/entities")
@router.get("/entities/")
async def query_entities(request: Request) -> Response:
    """Query entities (5.7.2) by id, idPattern, type, attrs, q, geoQ; limit/offset/count."""
    ctx = await context_for(request, request.app.state.contexts, geojson=True)
    params = request.query_params
    geo_params = (params.get("georel"), params.get("geometry"), params.get("coordinates"))
    selectors = [params.get(p) for p in ("id", "idPattern", "type", "attrs", "q", "scopeQ")] + list(geo_params)
    if all(s is None for s in selectors) and params.get("local") != "true":
        raise BadRequestData("a query needs at least one of id, idPattern, type, attrs, q, geoQ or scopeQ "
                             "(or local=true)")
    in_scope = parse_scopeq(params["scopeQ"]) if "scopeQ" in params else None
    return await run_query(request, ctx, ids=split_list(params.get("id")), id_pattern=params.get("idPattern"),
                           type_text=params.get("type"), attrs=attrs_param(request, ctx), q_text=params.get("q"),
                           geo=(*geo_params, params.get("geoproperty")), match=in_scope)


async def run_query(request: Request, ctx: Ctx, *, ids, id_pattern, type_text, attrs, q_text, geo,
                    match=None, body: dict | None = None) -> Response:
    """Validate the selection, run it (match: extra entity predicate), render the page (+ count when count=true).

    body: the Query body of a POST query, whose pick, omit, lang, datasetId and join take the place of the URL's.
    """
    renderer = renderer_for(request, ctx, attrs=attrs, body=body)
    result, headers = await select_entities(request, ctx, ids=ids, id_pattern=id_pattern, type_text=type_text,
                                            attrs=attrs, q_text=q_text, geo=geo, match=match)
    rendered = [renderer.entity(doc) for doc in result.entities]
    if ctx.accept == GEOJSON:
        features = [as_geojson(request, ctx, r, d) for r, d in zip(rendered, result.entities)]
        return respond(ctx, {"type": "FeatureCollection", "features": features}, headers=headers)
    return respond(ctx, rendered, headers=headers)


async def select_entities(request: Request, ctx: Ctx, *, ids, id_pattern, type_text, attrs, q_text, geo,
                          match=None) -> tuple[QueryResult, dict]:
    """Validate a selection and run it on the current entities: the page (limit/offset/count) and its headers."""
    settings = request.app.state.settings
    limit = int_param(request, "limit", settings.default_limit)
    offset = int_param(request, "offset", 0)
    if limit > settings.max_limit:
        raise TooManyResults(f"limit {limit} exceeds the maximum of {settings.max_limit}")
    count = request.query_params.get("count") == "true"
    if ids is not None:
        for entity_id in ids:
            check_uri(entity_id, "id")
    types = parse_type_selection(type_text, ctx.terms.expand) if type_text is not None else None
    q = parse_q(q_text, ctx.terms.expand) if q_text is not None else None
    georel, geometry, coordinates, geoproperty = geo
    geo_query = parse_geoq(georel, geometry, coordinates, geoproperty, ctx.terms.expand)
    result = await _broker(request).query(ctx.tenant, ids=ids, id_pattern=id_pattern, types=types, attrs=attrs,
                                          q=q, geo=geo_query, scope=match, limit=limit, offset=offset, count=count)
    headers = page_links(request, offset, limit, result.more)
    if count:
        headers["NGSILD-Results-Count"] = str(result.total)
    return result, headers


@router.get("/entities/{entity_id}")
async def retrieve_entity(entity_id: str, request: Request) -> Response:
    """Retrieve an entity (5.7.1); 404 ResourceNotFound."""
    check_uri(entity_id, "entity id")
    ctx = await context_for(request, request.app.state.contexts, geojson=True)
    attrs = attrs_param(request, ctx)
    renderer = renderer_for(request, ctx, attrs=attrs)
    doc = await _broker(request).retrieve(ctx.tenant, entity_id)
    rendered = renderer.entity(doc)
    if ctx.accept == GEOJSON:
        return respond(ctx, as_geojson(request, ctx, rendered, doc))
    return respond(ctx, rendered)


@router.put("/entities/{entity_id}")
async def replace_entity(entity_id: str, request: Request) -> Response:
    """Replace an entity (5.6.18): 204; 404 if absent."""
    check_uri(entity_id, "entity id")
    body, media = await read_body(request)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    fragment = _fragment_for(ctx, entity_id, body, require_type=False)
    await _mutate_existing(request, ctx, entity_id, Broker.replace_op(fragment, must_exist=True))
    return Response(status_code=204)


@router.patch("/entities/{entity_id}")
async def merge_entity(entity_id: str, request: Request) -> Response:
    """Merge an entity (5.6.17, merge-patch semantics, urn:ngsi-ld:null deletes): 204; 404 if absent."""
    check_uri(entity_id, "entity id")
    body, media = await read_body(request, merge_patch=True)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    fragment = _fragment_for(ctx, entity_id, body, require_type=False, allow_null=True)
    await _mutate_existing(request, ctx, entity_id, Broker.merge_op(fragment))
    return Response(status_code=204)


@router.delete("/entities/{entity_id}")
async def delete_entity(entity_id: str, request: Request) -> Response:
    """Delete an entity (5.6.6): 204; 404 if absent."""
    check_uri(entity_id, "entity id")
    ctx = await context_for(request, request.app.state.contexts)
    await _mutate_existing(request, ctx, entity_id, Broker.delete_op(entity_id))
    return Response(status_code=204)


@router.post("/entities/{entity_id}/attrs")
@router.post("/entities/{entity_id}/attrs/")
async def append_attributes(entity_id: str, request: Request) -> Response:
    """Append attributes (5.6.3), options=noOverwrite: 204, or 207 with updated / notUpdated."""
    check_uri(entity_id, "entity id")
    body, media = await read_body(request)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    fragment = _fragment_for(ctx, entity_id, body, require_type=False)
    no_overwrite = "noOverwrite" in options_of(request)
    op = Broker.append_op(fragment, no_overwrite=no_overwrite, must_exist=True)
    report = await _mutate_existing(request, ctx, entity_id, op)
    return _report_response(ctx, report)


@router.patch("/entities/{entity_id}/attrs")
@router.patch("/entities/{entity_id}/attrs/")
async def update_attributes(entity_id: str, request: Request) -> Response:
    """Update existing attributes (5.6.2): 204, or 207 listing those not updated."""
    check_uri(entity_id, "entity id")
    body, media = await read_body(request, merge_patch=True)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    fragment = _fragment_for(ctx, entity_id, body, require_type=False, allow_null=True)
    op = Broker.append_op(fragment, no_overwrite=False, must_exist=True, only_existing=True)
    report = await _mutate_existing(request, ctx, entity_id, op)
    return _report_response(ctx, report)


@router.patch("/entities/{entity_id}/attrs/{attr}")
async def partial_attribute_update(entity_id: str, attr: str, request: Request) -> Response:
    """Partial attribute update (5.6.4): the given members change, the rest stays; 404 if absent."""
    return await _attribute_write(entity_id, attr, request, replace=False)


@router.put("/entities/{entity_id}/attrs/{attr}")
async def replace_attribute(entity_id: str, attr: str, request: Request) -> Response:
    """Replace an attribute (5.6.19); 404 if absent."""
    return await _attribute_write(entity_id, attr, request, replace=True)


async def _attribute_write(entity_id: str, attr: str, request: Request, *, replace: bool) -> Response:
    check_uri(entity_id, "entity id")
    body, media = await read_body(request, merge_patch=not replace)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    name = attribute_iri(attr, ctx)  # 5.6.4.4 / 5.6.19.4: scope (an entity member) is no target attribute
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "@context"}
        if not body:
            raise BadRequestData(f"the fragment for attribute {attr!r} is empty")
    if not replace and _only_sub_attributes(body):
        op = _sub_attributes_patch_op(entity_id, name, EntityParser(ctx.terms), body)
    else:
        instances = EntityParser(ctx.terms).attribute(attr, body, allow_null=not replace)
        typed = any(isinstance(item, dict) and "type" in item for item in (body if isinstance(body, list) else [body]))
        op = Broker.attr_patch_op(entity_id, name, instances, replace=replace, typed=typed)
    await _mutate_existing(request, ctx, entity_id, op)
    return Response(status_code=204)


_INSTANCE_MEMBERS = frozenset({"datasetId", "observedAt", "unitCode", "objectType", "lang"})
_VALUE_MEMBERS = frozenset({"type", "value", "object", "objectList", "languageMap", "valueList", "json", "vocab"})


def _only_sub_attributes(body: Any) -> bool:
    """True for a partial-update fragment that changes an instance's members but not its value (5.6.4)."""
    return (isinstance(body, dict) and bool(body) and not _VALUE_MEMBERS & body.keys()
            and all(key in _INSTANCE_MEMBERS or isinstance(value, dict) and _VALUE_MEMBERS & value.keys()
                    for key, value in body.items()))


def _sub_attributes_patch_op(entity_id: str, name: str, parser: EntityParser, body: dict):
    """Merge sub-attributes and members (unitCode, observedAt, ...) into an instance, keeping its type and value."""
    def fn(doc, now):
        datasets = doc["attrs"].get(name, ()) if doc is not None else ()
        match = next((old for old in datasets if old.get("datasetId") == body.get("datasetId")), None)
        kind = match["type"] if match is not None else "Property"
        value_key = {"Relationship": "object", "LanguageProperty": "languageMap", "ListProperty": "valueList",
                     "ListRelationship": "objectList", "JsonProperty": "json", "VocabProperty": "vocab"}.get(kind, "value")
        fragment = parser.instance(name, {**body, "type": kind, value_key: _placeholder(kind)}, allow_null=True)
        del fragment[value_key]
        return Broker.attr_patch_op(entity_id, name, [fragment], replace=False)(doc, now)
    return fn


def _placeholder(kind: str) -> Any:
    """A valid value of an attribute kind, parsed with a fragment and then dropped."""
    return {"GeoProperty": {"type": "Point", "coordinates": [0, 0]}, "Relationship": "urn:ngsi-ld:placeholder",
            "LanguageProperty": {"en": "x"}, "ListProperty": [0], "ListRelationship": ["urn:ngsi-ld:placeholder"],
            "JsonProperty": {}, "VocabProperty": "placeholder"}.get(kind, 0)


@router.delete("/entities/{entity_id}/attrs/{attr}")
async def delete_attribute(entity_id: str, attr: str, request: Request) -> Response:
    """Delete an attribute (5.6.5): the default instance, ?datasetId=, or ?deleteAll=true; 404 if absent."""
    check_uri(entity_id, "entity id")
    ctx = await context_for(request, request.app.state.contexts)
    name = attribute_iri(attr, ctx)
    dataset_id = request.query_params.get("datasetId")
    if dataset_id is not None:
        check_uri(dataset_id, "datasetId")
    delete_all = request.query_params.get("deleteAll") == "true"
    op = Broker.attr_delete_op(entity_id, name, dataset_id, delete_all)
    await _mutate_existing(request, ctx, entity_id, op)
    return Response(status_code=204)


async def _mutate_existing(request: Request, ctx: Ctx, entity_id: str, op) -> Any:
    """Run a mutation of an existing entity; its 404 is NonexistentTenant when the tenant itself is unknown."""
    broker = _broker(request)
    try:
        return await broker.mutate_one(ctx.tenant, entity_id, op)
    except ResourceNotFound:
        await broker.check_tenant(ctx.tenant)
        raise


def _fragment_for(ctx: Ctx, entity_id: str, body: Any, *, require_type: bool, allow_null: bool = False) -> dict:
    """A validated entity fragment for an entity addressed by URL (a different id in the body is an error)."""
    if not isinstance(body, dict):
        raise BadRequestData("the body must be a JSON object")
    if "id" in body and body["id"] != entity_id:
        raise BadRequestData(f"the body's id {body['id']!r} differs from the URL's {entity_id!r}")
    parser = EntityParser(ctx.terms)
    fragment = {"id": entity_id}
    if "type" in body:
        fragment["type"] = expand_types(body["type"], ctx.terms)
    elif require_type:
        raise BadRequestData("entity type is missing")
    if "scope" in body:
        fragment["scope"] = parser._scope(body["scope"])
    fragment["attrs"] = parser.attributes(body, allow_null=allow_null)
    return fragment


def _report_response(ctx: Ctx, report: AttrReport) -> Response:
    if not report.not_updated:
        return Response(status_code=204)
    payload = {"updated": [ctx.terms.compact(n) for n in report.updated],
               "notUpdated": [{"attributeName": ctx.terms.compact(n), "reason": reason} for n, reason in report.not_updated]}
    return respond(ctx, payload, status=207)
