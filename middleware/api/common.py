"""What every NGSI-LD route shares: tenant, @context from Link header or body, content negotiation, responses."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from ..context.errors import BadRequestData, InvalidRequest, NgsiLdError
from ..context.jsonld import CORE_CONTEXT_URL, JSONLD_CONTEXT_REL, TermMap, link_header
TENANT_HEADER = "NGSILD-Tenant"
_LINK = re.compile(r'<([^>]*)>\s*((?:;\s*[^;,]+)*)')
_TENANT = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
JSON, JSONLD, GEOJSON, MERGE_PATCH = "application/json", "application/ld+json", "application/geo+json", "application/merge-patch+json"


class NotAcceptable(NgsiLdError):
    """The Accept header names no media type the broker produces (HTTP 406)."""

    type_name = "InvalidRequest"
    status = 406


class UnsupportedMediaType(NgsiLdError):
    """The request body has a Content-Type the broker does not take (HTTP 415)."""

    type_name = "InvalidRequest"
    status = 415


@dataclass
class Ctx:
    """One request's NGSI-LD context: tenant, term map, the @context to echo, and the negotiated media type."""

    tenant: str
    terms: TermMap
    context_url: str
    context_value: Any
    accept: str


def tenant_of(request: Request) -> str:
    """The tenant named by NGSILD-Tenant ('' for the default tenant); invalid names are BadRequestData."""
    tenant = request.headers.get(TENANT_HEADER)
    if tenant is None or tenant == "":
        return ""
    if not _TENANT.match(tenant):
        raise BadRequestData(f"invalid {TENANT_HEADER} {tenant!r}: use letters, digits, '_' and '-' (at most 64)")
    return tenant


def link_context(request: Request) -> str | None:
    """The @context URL of the request's JSON-LD Link header, if any (two such links are an error)."""
    found: list[str] = []
    for header in request.headers.getlist("link"):
        for url, params in _LINK.findall(header):
            rel = re.search(r'rel\s*=\s*"?([^";]+)"?', params)
            if rel and rel.group(1).strip() == JSONLD_CONTEXT_REL:
                found.append(url.strip())
    if len(found) > 1:
        raise BadRequestData("more than one JSON-LD @context Link header")
    if found and not re.match(r"^https?://", found[0]):
        raise BadRequestData(f"the JSON-LD Link header must hold an http(s) URL, got {found[0]!r}")
    return found[0] if found else None


def negotiate(request: Request, *, geojson: bool = False) -> str:
    """The response media type from the Accept header: application/json (default), ld+json or geo+json."""
    accept = request.headers.get("accept")
    if not accept:
        return JSON
    best: tuple[float, int, str] | None = None
    for index, part in enumerate(accept.split(",")):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        weight = 1.0
        match = re.search(r"q\s*=\s*([0-9.]+)", params)
        if match:
            try:
                weight = float(match.group(1))
            except ValueError:
                weight = 0.0
        if weight <= 0:
            continue
        if media in (JSON, "*/*", "application/*"):
            chosen = JSON
        elif media == JSONLD:
            chosen = JSONLD
        elif media == GEOJSON and geojson:
            chosen = GEOJSON
        else:
            continue
        candidate = (-weight, index, chosen)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise NotAcceptable(f"cannot produce any of Accept: {accept} (use application/json or application/ld+json)")
    return best[2]


