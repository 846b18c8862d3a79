"""MQTT notifications (clause 7.2) end to end: a real middleware publishing to a real Mosquitto, read with paho-mqtt."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import CORE, Mosquitto, link
from tests.integration.test_notifications import entity, patch, subscribe

WAIT = 10.0


class Listener:
    """A paho-mqtt 2.x client subscribed (QoS 1) to one topic, keeping every message it gets."""

    def __init__(self, port: int, topic: str, *, client_id: str | None = None, clean: bool = True,
                 username: str | None = None, password: str | None = None):
        self.topic = topic
        self.messages: list[dict] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda client, userdata, message: self.messages.append(orjson.loads(message.payload))
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "the test subscriber could not subscribe"

    def wait(self, count: int, timeout: float = WAIT) -> list[dict]:
        """Poll until count messages arrived."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages)} of {count} MQTT messages on {self.topic}: {self.messages}")
            time.sleep(0.02)
        return list(self.messages)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def temperatures(messages: list[dict]) -> list:
    """The temperature of the single entity of each MQTT notification."""
    return [m["body"]["data"][0]["temperature"]["value"] for m in messages]


@pytest.mark.parametrize("version", ["mqtt3.1.1", "mqtt5.0"])
def test_mqtt_message_has_metadata_and_body(api, mosquitto, version):
    """An mqtt:// endpoint gets {"metadata": {Content-Type, Link, receiverInfo...}, "body": Notification}."""
    topic = f"citybridge/{uuid.uuid4().hex[:8]}/notify"
    listener = Listener(mosquitto.port, topic)
    try:
        sub_id = subscribe(api, f"mqtt://127.0.0.1:{mosquitto.port}/{topic}", notification={"endpoint": {
            "notifierInfo": [{"key": "MQTT-QoS", "value": "1"}, {"key": "MQTT-Version", "value": version}],
            "receiverInfo": [{"key": "X-Site", "value": "north"}]}})
        create_ok = api.post_json("/entities", entity("urn:ngsi-ld:Sensor:m", temperature=1))
        assert create_ok.status_code == 201
        patch(api, "urn:ngsi-ld:Sensor:m", temperature=2)
        first, second = listener.wait(2)
        assert first["metadata"] == {"Content-Type": "application/json", "Link": link(CORE)["Link"], "X-Site": "north"}
        body = first["body"]
        assert body["type"] == "Notification" and body["subscriptionId"] == sub_id and "notifiedAt" in body
        assert body["data"] == [{"id": "urn:ngsi-ld:Sensor:m", "type": "Sensor",
                                 "temperature": {"type": "Property", "value": 1}}]
        assert temperatures([first, second]) == [1, 2]
    finally:
        listener.close()


def test_mqtt_metadata_link_names_the_context_array(api, mosquitto, context_server):
    """metadata.Link names the @context the body was compacted with, also when it was given as an array."""
    ctx_url = context_server.publish(f"/ctx/{uuid.uuid4().hex}.jsonld", {"temp": "https://example.org/m#temperature"})
    topic = f"citybridge/{uuid.uuid4().hex[:8]}/notify"
    listener = Listener(mosquitto.port, topic)
    try:
        body = {"type": "Subscription", "entities": [{"type": "Sensor"}], "@context": [ctx_url],
                "notification": {"endpoint": {"uri": f"mqtt://127.0.0.1:{mosquitto.port}/{topic}"}}}
        response = api.send_json("POST", "/subscriptions", body, content_type="application/ld+json")
        assert response.status_code == 201, response.text
        created = api.post_json("/entities", {"id": "urn:ngsi-ld:Sensor:ma", "type": "Sensor",
                                              "https://example.org/m#temperature": {"type": "Property", "value": 1}})
        assert created.status_code == 201
        (message,) = listener.wait(1)
        assert message["metadata"]["Link"] == link(ctx_url)["Link"]
        assert message["body"]["data"][0]["temp"] == {"type": "Property", "value": 1}
    finally:
        listener.close()


def test_mqtt_ld_json_has_context_in_data_and_no_link(api, mosquitto):
    """accept application/ld+json over MQTT: Content-Type metadata, no Link, @context in each data item."""
    topic = f"citybridge/{uuid.uuid4().hex[:8]}"
    listener = Listener(mosquitto.port, topic)
    try:
        subscribe(api, f"mqtt://127.0.0.1:{mosquitto.port}/{topic}",
                  notification={"endpoint": {"accept": "application/ld+json"}})
        assert api.post_json("/entities", entity("urn:ngsi-ld:Sensor:ld", temperature=1)).status_code == 201
        (message,) = listener.wait(1)
        assert message["metadata"] == {"Content-Type": "application/ld+json"}
        assert message["body"]["data"][0]["@context"] == CORE
    finally:
        listener.close()


