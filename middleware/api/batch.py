"""NGSI-LD batch routes (clauses 5.6.7-5.6.10, 5.6.20, 5.7.2 POST query): 201/204 when all succeed, else 207."""
from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..context.broker import AttrReport, Broker, Mutation
from ..context.errors import AlreadyExists, BadRequestData, LdContextNotAvailable, NgsiLdError
from ..context.model import EntityParser, check_uri, now_iso
from ..context.scopeq import parse_scopeq
from ..context.typeexpr import parse_type_selection
from .common import JSONLD, Ctx, context_for, options_of, read_body, refuse_link_with_jsonld
from .entities import attr_names, run_query

router = APIRouter(prefix="/ngsi-ld/v1/entityOperations")


async def _batch_body(request: Request) -> tuple[list[tuple[Any, Ctx]], Ctx, list[dict]]:
    """The entities of a batch body, each with the Ctx of its own @context (application/ld+json lets every entity
    bring one); an entity whose @context is missing, misplaced or cannot be fetched fails alone (207).
    Returns (pairs, ctx, errors)."""
    body, media = await read_body(request)
    _check_batch_array(body, "entities")
    resolver = request.app.state.contexts
    if media == JSONLD:
        refuse_link_with_jsonld(request)  # a request-level error (6.3.5), not one entity's
    ctx = await context_for(request, resolver)
    by_context: dict[bytes, Ctx | NgsiLdError] = {}
    pairs: list[tuple[Any, Ctx]] = []
    errors: list[dict] = []
    for item in body:
        if not isinstance(item, dict):
            pairs.append((item, ctx))  # the parser reports it
            continue
        key = orjson.dumps(item.get("@context")) if media == JSONLD else orjson.dumps("@context" in item)
        if key not in by_context:
            try:
                by_context[key] = await context_for(request, resolver, body=item, media=media)
            except (BadRequestData, LdContextNotAvailable) as failure:
                by_context[key] = failure
        found = by_context[key]
        if isinstance(found, NgsiLdError):
            errors.append({"entityId": _id_of(item), "error": found.problem()})
        else:
            pairs.append((item, found))
    return pairs, pairs[0][1] if pairs else ctx, errors


def _check_batch_array(body: Any, what: str) -> None:
    """BadRequestData unless body is a non-empty JSON array without null items (5.6.7.4-5.6.10.4, 5.6.20.4)."""
    if not isinstance(body, list):
        raise BadRequestData(f"a batch body must be a JSON array of {what}")
    if not body:
        raise BadRequestData(f"a batch body must not be an empty array: give at least one of the {what}")
    if any(item is None for item in body):
        raise BadRequestData("a batch body must not contain null items")


def _id_of(item: Any) -> str | None:
    """The id of a batch item, if it has a string one (for its error entry)."""
    return item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None


def _parse_all(pairs: list[tuple[Any, Ctx]], *, allow_null: bool = False, require_type: bool = True,
               now: str | None = None) -> tuple[list[dict], list[dict]]:
    """Validate each entity (stamped with now, if given); return (fragments, error entries) so one bad entity fails alone."""
    parsers: dict[int, EntityParser] = {}
    fragments: list[dict] = []
    errors: list[dict] = []
    for item, ctx in pairs:
        parser = parsers.get(id(ctx))
        if parser is None:
            parser = parsers[id(ctx)] = EntityParser(ctx.terms, now)
        try:
            if allow_null:
                head = {k: v for k, v in item.items() if k in ("id", "type", "scope")} if isinstance(item, dict) else item
                fragment = parser.entity(head, require_type=False)
                fragment["attrs"] = parser.attributes(item, allow_null=True)
            else:
                fragment = parser.entity(item, require_type=require_type)
            fragments.append(fragment)
        except NgsiLdError as error:
            errors.append({"entityId": _id_of(item), "error": error.problem()})
    return fragments, errors


async def _run(request: Request, ctx: Ctx, ops: list[tuple[str, Mutation]],
               now: str | None = None) -> tuple[list[str], list[dict], list]:
    results = await request.app.state.broker.mutate(ctx.tenant, ops, now)
    success: list[str] = []
    errors: list[dict] = []
    for (entity_id, _), result in zip(ops, results):
        if isinstance(result, NgsiLdError):
            errors.append({"entityId": entity_id, "error": result.problem()})
        else:
            success.append(entity_id)
    return success, errors, results


