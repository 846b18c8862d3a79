"""Notifications (clause 5.8.6) end to end: a real middleware process notifying a real HTTP receiver.

Absence of a notification is checked deterministically through the per-subscription order guarantee: after the
change that must not notify, a change that must notify is made, and once its notification arrives every earlier
one of that subscription has arrived too.
"""
from __future__ import annotations

import http.server
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest

from tests.conftest import CORE, PG_ADMIN_DSN, Api, Middleware, _pg, free_port, link

NULL = "urn:ngsi-ld:null"
WAIT = 10.0


# --------------------------------------------------------------------------------------------- the receiver

class Receiver:
    """A real HTTP server recording every request; it can answer 500, hold a path, or be down (closed port)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict] = []
        self.status = 200
        self.held: dict[str, threading.Event] = {}
        self.held_after: dict[str, tuple[int, threading.Event]] = {}  # hold a path's requests after the first n
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        """Listen (again) on the same port."""
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.status
                gate = outer.held.get(self.path)
                record = {"method": self.command, "path": self.path, "status": status,
                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": orjson.loads(raw)}
                with outer.lock:
                    outer.requests.append(record)
                    after, later_gate = outer.held_after.get(self.path, (0, None))
                    if later_gate is not None and sum(r["path"] == self.path for r in outer.requests) > after:
                        gate = later_gate
                if gate is not None:
                    gate.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the port: connections are refused until start()."""
        self.server.shutdown()
        self.server.server_close()

    def endpoint(self) -> tuple[str, str]:
        """A fresh path on this receiver and its URL."""
        path = f"/notify/{uuid.uuid4().hex[:10]}"
        return path, self.url + path

    def got(self, path: str, *, status: int | None = 200) -> list[dict]:
        """Requests received on path (answered with status, or all when None), in arrival order."""
        with self.lock:
            return [r for r in self.requests if r["path"] == path and (status is None or r["status"] == status)]

    def wait(self, path: str, count: int, *, status: int | None = 200, timeout: float = WAIT) -> list[dict]:
        """Poll until at least count requests arrived on path; fail with what did arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.got(path, status=status)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{len(self.got(path, status=status))} of {count} notifications on {path}: "
                             f"{[r['body'] for r in self.got(path, status=None)]}")

    def wait_for(self, path: str, predicate, *, timeout: float = WAIT) -> list[dict]:
        """Poll until some request on path satisfies predicate(body); return all so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.got(path)
            if any(predicate(r["body"]) for r in found):
                return found
            time.sleep(0.02)
        raise AssertionError(f"no matching notification on {path}: {[r['body'] for r in self.got(path, status=None)]}")


@pytest.fixture
def receiver():
    """A fresh HTTP receiver for one test."""
    server = Receiver()
    yield server
    for gate in [*server.held.values(), *(gate for _, gate in server.held_after.values())]:
        gate.set()
    server.stop()


# --------------------------------------------------------------------------------------------- helpers

def entity(entity_id: str, entity_type: str = "Sensor", **attrs) -> dict:
    """An entity whose keyword attributes are Properties."""
    return {"id": entity_id, "type": entity_type, **{k: {"type": "Property", "value": v} for k, v in attrs.items()}}


def subscribe(api: Api, uri: str, *, entities=None, headers=None, **members) -> str:
    """Create a subscription notifying uri (members may override notification, entities); return its id."""
    notification = members.pop("notification", {})
    endpoint = {"uri": uri, **notification.pop("endpoint", {})}
    body = {"type": "Subscription", "entities": entities if entities is not None else [{"type": "Sensor"}],
            "notification": {"endpoint": endpoint, **notification}, **members}
    if body["entities"] is None:
        del body["entities"]
    response = api.post_json("/subscriptions", body, headers=headers or {})
    assert response.status_code == 201, response.text
    return response.headers["Location"].rsplit("/", 1)[1]


def ok(response, *codes) -> None:
    """Assert an API answer's status."""
    assert response.status_code in (codes or (201, 204)), response.text


def create(api: Api, body: dict, **kwargs) -> None:
    """Create an entity."""
    ok(api.post_json("/entities", body, **kwargs), 201)


def patch(api: Api, entity_id: str, **values) -> None:
    """Update attributes' values (PATCH .../attrs)."""
    body = {k: {"type": "Property", "value": v} for k, v in values.items()}
    ok(api.send_json("PATCH", f"/entities/{entity_id}/attrs", body), 204)


def append(api: Api, entity_id: str, **values) -> None:
    """Append attributes (POST .../attrs)."""
    body = {k: {"type": "Property", "value": v} for k, v in values.items()}
    ok(api.post_json(f"/entities/{entity_id}/attrs", body), 204)


def data(request: dict) -> list[dict]:
    """The entities of a received notification."""
    return request["body"]["data"]


def values(requests: list[dict], attr: str = "temperature") -> list:
    """The attr value of the single entity of each notification."""
    out = []
    for request in requests:
        (item,) = data(request)
        shown = item.get(attr)
        out.append(shown["value"] if isinstance(shown, dict) and "value" in shown else shown)
    return out


