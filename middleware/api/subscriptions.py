"""NGSI-LD subscription routes (clauses 5.8.1-5.8.5, 6.10, 6.11)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..context.errors import BadRequestData, TooManyResults
from ..context.model import check_uri
from ..subscriptions.model import render
from ..subscriptions.service import SubscriptionService
from .common import context_for, int_param, options_of, page_links, read_body, respond

router = APIRouter(prefix="/ngsi-ld/v1/subscriptions")


def _service(request: Request) -> SubscriptionService:
    return request.app.state.subscriptions


@router.post("")
@router.post("/")
async def create_subscription(request: Request) -> Response:
    """Create a subscription (5.8.1): 201 with Location; 409 AlreadyExists; 400 for an invalid body."""
    body, media = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequestData("a subscription must be a JSON object")
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    if body.get("jsonldContext") is not None:
        check_uri(body["jsonldContext"], "jsonldContext")
        await request.app.state.contexts.resolve(body["jsonldContext"])
    sub_id = await _service(request).create(ctx.tenant, body, ctx.terms, ctx.context_value)
    return Response(status_code=201, headers={"Location": f"/ngsi-ld/v1/subscriptions/{sub_id}"})


@router.get("")
@router.get("/")
async def query_subscriptions(request: Request) -> Response:
    """List subscriptions (5.8.4) with limit, offset, count=true and Link rel="prev" / rel="next"."""
    ctx = await context_for(request, request.app.state.contexts)
    settings = request.app.state.settings
    limit = int_param(request, "limit", settings.default_limit)
    offset = int_param(request, "offset", 0)
    if limit > settings.max_limit:
        raise TooManyResults(f"limit {limit} exceeds the maximum of {settings.max_limit}")
    service = _service(request)
    await service.broker.check_tenant(ctx.tenant)
    records, total = await service.store.list_subscriptions(ctx.tenant, limit, offset)
    sys_attrs = "sysAttrs" in options_of(request)
    headers = page_links(request, offset, limit, offset + len(records) < total)
    if request.query_params.get("count") == "true":
        headers["NGSILD-Results-Count"] = str(total)
    return respond(ctx, [render(r, ctx.terms, sys_attrs=sys_attrs) for r in records], headers=headers)


@router.get("/{sub_id}")
async def retrieve_subscription(sub_id: str, request: Request) -> Response:
    """Retrieve a subscription (5.8.3) with its status and notification status."""
    check_uri(sub_id, "subscription id")
    ctx = await context_for(request, request.app.state.contexts)
    record = await _service(request).get(ctx.tenant, sub_id)
    return respond(ctx, render(record, ctx.terms, sys_attrs="sysAttrs" in options_of(request)))


@router.patch("/{sub_id}")
async def update_subscription(sub_id: str, request: Request) -> Response:
    """Update a subscription (5.8.2, merge of top-level members): 204; 404 if absent."""
    check_uri(sub_id, "subscription id")
    body, media = await read_body(request, merge_patch=True)
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    if isinstance(body, dict) and body.get("jsonldContext") not in (None, "urn:ngsi-ld:null"):
        check_uri(body["jsonldContext"], "jsonldContext")
        await request.app.state.contexts.resolve(body["jsonldContext"])
    await _service(request).update(ctx.tenant, sub_id, body, ctx.terms, ctx.context_value)
    return Response(status_code=204)


@router.delete("/{sub_id}")
async def delete_subscription(sub_id: str, request: Request) -> Response:
    """Delete a subscription (5.8.5): 204; 404 if absent."""
    check_uri(sub_id, "subscription id")
    ctx = await context_for(request, request.app.state.contexts)
    await _service(request).delete(ctx.tenant, sub_id)
    return Response(status_code=204)
