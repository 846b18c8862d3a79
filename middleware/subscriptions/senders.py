"""Notification senders: HTTP(S) POST (aiohttp) and MQTT(S) publish (paho-mqtt 2.x), clause 5.8.6 and 7.2.

Each sender answers one question: did this notification reach the endpoint? (raises DeliveryFailed if not).
aiohttp rather than httpx here: at thousands of notifications per second httpx's connection-pool bookkeeping
was the delivery path's largest cost, aiohttp's pooled connector about a third of it.
MQTT connections are pooled per broker and credentials; paho's network thread reconnects by itself with
backoff after a broker restart or a lost keepalive, and publishing resumes on the same client.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson
import paho.mqtt.client as mqtt

from ..context.jsonld import link_header

log = logging.getLogger("citybridge.notify")


class DeliveryFailed(Exception):
    """The endpoint did not take the notification (refused, timed out, non-2xx, broker unreachable)."""


@dataclass(frozen=True)
class Delivery:
    """What a sender needs to deliver one notification."""

    tenant: str
    endpoint: dict
    payload: bytes
    context_url: str


def _info(pairs: list[dict] | None) -> dict[str, str]:
    return {p["key"]: p["value"] for p in pairs or ()}


class HttpSender:
    """POSTs notifications; success is a 2xx answer within the endpoint's timeout."""

    def __init__(self, default_timeout: float):
        self.default_timeout = default_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use, inside the running event loop
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200, limit_per_host=0),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def send(self, delivery: Delivery) -> None:
        """Deliver one notification over HTTP (receiverInfo as headers, Link for application/json)."""
        endpoint = delivery.endpoint
        accept = endpoint.get("accept", "application/json")
        headers = {"Content-Type": accept}
        if accept == "application/json":
            headers["Link"] = link_header(delivery.context_url)
        if delivery.tenant:
            headers["NGSILD-Tenant"] = delivery.tenant
        headers.update(_info(endpoint.get("receiverInfo")))
        timeout = endpoint["timeout"] / 1000 if "timeout" in endpoint else self.default_timeout
        try:
            async with self._client().post(endpoint["uri"], data=delivery.payload, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise DeliveryFailed(f"{exc.__class__.__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")

    async def close(self) -> None:
        """Close pooled connections."""
        if self._session is not None:
            await self._session.close()


class _MqttConnection:
    """One pooled MQTT client: connects in the background, reconnects by itself, resolves publishes as futures."""

    def __init__(self, host: str, port: int, tls: bool, username: str | None, password: str | None, version: str):
        protocol = mqtt.MQTTv5 if version == "mqtt5.0" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"citybridge-notifier-{uuid.uuid4().hex[:12]}",
                                  protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set_context(ssl.create_default_context())
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.connected = threading.Event()
        self.attempted = threading.Event()  # the first connection attempt has ended, either way
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self.name = f"{host}:{port}"
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.attempted.set()
        if not reason_code.is_failure:
            self.connected.set()
            log.info("MQTT notifier connected to %s", self.name)

    def _on_connect_fail(self, client, userdata) -> None:
        self.attempted.set()
        log.warning("MQTT notifier could not connect to %s; retrying", self.name)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.attempted.set()
        self.connected.clear()
        log.warning("MQTT notifier lost %s (%s); reconnecting", self.name, reason_code)
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, future in pending.values():
            loop.call_soon_threadsafe(_fail, future, "connection lost before the broker acknowledged")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._done.add(mid)
        if entry is not None:
            loop, future = entry
            loop.call_soon_threadsafe(_succeed, future)

    async def publish(self, topic: str, payload: bytes, qos: int, timeout: float) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1/2) or for the packet to leave (QoS 0).

        A new connection's first attempt is waited for within the same timeout; a broker known to be down fails
        at once (the attempt is retried with backoff), so it does not hold a delivery slot for the whole timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.connected.is_set():
            if self.attempted.is_set() or asyncio.get_running_loop().time() >= deadline:
                raise DeliveryFailed(f"MQTT broker {self.name} is not connected")
            await asyncio.sleep(0.02)
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise DeliveryFailed(f"MQTT publish to {self.name} failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._done:
                self._done.discard(info.mid)
                return
            self._pending[info.mid] = (loop, future)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            with self._lock:
                self._pending.pop(info.mid, None)
            raise DeliveryFailed(f"MQTT broker {self.name} did not acknowledge within {timeout} s") from None

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def _succeed(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future, reason: str) -> None:
    if not future.done():
        future.set_exception(DeliveryFailed(reason))


class MqttSender:
    """Publishes notifications as {"metadata", "body"} (clause 7.2) over pooled connections per broker."""

    def __init__(self, default_timeout: float):
        self.default_timeout = default_timeout
        self.pool: dict[tuple, _MqttConnection] = {}

    def connection(self, uri: str, version: str) -> tuple[_MqttConnection, str]:
        """The pooled connection for an mqtt(s) URI and the topic it names."""
        parts = urlsplit(uri)
        tls = parts.scheme == "mqtts"
        port = parts.port or (8883 if tls else 1883)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        key = (parts.hostname, port, tls, username, password, version)
        connection = self.pool.get(key)
        if connection is None:
            connection = self.pool[key] = _MqttConnection(parts.hostname, port, tls, username, password, version)
        return connection, unquote(parts.path.lstrip("/"))

    async def send(self, delivery: Delivery) -> None:
        """Deliver one notification over MQTT with the QoS and version of notifierInfo (defaults 0 and mqtt5.0)."""
        endpoint = delivery.endpoint
        notifier = _info(endpoint.get("notifierInfo"))
        qos = int(notifier.get("MQTT-QoS", "0"))
        connection, topic = self.connection(endpoint["uri"], notifier.get("MQTT-Version", "mqtt5.0"))
        accept = endpoint.get("accept", "application/json")
        metadata = {"Content-Type": accept}
        if accept == "application/json":
            metadata["Link"] = link_header(delivery.context_url)
        metadata.update(_info(endpoint.get("receiverInfo")))
        message = b'{"metadata":' + orjson.dumps(metadata) + b',"body":' + delivery.payload + b"}"
        timeout = endpoint["timeout"] / 1000 if "timeout" in endpoint else self.default_timeout
        await connection.publish(topic, message, qos, timeout)

    async def close(self) -> None:
        """Close every pooled connection."""
        for connection in self.pool.values():
            connection.close()
        self.pool.clear()
