"""NGSI-LD discovery routes (clause 5.7.5-5.7.10): available entity types and attributes, with details=true."""
from __future__ import annotations

import hashlib
from collections import defaultdict

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.convertors import PathConvertor, register_url_convertor

from ..context.errors import ResourceNotFound
from ..context.model import check_name
from .common import Ctx, context_for, respond

router = APIRouter(prefix="/ngsi-ld/v1")


class NameConvertor(PathConvertor):
    """A non-empty path parameter: a short name or an expanded IRI whose %2F the server decoded to '/'."""

    regex = ".+"


register_url_convertor("name", NameConvertor())


def _list_id(kind: str, names: list[str]) -> str:
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return f"urn:ngsi-ld:{kind}:{digest}"


async def _catalogue(request: Request, ctx: Ctx):
    """Per type: entity count and {attr: set(kinds)}; per attribute: count, kinds and types."""
    docs = await request.app.state.broker.all_entities(ctx.tenant)
    types: dict[str, dict] = defaultdict(lambda: {"count": 0, "attrs": defaultdict(set)})
    attrs: dict[str, dict] = defaultdict(lambda: {"count": 0, "kinds": set(), "types": set()})
    for doc in docs:
        for type_iri in doc["type"]:
            types[type_iri]["count"] += 1
        for name, instances in doc["attrs"].items():
            entry = attrs[name]
            entry["count"] += len(instances)  # attributeCount is the number of attribute instances (5.2.28)
            for inst in instances:
                entry["kinds"].add(inst["type"])
                for type_iri in doc["type"]:
                    types[type_iri]["attrs"][name].add(inst["type"])
            entry["types"].update(doc["type"])
    return types, attrs


def _details_true(request: Request) -> bool:
    return request.query_params.get("details") == "true"


@router.get("/types")
async def list_types(request: Request) -> Response:
    """EntityTypeList, or with details=true an array of EntityType."""
    ctx = await context_for(request, request.app.state.contexts)
    types, _ = await _catalogue(request, ctx)
    compact = ctx.terms.compact
    if _details_true(request):
        return respond(ctx, [{"id": iri, "type": "EntityType", "typeName": compact(iri),
                              "attributeNames": sorted(compact(a) for a in info["attrs"])}
                             for iri, info in sorted(types.items())])
    names = sorted(compact(iri) for iri in types)
    return respond(ctx, {"id": _list_id("EntityTypeList", names), "type": "EntityTypeList", "typeList": names})


@router.get("/types/{type_name:name}")
async def type_info(type_name: str, request: Request) -> Response:
    """EntityTypeInfo: entity count and attribute details of one type; 404 if no entity has it."""
    check_name(type_name, "entity type")
    ctx = await context_for(request, request.app.state.contexts)
    types, _ = await _catalogue(request, ctx)
    iri = ctx.terms.expand(type_name)
    info = types.get(iri)
    if info is None:
        raise ResourceNotFound(f"no entity has type {type_name}")
    compact = ctx.terms.compact
    details = [{"id": name, "type": "Attribute", "attributeName": compact(name), "attributeTypes": sorted(kinds)}
               for name, kinds in sorted(info["attrs"].items())]
    return respond(ctx, {"id": iri, "type": "EntityTypeInfo", "typeName": compact(iri), "entityCount": info["count"],
                         "attributeDetails": details})


@router.get("/attributes")
async def list_attributes(request: Request) -> Response:
    """AttributeList, or with details=true an array of Attribute."""
    ctx = await context_for(request, request.app.state.contexts)
    _, attrs = await _catalogue(request, ctx)
    compact = ctx.terms.compact
    if _details_true(request):
        return respond(ctx, [_attribute(compact, name, info, with_count=False) for name, info in sorted(attrs.items())])
    names = sorted(compact(name) for name in attrs)
    return respond(ctx, {"id": _list_id("AttributeList", names), "type": "AttributeList", "attributeList": names})


@router.get("/attributes/{attr_name:name}")
async def attribute_info(attr_name: str, request: Request) -> Response:
    """Attribute: count, kinds and entity types of one attribute; 404 if no entity has it."""
    check_name(attr_name)
    ctx = await context_for(request, request.app.state.contexts)
    _, attrs = await _catalogue(request, ctx)
    iri = ctx.terms.expand(attr_name)
    info = attrs.get(iri)
    if info is None:
        raise ResourceNotFound(f"no entity has attribute {attr_name}")
    return respond(ctx, _attribute(ctx.terms.compact, iri, info, with_count=True))


def _attribute(compact, iri: str, info: dict, *, with_count: bool) -> dict:
    out = {"id": iri, "type": "Attribute", "attributeName": compact(iri)}
    if with_count:
        out["attributeCount"] = info["count"]
    out["attributeTypes"] = sorted(info["kinds"])
    out["typeNames"] = sorted(compact(t) for t in info["types"])
    return out
