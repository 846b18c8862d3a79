"""The device registry: config groups and devices as the FIWARE IoT Agents provision them, and who sent an uplink.

Stored documents are the IoT Agent JSON (doc/api.md of iotagent-node-lib) with the scope written in: a config group
carries `service` / `subservice`, a device `service` / `service_path`. The pipeline sees a `Device` — the device's
own fields with the missing ones inherited from its config group (attributes merged by name, device first).

Every process keeps an in-memory copy (groups by (apikey, resource), devices by (apikey, device_id)) loaded at start,
written through on its own changes and reloaded when the store's registry fingerprint changes (another process
provisioned something); a lookup that misses the copy asks the store before answering None, so a device provisioned
a moment ago through another process is found at once. `touch` only marks a device as seen in memory; last-seen
times reach the store in one batched write every few seconds.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from ..store.base import DeviceRecord, GroupRecord
from .types import Device

log = logging.getLogger("citybridge.devices")

DEFAULT_ENTITY_TYPE = "Device"   # entity type of a device with none of its own and no config group giving one
LIST_KEYS = ("attributes", "lazy", "commands", "static_attributes")
_ATTR_NAME = re.compile(r"^[^<>();'=\"]+$")                       # iotagent-node-lib's attribute name pattern
_DEVICE_ID = re.compile(r"^[^\s/#+?<>\"'=;()\\]{1,256}$")         # also a valid MQTT topic level and URN part
_APIKEY = re.compile(r"^[^\s/#+]{1,256}$")                         # one MQTT topic level
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")       # device-profiles/<name>.yaml, no path parts
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_TYPE = re.compile(r"^[^\s<>\"'=;()]{1,256}$")
_DEVICE_FIELDS = {"device_id", "service", "service_path", "entity_name", "entity_type", "apikey", "protocol",
                  "transport", "profile", "endpoint", "timestamp", "explicitAttrs", "internal_attributes",
                  "last_seen", *LIST_KEYS}
_GROUP_ONLY = {"resource", "subservice", "autoprovision", "type", "cbHost", "trust", "entityNameExp"}


class ProvisioningError(Exception):
    """A provisioning request refused in IoT Agent terms: error name (e.g. WRONG_SYNTAX), HTTP status and message."""

    def __init__(self, name: str, status: int, message: str):
        super().__init__(message)
        self.name = name
        self.status = status
        self.message = message


class AutoprovisionRefused(Exception):
    """The config group does not allow autoprovisioning; the message is a dead-letter reason."""


def wrong(field: str, problem: str) -> ProvisioningError:
    """A 400 WRONG_SYNTAX error naming the offending field."""
    return ProvisioningError("WRONG_SYNTAX", 400, f"{field}: {problem}")


def default_entity_name(entity_type: str, device_id: str) -> str:
    """The entity id of a device without entity_name: urn:ngsi-ld:<entity_type>:<device_id> (IoT Agents on NGSI-LD)."""
    return f"urn:ngsi-ld:{entity_type}:{device_id}"


def profile_known(library: Any, name: str) -> bool:
    """True if the attached profile library has a profile of this name (exists(), `in` or get()), or is empty.

    An empty library (no profile folder found) counts as no library: any name is accepted then.
    """
    try:
        if len(library) == 0:
            return True
    except TypeError:
        pass
    if hasattr(library, "exists"):
        return bool(library.exists(name))
    try:
        return name in library
    except TypeError:
        pass
    try:
        return library.get(name) is not None
    except (KeyError, LookupError):
        return False


def _flag(value: Any, where: str, *, strings: bool = False) -> Any:
    if isinstance(value, bool) or (strings and isinstance(value, str)):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise wrong(where, "must be true or false")


def _check_common(body: dict, where: str, profiles: Any) -> None:
    """Checks shared by groups and devices: attribute lists, flags, strings and the profile name."""
    for key in ("attributes", "lazy", "commands"):
        if key in body:
            items = body[key]
            if not isinstance(items, list):
                raise wrong(f"{where}.{key}", "must be an array")
            for n, item in enumerate(items):
                at = f"{where}.{key}[{n}]"
                if not isinstance(item, dict):
                    raise wrong(at, "must be an object")
                if not isinstance(item.get("name"), str) or not _ATTR_NAME.match(item["name"]):
                    raise wrong(f"{at}.name", "is mandatory: a string without <>();'=\"")
                for text in ("object_id", "type", "expression", "entity_name", "entity_type"):
                    if text in item and not isinstance(item[text], str):
                        raise wrong(f"{at}.{text}", "must be a string")
                if "metadata" in item and not isinstance(item["metadata"], dict):
                    raise wrong(f"{at}.metadata", "must be an object")
    if "static_attributes" in body:
        items = body["static_attributes"]
        if not isinstance(items, list):
            raise wrong(f"{where}.static_attributes", "must be an array")
        for n, item in enumerate(items):
            at = f"{where}.static_attributes[{n}]"
            if not isinstance(item, dict):
                raise wrong(at, "must be an object")
            if not isinstance(item.get("name"), str) or not _ATTR_NAME.match(item["name"]):
                raise wrong(f"{at}.name", "is mandatory: a string without <>();'=\"")
            if "type" in item and not isinstance(item["type"], str):
                raise wrong(f"{at}.type", "must be a string")
            if "metadata" in item and not isinstance(item["metadata"], dict):
                raise wrong(f"{at}.metadata", "must be an object")
    for key in ("protocol", "transport", "endpoint", "timezone", "cbHost", "trust", "entityNameExp"):
        if key in body and not isinstance(body[key], str):
            raise wrong(f"{where}.{key}", "must be a string")
    if "timestamp" in body and body["timestamp"] is not None:
        body["timestamp"] = _flag(body["timestamp"], f"{where}.timestamp")
    if "explicitAttrs" in body:
        explicit = body["explicitAttrs"]
        if isinstance(explicit, list):
            if not all(isinstance(name, str) for name in explicit):
                raise wrong(f"{where}.explicitAttrs", "a list of explicit attributes holds attribute names")
        else:
            body["explicitAttrs"] = _flag(explicit, f"{where}.explicitAttrs", strings=True)
    if "entity_type" in body and (not isinstance(body["entity_type"], str) or not _TYPE.match(body["entity_type"])):
        raise wrong(f"{where}.entity_type", "must be a type name (no spaces)")
    if "profile" in body:
        name = body["profile"]
        if not isinstance(name, str) or not _PROFILE.match(name):
            raise wrong(f"{where}.profile", "must be a profile name (letters, digits, '_', '-', '.')")
        if profiles is not None and not profile_known(profiles, name):
            raise wrong(f"{where}.profile", f"no device profile {name!r} in the profile library")


def validate_group(body: Any, where: str, profiles: Any = None, *, partial: bool = False) -> dict:
    """A config group body checked and normalised (apikey, resource, entity_type); WRONG_SYNTAX names the field."""
    if not isinstance(body, dict):
        raise wrong(where, "a config group must be a JSON object")
    doc = dict(body)
    doc.pop("service", None)
    doc.pop("subservice", None)
    if "entity_type" not in doc and isinstance(doc.get("type"), str):
        doc["entity_type"] = doc.pop("type")   # older IoT Agent documents name the entity type `type`
    if not partial or "apikey" in doc:
        if not isinstance(doc.get("apikey"), str) or not _APIKEY.match(doc["apikey"]):
            raise wrong(f"{where}.apikey", "is mandatory: a non-empty string without spaces, '/', '+' or '#'")
    if "resource" in doc and not isinstance(doc["resource"], str):
        raise wrong(f"{where}.resource", "must be a string")
    if not partial:
        doc.setdefault("resource", "")
    if "autoprovision" in doc:
        doc["autoprovision"] = _flag(doc["autoprovision"], f"{where}.autoprovision")
    _check_common(doc, where, profiles)
    return doc


def validate_device(body: Any, where: str, profiles: Any = None, *, partial: bool = False) -> dict:
    """A device body checked (device_id, entity_name, lists, flags, profile); WRONG_SYNTAX names the field."""
    if not isinstance(body, dict):
        raise wrong(where, "a device must be a JSON object")
    doc = dict(body)
    for read_only in ("service", "service_path", "last_seen"):
        doc.pop(read_only, None)
    if not partial or "device_id" in doc:
        if not isinstance(doc.get("device_id"), str) or not _DEVICE_ID.match(doc["device_id"]):
            raise wrong(f"{where}.device_id", "is mandatory: a non-empty string without spaces or /#+?<>\"'=;()\\")
    if "entity_name" in doc and (not isinstance(doc["entity_name"], str) or not _URI.match(doc["entity_name"])):
        raise wrong(f"{where}.entity_name", "must be a URI, e.g. urn:ngsi-ld:AirQualityObserved:sensor-1")
    if "apikey" in doc and doc["apikey"] is not None and (
            not isinstance(doc["apikey"], str) or (doc["apikey"] and not _APIKEY.match(doc["apikey"]))):
        raise wrong(f"{where}.apikey", "must be a string without spaces, '/', '+' or '#'")
    if doc.get("apikey") in ("", None):
        doc.pop("apikey", None)
    _check_common(doc, where, profiles)
    return doc


def _merge(inherited: list | None, own: list | None) -> list[dict]:
    """Group attributes not redefined by the device (same name), then the device's own."""
    own = list(own or [])
    names = {item.get("name") for item in own}
    return [item for item in inherited or [] if item.get("name") not in names] + own