def subscription(api: Api, sub_id: str) -> dict:
    """GET a subscription."""
    response = api.get(f"/subscriptions/{sub_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_subscription(api: Api, sub_id: str, predicate, timeout: float = WAIT) -> dict:
    """Poll a subscription until predicate(body) holds."""
    deadline = time.monotonic() + timeout
    while True:
        body = subscription(api, sub_id)
        if predicate(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"subscription never reached the expected state: {body}")
        time.sleep(0.05)


def iso_in(seconds: float) -> str:
    """A DateTime seconds from now."""
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------- triggers

def test_every_trigger_and_the_default(api, receiver):
    """Each notificationTrigger fires for its kind of change only; the default is attributeCreated+attributeUpdated."""
    triggers = ["entityCreated", "entityUpdated", "entityDeleted", "attributeCreated", "attributeUpdated",
                "attributeDeleted", None]
    paths = {}
    for trigger in triggers:
        path, uri = receiver.endpoint()
        paths[trigger] = path
        members = {"notificationTrigger": [trigger]} if trigger else {}
        subscribe(api, uri, **members)
    create(api, entity("urn:ngsi-ld:Sensor:flush", humidity=1))  # the entity whose changes close the test
    e = "urn:ngsi-ld:Sensor:e"
    create(api, entity(e, temperature=20))            # entityCreated / attributeCreated
    patch(api, e, temperature=20)                      # same value: no change at all (5.8.6)
    patch(api, e, temperature=21)                      # attributeUpdated
    append(api, e, humidity=50)                        # attributeCreated
    ok(api.delete(f"/entities/{e}/attrs/humidity"))    # attributeDeleted
    ok(api.delete(f"/entities/{e}"))                   # entityDeleted
    # flush: one change of every kind on another entity; each subscription's last notification is about it
    f, g = "urn:ngsi-ld:Sensor:flush", "urn:ngsi-ld:Sensor:g"
    patch(api, f, humidity=2)
    append(api, f, extra=1)
    ok(api.delete(f"/entities/{f}/attrs/extra"))
    ok(api.delete(f"/entities/{f}"))
    create(api, entity(g, temperature=0))
    flush_of = {"entityCreated": g, "entityUpdated": f, "entityDeleted": f, "attributeCreated": g,
                "attributeUpdated": f, "attributeDeleted": f, None: g}
    seen = {}
    for trigger, path in paths.items():
        found = receiver.wait_for(path, lambda body, t=trigger: body["data"][0]["id"] == flush_of[t])
        seen[trigger] = [r["body"]["data"][0] for r in found if r["body"]["data"][0]["id"] == e]
    for trigger in triggers:
        assert all(len(r["body"]["data"]) == 1 for r in receiver.got(paths[trigger]))
    temp = lambda item: item.get("temperature", {}).get("value")  # noqa: E731
    assert [temp(i) for i in seen["entityCreated"]] == [20]
    assert [temp(i) for i in seen["attributeCreated"]] == [20, 21]
    assert "humidity" in seen["attributeCreated"][1]
    assert [temp(i) for i in seen["attributeUpdated"]] == [21]
    assert [temp(i) for i in seen[None]] == [20, 21, 21]
    # attributeDeleted: the attribute deleted, then the entity's deletion, which deletes its remaining attribute
    removed, entity_gone = seen["attributeDeleted"]
    assert removed["humidity"] == {"type": "Property", "value": NULL}
    assert set(entity_gone) == {"id", "type", "deletedAt", "temperature"}
    assert entity_gone["temperature"] == {"type": "Property", "value": NULL}
    # entityUpdated is attributeCreated + attributeUpdated + attributeDeleted (5.2.12), so creation counts too
    assert [temp(i) for i in seen["entityUpdated"]] == [20, 21, 21, 21] and seen["entityUpdated"][3]["humidity"]["value"] == NULL
    (deleted,) = seen["entityDeleted"]
    assert set(deleted) == {"id", "type", "deletedAt"} and deleted["type"] == "Sensor"


def test_deleted_attributes_are_typed_in_normalized_and_bare_in_key_values(api, receiver):
    """5.2.1: a deleted attribute is urn:ngsi-ld:null as Property value / Relationship object ({"@none": ...} for a
    LanguageProperty), inside the attribute's normalized object; keyValues and concise show the bare null."""
    paths = {}
    for fmt in ("normalized", "keyValues", "concise"):
        paths[fmt], uri = receiver.endpoint()
        subscribe(api, uri, notificationTrigger=["attributeDeleted"], notification={"format": fmt})
    e = "urn:ngsi-ld:Sensor:del"
    create(api, {**entity(e, temperature=1), "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1"},
                 "label": {"type": "LanguageProperty", "languageMap": {"en": "x"}}})
    for name in ("temperature", "owner", "label"):
        ok(api.delete(f"/entities/{e}/attrs/{name}"))
    shown = {fmt: [data(r)[0] for r in receiver.wait(path, 3)] for fmt, path in paths.items()}
    assert [item[name] for item, name in zip(shown["normalized"], ("temperature", "owner", "label"))] == [
        {"type": "Property", "value": NULL}, {"type": "Relationship", "object": NULL},
        {"type": "LanguageProperty", "languageMap": {"@none": NULL}}]
    assert [item[name] for item, name in zip(shown["keyValues"], ("temperature", "owner", "label"))] == [
        NULL, NULL, {"@none": NULL}]
    assert [item[name] for item, name in zip(shown["concise"], ("temperature", "owner", "label"))] == [NULL] * 3


def test_entity_deletion_deletes_its_attributes(api, receiver):
    """Deleting an entity deletes its attributes: attributeDeleted fires for a watched one (shown as deleted), and
    entityDeleted with showChanges lists every attribute with its previous value; plain entityDeleted stays bare."""
    watched_path, watched_uri = receiver.endpoint()
    subscribe(api, watched_uri, watchedAttributes=["temperature"], notificationTrigger=["attributeDeleted"])
    changes_path, changes_uri = receiver.endpoint()
    subscribe(api, changes_uri, notificationTrigger=["entityDeleted"], notification={"showChanges": True})
    plain_path, plain_uri = receiver.endpoint()
    subscribe(api, plain_uri, notificationTrigger=["entityDeleted"])
    e = "urn:ngsi-ld:Sensor:gone"
    create(api, {**entity(e, temperature=1, humidity=2), "owner": {"type": "Relationship", "object": "urn:ngsi-ld:P:1"}})
    ok(api.delete(f"/entities/{e}"))
    (watched,) = receiver.wait(watched_path, 1)
    assert set(data(watched)[0]) == {"id", "type", "deletedAt", "temperature"}
    assert data(watched)[0]["temperature"] == {"type": "Property", "value": NULL}
    (changes,) = receiver.wait(changes_path, 1)
    item = data(changes)[0]
    assert item["id"] == e and item["type"] == "Sensor" and "deletedAt" in item
    assert item["temperature"] == {"type": "Property", "value": NULL, "previousValue": 1}
    assert item["humidity"] == {"type": "Property", "value": NULL, "previousValue": 2}
    assert item["owner"] == {"type": "Relationship", "object": NULL, "previousObject": "urn:ngsi-ld:P:1"}
    (plain,) = receiver.wait(plain_path, 1)
    assert set(data(plain)[0]) == {"id", "type", "deletedAt"}


