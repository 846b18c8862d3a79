"""Commands (downlink), IoT Agent semantics: a command attribute updated through NGSI-LD is published to the device.

`<cmd>` written on a provisioned device's entity → `{"<cmd>": <value>}` on `/<apikey>/<device_id>/cmd` (or the
profile's command topic) and `<cmd>_status` PENDING; the device's `/cmdexe` reply `{"<cmd>": result}` is decoded
like any uplink into `<cmd>_status` OK and `<cmd>_info` (see middleware/codecs/iota.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..codecs import encode_command
from ..context.broker import Broker
from ..context.model import EntityParser
from .types import Device

log = logging.getLogger("citybridge.commands")

Send = Callable[[str, bytes], Awaitable[None]]


class Commands:
    """A broker listener that turns command attribute updates into downlinks."""

    def __init__(self, broker: Broker, registry, profiles, terms, send: Send, *, skip: Callable[[], bool] = lambda: False):
        self.broker = broker
        self.registry = registry
        self.profiles = profiles
        self.terms = terms
        self.send = send
        self.skip = skip                  # true while the ingest commits: device data never carries commands
        self.known: dict[tuple[str, str], tuple[str | None, str]] = {}  # (tenant, entity id) → (apikey, device_id)
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Listen to committed changes."""
        self.broker.listeners.append(self.on_change)

    async def close(self) -> None:
        """Stop listening and wait for downlinks under way."""
        if self.on_change in self.broker.listeners:
            self.broker.listeners.remove(self.on_change)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def remember(self, device: Device) -> None:
        """Note which device feeds an entity (for entity names that do not end with the device id)."""
        self.known[(device.tenant, device.entity_name)] = (device.apikey, device.device_id)

    async def on_change(self, tenant: str, events: list[tuple[dict | None, dict | None]]) -> None:
        """Find command attributes that changed on device entities and send them (in the background)."""
        if self.skip():
            return
        for old, new in events:
            if new is None:
                continue
            device = await self._device_of(tenant, new["id"])
            if device is None:
                continue
            profile = self.profiles.get(device.profile) if self.profiles is not None else None
            names = [c["name"] for c in device.commands if c.get("name")]
            names += [c["name"] for c in (profile.commands if profile else ()) if c["name"] not in names]
            for name in names:
                instances = new["attrs"].get(self.terms.expand(name))
                if not instances:
                    continue
                before = (old or {}).get("attrs", {}).get(self.terms.expand(name))
                if before and before[0].get("modifiedAt") == instances[0].get("modifiedAt"):
                    continue
                task = asyncio.create_task(self.execute(tenant, device, profile, name, _plain(instances[0])))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _device_of(self, tenant: str, entity_id: str) -> Device | None:
        apikey, device_id = self.known.get((tenant, entity_id), (None, entity_id.rsplit(":", 1)[-1]))
        device = await self.registry.find(apikey, device_id)
        if device is None or device.tenant != tenant or device.entity_name != entity_id:
            return None
        return device

    async def execute(self, tenant: str, device: Device, profile, name: str, value) -> None:
        """Publish one command and record <cmd>_status PENDING (ERROR with <cmd>_info when it cannot be sent)."""
        try:
            topic, payload = encode_command(profile, device, name, value)
            await self.send(topic, payload)
            status, info = "PENDING", None
            log.info("command %s sent to %s on %s", name, device.device_id, topic)
        except Exception as exc:
            status, info = "ERROR", f"{exc.__class__.__name__}: {exc}"
            log.warning("command %s for %s could not be sent: %s", name, device.device_id, info)
        body = {"id": device.entity_name, f"{name}_status": {"type": "Property", "value": status}}
        if info is not None:
            body[f"{name}_info"] = {"type": "Property", "value": info}
        fragment = EntityParser(self.terms).entity(body, require_type=False)
        try:
            await self.broker.mutate(tenant, [(device.entity_name, Broker.append_op(fragment, no_overwrite=False,
                                                                                     must_exist=True))])
        except Exception:
            log.exception("the status of command %s on %s could not be written", name, device.entity_name)


def _plain(instance: dict):
    """The plain value of a stored Property instance (a JSON literal @value unwrapped)."""
    value = instance.get("value", instance.get("object"))
    if isinstance(value, dict) and "@value" in value:
        return value["@value"]
    return value