def to_device(doc: dict, group: dict | None = None) -> Device:
    """The pipeline's Device: a stored device document with what it lacks inherited from its config group."""
    g = group or {}

    def pick(key: str) -> Any:
        value = doc.get(key)
        return value if value is not None else g.get(key)

    entity_type = doc.get("entity_type") or g.get("entity_type") or DEFAULT_ENTITY_TYPE
    extra = {k: v for k, v in g.items() if k not in _DEVICE_FIELDS and k not in _GROUP_ONLY and k != "apikey"}
    extra.update((k, v) for k, v in doc.items() if k not in _DEVICE_FIELDS)
    explicit = pick("explicitAttrs")
    return Device(
        tenant=doc["service"], service_path=doc["service_path"], device_id=doc["device_id"],
        entity_name=doc.get("entity_name") or default_entity_name(entity_type, doc["device_id"]),
        entity_type=entity_type, apikey=doc.get("apikey") or g.get("apikey"), protocol=pick("protocol"),
        transport=pick("transport"), profile=pick("profile"),
        attributes=_merge(g.get("attributes"), doc.get("attributes")),
        static_attributes=_merge(g.get("static_attributes"), doc.get("static_attributes")),
        commands=_merge(g.get("commands"), doc.get("commands")), lazy=_merge(g.get("lazy"), doc.get("lazy")),
        internal_attributes=pick("internal_attributes"), explicit_attrs=explicit if explicit is not None else False,
        timestamp=pick("timestamp"), endpoint=pick("endpoint"), extra=extra)


