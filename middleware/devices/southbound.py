"""Southbound wiring: the profile library, the MQTT adapter (an embedded broker when none answers), ingest, commands."""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from paho.mqtt.client import topic_matches_sub

from adapters.mqtt import IOTA_TOPICS, Endpoint, MqttAdapter, broker_answers, claim_client_id

from ..codecs import ProfileLibrary
from .commands import Commands
from .ingest import INGESTING, Ingest

log = logging.getLogger("citybridge.southbound")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class Profiles(ProfileLibrary):
    """The profile library, plus `exists(name)` for the registry's provisioning checks."""

    def exists(self, name: str) -> bool:
        """True if a profile of that name is loaded."""
        return name in self.profiles


def load_profiles(directory: str) -> Profiles:
    """The profile library of a folder (empty, with a warning, when the folder does not exist)."""
    if not Path(directory).is_dir():
        log.warning("no device profile folder %s (CITYBRIDGE_PROFILES_DIR): only IoT Agent JSON devices", directory)
        return Profiles({})
    library = Profiles(ProfileLibrary.load(directory).profiles)
    log.info("%d device profiles loaded from %s", len(library), directory)
    return library


def mqtt_filters(profiles) -> list[str]:
    """The IoT Agent topics plus each profile's topic templates as filters ({x} → +), without overlaps."""
    filters = list(IOTA_TOPICS)
    for profile in profiles or ():
        for template in (profile.mqtt or {}).get("topics", []):
            candidate = _PLACEHOLDER.sub("+", template)
            if not any(topic_matches_sub(existing, candidate) for existing in filters):
                filters.append(candidate)
    return filters


async def start_embedded(host: str, port: int):
    """Start an amqtt broker on host:port (loopback only) in this event loop; None when it cannot."""
    if host not in LOOPBACK:
        return None
    from amqtt.broker import Broker as AmqttBroker
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    broker = AmqttBroker(config)
    try:
        await broker.start()
    except Exception as exc:  # another worker of this machine won the port: use its broker
        log.info("embedded MQTT broker not started on %s:%d (%s)", host, port, exc)
        return None
    log.warning("no MQTT broker answered at %s:%d: started an embedded broker (amqtt, in memory, MQTT 3.1.1) there; "
                "for production run Mosquitto with the settings of docs/mqtt.md", host, port)
    return broker


class Southbound:
    """Owns the MQTT adapter, the ingest stage and the command listener of one process."""

    def __init__(self, settings, broker, registry, deadletters, profiles, terms):
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self.deadletters = deadletters
        self.profiles = profiles
        self.terms = terms
        self.embedded = None
        self.adapter: MqttAdapter | None = None
        self.ingest = Ingest(broker, registry, profiles, deadletters, terms, batch_max=settings.ingest_batch_max,
                             batch_wait=settings.ingest_batch_wait, max_payload=settings.max_payload_bytes)
        self.commands: Commands | None = None

    async def start(self) -> None:
        """Start the ingest, then connect to the broker (starting an embedded one if allowed and needed)."""
        s = self.settings
        self.ingest.start()
        if not s.mqtt_enabled:
            return
        endpoint = Endpoint.parse(s.mqtt_url)
        version = s.mqtt_version
        if s.mqtt_embedded == "auto" and not await asyncio.to_thread(broker_answers, endpoint.host, endpoint.port):
            self.embedded = await start_embedded(endpoint.host, endpoint.port)
        if self.embedded is not None:
            version = "3.1.1"
        group = s.mqtt_shared_group or ("citybridge" if s.workers > 1 else None)
        client_id = claim_client_id(s.mqtt_client_id, f"{endpoint.host}:{endpoint.port}")
        self.adapter = MqttAdapter(s.mqtt_url, client_id=client_id, topics=mqtt_filters(self.profiles),
                                   shared_group=group, tls_ca=s.mqtt_tls_ca or None, version=version,
                                   receive_maximum=4 * s.ingest_batch_max)
        self.commands = Commands(self.broker, self.registry, self.profiles, self.terms, self.adapter.send,
                                 skip=INGESTING.get)
        self.ingest.on_device = self.commands.remember
        self.commands.start()
        self.adapter.start(self.ingest.submit, self.ingest.backlog, max_backlog=3 * s.ingest_batch_max)

    async def stop(self) -> None:
        """Stop listening for commands, finish the batch under way, disconnect, stop the embedded broker."""
        if self.commands is not None:
            await self.commands.close()
        await self.ingest.stop()
        if self.adapter is not None:
            await self.adapter.stop()
        if self.embedded is not None:
            await self.embedded.shutdown()
