"""Wires the middleware: settings → store → broker → FastAPI routers, error handlers and the body-size guard."""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from . import __version__
from .api import batch, discovery, entities, subscriptions
from .api import iot  # device provisioning and dead letters (issue 4)
from .api import temporal  # temporal API (issue 5)
from .history.influx import forwarder_from_settings  # history to InfluxDB (issue 5)
from .history.backlog import Backpressure, backlog_from_settings  # bound on the InfluxDB backlog (issue 5)
from .history.influx_read import reader_from_settings  # temporal API from InfluxDB (issue 5)
from . import metrics
from .devices.deadletters import DeadLetters
from .devices.registry import DeviceRegistry
from .devices.southbound import Southbound, load_profiles  # MQTT ingest (issue 4)
from .api.common import problem_response
from .context.broker import Broker
from .context.errors import BadRequestData, InternalError, InvalidRequest, NgsiLdError, PayloadTooLarge, ResourceNotFound
from .context.jsonld import ContextResolver
from .config import Settings
from .store import open_store
from .subscriptions.service import SubscriptionService

log = logging.getLogger("citybridge")


class TrackedSend:
    """An ASGI send that remembers whether the response has started (after that, no other answer can be sent)."""

    def __init__(self, send):
        self.send = send
        self.started = False

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class InternalErrors:
    """ASGI guard: an unexpected exception becomes a 500 InternalError ProblemDetails, and the connection stays open.

    Starlette's own handler for Exception answers and then re-raises, so uvicorn closes the connection; keep-alive
    clients (batch loaders, dashboards) then see their next request fail. Here the error is logged and answered
    instead; only an exception after the response started is re-raised (nothing else can be sent then).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            if tracked.started:
                raise
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            await problem_response(InternalError(f"{error.__class__.__name__}: {error}"))(scope, receive, send)


class BodyLimit:
    """ASGI guard: a request body larger than the limit gets 413 ProblemDetails before it is buffered."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send)
        seen = 0
        tracked = TrackedSend(send)

        async def guarded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, guarded_receive, tracked)
        except _TooLarge:
            if not tracked.started:
                await self._reject(send)

    async def _reject(self, send):
        error = PayloadTooLarge(f"the request body exceeds the limit of {self.limit} bytes (CITYBRIDGE_MAX_BODY_BYTES)")
        body = orjson.dumps(error.problem())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def allowed_methods(request: Request) -> list[str]:
    """The methods some route takes at the request's path (for a 405's Allow header)."""
    routes = request.app.router.routes
    return [method for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


_ENTITIES = "/ngsi-ld/v1/entities"


def missing_entity_id(request: Request) -> bool:
    """True for an entity URL whose entity id is empty: /entities//..., or PUT, PATCH or DELETE on /entities/."""
    path = request.url.path
    return path.startswith(_ENTITIES + "//") or path == _ENTITIES + "/" and request.method in ("PUT", "PATCH", "DELETE")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The middleware's ASGI application."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = open_store(settings.store)
        await store.open()
        app.state.store = store
        app.state.broker = Broker(store)
        if not settings.history:
            app.state.broker.recorder = None  # issue 5: no history rows
        app.state.contexts = ContextResolver(timeout=settings.context_timeout, cache_ttl=settings.context_cache_ttl)
        app.state.subscriptions = SubscriptionService(
            store, app.state.broker, app.state.contexts, timeout=settings.notify_timeout,
            max_attempts=settings.notify_max_attempts, backoff_max=settings.notify_backoff_max,
            join_backlog=settings.notify_join_backlog, log_level=settings.log_level,
            delivery_store=settings.store if settings.notify_process and ":memory:" not in settings.store else None)
        await app.state.subscriptions.start()
        app.state.forwarder = forwarder_from_settings(settings, store, app.state.contexts.core.compact)  # issue 5
        if app.state.forwarder is not None:
            await app.state.forwarder.start()
        app.state.backlog = backlog_from_settings(settings, store)  # issue 5: backpressure at the bound
        if app.state.backlog is not None:
            await app.state.backlog.start()
        app.state.history_source = reader_from_settings(settings, store)  # issue 5: temporal API source
        app.state.profiles = load_profiles(settings.profiles_dir)  # MQTT ingest (issue 4)
        app.state.registry = DeviceRegistry(store, profiles=getattr(app.state, "profiles", None))
        await app.state.registry.start()
        app.state.deadletters = DeadLetters(store)
        app.state.southbound = Southbound(settings, app.state.broker, app.state.registry, app.state.deadletters,
                                          app.state.profiles, app.state.contexts.core)  # MQTT ingest (issue 4)
        if app.state.backlog is not None:
            app.state.southbound.ingest.hold = app.state.backlog.wait_clear  # issue 5: no acks at the bound
        await app.state.southbound.start()
        # The long-lived objects made at startup (modules, profiles, contexts) leave the garbage collector's
        # generations, and young collections run every 50,000 allocations instead of 700: a 1,000-entity batch
        # allocates millions of short-lived dicts, and the default thresholds made collection the largest
        # single cost of a write (50-70 us per entity, 3.5-9 us after this).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 10)
        log.info("citybridge %s ready: store %s", __version__, settings.store.split("@")[-1])
        try:
            yield
        finally:
            await app.state.southbound.stop()  # MQTT ingest (issue 4)
            if app.state.forwarder is not None:
                await app.state.forwarder.stop()
            if app.state.backlog is not None:
                await app.state.backlog.stop()
            if app.state.history_source is not store:
                await app.state.history_source.close()
            await app.state.deadletters.close()
            await app.state.registry.close()
            await app.state.subscriptions.close()
            await app.state.contexts.close()
            await store.close()

    app = FastAPI(title="CityBridge", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.include_router(entities.router)
    app.include_router(batch.router)
    app.include_router(discovery.router)
    app.include_router(subscriptions.router)
    app.include_router(iot.router)
    app.include_router(temporal.router)
    app.include_router(metrics.router)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 with the version."""
        return Response(orjson.dumps({"status": "ok", "version": __version__}), media_type="application/json")

    @app.exception_handler(NgsiLdError)
    async def ngsi_error(request: Request, error: NgsiLdError) -> Response:
        return problem_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        return problem_response(BadRequestData(str(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code in (404, 405) and missing_entity_id(request):  # 5.6.2.4-5.6.19.4
            return problem_response(BadRequestData(f"the entity id is missing from {request.url.path}"))
        if error.status_code == 404:
            return problem_response(ResourceNotFound(f"no resource at {request.url.path}"))
        if error.status_code == 405:
            failure = InvalidRequest(f"method {request.method} is not allowed on {request.url.path}")
            failure.status = 405
            response = problem_response(failure)
            response.headers["Allow"] = ", ".join(allowed_methods(request))  # 6.3.2
            return response
        failure = InvalidRequest(str(error.detail))
        failure.status = error.status_code
        return problem_response(failure)

    app.add_middleware(InternalErrors)  # innermost of ours: the others see a plain 500 response
    app.add_middleware(Backpressure)  # issue 5: 503 + Retry-After on NGSI-LD writes at the InfluxDB backlog bound
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
