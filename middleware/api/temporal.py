"""NGSI-LD temporal routes (ETSI GS CIM 009 v1.8 clauses 5.7.3, 5.7.4): the temporal evolution of entities.

Entities are selected among the current ones (id, idPattern, type, attrs, q, geoQ, limit/offset), then their
history is read in one query, from the store or from InfluxDB (CITYBRIDGE_TEMPORAL_SOURCE, app.state.history_source),
and rendered normalized, as temporalValues or aggregated.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..context.errors import BadRequestData, NgsiLdError
from ..context.model import Renderer, check_uri
from ..history.aggregate import AGGR_METHODS
from ..history.influx import Retry
from ..history.paging import trim
from ..history.representation import Aggregation, TemporalRenderer
from ..history.timerange import TemporalQ, iso_from_micros, parse_duration, parse_temporal_q
from ..store.base import HistoryQuery
from .batch import query_selection
from .common import Ctx, context_for, int_param, options_of, read_body, respond, split_list
from .entities import attrs_param, select_entities

router = APIRouter(prefix="/ngsi-ld/v1/temporal")


class HistoryUnavailable(NgsiLdError):
    """The history source (InfluxDB) did not answer: HTTP 503, try again later."""

    type_name = "InternalError"  # NGSI-LD defines no error type for an unavailable service; the status says 503
    status = 503


@router.get("/entities")
async def query_temporal(request: Request) -> Response:
    """Query the temporal evolution of entities (5.7.4): entity selection plus timerel/timeAt/endTimeAt/lastN."""
    ctx = await context_for(request, request.app.state.contexts)
    params = request.query_params
    geo = (params.get("georel"), params.get("geometry"), params.get("coordinates"), params.get("geoproperty"))
    selectors = [params.get(p) for p in ("id", "idPattern", "type", "attrs", "q")] + list(geo[:3])
    if all(s is None for s in selectors) and params.get("local") != "true":
        raise BadRequestData("a temporal query needs at least one of id, idPattern, type, attrs, q or geoQ")
    when = parse_temporal_q(params.get("timerel"), params.get("timeAt"), params.get("endTimeAt"),
                            params.get("timeproperty"))
    attrs = attrs_param(request, ctx)
    return await _answer(request, ctx, when, attrs, dict(ids=split_list(params.get("id")),
                                                         id_pattern=params.get("idPattern"),
                                                         type_text=params.get("type"), attrs=attrs,
                                                         q_text=params.get("q"), geo=geo))


@router.post("/entityOperations/query")
async def query_temporal_post(request: Request) -> Response:
    """Query the temporal evolution of entities by POST (5.7.4 with a Query body holding temporalQ)."""
    body, media = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequestData("the query body must be a JSON object of type Query")
    ctx = await context_for(request, request.app.state.contexts, body=body, media=media)
    temporal = body.get("temporalQ", {})
    if not isinstance(temporal, dict):
        raise BadRequestData("temporalQ must be an object with timerel, timeAt, endTimeAt and timeproperty")
    when = parse_temporal_q(temporal.get("timerel"), temporal.get("timeAt"), temporal.get("endTimeAt"),
                            temporal.get("timeproperty"))
    selection = query_selection(body, ctx)
    return await _answer(request, ctx, when, selection["attrs"], selection)


@router.get("/entities/{entity_id}")
async def retrieve_temporal(entity_id: str, request: Request) -> Response:
    """Retrieve the temporal evolution of one entity (5.7.3); 404 ResourceNotFound if it does not exist."""
    check_uri(entity_id, "entity id")
    ctx = await context_for(request, request.app.state.contexts)
    params = request.query_params
    when = parse_temporal_q(params.get("timerel"), params.get("timeAt"), params.get("endTimeAt"),
                            params.get("timeproperty"))
    attrs = attrs_param(request, ctx)
    shape = _shape(request, ctx, when)
    doc = await request.app.state.broker.retrieve(ctx.tenant, entity_id)
    (body,), status, headers = await _history(request, ctx, [doc], attrs, when, *shape)
    return respond(ctx, body, status=status, headers=headers)


async def _answer(request: Request, ctx: Ctx, when: TemporalQ, attrs: set[str] | None, selection: dict) -> Response:
    shape = _shape(request, ctx, when)
    result, headers = await select_entities(request, ctx, **selection)
    rendered, status, range_headers = await _history(request, ctx, result.entities, attrs, when, *shape)
    return respond(ctx, rendered, status=status, headers={**headers, **range_headers})


def _shape(request: Request, ctx: Ctx, when: TemporalQ) -> tuple[TemporalRenderer, int | None]:
    """The renderer asked for by options (temporalValues, aggregatedValues, sysAttrs), aggrMethods, lastN and lang."""
    params = request.query_params
    options = options_of(request)
    last_n = int_param(request, "lastN", 0, minimum=1) or None
    methods = split_list(params.get("aggrMethods"))
    aggregated = "aggregatedValues" in options or params.get("format") == "aggregatedValues" or methods is not None
    values = "temporalValues" in options or params.get("format") == "temporalValues"
    if values and aggregated:
        raise BadRequestData("temporalValues and aggregatedValues exclude each other")
    aggregation = None
    if aggregated:
        if not methods:
            raise BadRequestData("aggregatedValues needs aggrMethods (" + ", ".join(AGGR_METHODS) + ")")
        unknown = [m for m in methods if m not in AGGR_METHODS]
        if unknown:
            raise BadRequestData(f"unknown aggrMethods {', '.join(unknown)}; use {', '.join(AGGR_METHODS)}")
        aggregation = Aggregation(methods, parse_duration(params.get("aggrPeriodDuration", "P0D")))
    elif params.get("aggrPeriodDuration") is not None:
        raise BadRequestData("aggrPeriodDuration needs aggrMethods")
    renderer = Renderer(ctx.terms, sys_attrs="sysAttrs" in options, lang=params.get("lang"))
    return TemporalRenderer(renderer, when, values=values, aggregation=aggregation, last_n=last_n), last_n


async def _history(request: Request, ctx: Ctx, docs: list[dict], attrs: set[str] | None, when: TemporalQ,
                   shape: TemporalRenderer, last_n: int | None) -> tuple[list[dict], int, dict]:
    """Read and render the history of docs: (temporal entities, 200 or 206, Content-Range header when cut)."""
    if not docs:
        return [], 200, {}
    cap = request.app.state.settings.temporal_limit
    exact = shape.aggregation is not None or (last_n is not None and last_n <= cap)
    n = cap if last_n is None else min(last_n, cap)
    query = HistoryQuery([doc["id"] for doc in docs], attrs, when.timeproperty, when.start, when.end,
                         newest_first=last_n is not None,
                         per_attr=None if shape.aggregation is not None else (n if exact else n + 1))
    source = getattr(request.app.state, "history_source", None) or request.app.state.store
    try:
        rows = await source.history(ctx.tenant, query)
    except Retry as exc:
        raise HistoryUnavailable(f"the temporal source InfluxDB did not answer: {exc}") from None
    span = None
    if not exact:
        rows, span = trim(rows, n, newest_first=last_n is not None, timeproperty=when.timeproperty)
    by_entity: dict[str, list[Any]] = {}
    for row in rows:
        by_entity.setdefault(row.entity_id, []).append(row)
    rendered = [shape.entity(doc, by_entity.get(doc["id"], [])) for doc in docs]
    if span is None:
        return rendered, 200, {}
    size = str(last_n) if last_n is not None else "*"
    return rendered, 206, {"Content-Range": f"date-time {iso_from_micros(span[0])}-{iso_from_micros(span[1])}/{size}"}