def test_watched_attributes(api, receiver):
    """With watchedAttributes only changes of those attributes notify; the whole entity is sent."""
    path, uri = receiver.endpoint()
    subscribe(api, uri, entities=None, watchedAttributes=["temperature"])
    e = "urn:ngsi-ld:Sensor:w"
    create(api, entity(e, temperature=1, humidity=1))
    patch(api, e, humidity=2)
    patch(api, e, temperature=2)
    found = receiver.wait(path, 2)
    assert [(i["temperature"]["value"], i["humidity"]["value"]) for r in found for i in data(r)] == [(1, 1), (2, 2)]


def test_q_and_geoq_filters(api, receiver):
    """q and geoQ are evaluated on the changed entity: only matching changes notify."""
    q_path, q_uri = receiver.endpoint()
    subscribe(api, q_uri, q="temperature>30")
    geo_path, geo_uri = receiver.endpoint()
    subscribe(api, geo_uri, geoQ={"geometry": "Point", "coordinates": [2.35, 48.85], "georel": "near;maxDistance==2000"})
    e = "urn:ngsi-ld:Sensor:q"
    far = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [4.83, 45.76]}}
    near = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.351, 48.851]}}
    create(api, {**entity(e, temperature=10), "location": far})
    patch(api, e, temperature=35)
    ok(api.send_json("PATCH", f"/entities/{e}/attrs", {"location": near}), 204)
    patch(api, e, temperature=12)
    assert values(receiver.wait(q_path, 2)) == [35, 35]  # the location change while hot, then nothing at 12
    assert values(receiver.wait(geo_path, 2)) == [35, 12]
    patch(api, e, temperature=40)
    assert values(receiver.wait(q_path, 3))[2] == 40
    assert len(receiver.got(q_path)) == 3 and values(receiver.wait(geo_path, 3))[2] == 40


def test_entity_selectors_by_id_pattern_and_type(api, receiver):
    """Entity selectors: id, idPattern and type select exactly their entities."""
    paths = {}
    for name, selector in (("id", {"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor"}),
                           ("pattern", {"idPattern": "^urn:ngsi-ld:Sensor:2$", "type": "Sensor"}),
                           ("type", {"type": "Sensor"}), ("other", {"type": "Other"})):
        paths[name], uri = receiver.endpoint()
        subscribe(api, uri, entities=[selector])
    create(api, entity("urn:ngsi-ld:Other:1", "Other", temperature=1))
    create(api, entity("urn:ngsi-ld:Sensor:1", temperature=1))
    create(api, entity("urn:ngsi-ld:Sensor:2", temperature=1))
    batch = [entity(i, t, temperature=2) for i, t in
             (("urn:ngsi-ld:Other:1", "Other"), ("urn:ngsi-ld:Sensor:1", "Sensor"), ("urn:ngsi-ld:Sensor:2", "Sensor"))]
    ok(api.post_json("/entityOperations/upsert", batch, params={"options": "update"}), 201, 204)
    expected = {"id": {"urn:ngsi-ld:Sensor:1"}, "pattern": {"urn:ngsi-ld:Sensor:2"},
                "type": {"urn:ngsi-ld:Sensor:1", "urn:ngsi-ld:Sensor:2"}, "other": {"urn:ngsi-ld:Other:1"}}
    for name, ids in expected.items():
        found = receiver.wait_for(paths[name], lambda body: body["data"][0]["temperature"]["value"] == 2)
        assert {i["id"] for r in found for i in data(r)} == ids
        assert {i["id"] for i in data(found[-1])} == ids  # the batch: one notification with all its entities


def test_entity_type_selection_in_selectors(api, receiver):
    """5.2.33 / 4.17: an entity selector's type is a type selection: (A|B) and A,B mean either, A;B both."""
    paths = {}
    for name, selection in (("bar", "(Building|Tower)"), ("comma", "Building,Tower"), ("and", "Building;Tower")):
        paths[name], uri = receiver.endpoint()
        subscribe(api, uri, entities=[{"type": selection}], notificationTrigger=["entityCreated"])
    create(api, entity("urn:ngsi-ld:Hall:1", "Hall", temperature=1))
    create(api, entity("urn:ngsi-ld:Building:1", "Building", temperature=1))
    create(api, entity("urn:ngsi-ld:Tower:1", "Tower", temperature=1))
    create(api, {**entity("urn:ngsi-ld:BT:1", temperature=1), "type": ["Building", "Tower"]})
    both = ["urn:ngsi-ld:Building:1", "urn:ngsi-ld:Tower:1", "urn:ngsi-ld:BT:1"]
    for name in ("bar", "comma"):
        assert [data(r)[0]["id"] for r in receiver.wait(paths[name], 3)] == both, name
    assert [data(r)[0]["id"] for r in receiver.wait(paths["and"], 1)] == ["urn:ngsi-ld:BT:1"]


def test_scope_q_filters_notifications_and_periodic_ones(api, receiver):
    """5.2.12 scopeQ (4.19): only entities in scope are notified, on change and periodically."""
    path, uri = receiver.endpoint()
    subscribe(api, uri, entities=[{"type": "Shop"}], scopeQ="/Madrid/#", notificationTrigger=["entityCreated"])
    create(api, {**entity("urn:ngsi-ld:Shop:berlin", "Shop", temperature=1), "scope": "/Berlin"})
    create(api, {**entity("urn:ngsi-ld:Shop:madrid", "Shop", temperature=1), "scope": "/Madrid/Centro"})
    assert [data(r)[0]["id"] for r in receiver.wait(path, 1)] == ["urn:ngsi-ld:Shop:madrid"]
    periodic_path, periodic_uri = receiver.endpoint()
    subscribe(api, periodic_uri, entities=[{"type": "Shop"}], scopeQ="/Madrid/#", timeInterval=1)
    assert [i["id"] for i in data(receiver.wait(periodic_path, 1)[0])] == ["urn:ngsi-ld:Shop:madrid"]