def _multi_status(ctx: Ctx, success: list[str], errors: list[dict]) -> Response:
    return Response(orjson.dumps({"success": success, "errors": errors}), status_code=207, media_type="application/json")


@router.post("/create")
async def batch_create(request: Request) -> Response:
    """Batch create (5.6.7): 201 with the created ids, or 207."""
    pairs, ctx, errors = await _batch_body(request)
    now = now_iso()
    fragments, parse_errors = _parse_all(pairs, now=now)
    errors += parse_errors
    success, run_errors, _ = await _run(request, ctx, [(f["id"], Broker.create_op(f)) for f in fragments], now)
    errors += run_errors
    if errors:
        return _multi_status(ctx, success, errors)
    return Response(orjson.dumps(success), status_code=201, media_type="application/json")


@router.post("/upsert")
async def batch_upsert(request: Request) -> Response:
    """Batch upsert (5.6.8), options=replace (default) or update: 201 with created ids, 204 if none created, or 207."""
    pairs, ctx, errors = await _batch_body(request)
    options = options_of(request)
    if {"replace", "update"} <= options:
        raise BadRequestData("options replace and update exclude each other")
    now = now_iso()
    fragments, parse_errors = _parse_all(pairs, now=now)
    errors += parse_errors
    if "update" in options:
        ops = [(f["id"], Broker.append_op(f, no_overwrite=False, must_exist=False)) for f in fragments]
    else:
        ops = [(f["id"], Broker.replace_op(f, must_exist=False)) for f in fragments]
    success, run_errors, results = await _run(request, ctx, ops, now)
    errors += run_errors
    if errors:
        return _multi_status(ctx, success, errors)
    created = [entity_id for (entity_id, _), result in zip(ops, results) if result == "created"]
    if created:
        return Response(orjson.dumps(created), status_code=201, media_type="application/json")
    return Response(status_code=204)


@router.post("/update")
async def batch_update(request: Request) -> Response:
    """Batch update (5.6.9), options=noOverwrite: 204 or 207 (missing entities are errors)."""
    pairs, ctx, errors = await _batch_body(request)
    await request.app.state.broker.check_tenant(ctx.tenant)  # these operations need existing entities
    no_overwrite = "noOverwrite" in options_of(request)
    fragments, parse_errors = _parse_all(pairs, require_type=False)
    errors += parse_errors
    ops = [(f["id"], Broker.append_op(f, no_overwrite=no_overwrite, must_exist=True)) for f in fragments]
    success, run_errors, results = await _run(request, ctx, ops)
    errors += run_errors
    for (entity_id, _), result in zip(ops, results):
        if isinstance(result, AttrReport) and result.not_updated:  # noOverwrite skipped some: not a full success
            success.remove(entity_id)
            skipped = ", ".join(f"{ctx.terms.compact(name)} ({reason})" for name, reason in result.not_updated)
            errors.append({"entityId": entity_id, "error": AlreadyExists(f"not updated: {skipped}").problem()})
    return _multi_status(ctx, success, errors) if errors else Response(status_code=204)


@router.post("/merge")
async def batch_merge(request: Request) -> Response:
    """Batch merge (5.6.20): 204 or 207."""
    pairs, ctx, errors = await _batch_body(request)
    await request.app.state.broker.check_tenant(ctx.tenant)
    fragments, parse_errors = _parse_all(pairs, allow_null=True)
    errors += parse_errors
    success, run_errors, _ = await _run(request, ctx, [(f["id"], Broker.merge_op(f)) for f in fragments])
    errors += run_errors
    return _multi_status(ctx, success, errors) if errors else Response(status_code=204)


@router.post("/delete")
async def batch_delete(request: Request) -> Response:
    """Batch delete (5.6.10) of an array of ids: 204 or 207."""
    body, media = await read_body(request)
    _check_batch_array(body, "entity ids")
    ctx = await context_for(request, request.app.state.contexts)
    await request.app.state.broker.check_tenant(ctx.tenant)
    ops: list[tuple[str, Mutation]] = []
    errors: list[dict] = []
    for item in body:
        try:
            ops.append((check_uri(item, "entity id"), Broker.delete_op(item)))
        except NgsiLdError as error:
            errors.append({"entityId": item if isinstance(item, str) else None, "error": error.problem()})
    success, run_errors, _ = await _run(request, ctx, ops)
    errors += run_errors
    return _multi_status(ctx, success, errors) if errors else Response(status_code=204)