async def read_body(request: Request, *, merge_patch: bool = False) -> tuple[Any, str]:
    """Parse the JSON body; return (body, media type). 415 for other media types, 400 for malformed JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = (JSON, JSONLD, MERGE_PATCH) if merge_patch else (JSON, JSONLD)
    if content_type not in allowed:
        raise UnsupportedMediaType(f"Content-Type {content_type or '(none)'} is not supported; use {' or '.join(allowed)}")
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    return body, content_type


def refuse_link_with_jsonld(request: Request) -> None:
    """BadRequestData if an application/ld+json request also sends a JSON-LD Link header (clause 6.3.5)."""
    if link_context(request) is not None:
        raise BadRequestData("Content-Type application/ld+json takes the @context from the body: "
                             "a JSON-LD Link header must not be sent as well (clause 6.3.5)")


async def context_for(request: Request, resolver, *, body: Any = None, media: str | None = None,
                      geojson: bool = False) -> Ctx:
    """Build the request's Ctx; the @context comes from the body for ld+json, else from the Link header."""
    tenant = tenant_of(request)
    accept = negotiate(request, geojson=geojson)
    if media == JSONLD:
        refuse_link_with_jsonld(request)
        items = body if isinstance(body, list) else [body]
        contexts = [item.get("@context") if isinstance(item, dict) else None for item in items]
        if not contexts or any(c is None for c in contexts):
            raise BadRequestData("Content-Type application/ld+json needs an @context in the body")
        value = contexts[0]
        if any(c != value for c in contexts[1:]):
            raise BadRequestData("every entity of a batch must carry the same @context")
        terms = await resolver.resolve(value)
        url = value if isinstance(value, str) else CORE_CONTEXT_URL
        return Ctx(tenant, terms, url, value, accept)
    if media is not None:
        items = body if isinstance(body, list) else [body]
        if any(isinstance(item, dict) and "@context" in item for item in items):
            raise BadRequestData("an @context in the body needs Content-Type application/ld+json (else use the Link header)")
    url = link_context(request)
    terms = await resolver.resolve(url)
    return Ctx(tenant, terms, url or CORE_CONTEXT_URL, url or CORE_CONTEXT_URL, accept)


def respond(ctx: Ctx, payload: Any, *, status: int = 200, headers: dict | None = None) -> Response:
    """A JSON / JSON-LD / GeoJSON response carrying the @context the way the negotiated media type asks.

    JSON: a Link header; JSON-LD: an @context member in each entity; GeoJSON: an @context member in the
    Feature or FeatureCollection, and the Link header as well.
    """
    out_headers = dict(headers or {})
    if ctx.accept == JSONLD and isinstance(payload, list):
        payload = [dict(item, **{"@context": ctx.context_value}) if isinstance(item, dict) else item for item in payload]
    elif ctx.accept in (JSONLD, GEOJSON) and isinstance(payload, dict):  # a GeoJSON Feature(Collection): 4.5.16
        payload = dict(payload, **{"@context": ctx.context_value})
    if ctx.accept != JSONLD:
        links = [link_header(ctx.context_url)] + ([out_headers["Link"]] if "Link" in out_headers else [])
        out_headers["Link"] = ", ".join(links)
    return Response(orjson.dumps(payload), status_code=status, media_type=ctx.accept, headers=out_headers)


def page_links(request: Request, offset: int, limit: int, more: bool) -> dict:
    """Link header values rel="prev" / rel="next" for a page of results (clauses 5.5.9 and 6.3.10).

    In the form of the spec's example: a relative reference keeping the request's other parameters as sent,
    then limit and offset, and type="application/ld+json".
    """
    if limit == 0:  # limit=0 asks for the count only: no page follows
        return {}
    kept = [part for part in request.url.query.split("&") if part and part.split("=", 1)[0] not in ("limit", "offset")]

    def link(to_offset: int, rel: str) -> str:
        query = "&".join(kept + [f"limit={limit}", f"offset={to_offset}"])
        return f'<{request.url.path}?{query}>;rel="{rel}";type="application/ld+json"'
    links = ([link(max(0, offset - limit), "prev")] if offset > 0 else []) + ([link(offset + limit, "next")] if more else [])
    return {"Link": ",".join(links)} if links else {}


def problem_response(error: NgsiLdError) -> Response:
    """The ProblemDetails response of an error."""
    return Response(orjson.dumps(error.problem()), status_code=error.status, media_type="application/json")


def split_list(value: str | None) -> list[str] | None:
    """A comma-separated query parameter as a list (None when absent); empty items are BadRequestData."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise BadRequestData(f"empty item in list parameter {value!r}")
    return items


def int_param(request: Request, name: str, default: int, *, minimum: int = 0) -> int:
    """An integer query parameter (BadRequestData when malformed or below minimum)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestData(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise BadRequestData(f"{name} must be >= {minimum}, got {value}")
    return value


def options_of(request: Request) -> set[str]:
    """The values of the options parameter (possibly repeated, comma-separated)."""
    found: set[str] = set()
    for raw in request.query_params.getlist("options"):
        found.update(item.strip() for item in raw.split(",") if item.strip())
    return found