def test_dataset_id_selects_the_instances_notified(api, receiver):
    """4.5.5 / 5.2.12 datasetId: only changes of those attribute instances notify, and only they are shown."""
    french = "urn:ngsi-ld:Dataset:french-name"
    path, uri = receiver.endpoint()
    subscribe(api, uri, datasetId=[french])
    e = "urn:ngsi-ld:Sensor:ds"
    create(api, {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 1},
                 "name": [{"type": "Property", "value": "house"},
                          {"type": "Property", "value": "maison", "datasetId": french}]})
    patch(api, e, temperature=2)  # the default instance of another attribute: not notified
    ok(api.send_json("PATCH", f"/entities/{e}/attrs",
                     {"name": {"type": "Property", "value": "logis", "datasetId": french}}), 204)
    first, second = receiver.wait(path, 2)
    assert data(first) == [{"id": e, "type": "Sensor",
                            "name": {"type": "Property", "value": "maison", "datasetId": french}}]
    assert data(second)[0]["name"]["value"] == "logis" and "temperature" not in data(second)[0]
    assert len(receiver.got(path, status=None)) == 2


def test_pick_and_omit_shape_the_notified_entities(api, receiver):
    """4.21 notification.pick / omit: only the members picked, or all but the members omitted."""
    pick_path, pick_uri = receiver.endpoint()
    subscribe(api, pick_uri, notification={"pick": ["id", "temperature"]})
    omit_path, omit_uri = receiver.endpoint()
    subscribe(api, omit_uri, notification={"omit": ["humidity"]})
    e = "urn:ngsi-ld:Sensor:po"
    create(api, entity(e, temperature=1, humidity=2))
    assert data(receiver.wait(pick_path, 1)[0]) == [{"id": e, "temperature": {"type": "Property", "value": 1}}]
    assert data(receiver.wait(omit_path, 1)[0]) == [{"id": e, "type": "Sensor",
                                                     "temperature": {"type": "Property", "value": 1}}]


# --------------------------------------------------------------------------------------------- payload

def test_notification_attributes_and_formats(api, receiver):
    """notification.attributes restricts the payload; each format equals the GET rendering in that format."""
    e = "urn:ngsi-ld:Sensor:f"
    paths = {}
    for fmt in ("normalized", "keyValues", "concise"):
        paths[fmt], uri = receiver.endpoint()
        subscribe(api, uri, notification={"format": fmt})
    attrs_path, attrs_uri = receiver.endpoint()
    subscribe(api, attrs_uri, notification={"attributes": ["temperature"]})
    body = {**entity(e, temperature=21, humidity=40),
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1"},
            "name": {"type": "Property", "value": "x", "unitCode": "C"}}
    create(api, body)
    for fmt, path in paths.items():
        (item,) = data(receiver.wait(path, 1)[0])
        assert item == api.get(f"/entities/{e}", params={"format": fmt}).json()
    (item,) = data(receiver.wait(attrs_path, 1)[0])
    assert item == {"id": e, "type": "Sensor", "temperature": {"type": "Property", "value": 21}}


def test_show_changes_and_sys_attrs(api, receiver):
    """showChanges adds previousValue/previousObject (also in concise); sysAttrs adds createdAt/modifiedAt."""
    e = "urn:ngsi-ld:Sensor:c"
    norm_path, norm_uri = receiver.endpoint()
    subscribe(api, norm_uri, notification={"showChanges": True}, notificationTrigger=["entityUpdated"])
    concise_path, concise_uri = receiver.endpoint()
    subscribe(api, concise_uri, notification={"showChanges": True, "format": "concise"})
    sys_path, sys_uri = receiver.endpoint()
    subscribe(api, sys_uri, notification={"sysAttrs": True}, notificationTrigger=["entityUpdated", "entityDeleted"])
    create(api, {**entity(e, temperature=20), "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1"}})
    ok(api.send_json("PATCH", f"/entities/{e}/attrs", {
        "temperature": {"type": "Property", "value": 25},
        "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:2"}}), 204)
    ok(api.delete(f"/entities/{e}/attrs/temperature"))
    ok(api.delete(f"/entities/{e}"))
    _, updated, deleted_attr = (data(r)[0] for r in receiver.wait(norm_path, 3)[:3])  # creation, update, deletion
    assert updated["temperature"] == {"type": "Property", "value": 25, "previousValue": 20}
    assert updated["owner"] == {"type": "Relationship", "object": "urn:ngsi-ld:Person:2",
                                "previousObject": "urn:ngsi-ld:Person:1"}
    assert deleted_attr["temperature"]["value"] == NULL and deleted_attr["temperature"]["previousValue"] == 25
    concise = data(receiver.wait(concise_path, 2)[1])[0]
    assert concise["temperature"] == {"value": 25, "previousValue": 20}
    sys_update, sys_attr_deleted, sys_deleted = (data(r)[0] for r in receiver.wait(sys_path, 4)[1:4])
    assert {"createdAt", "modifiedAt"} <= set(sys_update) and {"createdAt", "modifiedAt"} <= set(sys_update["temperature"])
    assert sys_attr_deleted["temperature"]["value"] == NULL and "deletedAt" in sys_attr_deleted["temperature"]
    assert set(sys_deleted) == {"id", "type", "deletedAt", "createdAt", "modifiedAt"}


def test_accept_json_gets_link_header_and_ld_json_gets_context_in_each_item(api, receiver):
    """application/json: Link header to the @context; application/ld+json: @context in each data item, no Link."""
    json_path, json_uri = receiver.endpoint()
    subscribe(api, json_uri)
    ld_path, ld_uri = receiver.endpoint()
    subscribe(api, ld_uri, notification={"endpoint": {"accept": "application/ld+json"}})
    ok(api.post_json("/entityOperations/create", [entity("urn:ngsi-ld:Sensor:a", temperature=1),
                                                  entity("urn:ngsi-ld:Sensor:b", temperature=1)]), 201)
    (plain,) = receiver.wait(json_path, 1)
    assert plain["method"] == "POST" and plain["headers"]["content-type"] == "application/json"
    assert plain["headers"]["link"] == link(CORE)["Link"]
    body = plain["body"]
    assert body["type"] == "Notification" and body["id"].startswith("urn:") and "notifiedAt" in body
    assert len(body["data"]) == 2 and all("@context" not in item for item in body["data"]) and "@context" not in body
    (ld,) = receiver.wait(ld_path, 1)
    assert ld["headers"]["content-type"] == "application/ld+json" and "link" not in ld["headers"]
    assert [item["@context"] for item in data(ld)] == [CORE, CORE]


