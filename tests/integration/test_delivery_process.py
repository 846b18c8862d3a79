"""The notification delivery process (middleware/subscriptions/delivery_process.py) of a real middleware process:
it delivers, it follows subscription changes at once, its counts reach /metrics, it is restarted when it dies,
and it ends with the middleware, SIGKILL included."""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import Api, Middleware, children
from tests.integration.test_notifications import (create, fresh_store, patch, receiver, subscribe,  # noqa: F401
                                                  values, wait_subscription)

DELIVERY_MODULE = "middleware.subscriptions.delivery_process"


def delivery_pids(pid: int) -> list[int]:
    """The delivery processes among pid's children."""
    out = []
    for child in children(pid):
        try:
            if DELIVERY_MODULE in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                out.append(child)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll predicate() until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout} s")


def sent_metric(server: Middleware) -> float:
    """citybridge_notifications_total{outcome="sent"} from /metrics."""
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('citybridge_notifications_total{outcome="sent"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def server(fresh_store):  # noqa: F811
    """A middleware process on a store of its own (SQLite and PostgreSQL)."""
    url, workdir = fresh_store
    middleware = Middleware(url, workdir)
    yield middleware
    middleware.stop()


def test_a_child_process_delivers_and_its_counts_reach_metrics(server, receiver):  # noqa: F811
    (child,) = wait_until(lambda: delivery_pids(server.process.pid), what="a delivery process")
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    path, uri = receiver.endpoint()
    subscribe(client, uri)
    e = "urn:ngsi-ld:Sensor:child"
    create(client, {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 0}})
    for n in range(1, 4):
        patch(client, e, temperature=n)
    assert values(receiver.wait(path, 4)) == [0, 1, 2, 3]
    wait_until(lambda: sent_metric(server) >= 4, what="/metrics counting the 4 notifications")
    assert sent_metric(server) == 4
    assert delivery_pids(server.process.pid) == [child]
    client.close()


def test_a_changed_endpoint_is_used_by_the_next_notification(server, receiver):  # noqa: F811
    """The API process tells the child of a subscription change before any later notification (no 2 s wait)."""
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    old_path, old_uri = receiver.endpoint()
    new_path, new_uri = receiver.endpoint()
    sub_id = subscribe(client, old_uri)
    e = "urn:ngsi-ld:Sensor:moved"
    create(client, {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 0}})
    receiver.wait(old_path, 1)
    for n in range(1, 6):
        response = client.send_json("PATCH", f"/subscriptions/{sub_id}",
                                    {"notification": {"endpoint": {"uri": new_uri if n % 2 else old_uri}}})
        assert response.status_code == 204, response.text
        patch(client, e, temperature=n)
        receiver.wait_for(new_path if n % 2 else old_path, lambda body, n=n: body["data"][0]["temperature"]["value"] == n)
    assert values(receiver.got(new_path)) == [1, 3, 5]
    assert values(receiver.got(old_path)) == [0, 2, 4]
    client.close()


def first_notification_recorded(server: Middleware, receiver, e: str) -> tuple[Api, str, int]:  # noqa: F811
    """A subscription whose first notification (entity e created, temperature 0) is delivered and recorded;
    (client, receiver path, pid of the delivery process)."""
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    path, uri = receiver.endpoint()
    sub_id = subscribe(client, uri)
    create(client, {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 0}})
    receiver.wait(path, 1)
    # once its delivery is recorded (within 20 ms) the first notification is not sent again
    wait_subscription(client, sub_id, lambda body: body["notification"].get("timesSent") == 1)
    (child,) = delivery_pids(server.process.pid)
    return client, path, child


def test_a_dead_child_is_replaced_and_what_was_queued_meanwhile_arrives(server, receiver):  # noqa: F811
    e = "urn:ngsi-ld:Sensor:orphaned"
    client, path, first = first_notification_recorded(server, receiver, e)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first), what="the killed delivery process to end")
    for n in range(1, 4):
        patch(client, e, temperature=n)  # accepted while no child runs (or just as the next one starts)
    (second,) = wait_until(lambda: [p for p in delivery_pids(server.process.pid) if p != first],
                           what="a new delivery process")
    assert second != first
    # the killed child's leases were never given back: its successor waits for them to run out (10 s)
    assert values(receiver.wait(path, 4, timeout=30)) == [0, 1, 2, 3]
    assert server.process.poll() is None
    client.close()


def test_a_child_stopped_with_sigterm_gives_its_leases_back_and_is_replaced(server, receiver):  # noqa: F811
    e = "urn:ngsi-ld:Sensor:termed"
    client, path, first = first_notification_recorded(server, receiver, e)
    os.kill(first, signal.SIGTERM)
    wait_until(lambda: not alive(first), what="the delivery process to end on SIGTERM")
    started = time.monotonic()
    patch(client, e, temperature=1)
    # its lease was given back: the next child sends at once, not after the 10 s a lease takes to run out
    assert values(receiver.wait(path, 2, timeout=8)) == [0, 1]
    assert time.monotonic() - started < 8
    assert server.process.poll() is None
    client.close()


def test_the_child_ends_with_a_killed_middleware(fresh_store):  # noqa: F811
    url, workdir = fresh_store
    server = Middleware(url, workdir)
    try:
        (child,) = wait_until(lambda: delivery_pids(server.process.pid), what="a delivery process")
        server.process.kill()
        server.process.wait(10)
        wait_until(lambda: not alive(child), timeout=10, what="the delivery process to end after its parent")
    finally:
        server.stop()


def test_notify_process_off_delivers_in_the_api_process(fresh_store, receiver):  # noqa: F811
    url, workdir = fresh_store
    server = Middleware(url, workdir, CITYBRIDGE_NOTIFY_PROCESS="false")
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    try:
        assert delivery_pids(server.process.pid) == []
        path, uri = receiver.endpoint()
        subscribe(client, uri)
        create(client, {"id": "urn:ngsi-ld:Sensor:inline", "type": "Sensor",
                        "temperature": {"type": "Property", "value": 7}})
        assert values(receiver.wait(path, 1)) == [7]
        wait_until(lambda: sent_metric(server) >= 1, what="/metrics counting the notification")
        assert delivery_pids(server.process.pid) == []
    finally:
        client.close()
        server.stop()


def test_changes_through_two_processes_are_notified_in_the_order_they_were_made(fresh_store, receiver):  # noqa: F811
    """One entity changed through two processes in turn: the outbox rows are committed with the changes, so the
    subscription's notifications come in the order of the changes, whichever process sends them."""
    url, workdir = fresh_store
    first, second = Middleware(url, workdir), Middleware(url, workdir)
    tenant = f"t{uuid.uuid4().hex[:12]}"
    clients = [Api(first.url, tenant), Api(second.url, tenant)]
    try:
        path, uri = receiver.endpoint()
        subscribe(clients[0], uri)
        time.sleep(3)  # the second process picks the subscription up within 2 s
        e = "urn:ngsi-ld:Sensor:alternating"
        create(clients[0], {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 0}})
        for n in range(1, 30):
            patch(clients[n % 2], e, temperature=n)
        assert values(receiver.wait(path, 30, timeout=30)) == list(range(30))
    finally:
        for client in clients:
            client.close()
        second.stop()
        first.stop()