def from_device(device: Device) -> dict:
    """The IoT Agent JSON of a Device (its effective fields, group inheritance included)."""
    doc: dict[str, Any] = {
        "device_id": device.device_id, "service": device.tenant, "service_path": device.service_path,
        "entity_name": device.entity_name, "entity_type": device.entity_type, "apikey": device.apikey,
        "protocol": device.protocol, "transport": device.transport, "profile": device.profile,
        "endpoint": device.endpoint, "timestamp": device.timestamp, "explicitAttrs": device.explicit_attrs,
        "attributes": device.attributes, "lazy": device.lazy, "commands": device.commands,
        "static_attributes": device.static_attributes, "internal_attributes": device.internal_attributes}
    doc = {k: v for k, v in doc.items() if v is not None}
    doc.update(device.extra)
    return doc


def _allows_autoprovision(group: dict) -> bool:
    value = group.get("autoprovision", True)
    return not (value is False or (isinstance(value, str) and value.lower() == "false"))


def _pick_group(groups: list[GroupRecord], apikey: str | None, entity_type: str | None) -> GroupRecord | None:
    """The config group a device of a scope belongs to: same apikey (if it has one), same entity type preferred.

    A device without apikey and without a matching entity type inherits only when its scope has exactly one group.
    """
    candidates = [g for g in groups if not apikey or g.apikey == apikey]
    if entity_type:
        typed = [g for g in candidates if g.doc.get("entity_type") == entity_type]
        if typed:
            return typed[0]
    if candidates and (apikey or len(candidates) == 1):
        return candidates[0]
    return None