def test_user_context_compacts_notifications(api, receiver, context_server):
    """A subscription made with a user @context gets its notifications compacted with it (and linked to it)."""
    ctx_url = context_server.publish(f"/ctx/{uuid.uuid4().hex}.jsonld", {
        "temp": "https://example.org/ns#temperature", "Thermo": "https://example.org/ns#Thermometer"})
    json_path, json_uri = receiver.endpoint()
    subscribe(api, json_uri, entities=[{"type": "Thermo"}], watchedAttributes=["temp"], headers=link(ctx_url))
    ld_path, ld_uri = receiver.endpoint()
    subscribe(api, ld_uri, entities=[{"type": "Thermo"}], headers=link(ctx_url),
              notification={"endpoint": {"accept": "application/ld+json"}})
    create(api, {"id": "urn:ngsi-ld:Thermometer:1", "type": "https://example.org/ns#Thermometer",
                 "https://example.org/ns#temperature": {"type": "Property", "value": 7}})
    (plain,) = receiver.wait(json_path, 1)
    assert plain["headers"]["link"] == link(ctx_url)["Link"]
    assert data(plain) == [{"id": "urn:ngsi-ld:Thermometer:1", "type": "Thermo", "temp": {"type": "Property", "value": 7}}]
    (ld,) = receiver.wait(ld_path, 1)
    assert data(ld)[0]["@context"] == ctx_url and data(ld)[0]["temp"]["value"] == 7


def test_json_notification_links_the_context_it_was_compacted_with(api, receiver, context_server):
    """application/json: the Link names the context the data was compacted with, also for an @context array
    (6.3.5, 5.2.12 jsonldContext); a context no single URL names compacts with (and links) the core context."""
    ns = "https://example.org/arr#"
    terms = {"temp": ns + "temperature", "Thermo": ns + "Thermometer"}
    ctx_url = context_server.publish(f"/ctx/{uuid.uuid4().hex}.jsonld", terms)
    other_url = context_server.publish(f"/ctx/{uuid.uuid4().hex}.jsonld", {"hum": ns + "humidity"})
    contexts = {"array": [ctx_url], "with-core": [CORE, ctx_url], "inline": terms, "two-urls": [ctx_url, other_url]}
    paths = {}
    for name, context in contexts.items():
        paths[name], uri = receiver.endpoint()
        body = {"type": "Subscription", "entities": [{"type": "Thermo"}], "notification": {"endpoint": {"uri": uri}},
                "@context": context}
        ok(api.send_json("POST", "/subscriptions", body, content_type="application/ld+json"), 201)
    create(api, {"id": "urn:ngsi-ld:Thermometer:arr", "type": ns + "Thermometer",
                 ns + "temperature": {"type": "Property", "value": 7}})
    for name in ("array", "with-core"):
        (plain,) = receiver.wait(paths[name], 1)
        assert plain["headers"]["link"] == link(ctx_url)["Link"], name
        assert data(plain) == [{"id": "urn:ngsi-ld:Thermometer:arr", "type": "Thermo",
                                "temp": {"type": "Property", "value": 7}}], name
    for name in ("inline", "two-urls"):
        (plain,) = receiver.wait(paths[name], 1)
        assert plain["headers"]["link"] == link(CORE)["Link"], name
        assert data(plain) == [{"id": "urn:ngsi-ld:Thermometer:arr", "type": ns + "Thermometer",
                                ns + "temperature": {"type": "Property", "value": 7}}], name


def test_patched_q_is_expanded_with_the_patch_context(api, receiver, context_server):
    """5.8.2: names in an update are expanded with the update's @context, q included (not the creation one)."""
    ns = "https://example.org/pq#"
    ctx_url = context_server.publish(f"/ctx/{uuid.uuid4().hex}.jsonld", {"aql": ns + "airQualityLevel"})
    path, uri = receiver.endpoint()
    sub_id = subscribe(api, uri, entities=[{"type": "Building"}])  # the core context
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"q": "aql>3"}, headers=link(ctx_url)), 204)
    assert api.get(f"/subscriptions/{sub_id}", headers=link(ctx_url)).json()["q"] == "aql>3"
    e = "urn:ngsi-ld:Building:pq"
    create(api, {"id": e, "type": "Building", ns + "airQualityLevel": {"type": "Property", "value": 1}})
    ok(api.send_json("PATCH", f"/entities/{e}/attrs", {ns + "airQualityLevel": {"type": "Property", "value": 9}}), 204)
    assert values(receiver.wait(path, 1), ns + "airQualityLevel") == [9]


def test_receiver_info_headers_and_tenant(api, receiver):
    """receiverInfo pairs become HTTP headers; the tenant is sent as NGSILD-Tenant."""
    path, uri = receiver.endpoint()
    subscribe(api, uri, notification={"endpoint": {"receiverInfo": [{"key": "Authorization", "value": "Bearer abc"},
                                                                    {"key": "X-Site", "value": "north"}]}})
    create(api, entity("urn:ngsi-ld:Sensor:r", temperature=1))
    (request,) = receiver.wait(path, 1)
    headers = request["headers"]
    assert headers["authorization"] == "Bearer abc" and headers["x-site"] == "north"
    assert headers["ngsild-tenant"] == api.tenant


# --------------------------------------------------------------------------------------------- timing members

def test_throttling_discards_changes_within_the_window(api, receiver):
    """With throttling, a change within the window after a notification is not notified (discarded, not delayed)."""
    path, uri = receiver.endpoint()
    sub_id = subscribe(api, uri, throttling=600)
    e = "urn:ngsi-ld:Sensor:t"
    create(api, entity(e, temperature=1))
    patch(api, e, temperature=2)  # within the window
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"throttling": None}), 204)
    patch(api, e, temperature=3)
    assert values(receiver.wait(path, 2)) == [1, 3]


def test_time_interval_sends_current_state_periodically(api, receiver):
    """timeInterval: notifications keep coming without changes, each with the entity's current state."""
    e = "urn:ngsi-ld:Sensor:p"
    create(api, entity(e, temperature=1))
    path, uri = receiver.endpoint()
    sub_id = subscribe(api, uri, entities=[{"id": e, "type": "Sensor"}], timeInterval=1)
    assert values(receiver.wait(path, 2))[:2] == [1, 1]
    patch(api, e, temperature=2)
    receiver.wait_for(path, lambda body: body["data"][0]["temperature"]["value"] == 2)
    ok(api.delete(f"/subscriptions/{sub_id}"))


