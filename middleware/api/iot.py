"""The /iot surface: provisioning compatible with the FIWARE IoT Agents (config groups, devices) and dead letters.

Headers fiware-service (→ NGSI-LD tenant; none = the default tenant '') and fiware-servicepath ('/' by default) scope
every operation. Errors use the IoT Agent JSON shape {"name": ..., "message": ...}, never NGSI-LD ProblemDetails.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from .. import __version__
from ..devices.deadletters import as_json as deadletter_json
from ..devices.registry import LIST_KEYS, DeviceRegistry, ProvisioningError, wrong
from ..store.base import DeviceRecord

log = logging.getLogger("citybridge.iot")

_SERVICE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SERVICE_PATH = re.compile(r"^/([A-Za-z0-9_\-]{1,50}(/[A-Za-z0-9_\-]{1,50}){0,9})?$")
DEFAULT_LIMIT = 1000     # IoT Agents list everything unless told; a large first page keeps such scripts working
MAX_LIMIT = 10_000


def iota_error(name: str, status: int, message: str) -> Response:
    """An IoT Agent error response: {"name": name, "message": message}."""
    return Response(orjson.dumps({"name": name, "message": message}), status_code=status,
                    media_type="application/json")


class IotaRoute(APIRoute):
    """A route whose failures answer in the IoT Agent error shape (a JSON 500 INTERNAL_ERROR for the unexpected)."""

    def get_route_handler(self) -> Callable:
        """The FastAPI handler wrapped with the IoT Agent error mapping."""
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ProvisioningError as error:
                return iota_error(error.name, error.status, error.message)
            except Exception as error:
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return iota_error("INTERNAL_ERROR", 500, f"{error.__class__.__name__}: {error}")
        return guarded


router = APIRouter(route_class=IotaRoute)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _registry(request: Request) -> DeviceRegistry:
    return request.app.state.registry


def scope(request: Request, *, listing: bool = False) -> tuple[str, str | None]:
    """(tenant, service path) from fiware-service / fiware-servicepath; a listing may ask '/*' (None: every path)."""
    service = request.headers.get("fiware-service") or ""
    if service and not _SERVICE.match(service):
        raise wrong("fiware-service", f"invalid service {service!r}: use letters, digits, '_' and '-' (at most 64)")
    path = request.headers.get("fiware-servicepath") or "/"
    if listing and path in ("/*", "/#"):
        return service, None
    if not _SERVICE_PATH.match(path):
        raise wrong("fiware-servicepath", f"invalid service path {path!r}: '/' or '/<name>[/<name>...]'")
    return service, path


def _int(request: Request, name: str, default: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise wrong(name, f"must be a non-negative integer, got {raw!r}") from None
    if value < 0 or (maximum is not None and value > maximum):
        raise wrong(name, f"must be between 0 and {maximum}, got {value}" if maximum else f"must be >= 0, got {value}")
    return value


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise wrong("body", "the request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise wrong("body", f"not valid JSON: {exc}") from None


def _group_key(request: Request) -> str:
    return "groups" if request.url.path.rstrip("/").endswith("/groups") else "services"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def device_json(record: DeviceRecord, registry: DeviceRegistry) -> dict:
    """A stored device as GET returns it: its document, empty attribute lists by default, and last_seen if known."""
    doc = dict(record.doc)
    for key in (*LIST_KEYS, "internal_attributes"):
        doc.setdefault(key, [])
    pending = registry.pending_seen(record.tenant, record.service_path, record.device_id, record.apikey)
    seen = max(filter(None, (record.last_seen, pending)), default=None)
    if seen:
        doc["last_seen"] = _iso(seen)
    return doc


# ---------------------------------------------------------------- config groups (/iot/services, alias /iot/groups)

@router.post("/iot/services")
@router.post("/iot/groups")
async def create_groups(request: Request) -> Response:
    """Create config groups: {"services": [...]} (or {"groups": [...]}); 201, all or none."""
    tenant, path = scope(request)
    body = await _body(request)
    key = _group_key(request)
    if not isinstance(body, dict):
        raise wrong("body", f'must be an object {{"{key}": [...]}}')
    if key not in body:
        key = "groups" if key == "services" and "groups" in body else "services" if "services" in body else key
    if key not in body:
        raise wrong(_group_key(request), "is mandatory: the array of config groups to create")
    await _registry(request).create_groups(tenant, path, body[key], key)
    return Response(status_code=201)


@router.get("/iot/services")
@router.get("/iot/groups")
async def list_groups(request: Request) -> Response:
    """List config groups of the service (and path, '/*' for all): {"count": n, "services": [...]}."""
    tenant, path = scope(request, listing=True)
    limit = _int(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _int(request, "offset", 0)
    groups, total = await _registry(request).store.list_groups(
        tenant, path, limit, offset, apikey=request.query_params.get("apikey"),
        resource=request.query_params.get("resource"))
    return _json({"count": total, _group_key(request): [g.doc for g in groups]})


def _group_selector(request: Request) -> tuple[str, str | None]:
    apikey = request.query_params.get("apikey")
    if not apikey:
        raise ProvisioningError("MISSING_HEADERS", 400, "Some headers were missing from the request: "
                                "[\"apikey\"] (query parameters apikey and resource select the config group)")
    return apikey, request.query_params.get("resource")


@router.put("/iot/services")
@router.put("/iot/groups")
async def update_group(request: Request) -> Response:
    """Change the fields given in the body of the config group ?apikey=&resource=; 204."""
    tenant, path = scope(request)
    apikey, resource = _group_selector(request)
    body = await _body(request)
    registry = _registry(request)
    group = await registry.select_group(tenant, path, apikey, resource)
    await registry.update_group(group, body)
    return Response(status_code=204)


@router.delete("/iot/services")
@router.delete("/iot/groups")
async def delete_group(request: Request) -> Response:
    """Remove the config group ?apikey=&resource=; 204 (its devices stay)."""
    tenant, path = scope(request)
    apikey, resource = _group_selector(request)
    registry = _registry(request)
    await registry.delete_group(await registry.select_group(tenant, path, apikey, resource))
    return Response(status_code=204)


# ---------------------------------------------------------------- devices

@router.post("/iot/devices")
async def create_devices(request: Request) -> Response:
    """Provision devices: {"devices": [...]}; 201, all or none (409 DUPLICATE_DEVICE_ID)."""
    tenant, path = scope(request)
    body = await _body(request)
    if not isinstance(body, dict) or "devices" not in body:
        raise wrong("devices", 'is mandatory: the body is {"devices": [...]}')
    await _registry(request).create_devices(tenant, path, body["devices"])
    return Response(status_code=201)


@router.get("/iot/devices")
async def list_devices(request: Request) -> Response:
    """List devices of the service (and path, '/*' for all): {"count": n, "devices": [...]}; ?limit&offset&protocol."""
    tenant, path = scope(request, listing=True)
    limit = _int(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = _int(request, "offset", 0)
    registry = _registry(request)
    records, total = await registry.store.list_devices(
        tenant, path, limit, offset, apikey=request.query_params.get("apikey"),
        protocol=request.query_params.get("protocol"))
    return _json({"count": total, "devices": [device_json(r, registry) for r in records]})


@router.get("/iot/devices/{device_id}")
async def get_device(request: Request, device_id: str) -> Response:
    """One device (?apikey= picks among devices sharing the id); 404 DEVICE_NOT_FOUND."""
    tenant, path = scope(request)
    registry = _registry(request)
    record = await registry.get_device(tenant, path, device_id, request.query_params.get("apikey"))
    return _json(device_json(record, registry))


@router.put("/iot/devices/{device_id}")
async def update_device(request: Request, device_id: str) -> Response:
    """Change the fields given in the body; 204."""
    tenant, path = scope(request)
    body = await _body(request)
    registry = _registry(request)
    record = await registry.get_device(tenant, path, device_id, request.query_params.get("apikey"))
    await registry.update_device(record, body)
    return Response(status_code=204)


@router.delete("/iot/devices/{device_id}")
async def delete_device(request: Request, device_id: str) -> Response:
    """Remove a device; 204."""
    tenant, path = scope(request)
    registry = _registry(request)
    await registry.delete_device(await registry.get_device(tenant, path, device_id,
                                                           request.query_params.get("apikey")))
    return Response(status_code=204)


@router.post("/iot/op/delete")
async def delete_devices(request: Request) -> Response:
    """Remove several devices: {"devices": [{"deviceId": ..., "apikey": ...}]}; 204, or 404 naming the missing ones."""
    tenant, path = scope(request)
    body = await _body(request)
    items = body.get("devices") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise wrong("devices", 'is mandatory: {"devices": [{"deviceId": ..., "apikey": ...}]}')
    registry = _registry(request)
    missing: list[str] = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("deviceId"), str):
            raise wrong(f"devices[{n}].deviceId", "is mandatory: a string")
    for item in items:
        try:
            record = await registry.get_device(tenant, path, item["deviceId"], item.get("apikey") or None)
            await registry.delete_device(record)
        except ProvisioningError:
            missing.append(item["deviceId"])
    if missing:
        raise ProvisioningError("DEVICE_NOT_FOUND", 404, f"No device was found with id:{', '.join(missing)} "
                                "(the others were removed)")
    return Response(status_code=204)


# ---------------------------------------------------------------- about and dead letters

@router.get("/iot/about")
async def about(request: Request) -> Response:
    """IoT Agent style heartbeat: versions."""
    return _json({"libVersion": f"citybridge {__version__}", "port": str(request.url.port or ""), "baseRoot": "/",
                  "version": __version__})


@router.get("/iot/deadletters")
async def list_deadletters(request: Request) -> Response:
    """Dead letters, newest first: {"count": n, "deadletters": [...]}; with fiware-service only that tenant's."""
    limit = _int(request, "limit", 20, MAX_LIMIT)
    offset = _int(request, "offset", 0)
    tenant = None
    if "fiware-service" in request.headers:
        tenant, _ = scope(request, listing=True)
    records, total = await request.app.state.deadletters.list(limit, offset, tenant=tenant)
    return _json({"count": total, "deadletters": [deadletter_json(r) for r in records]})