class DeviceRegistry:
    """Config groups and devices of every tenant: the pipeline's lookups and the /iot provisioning operations."""

    def __init__(self, store, *, profiles: Any = None, refresh_interval: float = 2.0, flush_interval: float = 5.0):
        self.store = store
        self.profiles = profiles          # a profile library, once attached: profile names are then checked
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
        self._groups: dict[tuple[str, str], GroupRecord] = {}
        self._devices: dict[tuple[str, str], DeviceRecord] = {}
        self._by_id: dict[str, tuple[str, str]] = {}
        self._resolved: dict[tuple[str, str], Device] = {}
        self._missing: dict[tuple, float] = {}
        self._seen: dict[tuple[str, str, str, str], float] = {}
        self._fingerprint: tuple | None = None
        self._tasks: list[asyncio.Task] = []

    # ---------------------------------------------------------------- lifecycle and cache upkeep

    async def start(self) -> None:
        """Load every group and device, then keep the copy current and flush last-seen times in the background."""
        await self._reload()
        self._tasks = [asyncio.create_task(self._refresh_forever()), asyncio.create_task(self._flush_forever())]

    async def close(self) -> None:
        """Stop the background loops and write the last-seen times still in memory."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.flush_seen()

    async def _reload(self) -> None:
        fingerprint = await self.store.registry_fingerprint()
        groups = await self.store.all_groups()
        devices = await self.store.all_devices()
        self._groups = {(g.apikey, g.resource): g for g in groups}
        fresh: dict[tuple[str, str], DeviceRecord] = {}
        by_id: dict[str, tuple[str, str]] = {}
        for record in devices:
            key = (record.apikey, record.device_id)
            fresh.setdefault(key, record)    # the oldest wins when tenants share an (apikey, device_id)
            by_id.setdefault(record.device_id, key)
        self._devices, self._by_id = fresh, by_id
        self._resolved = {}
        self._missing = {}
        self._fingerprint = fingerprint

    async def _refresh_forever(self) -> None:
        """Pick up groups and devices provisioned, changed or removed through other processes sharing the store."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                if await self.store.registry_fingerprint() != self._fingerprint:
                    await self._reload()
            except Exception:
                log.exception("device registry refresh failed")

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush_seen()
            except Exception:
                log.exception("writing last-seen times failed")

    def _changed(self) -> None:
        """A local write: drop derived lookups; the next poll reloads (other processes may hold the same keys)."""
        self._resolved = {}
        self._missing = {}
        self._fingerprint = None

    def _cache_device(self, record: DeviceRecord) -> None:
        key = (record.apikey, record.device_id)
        current = self._devices.get(key)
        if current is None or (current.tenant, current.service_path) == (record.tenant, record.service_path):
            self._devices[key] = record
        self._by_id.setdefault(record.device_id, key)

    def _group_of(self, record: DeviceRecord) -> dict | None:
        scope = [g for g in self._groups.values() if (g.tenant, g.service_path) == (record.tenant, record.service_path)]
        group = _pick_group(scope, record.apikey or None, record.doc.get("entity_type"))
        return group.doc if group is not None else None

    def _resolve(self, record: DeviceRecord) -> Device:
        key = (record.apikey, record.device_id)
        device = self._resolved.get(key)
        if device is None or (device.tenant, device.service_path) != (record.tenant, record.service_path):
            device = to_device(record.doc, self._group_of(record))
            self._resolved[key] = device
        return device

    # ---------------------------------------------------------------- the pipeline's side

    async def find(self, apikey: str | None, device_id: str) -> Device | None:
        """The device that sent an uplink, by apikey and device id (any apikey when None), or None if unknown."""
        key = self._by_id.get(device_id) if apikey is None else (apikey, device_id)
        record = self._devices.get(key) if key is not None else None
        if record is not None:
            return self._resolve(record)
        miss = (apikey, device_id)
        now = time.monotonic()
        if self._missing.get(miss, 0) > now:
            return None
        record = await self.store.find_device(apikey, device_id)
        if record is None:
            self._missing[miss] = now + self.refresh_interval
            if len(self._missing) > 100_000:
                self._missing = {}
            return None
        if record.apikey and not any(k[0] == record.apikey for k in self._groups):
            for group in await self.store.find_groups(record.apikey):
                self._groups.setdefault((group.apikey, group.resource), group)
        self._cache_device(record)
        self._fingerprint = None   # the copy now holds a row the last reload did not see: re-check at the next poll
        return self._resolve(record)

    async def group_for(self, apikey: str, resource: str | None = None) -> dict | None:
        """The config group of an apikey (and resource, when the transport has one), or None."""
        group = self._match_group(apikey, resource)
        if group is not None:
            return group.doc
        miss = ("group", apikey, resource)
        now = time.monotonic()
        if self._missing.get(miss, 0) > now:
            return None
        found = await self.store.find_groups(apikey)
        for record in found:
            self._groups.setdefault((record.apikey, record.resource), record)
        if found:
            self._fingerprint = None
        group = self._match_group(apikey, resource)
        if group is None:
            self._missing[miss] = now + self.refresh_interval
            return None
        return group.doc

    def _match_group(self, apikey: str, resource: str | None) -> GroupRecord | None:
        if resource is not None:
            return self._groups.get((apikey, resource))
        return next((g for (key, _), g in self._groups.items() if key == apikey), None)

    async def autoprovision(self, group: dict, device_id: str) -> Device:
        """Register an unknown device of a config group (AutoprovisionRefused if the group forbids it)."""
        if not _allows_autoprovision(group):
            raise AutoprovisionRefused(f"autoprovision-refused: config group apikey={group.get('apikey')!r} "
                                       f"resource={group.get('resource')!r} does not allow autoprovisioning")
        if not _DEVICE_ID.match(device_id):
            raise AutoprovisionRefused(f"autoprovision-refused: {device_id!r} is not a valid device id")
        entity_type = group.get("entity_type") or DEFAULT_ENTITY_TYPE
        tenant, path, apikey = group["service"], group["subservice"], group["apikey"]
        doc = {"device_id": device_id, "apikey": apikey, "entity_type": entity_type,
               "entity_name": default_entity_name(entity_type, device_id), "service": tenant, "service_path": path}
        record = DeviceRecord(tenant, path, device_id, apikey, doc)
        if await self.store.create_devices([record]):
            record = await self.store.get_device(tenant, path, device_id, apikey) or record  # another process won
        else:
            log.info("autoprovisioned device %s (apikey %s) in service %r %s", device_id, apikey, tenant, path)
        self._changed()
        self._cache_device(record)
        return self._resolve(record)

    def touch(self, device: Device, when: float) -> None:
        """Note that the device sent something at `when` (epoch seconds); written to the store in batches."""
        key = (device.tenant, device.service_path, device.device_id, device.apikey or "")
        if when > self._seen.get(key, 0):
            self._seen[key] = when

    def pending_seen(self, tenant: str, service_path: str, device_id: str, apikey: str) -> float | None:
        """A last-seen time noted in this process and not yet written to the store."""
        return self._seen.get((tenant, service_path, device_id, apikey))

    async def flush_seen(self) -> None:
        """Write the last-seen times noted since the previous flush."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        try:
            await self.store.touch_devices([(*key, when) for key, when in seen.items()])
        except BaseException:
            for key, when in seen.items():
                if when > self._seen.get(key, 0):
                    self._seen[key] = when
            raise

    # ---------------------------------------------------------------- provisioning (the /iot API)

    async def create_groups(self, tenant: str, service_path: str, bodies: Any, field: str) -> list[dict]:
        """Validate and store a batch of config groups all-or-nothing (409 DUPLICATE_GROUP if a key exists)."""
        if not isinstance(bodies, list) or not bodies:
            raise wrong(field, "must be a non-empty array of config groups")
        docs = [validate_group(body, f"{field}[{n}]", self.profiles) for n, body in enumerate(bodies)]
        keys = [(d["apikey"], d["resource"]) for d in docs]
        for n, key in enumerate(keys):
            if key in keys[:n]:
                raise ProvisioningError("DUPLICATE_GROUP", 409, f"{field}[{n}]: the batch repeats the config group "
                                        f"apikey={key[0]!r} resource={key[1]!r}")
        for doc in docs:
            doc["service"], doc["subservice"] = tenant, service_path
        rows = [GroupRecord(tenant, service_path, d["apikey"], d["resource"], d) for d in docs]
        taken = await self.store.create_groups(rows)
        if taken:
            apikey, resource = taken[0]
            raise ProvisioningError("DUPLICATE_GROUP", 409, f"a config group with apikey={apikey!r} and "
                                    f"resource={resource!r} already exists (the pair is unique across services)")
        self._changed()
        for row in rows:
            self._groups[(row.apikey, row.resource)] = row
        return docs

    async def select_group(self, tenant: str, service_path: str, apikey: str, resource: str | None) -> GroupRecord:
        """The config group that PUT/DELETE ?apikey=&resource= names (resource optional when the apikey has one group)."""
        if resource is not None:
            group = await self.store.get_group(tenant, service_path, apikey, resource)
            groups = [group] if group is not None else []
        else:
            groups, _ = await self.store.list_groups(tenant, service_path, 2, 0, apikey=apikey)
            if len(groups) > 1:
                raise wrong("resource", f"several config groups have apikey {apikey!r}: name the resource")
        if not groups:
            raise ProvisioningError("DEVICE_GROUP_NOT_FOUND", 404, f"no config group with apikey={apikey!r}"
                                    + (f" and resource={resource!r}" if resource is not None else "")
                                    + f" in service {tenant!r} {service_path}")
        return groups[0]

    async def update_group(self, group: GroupRecord, body: Any) -> dict:
        """Merge a partial config group body into a stored group (its apikey and resource cannot change)."""
        changes = validate_group(body, "body", self.profiles, partial=True)
        for key in ("apikey", "resource"):
            if key in changes and changes[key] != group.doc.get(key):
                raise wrong(key, "identifies the config group and cannot be changed; delete it and create another")
        doc = {**group.doc, **changes}
        row = GroupRecord(group.tenant, group.service_path, group.apikey, group.resource, doc)
        if not await self.store.replace_group(row):
            raise ProvisioningError("DEVICE_GROUP_NOT_FOUND", 404, f"config group apikey={group.apikey!r} is gone")
        self._changed()
        self._groups[(row.apikey, row.resource)] = row
        return doc

    async def delete_group(self, group: GroupRecord) -> None:
        """Remove a config group (its devices stay provisioned)."""
        if not await self.store.delete_group(group.tenant, group.service_path, group.apikey, group.resource):
            raise ProvisioningError("DEVICE_GROUP_NOT_FOUND", 404, f"config group apikey={group.apikey!r} is gone")
        self._changed()
        self._groups.pop((group.apikey, group.resource), None)

    async def create_devices(self, tenant: str, service_path: str, bodies: Any, field: str = "devices") -> list[dict]:
        """Validate, complete (group apikey and type, default entity_name) and store devices all-or-nothing."""
        if not isinstance(bodies, list) or not bodies:
            raise wrong(field, "must be a non-empty array of devices")
        docs = [validate_device(body, f"{field}[{n}]", self.profiles) for n, body in enumerate(bodies)]
        groups, _ = await self.store.list_groups(tenant, service_path, 10_000, 0)
        rows: list[DeviceRecord] = []
        seen: set[tuple[str, str]] = set()
        for n, doc in enumerate(docs):
            group = _pick_group(groups, doc.get("apikey"), doc.get("entity_type"))
            if group is not None:
                doc.setdefault("apikey", group.apikey)
                if not doc.get("entity_type") and group.doc.get("entity_type"):
                    doc["entity_type"] = group.doc["entity_type"]
            doc.setdefault("entity_type", DEFAULT_ENTITY_TYPE)
            doc.setdefault("entity_name", default_entity_name(doc["entity_type"], doc["device_id"]))
            doc["service"], doc["service_path"] = tenant, service_path
            key = (doc["device_id"], doc.get("apikey", ""))
            if key in seen:
                raise ProvisioningError("DUPLICATE_DEVICE_ID", 409, f"{field}[{n}]: the batch repeats device "
                                        f"{doc['device_id']!r}")
            seen.add(key)
            rows.append(DeviceRecord(tenant, service_path, doc["device_id"], doc.get("apikey", ""), doc))
        taken = await self.store.create_devices(rows)
        if taken:
            raise ProvisioningError("DUPLICATE_DEVICE_ID", 409, f"A device with the same pair (Service, DeviceId) was "
                                    f"found: ({tenant!r}, {taken[0]!r}) in service path {service_path}")
        self._changed()
        for row in rows:
            self._cache_device(row)
        return docs

    async def get_device(self, tenant: str, service_path: str, device_id: str,
                         apikey: str | None = None) -> DeviceRecord:
        """One provisioned device of a scope (404 DEVICE_NOT_FOUND)."""
        record = await self.store.get_device(tenant, service_path, device_id, apikey)
        if record is None:
            raise ProvisioningError("DEVICE_NOT_FOUND", 404, f"No device was found with id:{device_id}"
                                    + (f" and apikey:{apikey}" if apikey else "")
                                    + f" in service {tenant!r} {service_path}")
        return record

    async def update_device(self, record: DeviceRecord, body: Any) -> dict:
        """Merge a partial device body into a stored device (device_id, apikey, entity_name/type cannot change)."""
        changes = validate_device(body, "body", self.profiles, partial=True)
        for key in ("device_id", "apikey", "entity_name", "entity_type"):
            if key in changes and changes[key] != record.doc.get(key):
                raise wrong(key, "cannot be changed (it links the device to its entity); delete the device and "
                                 "provision it again")
        doc = {**record.doc, **changes}
        row = DeviceRecord(record.tenant, record.service_path, record.device_id, record.apikey, doc, record.last_seen)
        if not await self.store.replace_device(row):
            raise ProvisioningError("DEVICE_NOT_FOUND", 404, f"No device was found with id:{record.device_id}")
        self._changed()
        self._cache_device(row)
        return doc

    async def delete_device(self, record: DeviceRecord) -> None:
        """Remove a provisioned device (the entity it fed stays in the context broker)."""
        if not await self.store.delete_device(record.tenant, record.service_path, record.device_id, record.apikey):
            raise ProvisioningError("DEVICE_NOT_FOUND", 404, f"No device was found with id:{record.device_id}")
        self._changed()
        key = (record.apikey, record.device_id)
        cached = self._devices.get(key)
        if cached is not None and (cached.tenant, cached.service_path) == (record.tenant, record.service_path):
            del self._devices[key]
            if self._by_id.get(record.device_id) == key:
                del self._by_id[record.device_id]
        self._seen.pop((record.tenant, record.service_path, record.device_id, record.apikey), None)