def test_expires_at_stops_notifications(api, receiver):
    """Once expiresAt passes, the status is expired and changes are not notified."""
    path, uri = receiver.endpoint()
    sub_id = subscribe(api, uri, expiresAt=iso_in(2))
    e = "urn:ngsi-ld:Sensor:x"
    create(api, entity(e, temperature=1))
    receiver.wait(path, 1)
    wait_subscription(api, sub_id, lambda body: body["status"] == "expired")
    patch(api, e, temperature=2)
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"expiresAt": iso_in(600)}), 204)
    assert subscription(api, sub_id)["status"] == "active"
    patch(api, e, temperature=3)
    assert values(receiver.wait(path, 2)) == [1, 3]


def test_is_active_false_pauses_and_true_resumes(api, receiver):
    """isActive false: status paused and nothing sent; isActive true: active and notifying again."""
    path, uri = receiver.endpoint()
    sub_id = subscribe(api, uri)
    e = "urn:ngsi-ld:Sensor:i"
    create(api, entity(e, temperature=1))
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"isActive": False}), 204)
    assert subscription(api, sub_id)["status"] == "paused"
    patch(api, e, temperature=2)
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"isActive": True}), 204)
    assert subscription(api, sub_id)["status"] == "active"
    patch(api, e, temperature=3)
    assert values(receiver.wait(path, 2)) == [1, 3]
    status = wait_subscription(api, sub_id, lambda body: body["notification"]["timesSent"] == 2)["notification"]
    assert status["status"] == "ok" and "lastSuccess" in status and "lastNotification" in status
    assert "lastFailure" not in status and status["timesFailed"] == 0


def test_slow_endpoint_delays_neither_other_subscriptions_nor_writes(api, receiver):
    """While one endpoint holds its notification, writes succeed and another subscription gets everything."""
    slow_path, slow_uri = receiver.endpoint()
    receiver.held[slow_path] = gate = threading.Event()
    subscribe(api, slow_uri)
    fast_path, fast_uri = receiver.endpoint()
    subscribe(api, fast_uri)
    e = "urn:ngsi-ld:Sensor:s"
    create(api, entity(e, temperature=0))
    receiver.wait(slow_path, 1, status=None)  # the slow endpoint is now holding its first notification
    for n in range(1, 6):
        patch(api, e, temperature=n)
    assert values(receiver.wait(fast_path, 6)) == [0, 1, 2, 3, 4, 5]
    assert not gate.is_set() and len(receiver.got(slow_path, status=None)) == 1
    gate.set()
    assert values(receiver.wait(slow_path, 6)) == [0, 1, 2, 3, 4, 5]


def _entity_values(requests: list[dict]) -> list[list[tuple[str, object]]]:
    """(entity id, temperature) of each entity of each notification."""
    return [[(item["id"], item["temperature"]["value"]) for item in data(r)] for r in requests]


def _joined_counts(api: Api) -> dict[str, float]:
    """citybridge_notifications_joined_total by unit (rows, notifications) from /metrics."""
    metrics = httpx.get(str(api.base_url).split("/ngsi-ld")[0] + "/metrics", timeout=10).text
    counts = {"rows": 0.0, "notifications": 0.0}
    counts.update({line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("citybridge_notifications_joined_total{")})
    return counts


def _pile_up(api: Api, receiver: Receiver, ids: list[str], first_value=0) -> tuple[str, str, threading.Event]:
    """Subscribe to Sensors, change ids[0] and hold its notification; the caller queues more behind it."""
    path, uri = receiver.endpoint()
    receiver.held[path] = gate = threading.Event()
    sub_id = subscribe(api, uri)
    patch(api, ids[0], temperature=first_value)
    receiver.wait(path, 1, status=None)
    return path, sub_id, gate


def _release(receiver: Receiver, path: str, gate: threading.Event) -> None:
    del receiver.held[path]
    gate.set()


def test_notifications_piled_up_behind_a_slow_endpoint_are_joined_in_order(api, receiver):
    """A backlog of changes of distinct entities goes out as one notification; an entity never twice in one."""
    ids = [f"urn:ngsi-ld:Sensor:j{n}" for n in range(15)]
    for e in ids:
        create(api, entity(e, temperature=-1))
    before = _joined_counts(api)
    path, sub_id, gate = _pile_up(api, receiver, ids)
    for n, e in enumerate(ids[1:], start=1):
        patch(api, e, temperature=n)
    patch(api, ids[1], temperature=100)
    _release(receiver, path, gate)
    delivered = receiver.wait_for(path, lambda body: body["data"][0]["temperature"]["value"] == 100)
    assert _entity_values(delivered) == [[(ids[0], 0)], [(e, n) for n, e in enumerate(ids) if n], [(ids[1], 100)]]
    assert len({r["body"]["id"] for r in delivered}) == 3
    wait_subscription(api, sub_id, lambda b: b["notification"].get("timesSent") == 3)
    # the delivery process reports its counts to /metrics every 20 ms
    deadline = time.monotonic() + 2
    while (after := _joined_counts(api))["rows"] - before["rows"] < 14 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (after["rows"] - before["rows"], after["notifications"] - before["notifications"]) == (14, 1)


def test_a_short_queue_is_not_joined(api, receiver):
    """Fewer queued notifications than the backlog threshold (10) are sent one by one."""
    ids = [f"urn:ngsi-ld:Sensor:short{n}" for n in range(9)]
    for e in ids:
        create(api, entity(e, temperature=-1))
    path, _sub_id, gate = _pile_up(api, receiver, ids)
    for n, e in enumerate(ids[1:], start=1):
        patch(api, e, temperature=n)
    _release(receiver, path, gate)
    assert _entity_values(receiver.wait(path, 9)) == [[(e, n)] for n, e in enumerate(ids)]


