"""The records that travel the southbound pipeline (DESIGN.md): Uplink → Device → Measurement → NGSI-LD fragment.

adapters/<transport>   emit Uplink (bytes and where they came from; nothing of NGSI-LD)
middleware/devices     find the Device that sent it (registry, autoprovisioning) or dead-letter it
middleware/codecs      decode the payload with the device's profile: Measurement (named values, observed time)
middleware/normalize   turn the Measurement into NGSI-LD fragments for the broker (entity + Device entity)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass(frozen=True, slots=True)
class Uplink:
    """Bytes a device sent, and where they came from."""

    transport: str          # "mqtt" | "coap" | "modbus" | "serial" | "http"
    address: str            # peer: MQTT client/broker, ip:port, serial port, modbus host:port/unit
    topic: str              # MQTT topic, CoAP path, serial port name, Modbus register block name
    payload: bytes
    received_at: float      # epoch seconds
    ack: Callable[[], Awaitable[None]] | None = None  # called once the measurement is committed (MQTT manual ack)


@dataclass(slots=True)
class Device:
    """A registered (or autoprovisioned) device: FIWARE IoT Agent fields plus the CityBridge `profile`."""

    tenant: str                                   # NGSI-LD tenant ('' = default), from fiware-service
    service_path: str                             # fiware-servicepath, '/' by default
    device_id: str
    entity_name: str                              # NGSI-LD entity id, urn:ngsi-ld:<entity_type>:<device_id> by default
    entity_type: str
    apikey: str | None = None
    protocol: str | None = None
    transport: str | None = None
    profile: str | None = None                    # device-profiles/<profile>.yaml
    attributes: list[dict] = field(default_factory=list)         # object_id, name, type, metadata, expression
    static_attributes: list[dict] = field(default_factory=list)  # name, type, value, metadata
    commands: list[dict] = field(default_factory=list)           # name, type, value / expression
    lazy: list[dict] = field(default_factory=list)
    internal_attributes: Any = None
    explicit_attrs: Any = False
    timestamp: bool | None = None
    endpoint: str | None = None
    extra: dict = field(default_factory=dict)     # any other provisioning field, kept and returned as given


@dataclass(slots=True)
class Measurement:
    """Decoded readings of one uplink: attribute name (NGSI-LD short name) → value, and when they were observed."""

    device: Device
    values: dict[str, Any]
    observed_at: str                              # NGSI-LD DateTime
    metadata: dict[str, dict] = field(default_factory=dict)     # attribute name → extra sub-properties


class DecodeError(Exception):
    """An uplink that cannot be turned into a Measurement; its message becomes the dead-letter reason."""