class OwnMosquitto(Mosquitto):
    """A Mosquitto of one test, with extra configuration lines (e.g. a password file)."""

    def __init__(self, workdir, extra: str = ""):
        super().__init__(workdir)
        self.stop()
        self.config.write_text(self.config.read_text() + extra)
        self.start()


def secured_mosquitto(workdir, username: str, password: str) -> Mosquitto:
    """A Mosquitto that only accepts one user, from a password file."""
    passwords = workdir / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), username, password], check=True, capture_output=True)
    passwords.chmod(0o600)
    broker = OwnMosquitto(workdir, f"password_file {passwords}\n")
    broker.stop()
    broker.config.write_text(broker.config.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    return broker


def test_mqtt_credentials_in_the_uri(api, tmp_path):
    """user:password in the mqtt:// URI (percent-encoded) authenticate the notifier to the broker."""
    broker = secured_mosquitto(tmp_path, "city", "s3cr@t:pw")
    topic = f"secured/{uuid.uuid4().hex[:8]}"
    listener = Listener(broker.port, topic, username="city", password="s3cr@t:pw")
    try:
        subscribe(api, f"mqtt://city:s3cr%40t%3Apw@127.0.0.1:{broker.port}/{topic}",
                  notification={"endpoint": {"notifierInfo": [{"key": "MQTT-QoS", "value": "1"}]}})
        assert api.post_json("/entities", entity("urn:ngsi-ld:Sensor:auth", temperature=5)).status_code == 201
        assert temperatures(listener.wait(1)) == [5]
    finally:
        listener.close()
        broker.stop()


class SlowProxy:
    """A TCP proxy to a broker that holds each new connection for `delay` seconds before relaying it."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay)
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting."""
        self.server.close()


def test_first_notification_to_a_new_broker_waits_for_the_connection(api, mosquitto):
    """The first notification to a broker still being connected to is sent once the connection is up (within the
    endpoint timeout), not recorded as failed."""
    proxy = SlowProxy(mosquitto.port, 0.5)  # a broker the middleware has no connection to yet, slow to connect
    topic = f"fresh/{uuid.uuid4().hex[:8]}"
    listener = Listener(mosquitto.port, topic)
    try:
        sub_id = subscribe(api, f"mqtt://127.0.0.1:{proxy.port}/{topic}")
        assert api.post_json("/entities", entity("urn:ngsi-ld:Sensor:fresh", temperature=3)).status_code == 201
        assert temperatures(listener.wait(1)) == [3]
        deadline = time.monotonic() + WAIT
        while "lastSuccess" not in (status := api.get(f"/subscriptions/{sub_id}").json()["notification"]):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert (status["timesSent"], status["timesFailed"], status["status"]) == (1, 0, "ok")
        assert "lastFailure" not in status
    finally:
        listener.close()
        proxy.close()


def test_mqtt_broker_restart_loses_nothing(api, tmp_path):
    """Mosquitto restarted while the middleware runs: delivery resumes and every notification arrives, in order."""
    broker = OwnMosquitto(tmp_path)  # with working persistence: our session survives the restart
    topic = f"restart/{uuid.uuid4().hex[:8]}"
    # a persistent session (clean_session false, QoS 1): the broker keeps what arrives while we reconnect
    listener = Listener(broker.port, topic, client_id=f"test-{uuid.uuid4().hex[:8]}", clean=False)
    try:
        subscribe(api, f"mqtt://127.0.0.1:{broker.port}/{topic}",
                  notification={"endpoint": {"notifierInfo": [{"key": "MQTT-QoS", "value": "1"}]}})
        e = "urn:ngsi-ld:Sensor:restart"
        assert api.post_json("/entities", entity(e, temperature=0)).status_code == 201
        listener.wait(1)
        broker.stop()
        for n in range(1, 4):
            patch(api, e, temperature=n)  # writes go on while the broker is down
        broker.start()
        patch(api, e, temperature=4)
        deadline = time.monotonic() + 30
        while 4 not in temperatures(listener.messages):
            assert time.monotonic() < deadline, f"MQTT delivery did not resume: {temperatures(listener.messages)}"
            time.sleep(0.05)
        seen = list(dict.fromkeys(temperatures(listener.messages)))  # at least once: a redelivery may repeat
        assert seen == [0, 1, 2, 3, 4]
    finally:
        listener.close()
        broker.stop()