def test_rows_queued_before_a_subscription_change_are_not_joined_with_later_ones(api, receiver):
    """Rows rendered before the subscription's notification settings changed keep their own notification."""
    ids = [f"urn:ngsi-ld:Sensor:fmt{n}" for n in range(25)]
    for e in ids:
        create(api, entity(e, temperature=-1))
    path, sub_id, gate = _pile_up(api, receiver, ids)
    for n, e in enumerate(ids[1:12], start=1):
        patch(api, e, temperature=n)
    ok(api.send_json("PATCH", f"/subscriptions/{sub_id}", {"notification": {"format": "keyValues", "endpoint": {"uri": receiver.url + path}}}), 204)
    time.sleep(2.5)  # the middleware reloads changed subscriptions every 2 s
    for n, e in enumerate(ids[12:], start=12):
        patch(api, e, temperature=n)
    _release(receiver, path, gate)
    delivered = receiver.wait(path, 1 + 11 + 13)
    shown = [[(item["id"], item["temperature"]["value"] if isinstance(item["temperature"], dict)
               else item["temperature"]) for item in data(r)] for r in delivered]
    assert shown == [[(e, n)] for n, e in enumerate(ids)]  # none joined: the change was less than 5 s ago
    assert all(isinstance(data(r)[0]["temperature"], dict) for r in delivered[:12])
    assert all(not isinstance(data(r)[0]["temperature"], dict) for r in delivered[12:])


# --------------------------------------------------------------------------------------------- failures

@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_url(request, tmp_path_factory):
    """A fresh store of each kind for the tests that run their own middleware."""
    workdir = tmp_path_factory.mktemp(f"notify-{request.param}")
    if request.param == "sqlite":
        return f"sqlite:///{workdir}/store.db", workdir
    return request.getfixturevalue("pg_database"), workdir


@pytest.fixture(scope="module")
def resilient(store_url):
    """A middleware retrying quickly (backoff at most 1 s) with the default retry budget."""
    url, workdir = store_url
    server = Middleware(url, workdir, CITYBRIDGE_NOTIFY_BACKOFF_MAX="1", CITYBRIDGE_NOTIFY_TIMEOUT="2")
    yield server
    server.stop()


@pytest.fixture
def own_api(resilient):
    """A client of the resilient middleware on a fresh tenant."""
    client = Api(resilient.url, f"t{uuid.uuid4().hex[:12]}")
    yield client
    client.close()


def test_endpoint_answering_500_then_ok_gets_everything_in_order(own_api, receiver):
    """Failed deliveries are retried with the same notification id; later ones wait, so order is kept."""
    receiver.status = 500
    path, uri = receiver.endpoint()
    sub_id = subscribe(own_api, uri)
    e = "urn:ngsi-ld:Sensor:500"
    create(own_api, entity(e, temperature=0))
    for n in range(1, 4):
        patch(own_api, e, temperature=n)
    failed = receiver.wait(path, 2, status=500)
    status = wait_subscription(own_api, sub_id, lambda b: b["notification"].get("status") == "failed")["notification"]
    assert "lastFailure" in status and status["timesFailed"] >= 1 and "lastSuccess" not in status
    receiver.status = 200
    delivered = receiver.wait(path, 4)
    assert values(delivered) == [0, 1, 2, 3]
    ids = [r["body"]["id"] for r in delivered]
    assert len(set(ids)) == 4 and {r["body"]["id"] for r in failed} == {ids[0]}
    status = wait_subscription(own_api, sub_id, lambda b: b["notification"].get("status") == "ok")["notification"]
    assert "lastSuccess" in status and "lastFailure" in status and status["timesSent"] >= 4 + len(failed)


def test_endpoint_cooldown_spaces_the_retries(own_api, receiver):
    """5.2.15 cooldown: after a failure, no attempt to the endpoint before cooldown ms have passed."""
    receiver.status = 500
    path, uri = receiver.endpoint()
    subscribe(own_api, uri, notification={"endpoint": {"cooldown": 2500}})
    create(own_api, entity("urn:ngsi-ld:Sensor:cool", temperature=1))
    receiver.wait(path, 1, status=500)
    failed_at = time.monotonic()
    time.sleep(1.5)  # without the cooldown the backoff (0.25 to 0.5 s, then 0.5 to 1 s) would retry meanwhile
    assert len(receiver.got(path, status=None)) == 1
    receiver.status = 200
    assert values(receiver.wait(path, 1)) == [1]
    assert time.monotonic() - failed_at >= 2.4 and len(receiver.got(path, status=None)) == 2


def test_a_joined_notification_is_retried_under_its_own_id(own_api, receiver):
    """The joined notification is stored before it is sent: every retry carries the same id and entities, and
    rows queued meanwhile are neither joined with it nor sent before it."""
    ids = [f"urn:ngsi-ld:Sensor:rj{n}" for n in range(15)]
    path, uri = receiver.endpoint()
    receiver.held[path] = gate = threading.Event()
    subscribe(own_api, uri)
    create(own_api, entity(ids[0], temperature=0))
    receiver.wait(path, 1, status=None)
    for n, e in enumerate(ids[1:12], start=1):
        create(own_api, entity(e, temperature=n))
    receiver.status = 500
    _release(receiver, path, gate)
    receiver.wait(path, 2, status=500)
    for n, e in enumerate(ids[12:], start=12):
        create(own_api, entity(e, temperature=n))
    failed = receiver.wait(path, 3, status=500)
    receiver.status = 200
    delivered = receiver.wait(path, 5)
    assert _entity_values(delivered) == [[(ids[0], 0)], [(e, n) for n, e in enumerate(ids[:12]) if n],
                                         *[[(e, n)] for n, e in enumerate(ids) if n >= 12]]
    assert {r["body"]["id"] for r in failed} == {delivered[1]["body"]["id"]}
    assert all(r["body"] == delivered[1]["body"] for r in failed)


