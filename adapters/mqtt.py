"""MQTT transport (paho-mqtt 2.x): persistent QoS-1 subscriptions with manual acks in, publishes out.

Transport only: `start(emit)` hands every message to `emit` as an Uplink whose `ack` sends the PUBACK;
the pipeline calls it once the measurement is committed, so a crash before that loses nothing (the broker
redelivers unacknowledged messages of the persistent session). `send` publishes downlinks (commands).
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from middleware.devices.types import Uplink

log = logging.getLogger("citybridge.mqtt")

# The IoT Agent for JSON topics, with and without the leading slash (the IoTA accepts both).
IOTA_TOPICS = ("/+/+/attrs", "/+/+/attrs/+", "/+/+/cmdexe", "+/+/attrs", "+/+/attrs/+", "+/+/cmdexe")


@dataclass(frozen=True)
class Endpoint:
    """Where the broker is: host, port, TLS, credentials (from an mqtt:// or mqtts:// URL)."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        """Parse mqtt[s]://[user[:password]@]host[:port]."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"{url!r}: the MQTT URL must start with mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def broker_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def claim_client_id(base: str, address: str, slots: int = 64) -> str:
    """A client id no other process on this machine uses for the same broker: base, else base-1, base-2, ...

    Persistent sessions need a fixed id, but two processes with one id would take the connection from each
    other forever; a process holds a lock file per id for its lifetime (released by the OS even on SIGKILL),
    so a restarted worker gets a free id back and resumes that session.
    """
    digest = hashlib.sha1(f"{address}|{base}".encode()).hexdigest()[:16]
    for slot in range(slots):
        path = os.path.join(tempfile.gettempdir(), f"citybridge-mqtt-{digest}-{slot}.lock")
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _HELD.append(handle)
        return base if slot == 0 else f"{base}-{slot}"
    raise RuntimeError(f"{slots} processes already use MQTT client ids {base}[-n] on this machine")


_HELD: list = []  # lock files of the client ids this process holds


def shared(topic: str, group: str | None) -> str:
    """The topic filter, as a shared subscription $share/<group>/<filter> when a group is given."""
    return f"$share/{group}/{topic}" if group else topic


class _ReadBuffer:
    """A socket read in 64 KiB chunks: paho asks for a packet in three or more tiny recv() calls."""

    __slots__ = ("_sock", "_data", "_pos")

    def __init__(self, sock):
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        """Up to size bytes, from the buffer or else from one large read of the socket."""
        if self._pos >= len(self._data):
            data = self._sock.recv(65536)  # BlockingIOError / SSLWantReadError reach paho as before
            if not data:
                return data
            self._data, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._data))
        return self._data[start:self._pos]

    def pending(self) -> int:
        """Bytes readable without waiting; paho skips its select() wait while there are any."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._data) - self._pos + inner

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client with buffered socket reads."""

    def _create_socket(self):
        sock = super()._create_socket()
        return sock if self._transport == "websockets" else _ReadBuffer(sock)


class MqttAdapter:
    """One MQTT connection: subscribes (QoS 1, persistent session), emits Uplinks, publishes downlinks."""

    transport = "mqtt"

    def __init__(self, url: str, *, client_id: str, topics: list[str], shared_group: str | None = None,
                 tls_ca: str | None = None, version: str = "5", session_expiry: int = 7 * 24 * 3600,
                 receive_maximum: int = 4000, keepalive: int = 30):
        self.endpoint = Endpoint.parse(url)
        self.topics = [shared(t, shared_group) for t in dict.fromkeys(topics)]
        self.version = version
        self.address = f"{self.endpoint.host}:{self.endpoint.port}"
        self.client_id = client_id
        self.connected = threading.Event()
        self._generation = 0  # bumped on every (dis)connection: acks of an older connection are not sent
        self._inbox: collections.deque = collections.deque()
        self._woken = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._emit: Callable[[Uplink], None] | None = None
        self._backlog: Callable[[], int] | None = None
        self._max_backlog = 5000
        self._running = False
        v5 = version == "5"
        client_class = _Client if hasattr(mqtt.Client, "_create_socket") else mqtt.Client
        self.client = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=None if v5 else False,
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, manual_ack=True)
        self._connect_properties = None
        if v5:
            self._connect_properties = Properties(PacketTypes.CONNECT)
            self._connect_properties.SessionExpiryInterval = session_expiry
            self._connect_properties.ReceiveMaximum = max(1, min(receive_maximum, 65535))
        if self.endpoint.username is not None:
            self.client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls:
            self.client.tls_set_context(ssl.create_default_context(cafile=tls_ca))
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.keepalive = keepalive

    # ---------------------------------------------------------------- lifecycle

    def start(self, emit: Callable[[Uplink], None], backlog: Callable[[], int] | None = None,
              max_backlog: int = 5000) -> None:
        """Connect in the background (retrying with backoff) and hand every message to emit, on this event loop.

        backlog() tells how many emitted uplinks still wait; above max_backlog the adapter stops reading the
        socket until it drops (TCP flow control holds the rest at the broker, which queues it for the session).
        """
        self._loop = asyncio.get_running_loop()
        self._emit = emit
        self._backlog = backlog
        self._max_backlog = max_backlog
        self._running = True
        kwargs = {"clean_start": False, "properties": self._connect_properties} if self.version == "5" else {}
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self.keepalive, **kwargs)
        self.client.loop_start()

    async def stop(self) -> None:
        """Disconnect (the session and its unacknowledged messages stay with the broker) and stop the thread."""
        self._running = False
        self._generation += 1
        self.client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self.client.loop_stop)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the first connection is up; False after timeout."""
        return await asyncio.get_running_loop().run_in_executor(None, self.connected.wait, timeout)

    # ---------------------------------------------------------------- downlink

    async def send(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish a downlink and wait for the broker's acknowledgement; raises ConnectionError if it does not come."""
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise ConnectionError(f"MQTT publish to {self.address} failed: {mqtt.error_string(info.rc)}")
        await asyncio.get_running_loop().run_in_executor(None, info.wait_for_publish, timeout)
        if not info.is_published():
            raise ConnectionError(f"MQTT broker {self.address} did not acknowledge {topic} within {timeout} s")

    # ---------------------------------------------------------------- paho callbacks (network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s refused the connection: %s", self.address, reason_code)
            return
        self._generation += 1
        self.connected.set()
        log.info("MQTT connected to %s as %s (session %s); subscribing to %s", self.address, self.client_id,
                 "resumed" if flags.session_present else "new", ", ".join(self.topics))
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._generation += 1
        self.connected.clear()
        if self._emit is not None and reason_code != 0:
            log.warning("MQTT connection to %s lost (%s); reconnecting with backoff", self.address, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self._inbox.append((message.topic, message.payload, message.mid, message.qos, self._generation, time.time()))
        if not self._woken:
            self._woken = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed: we are shutting down
                return
        if self._backlog is not None:
            while self._running and len(self._inbox) + self._backlog() > self._max_backlog:
                time.sleep(0.002)  # backpressure: leave the CPU (and the GIL) to the pipeline

    # ---------------------------------------------------------------- event loop side

    def _drain(self) -> None:
        self._woken = False
        inbox, emit = self._inbox, self._emit
        while inbox:
            topic, payload, mid, qos, generation, received = inbox.popleft()
            emit(Uplink(self.transport, self.address, topic, payload, received,
                        self._acker(mid, qos, generation) if qos else None))

    def _acker(self, mid: int, qos: int, generation: int):
        async def ack() -> None:
            if generation == self._generation:
                self.client.ack(mid, qos)
        return ack