@router.post("/query")
async def batch_query(request: Request) -> Response:
    """Query by POST (5.7.2 with a Query body): entities, attrs, q, geoQ; limit/offset/count in the URL."""
    body, media = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequestData("the query body must be a JSON object of type Query")
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media, geojson=True)
    return await run_query(request, ctx, **query_selection(body, ctx), body=body)


def query_selection(body: dict, ctx: Ctx) -> dict:
    """The selection of a Query body (5.2.23) as keyword arguments of entities.run_query / select_entities."""
    if body.get("type") != "Query":
        raise BadRequestData("the query body must have \"type\": \"Query\"")
    selectors = body.get("entities")
    if selectors is not None and (not isinstance(selectors, list) or not selectors
                                  or not all(isinstance(s, dict) for s in selectors)):
        raise BadRequestData("entities must be a non-empty array of entity selectors")
    for selector in selectors or ():
        if "type" not in selector:
            raise BadRequestData("every entity selector needs a type (clause 5.2.33)")
    attrs = body.get("attrs")
    if attrs is not None:
        if not isinstance(attrs, list) or not attrs or not all(isinstance(a, str) for a in attrs):
            raise BadRequestData("attrs must be a non-empty array of attribute names")
        attrs = attr_names(attrs, ctx)
    q = body.get("q")
    if q is not None and not isinstance(q, str):
        raise BadRequestData("q must be a string")
    geo_q: Any = body.get("geoQ")
    geo = (None, None, None, None)
    if geo_q is not None:
        if not isinstance(geo_q, dict):
            raise BadRequestData("geoQ must be an object with georel, geometry and coordinates")
        geo = (geo_q.get("georel"), geo_q.get("geometry"), geo_q.get("coordinates"), geo_q.get("geoproperty"))
    scope_q = body.get("scopeQ")
    if scope_q is not None and not isinstance(scope_q, str):
        raise BadRequestData("scopeQ must be a string")
    in_scope = parse_scopeq(scope_q) if scope_q is not None else None
    if not selectors and attrs is None and q is None and geo_q is None and scope_q is None:
        raise BadRequestData("a query needs entities, attrs, q, geoQ or scopeQ")
    if not selectors:
        return dict(ids=None, id_pattern=None, type_text=None, attrs=attrs, q_text=q, geo=geo, match=in_scope)
    if len(selectors) == 1:
        s = selectors[0]
        ids = [s["id"]] if "id" in s else None
        return dict(ids=ids, id_pattern=None if ids else s.get("idPattern"), type_text=_type_text(s), attrs=attrs,
                    q_text=q, geo=geo, match=in_scope)
    tests = [_selector_test(s, ctx) for s in selectors]
    type_texts = [_type_text(s) for s in selectors]
    type_text = "|".join(f"({t})" for t in type_texts) if all(type_texts) else None
    return dict(ids=None, id_pattern=None, type_text=type_text, attrs=attrs, q_text=q, geo=geo,
                match=lambda doc: any(test(doc) for test in tests) and (in_scope is None or in_scope(doc)))


def _selector_test(selector: dict, ctx: Ctx):
    """A predicate on stored entities for one EntitySelector (5.2.33): id (idPattern ignored then), else idPattern; type."""
    entity_id = selector.get("id")
    if entity_id is not None:
        check_uri(entity_id, "id")
    pattern = None
    if entity_id is None and selector.get("idPattern") is not None:
        try:
            pattern = re.compile(selector["idPattern"])
        except (re.error, TypeError):
            raise BadRequestData(f"invalid idPattern {selector['idPattern']!r}") from None
    type_text = _type_text(selector)
    types = parse_type_selection(type_text, ctx.terms.expand) if type_text is not None else None

    def test(doc: dict) -> bool:
        return ((entity_id is None or doc["id"] == entity_id) and (pattern is None or pattern.search(doc["id"]) is not None)
                and (types is None or types.matches(doc["type"])))
    return test


def _type_text(selector: dict) -> str | None:
    value = selector.get("type")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequestData("an entity selector's type must be a string")
    return value