def test_endpoint_down_then_up_gets_everything_in_order(own_api, receiver):
    """A closed port is a failure; once the endpoint listens again every notification arrives, in order."""
    receiver.stop()
    path, uri = receiver.endpoint()
    sub_id = subscribe(own_api, uri)
    e = "urn:ngsi-ld:Sensor:down"
    create(own_api, entity(e, temperature=0))
    for n in range(1, 4):
        patch(own_api, e, temperature=n)
    wait_subscription(own_api, sub_id, lambda b: b["notification"].get("timesFailed", 0) >= 2)
    receiver.start()
    assert values(receiver.wait(path, 4)) == [0, 1, 2, 3]


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_store(request, tmp_path):
    """A store of each kind that no other middleware process uses."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db", tmp_path
        return
    name = f"citybridge_test_{uuid.uuid4().hex[:10]}"
    _pg(f"CREATE DATABASE {name}")
    yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}", tmp_path
    _pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_retry_budget_exhausted_counts_failures(fresh_store, receiver):
    """After CITYBRIDGE_NOTIFY_MAX_ATTEMPTS failed attempts a notification is dropped: timesFailed, status failed."""
    url, workdir = fresh_store
    server = Middleware(url, workdir, CITYBRIDGE_NOTIFY_BACKOFF_MAX="0.2", CITYBRIDGE_NOTIFY_MAX_ATTEMPTS="2")
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    try:
        receiver.status = 500
        path, uri = receiver.endpoint()
        sub_id = subscribe(client, uri)
        e = "urn:ngsi-ld:Sensor:budget"
        create(client, entity(e, temperature=0))
        patch(client, e, temperature=1)
        attempts = receiver.wait(path, 4, status=500)
        assert [r["body"]["id"] for r in attempts[:4]] == [attempts[0]["body"]["id"]] * 2 + [attempts[2]["body"]["id"]] * 2
        status = wait_subscription(client, sub_id, lambda b: b["notification"]["timesFailed"] == 4)["notification"]
        assert status["status"] == "failed" and "lastFailure" in status
        receiver.status = 200
        patch(client, e, temperature=2)
        (delivered,) = receiver.wait(path, 1)
        assert values([delivered]) == [2]  # the dropped ones are not sent again
        assert len(receiver.got(path, status=500)) == 4
    finally:
        client.close()
        server.stop()


def test_killed_middleware_delivers_pending_notifications_after_restart(fresh_store, receiver):
    """SIGKILL with notifications pending; restarted on the same store, all arrive in order with the same ids."""
    url, workdir = fresh_store
    env = {"CITYBRIDGE_NOTIFY_BACKOFF_MAX": "0.5"}
    server = Middleware(url, workdir, **env)
    tenant = f"t{uuid.uuid4().hex[:12]}"
    client = Api(server.url, tenant)
    receiver.status = 500
    path, uri = receiver.endpoint()
    subscribe(client, uri)
    e = "urn:ngsi-ld:Sensor:kill"
    create(client, entity(e, temperature=0))
    for n in range(1, 4):
        patch(client, e, temperature=n)
    first_attempts = receiver.wait(path, 1, status=500)
    client.close()
    server.kill()
    receiver.status = 200
    server = Middleware(url, workdir, **env)
    try:
        delivered = receiver.wait(path, 4, timeout=40)  # the dead process's delivery lease must run out first
        assert values(delivered) == [0, 1, 2, 3]
        ids = [r["body"]["id"] for r in delivered]
        assert len(set(ids)) == 4 and first_attempts[0]["body"]["id"] == ids[0]
    finally:
        server.stop()


def test_notifications_pending_at_a_restart_are_not_joined(fresh_store, receiver):
    """Rows queued before a restart may have been sent by the dead process: each goes again under its own id.

    120 rows: more than one delivery read takes, so the first read after the restart does not see them all."""
    url, workdir = fresh_store
    env = {"CITYBRIDGE_NOTIFY_BACKOFF_MAX": "0.5"}
    server = Middleware(url, workdir, **env)
    client = Api(server.url, f"t{uuid.uuid4().hex[:12]}")
    path, uri = receiver.endpoint()
    receiver.held[path] = gate = threading.Event()
    subscribe(client, uri)
    ids = [f"urn:ngsi-ld:Sensor:restart{n}" for n in range(120)]
    create(client, entity(ids[0], temperature=0))
    (in_flight,) = receiver.wait(path, 1)  # sent, never answered: the dead process cannot record it
    for n, e in enumerate(ids[1:], start=1):
        create(client, entity(e, temperature=n))
    client.close()
    server.kill()
    _release(receiver, path, gate)
    server = Middleware(url, workdir, **env)
    try:
        delivered = receiver.wait(path, 121, timeout=40)[1:]  # the dead process's delivery lease must run out first
        assert _entity_values(delivered) == [[(e, n)] for n, e in enumerate(ids)]
        assert delivered[0]["body"]["id"] == in_flight["body"]["id"]
    finally:
        server.stop()


def test_a_joined_notification_in_flight_when_its_process_dies_is_resent_by_another_under_its_id(fresh_store,
                                                                                                receiver):
    """Two processes share the store. The one delivering a subscription joins a backlog, sends the joined
    notification and is killed before the answer; the other takes the lease over once it runs out and resends
    that notification under the same id, then the change made through it meanwhile; nothing is lost."""
    url, workdir = fresh_store
    env = {"CITYBRIDGE_NOTIFY_BACKOFF_MAX": "0.5"}
    first, second = Middleware(url, workdir, **env), Middleware(url, workdir, **env)
    tenant = f"t{uuid.uuid4().hex[:12]}"
    client, other = Api(first.url, tenant), Api(second.url, tenant)
    try:
        ids = [f"urn:ngsi-ld:Sensor:takeover{n}" for n in range(16)]
        for e in ids:
            create(client, entity(e, temperature=-1))
        path, sub_id, gate = _pile_up(client, receiver, ids)  # the first process sends ids[0]'s change; held
        time.sleep(3)  # the second process picks the subscription up within 2 s
        for n, e in enumerate(ids[1:15], start=1):
            patch(client, e, temperature=n)
        receiver.held_after[path] = (1, later := threading.Event())  # answer the first, hold the next
        _release(receiver, path, gate)
        joined = receiver.wait(path, 2, status=None)[1]
        assert _entity_values([joined]) == [[(e, n) for n, e in enumerate(ids[1:15], start=1)]]
        first.kill()
        later.set()
        patch(other, ids[15], temperature=15)
        delivered = receiver.wait_for(path, lambda body: body["data"][0]["id"] == ids[15], timeout=40)
        # at least once: the first may come again too (its success may not have been recorded); ids tell
        distinct = list({r["body"]["id"]: r for r in delivered}.values())
        assert _entity_values(distinct) == [[(ids[0], 0)], _entity_values([joined])[0], [(ids[15], 15)]]
        assert [r["body"]["id"] for r in delivered].count(joined["body"]["id"]) == 2  # sent again, same id
    finally:
        client.close()
        other.close()
        if first.process.poll() is None:
            first.stop()
        second.stop()
