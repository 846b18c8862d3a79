"""Conformance: the subscription API (ETSI GS CIM 009 v1.8) at the HTTP level.

Data types: Subscription (5.2.12), NotificationParams (5.2.14), Endpoint (5.2.15), EntitySelector (5.2.33),
GeoQuery (5.2.13). Operations: create (5.8.1 / 6.10.3.1), update (5.8.2 / 6.11.3.2), retrieve (5.8.3 /
6.11.3.1), query (5.8.4 / 6.10.3.2), delete (5.8.5 / 6.11.3.3); partial update patch (5.5.8); errors (5.5.2 /
6.3.2); @context handling (6.3.5, 6.3.6); tenants (4.14, 6.3.14). Notification delivery (5.8.6) is covered by
tests/integration/test_notifications.py.
"""
from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import Api, link
from tests.conftest import assert_problem

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
CTX_REL = "http://www.w3.org/ns/json-ld#context"
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
SID = "urn:ngsi-ld:Subscription:conformance-1"
ENDPOINT = "http://127.0.0.1:9/notify"
EX = "https://example.org/citybridge/"


def subscription(**members) -> dict:
    """A minimal valid subscription (entities of type Vehicle, an HTTP endpoint) with members added or replaced."""
    body = {"type": "Subscription", "entities": [{"type": "Vehicle"}],
            "notification": {"endpoint": {"uri": ENDPOINT}}}
    body.update(members)
    return {k: v for k, v in body.items() if v is not ...}


def endpoint(**members) -> dict:
    """A subscription whose notification.endpoint has the given members on top of the default uri."""
    return subscription(notification={"endpoint": {"uri": ENDPOINT, **members}})


def create(api, body: dict, **kwargs) -> str:
    """Create a subscription, insist on 201, return its id from the Location header."""
    response = api.post_json("/subscriptions", body, **kwargs)
    assert response.status_code == 201, response.text
    location = response.headers["location"]
    assert location.startswith("/ngsi-ld/v1/subscriptions/")
    return location.rsplit("/", 1)[1]


def get(api, sub_id: str, **params) -> dict:
    """Retrieve a subscription (200) and return its body."""
    headers = params.pop("headers", {})
    response = api.get(f"/subscriptions/{sub_id}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def patch(api, sub_id: str, fragment: dict, **kwargs):
    """PATCH a subscription fragment (application/json)."""
    return api.send_json("PATCH", f"/subscriptions/{sub_id}", fragment, **kwargs)


def iso_in(seconds: float) -> str:
    """An NGSI-LD DateTime the given number of seconds from now (negative: in the past)."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def unique(path: str) -> str:
    """A context-server path nobody else has used (the broker caches @contexts by URL)."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{uuid.uuid4().hex[:8]}{dot}{ext}"


@pytest.fixture
def user_context(context_server) -> str:
    """A published user @context naming Vehicle, speed and location terms outside the core context."""
    return context_server.publish(unique("/subscriptions.jsonld"),
                                  {"Vehicle": EX + "Vehicle", "speed": EX + "speed", "brand": EX + "brand"})


# ------------------------------------------------------------------------------------------------ 5.8.1 create


def test_create_returns_201_with_location_and_generated_urn_id(api):
    """5.8.1 / 6.10.3.1 / 5.2.12: 201 with a Location holding the relative path; an id is generated when absent."""
    response = api.post_json("/subscriptions", subscription())
    assert response.status_code == 201, response.text
    assert response.content == b""
    location = response.headers["location"]
    assert location.startswith("/ngsi-ld/v1/subscriptions/urn:")
    generated = location.rsplit("/", 1)[1]
    assert get(api, generated)["id"] == generated


def test_two_creates_without_id_get_distinct_ids(api):
    """5.2.12: an id is assigned during the subscription process, so two subscriptions get two ids."""
    assert create(api, subscription()) != create(api, subscription())


def test_create_with_given_id_keeps_it(api):
    """5.2.12: a provided id is the subscription identifier; Location names it (6.10.3.1)."""
    response = api.post_json("/subscriptions", subscription(id=SID))
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/ngsi-ld/v1/subscriptions/{SID}"
    assert get(api, SID)["id"] == SID


def test_create_existing_id_is_409_already_exists(api):
    """5.8.1 / 6.10.3.1: the subscription already exists -> 409 AlreadyExists; the first one is unchanged."""
    create(api, subscription(id=SID, description="first"))
    assert_problem(api.post_json("/subscriptions", subscription(id=SID, description="second")), 409, "AlreadyExists")
    assert get(api, SID)["description"] == "first"


@pytest.mark.parametrize("bad_id", ["not a uri", "", 42])
def test_create_with_invalid_id_is_bad_request_data(api, bad_id):
    """5.2.12 / 5.8.1: the id shall be a URI -> BadRequestData."""
    assert_problem(api.post_json("/subscriptions", subscription(id=bad_id)), 400, "BadRequestData")


def test_create_with_malformed_json_is_invalid_request(api):
    """6.3.2 / 5.5.2: a body that is not valid JSON -> InvalidRequest (400)."""
    response = api.post("/subscriptions", content=b'{"type": "Subscription", ',
                        headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")


@pytest.mark.parametrize("body", [{}, [], "Subscription"], ids=["empty-object", "array", "string"])
def test_create_with_a_body_that_is_not_a_subscription_object_is_bad_request_data(api, body):
    """5.8.1 / 5.2.12: well-formed JSON that is not a Subscription object -> BadRequestData."""
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


@pytest.mark.parametrize("kind", [..., "Subscriptions", "Entity", ["Subscription"]], ids=["missing", "plural", "other", "array"])
def test_create_without_type_subscription_is_bad_request_data(api, kind):
    """5.2.12: type is mandatory and shall be equal to "Subscription"."""
    assert_problem(api.post_json("/subscriptions", subscription(type=kind)), 400, "BadRequestData")


@pytest.mark.parametrize("notification", [..., {}, {"format": "normalized"}, {"endpoint": {}},
                                          {"endpoint": {"accept": "application/json"}},
                                          {"endpoint": {"uri": "not a uri"}}, {"endpoint": "http://127.0.0.1:9/"},
                                          "http://127.0.0.1:9/"],
                         ids=["no-notification", "empty", "no-endpoint", "empty-endpoint", "no-uri", "uri-not-uri",
                              "endpoint-string", "notification-string"])
def test_create_without_notification_endpoint_uri_is_bad_request_data(api, notification):
    """5.2.12 / 5.2.14 / 5.2.15: notification (1), its endpoint (1) and the endpoint uri (1, a URI) are mandatory."""
    assert_problem(api.post_json("/subscriptions", subscription(notification=notification)), 400, "BadRequestData")


@pytest.mark.parametrize("uri", ["ftp://files.example.org/notify", "mailto:ops@example.org", "urn:ngsi-ld:Endpoint:1",
                                 "file:///tmp/notify"])
def test_create_with_unsupported_endpoint_scheme_is_bad_request_data(api, uri):
    """5.2.15 / 7.1: the notification is sent with the HTTP binding or the MQTT binding; other schemes -> 400."""
    assert_problem(api.post_json("/subscriptions", endpoint(uri=uri)), 400, "BadRequestData")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9/notify", "https://apps.example.org/hooks/v1",
                                 "mqtt://127.0.0.1:1883/city/notifications",
                                 "mqtts://user:secret@mqtt.example.org:8883/city/a/b"])
def test_create_with_http_https_mqtt_mqtts_endpoints_is_accepted(api, uri):
    """5.2.15 / 6 / 7.2: http, https (HTTP binding) and mqtt[s]://[user][:pw]@host[:port]/topic (MQTT binding)."""
    sub_id = create(api, subscription(notification={"endpoint": {"uri": uri}}))
    assert get(api, sub_id)["notification"]["endpoint"]["uri"] == uri


def test_create_with_neither_entities_nor_watched_attributes_is_bad_request_data(api):
    """5.2.12: at least one of entities or watchedAttributes shall be present."""
    assert_problem(api.post_json("/subscriptions", subscription(entities=...)), 400, "BadRequestData")


def test_create_with_only_watched_attributes_is_accepted(api):
    """5.2.12: watchedAttributes alone satisfy the entities-or-watchedAttributes rule."""
    sub_id = create(api, subscription(entities=..., watchedAttributes=["speed"]))
    body = get(api, sub_id)
    assert body["watchedAttributes"] == ["speed"]
    assert "entities" not in body


@pytest.mark.parametrize("members", [{"entities": []}, {"watchedAttributes": []},
                                     {"notification": {"attributes": [], "endpoint": {"uri": ENDPOINT}}}],
                         ids=["entities", "watchedAttributes", "notification.attributes"])
def test_create_with_empty_arrays_is_bad_request_data(api, members):
    """5.2.12 / 5.2.14: "Empty array (0 length) is not allowed" for entities, watchedAttributes and attributes."""
    assert_problem(api.post_json("/subscriptions", subscription(**members)), 400, "BadRequestData")


@pytest.mark.parametrize("selector", [{"id": "urn:ngsi-ld:Vehicle:A1"}, {"idPattern": "urn:ngsi-ld:Vehicle:.*"},
                                      {"type": ""}, {"type": 7}, "Vehicle"],
                         ids=["id-only", "idPattern-only", "empty-type", "number-type", "string"])
def test_create_with_entity_selector_without_type_is_bad_request_data(api, selector):
    """5.2.33: an EntitySelector requires type (a String)."""
    assert_problem(api.post_json("/subscriptions", subscription(entities=[selector])), 400, "BadRequestData")


@pytest.mark.parametrize("selection", ["(Vehicle|Bus)", "Vehicle,Bus", "Vehicle;Bus"])
def test_create_with_entity_type_selection_keeps_it(api, user_context, selection):
    """5.2.33 / 4.17: an entity selector's type may be a type selection; its names are expanded and compacted back."""
    sub_id = create(api, subscription(entities=[{"type": selection}]), headers=link(user_context))
    assert get(api, sub_id, headers=link(user_context))["entities"] == [{"type": selection}]
    assert get(api, sub_id)["entities"] == [{"type": selection.replace("Vehicle", EX + "Vehicle")}]


@pytest.mark.parametrize("selection", ["(Vehicle|Bus", "Vehicle||Bus", "Vehicle;"])
def test_create_with_invalid_entity_type_selection_is_bad_request_data(api, selection):
    """4.17: a malformed type selection -> BadRequestData."""
    assert_problem(api.post_json("/subscriptions", subscription(entities=[{"type": selection}])), 400, "BadRequestData")


def test_create_with_entity_selector_with_invalid_id_is_bad_request_data(api):
    """5.2.33: the EntitySelector id is a URI."""
    body = subscription(entities=[{"type": "Vehicle", "id": "not a uri"}])
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


@pytest.mark.parametrize("members", [{"timeInterval": 10, "watchedAttributes": ["speed"]},
                                     {"timeInterval": 10, "throttling": 5}],
                         ids=["with-watchedAttributes", "with-throttling"])
def test_create_time_interval_with_watched_attributes_or_throttling_is_bad_request_data(api, members):
    """5.2.12: if timeInterval is present, watchedAttributes and throttling shall not appear (0 cardinality)."""
    assert_problem(api.post_json("/subscriptions", subscription(**members)), 400, "BadRequestData")


@pytest.mark.parametrize("member", ["throttling", "timeInterval"])
@pytest.mark.parametrize("value", [0, -1, "10", True], ids=["zero", "negative", "string", "boolean"])
def test_create_with_non_positive_throttling_or_time_interval_is_bad_request_data(api, member, value):
    """5.2.12: throttling and timeInterval are Numbers greater than 0."""
    assert_problem(api.post_json("/subscriptions", subscription(**{member: value})), 400, "BadRequestData")


def test_create_periodic_and_throttled_subscriptions_are_accepted(api):
    """5.2.12: a positive timeInterval (with entities) or a positive throttling is valid and kept."""
    periodic = create(api, subscription(timeInterval=30))
    throttled = create(api, subscription(watchedAttributes=["speed"], throttling=5))
    assert get(api, periodic)["timeInterval"] == 30
    assert get(api, throttled)["throttling"] == 5


@pytest.mark.parametrize("q", ["speed>>", "(speed>1", "speed==", 42, ""], ids=["op", "paren", "no-value", "number", "empty"])
def test_create_with_invalid_q_is_bad_request_data(api, q):
    """5.2.12 / 4.9: q shall be a valid query."""
    assert_problem(api.post_json("/subscriptions", subscription(q=q)), 400, "BadRequestData")


@pytest.mark.parametrize("geo", [
    {"geometry": "Point", "coordinates": [8.68, 49.41]},
    {"georel": "near;maxDistance==1000", "coordinates": [8.68, 49.41]},
    {"georel": "near;maxDistance==1000", "geometry": "Point"},
    {"georel": "nearby", "geometry": "Point", "coordinates": [8.68, 49.41]},
    {"georel": "within", "geometry": "Blob", "coordinates": [8.68, 49.41]},
    {"georel": "near;maxDistance==1000", "geometry": "Point", "coordinates": "north"},
    "near;maxDistance==1000",
], ids=["no-georel", "no-geometry", "no-coordinates", "bad-georel", "bad-geometry", "bad-coordinates", "string"])
def test_create_with_invalid_geoq_is_bad_request_data(api, geo):
    """5.2.13: geometry, coordinates and georel are required and shall be valid (4.10)."""
    assert_problem(api.post_json("/subscriptions", subscription(geoQ=geo)), 400, "BadRequestData")


@pytest.mark.parametrize("scope_q", ["((", "Madrid", "/Madrid/#/x", ""])
def test_create_with_invalid_scope_q_is_bad_request_data(api, scope_q):
    """5.2.12 / 4.19: scopeQ is a scope query; a malformed one -> BadRequestData, as in the query API."""
    assert_problem(api.post_json("/subscriptions", subscription(scopeQ=scope_q)), 400, "BadRequestData")


def test_create_with_valid_scope_q_keeps_it(api):
    """5.2.12: a valid scopeQ is accepted and returned."""
    assert get(api, create(api, subscription(scopeQ="/Madrid/#,/Spain")))["scopeQ"] == "/Madrid/#,/Spain"


def test_create_with_valid_geoq_and_q_is_accepted(api):
    """5.2.12 / 5.2.13: a valid q and geoQ are kept; geoproperty is optional."""
    geo = {"georel": "near;maxDistance==2000", "geometry": "Point", "coordinates": [129.0756, 35.1796]}
    sub_id = create(api, subscription(q="speed>50", geoQ=geo))
    body = get(api, sub_id)
    assert body["q"] == "speed>50"
    assert body["geoQ"] == geo


@pytest.mark.parametrize("trigger", [["entityExploded"], "entityCreated", ["attributeUpdated", "bogus"], [1]],
                         ids=["unknown", "not-array", "one-unknown", "number"])
def test_create_with_invalid_notification_trigger_is_bad_request_data(api, trigger):
    """5.2.12: notificationTrigger is an array of entityCreated/Updated/Deleted, attributeCreated/Updated/Deleted."""
    assert_problem(api.post_json("/subscriptions", subscription(notificationTrigger=trigger)), 400, "BadRequestData")


@pytest.mark.parametrize("fmt", ["xml", "NORMALIZED", 1])
def test_create_with_invalid_format_is_bad_request_data(api, fmt):
    """5.2.14: notification.format is one of normalized, concise, keyValues (simplified)."""
    body = subscription(notification={"format": fmt, "endpoint": {"uri": ENDPOINT}})
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


@pytest.mark.parametrize("fmt", ["keyValues", "simplified"])
def test_create_show_changes_with_key_values_is_bad_request_data(api, fmt):
    """5.2.14: showChanges cannot be true in case format is "keyValues" (simplified is its synonym)."""
    body = subscription(notification={"format": fmt, "showChanges": True, "endpoint": {"uri": ENDPOINT}})
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


def test_create_show_changes_with_normalized_is_accepted(api):
    """5.2.14: showChanges true is valid with the normalized format."""
    sub_id = create(api, subscription(notification={"showChanges": True, "endpoint": {"uri": ENDPOINT}}))
    assert get(api, sub_id)["notification"]["showChanges"] is True


@pytest.mark.parametrize("member", ["receiverInfo", "notifierInfo"])
@pytest.mark.parametrize("info", [{"key": "a", "value": "b"}, [{"key": "a"}], [{"value": "b"}], [{"key": "a", "value": {"x": 1}}],
                                  ["a=b"], "a=b"],
                         ids=["object", "no-value", "no-key", "object-value", "string-item", "string"])
def test_create_with_malformed_receiver_or_notifier_info_is_bad_request_data(api, member, info):
    """5.2.15 / 5.2.22: receiverInfo and notifierInfo are arrays of KeyValuePair {key: String, value: String}."""
    assert_problem(api.post_json("/subscriptions", endpoint(**{member: info})), 400, "BadRequestData")


def test_create_with_receiver_and_notifier_info_keeps_them(api):
    """5.2.15 / 7.2: well-formed receiverInfo and notifierInfo (MQTT-QoS 0..2, MQTT-Version) are kept."""
    receiver = [{"key": "Authorization", "value": "Bearer 123"}]
    notifier = [{"key": "MQTT-QoS", "value": "2"}, {"key": "MQTT-Version", "value": "mqtt3.1.1"}]
    body = subscription(notification={"endpoint": {"uri": "mqtt://127.0.0.1:1883/city", "receiverInfo": receiver,
                                                    "notifierInfo": notifier}})
    ep = get(api, create(api, body))["notification"]["endpoint"]
    assert ep["receiverInfo"] == receiver
    assert ep["notifierInfo"] == notifier


@pytest.mark.parametrize("pair", [{"key": "MQTT-QoS", "value": "3"}, {"key": "MQTT-QoS", "value": "-1"},
                                  {"key": "MQTT-Version", "value": "mqtt4"}], ids=["qos-3", "qos-negative", "version"])
def test_create_with_invalid_mqtt_notifier_info_is_bad_request_data(api, pair):
    """7.2 table 7.2-1: MQTT-QoS is 0, 1 or 2; MQTT-Version is mqtt3.1.1 or mqtt5.0."""
    body = subscription(notification={"endpoint": {"uri": "mqtt://127.0.0.1:1883/city", "notifierInfo": [pair]}})
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


@pytest.mark.parametrize("accept", ["text/plain", "application/xml"])
def test_create_with_invalid_endpoint_accept_is_bad_request_data(api, accept):
    """5.2.15: endpoint.accept is application/json, application/ld+json or application/geo+json."""
    assert_problem(api.post_json("/subscriptions", endpoint(accept=accept)), 400, "BadRequestData")


@pytest.mark.parametrize("expires", ["2001-01-01T00:00:00Z", "tomorrow", "2030-13-01T00:00:00Z"],
                         ids=["past", "not-a-date", "bad-month"])
def test_create_with_expires_at_in_the_past_or_invalid_is_bad_request_data(api, expires):
    """5.2.12 / 5.8.1 (by analogy with 5.8.2): expiresAt shall be a DateTime in the future."""
    assert_problem(api.post_json("/subscriptions", subscription(expiresAt=expires)), 400, "BadRequestData")


def test_create_with_jsonld_context_that_is_not_a_uri_is_bad_request_data(api):
    """5.2.12 / 5.8.1: jsonldContext is a dereferenceable URI."""
    assert_problem(api.post_json("/subscriptions", subscription(jsonldContext="not a uri")), 400, "BadRequestData")


def test_create_with_unreachable_jsonld_context_is_ld_context_not_available(api, context_server):
    """5.8.1 / 5.8.2 / 6.3.2: a jsonldContext that cannot be retrieved -> LdContextNotAvailable; nothing is created."""
    missing = context_server.url + unique("/missing.jsonld")
    assert_problem(api.post_json("/subscriptions", subscription(id=SID, jsonldContext=missing)), 503,
                   "LdContextNotAvailable")
    assert api.get(f"/subscriptions/{SID}").status_code == 404


def test_create_with_slow_jsonld_context_is_ld_context_not_available(api, context_server):
    """5.8.1 / 6.3.5: a jsonldContext that does not answer within the broker's timeout -> LdContextNotAvailable."""
    slow = context_server.publish(unique("/slow-subscription.jsonld"), {"speed": EX + "speed"})
    started = time.monotonic()
    assert_problem(api.post_json("/subscriptions", subscription(jsonldContext=slow)), 503, "LdContextNotAvailable")
    assert time.monotonic() - started < 3


def test_create_with_invalid_jsonld_context_document_is_bad_request_data(api, context_server):
    """5.8.1 / 5.8.2: a jsonldContext that is retrieved but is not a valid JSON-LD @context -> BadRequestData."""
    broken = context_server.publish(unique("/broken.jsonld"), 42)
    assert_problem(api.post_json("/subscriptions", subscription(jsonldContext=broken)), 400, "BadRequestData")


def test_create_with_unreachable_link_context_is_ld_context_not_available(api, context_server):
    """6.3.5: the request @context (Link header) cannot be retrieved -> LdContextNotAvailable."""
    missing = context_server.url + unique("/missing-link.jsonld")
    assert_problem(api.post_json("/subscriptions", subscription(), headers=link(missing)), 503, "LdContextNotAvailable")


def test_create_with_reachable_jsonld_context_keeps_it(api, user_context):
    """5.2.12: a dereferenceable jsonldContext is stored and returned."""
    assert get(api, create(api, subscription(jsonldContext=user_context)))["jsonldContext"] == user_context


# ------------------------------------------------------------------------------------------------ 5.8.3 retrieve


def test_retrieve_applies_defaults(api):
    """5.2.12 / 5.2.14 / 5.2.15: notificationTrigger attributeCreated+attributeUpdated, format normalized, accept
    application/json; status active. The defaults of isActive, showChanges and sysAttrs apply but are not echoed:
    GET returns the members the client gave plus the read-only ones (as the ETSI test suite compares them)."""
    body = get(api, create(api, subscription()))
    assert body["type"] == "Subscription"
    assert "isActive" not in body
    assert "showChanges" not in body["notification"] and "sysAttrs" not in body["notification"]
    assert body["status"] == "active"
    assert sorted(body["notificationTrigger"]) == ["attributeCreated", "attributeUpdated"]
    assert body["notification"]["format"] == "normalized"
    assert body["notification"]["endpoint"] == {"uri": ENDPOINT, "accept": "application/json"}
    assert body["entities"] == [{"type": "Vehicle"}]


def test_retrieve_returns_what_was_created(api):
    """5.8.3: the subscription details as mandated by 5.2.12 (the members given on create)."""
    given = subscription(id=SID, subscriptionName="fast cars", description="cars above 100",
                         entities=[{"type": "Vehicle", "idPattern": "urn:ngsi-ld:Vehicle:.*"},
                                   {"type": "Vehicle", "id": "urn:ngsi-ld:Vehicle:A1"}],
                         watchedAttributes=["speed"], notificationTrigger=["entityCreated", "attributeUpdated"],
                         q="speed>100", throttling=2,
                         notification={"attributes": ["speed"], "format": "concise", "sysAttrs": True,
                                       "endpoint": {"uri": ENDPOINT, "accept": "application/ld+json",
                                                    "timeout": 500}})
    create(api, given)
    body = get(api, SID)
    for key in ("id", "type", "subscriptionName", "description", "entities", "watchedAttributes", "q", "throttling"):
        assert body[key] == given[key], key
    assert sorted(body["notificationTrigger"]) == ["attributeUpdated", "entityCreated"]
    notification = body["notification"]
    assert notification["attributes"] == ["speed"]
    assert notification["format"] == "concise"
    assert notification["sysAttrs"] is True
    assert notification["endpoint"] == {"uri": ENDPOINT, "accept": "application/ld+json", "timeout": 500}


def test_retrieve_echoes_defaulted_members_the_client_gave(api):
    """5.8.3: isActive, showChanges and sysAttrs are returned when the client sent them, even at their defaults."""
    sub_id = create(api, subscription(isActive=True, notification={"showChanges": False, "sysAttrs": False,
                                                                   "endpoint": {"uri": ENDPOINT}}))
    body = get(api, sub_id)
    assert body["isActive"] is True
    assert body["notification"]["showChanges"] is False and body["notification"]["sysAttrs"] is False


def test_create_with_dataset_id_keeps_it(api):
    """5.2.12 datasetId (4.5.5): stored and returned."""
    datasets = ["urn:ngsi-ld:Dataset:french-name", "@none"]
    assert get(api, create(api, subscription(datasetId=datasets)))["datasetId"] == datasets


@pytest.mark.parametrize("datasets", [[], ["not a uri"], [1], {"a": 1}])
def test_create_with_invalid_dataset_id_is_bad_request_data(api, datasets):
    """5.2.12 datasetId: an array of URIs -> anything else is BadRequestData."""
    assert_problem(api.post_json("/subscriptions", subscription(datasetId=datasets)), 400, "BadRequestData")


def test_create_with_pick_or_omit_keeps_them(api, user_context):
    """5.2.14 pick / omit (4.21): stored and returned, compacted with the request @context."""
    body = subscription(notification={"pick": ["id", "speed"], "omit": ["brand"], "endpoint": {"uri": ENDPOINT}})
    notification = get(api, create(api, body, headers=link(user_context)), headers=link(user_context))["notification"]
    assert notification["pick"] == ["id", "speed"] and notification["omit"] == ["brand"]


@pytest.mark.parametrize("members", [{"pick": ["speed"], "omit": ["speed"]}, {"pick": ["speed"], "attributes": ["speed"]},
                                     {"omit": ["brand"], "attributes": ["speed"]}, {"pick": []}, {"omit": [1]}],
                         ids=["same-member", "pick-attributes", "omit-attributes", "empty", "not-a-name"])
def test_create_with_conflicting_or_invalid_pick_omit_is_bad_request_data(api, members):
    """5.2.14 / 4.21: pick and omit exclude attributes, and no member may be both picked and omitted."""
    body = subscription(notification={**members, "endpoint": {"uri": ENDPOINT}})
    assert_problem(api.post_json("/subscriptions", body), 400, "BadRequestData")


@pytest.mark.parametrize("members", [{"join": "flat"}, {"joinLevel": 2}, {"pick": ["speed{unit}"]}],
                         ids=["join", "joinLevel", "nested-pick"])
def test_create_with_unsupported_notification_members_is_operation_not_supported(api, members):
    """4.5.23 join / joinLevel and nested projections are not supported: refused (6.3.2), not silently dropped."""
    body = subscription(notification={**members, "endpoint": {"uri": ENDPOINT}})
    assert_problem(api.post_json("/subscriptions", body), 422, "OperationNotSupported")


def test_retrieve_created_paused_subscription_has_status_paused(api):
    """5.2.12 table 5.2.12-2: isActive false -> status paused."""
    body = get(api, create(api, subscription(isActive=False)))
    assert body["isActive"] is False
    assert body["status"] == "paused"


def test_read_only_members_on_create_are_ignored(api):
    """5.2.12: read-only members (status, createdAt, modifiedAt; notification status members) given on create
    shall be ignored, not rejected."""
    body = subscription(status="paused", createdAt="2001-01-01T00:00:00Z", modifiedAt="2001-01-01T00:00:00Z",
                        notification={"endpoint": {"uri": ENDPOINT}, "status": "failed", "timesSent": 99,
                                      "timesFailed": 7, "lastFailure": "2001-01-01T00:00:00Z"})
    got = get(api, create(api, body), options="sysAttrs")
    assert got["status"] == "active"
    assert got["createdAt"] != "2001-01-01T00:00:00Z"
    assert got["modifiedAt"] != "2001-01-01T00:00:00Z"
    assert got["notification"].get("timesSent", 0) == 0
    assert got["notification"].get("timesFailed", 0) == 0
    assert got["notification"].get("status") != "failed"
    assert "lastFailure" not in got["notification"]


def test_retrieve_sys_attrs(api):
    """5.8.3 / 6.11.3.1: options=sysAttrs adds createdAt and modifiedAt (DateTime); without it they are absent."""
    sub_id = create(api, subscription())
    plain = get(api, sub_id)
    assert "createdAt" not in plain and "modifiedAt" not in plain
    with_sys = get(api, sub_id, options="sysAttrs")
    assert DATETIME.match(with_sys["createdAt"]) and DATETIME.match(with_sys["modifiedAt"])


def test_retrieve_response_is_json_with_link_or_json_ld_with_context(api):
    """6.3.6: application/json carries the @context in a Link header; application/ld+json carries it in the body."""
    sub_id = create(api, subscription())
    plain = api.get(f"/subscriptions/{sub_id}")
    assert plain.headers["content-type"].split(";")[0] == "application/json"
    assert CTX_REL in plain.headers["link"]
    assert "@context" not in plain.json()
    ld = api.get(f"/subscriptions/{sub_id}", headers={"Accept": "application/ld+json"})
    assert ld.headers["content-type"].split(";")[0] == "application/ld+json"
    assert "@context" in ld.json()


def test_names_are_compacted_with_the_request_context(api, user_context):
    """5.8.3 / 5.5.7 / 6.3.5: names are expanded with the creating request's @context and compacted with the
    reading request's @context: same context -> short names, no context -> the full IRIs."""
    given = subscription(entities=[{"type": "Vehicle"}], watchedAttributes=["speed"],
                         notification={"attributes": ["brand"], "endpoint": {"uri": ENDPOINT}})
    sub_id = create(api, given, headers=link(user_context))
    short = get(api, sub_id, headers=link(user_context))
    assert short["entities"] == [{"type": "Vehicle"}]
    assert short["watchedAttributes"] == ["speed"]
    assert short["notification"]["attributes"] == ["brand"]
    full = get(api, sub_id)
    assert full["entities"] == [{"type": EX + "Vehicle"}]
    assert full["watchedAttributes"] == [EX + "speed"]
    assert full["notification"]["attributes"] == [EX + "brand"]


def test_body_context_with_ld_json_is_used_for_expansion(api, user_context):
    """6.3.5: with application/ld+json the @context comes from the body."""
    given = dict(subscription(watchedAttributes=["speed"]), **{"@context": user_context})
    response = api.send_json("POST", "/subscriptions", given, content_type="application/ld+json")
    assert response.status_code == 201, response.text
    sub_id = response.headers["location"].rsplit("/", 1)[1]
    assert get(api, sub_id)["watchedAttributes"] == [EX + "speed"]
    assert get(api, sub_id, headers=link(user_context))["watchedAttributes"] == ["speed"]


def test_retrieve_unknown_subscription_is_404_resource_not_found(api):
    """5.8.3: unknown subscription -> ResourceNotFound (404)."""
    create(api, subscription())  # the tenant exists
    assert_problem(api.get("/subscriptions/urn:ngsi-ld:Subscription:nope"), 404, "ResourceNotFound")


def test_retrieve_with_invalid_id_is_bad_request_data(api):
    """5.8.3: an id that is not a valid URI -> BadRequestData."""
    create(api, subscription())
    assert_problem(api.get("/subscriptions/not-a-uri"), 400, "BadRequestData")


def test_expired_subscription_has_status_expired_and_future_expires_at_reactivates(api):
    """5.2.12 table 5.2.12-2 / 5.8.2: past expiresAt -> status expired; PATCH with a future expiresAt -> active."""
    sub_id = create(api, subscription(expiresAt=iso_in(1.5)))
    assert get(api, sub_id)["status"] == "active"
    time.sleep(2)
    assert get(api, sub_id)["status"] == "expired"
    assert patch(api, sub_id, {"isActive": True}).status_code == 204
    assert get(api, sub_id)["status"] == "expired"  # isActive true without expiresAt keeps expired (5.8.2)
    assert patch(api, sub_id, {"expiresAt": iso_in(600)}).status_code == 204
    assert get(api, sub_id)["status"] == "active"


# ------------------------------------------------------------------------------------------------ 5.8.4 query


def test_query_lists_the_tenants_subscriptions(api):
    """5.8.4 / 6.10.3.2: GET /subscriptions returns an array of the existing subscriptions with their status."""
    ids = {create(api, subscription()), create(api, subscription(isActive=False))}
    response = api.get("/subscriptions")
    assert response.status_code == 200
    body = response.json()
    assert {s["id"] for s in body} == ids
    assert sorted(s["status"] for s in body) == ["active", "paused"]
    assert all(s["type"] == "Subscription" for s in body)


def test_query_limit_offset_and_count(api):
    """5.8.4 / 5.5.9 / 6.3.13: limit and offset page through the list; count=true gives NGSILD-Results-Count."""
    ids = [create(api, subscription(id=f"urn:ngsi-ld:Subscription:p{i}")) for i in range(5)]
    first = api.get("/subscriptions", params={"limit": 2, "count": "true"})
    assert first.status_code == 200
    assert first.headers["NGSILD-Results-Count"] == "5"
    pages = [s["id"] for s in first.json()]
    assert len(pages) == 2
    for offset in (2, 4):
        page = api.get("/subscriptions", params={"limit": 2, "offset": offset}).json()
        pages += [s["id"] for s in page]
    assert sorted(pages) == sorted(ids)
    assert api.get("/subscriptions", params={"offset": 5}).json() == []
    assert "NGSILD-Results-Count" not in api.get("/subscriptions").headers


def test_query_pages_carry_prev_and_next_links(api):
    """5.8.4 / 5.5.9 / 6.3.10: a page of subscriptions links to the previous and next pages (ETSI 031_02)."""
    for i in range(3):
        create(api, subscription(id=f"urn:ngsi-ld:Subscription:l{i}"))
    ld = {"Accept": "application/ld+json"}
    middle = api.get("/subscriptions", params={"limit": 1, "offset": 1}, headers=ld)
    assert sorted(middle.headers["Link"].split(",")) == [
        '</ngsi-ld/v1/subscriptions?limit=1&offset=0>;rel="prev";type="application/ld+json"',
        '</ngsi-ld/v1/subscriptions?limit=1&offset=2>;rel="next";type="application/ld+json"']
    last = api.get("/subscriptions", params={"limit": 1, "offset": 2}, headers=ld)
    assert last.headers["Link"] == '</ngsi-ld/v1/subscriptions?limit=1&offset=1>;rel="prev";type="application/ld+json"'
    assert "Link" not in api.get("/subscriptions", params={"limit": 5}, headers=ld).headers


def test_query_limit_over_maximum_is_403_too_many_results(api):
    """5.8.4 / 6.3.2: a limit above the broker's maximum (1000) -> TooManyResults (403); 1000 itself is fine."""
    create(api, subscription())
    assert_problem(api.get("/subscriptions", params={"limit": 1001}), 403, "TooManyResults")
    assert api.get("/subscriptions", params={"limit": 1000}).status_code == 200


@pytest.mark.parametrize("params", [{"limit": "ten"}, {"limit": -1}, {"offset": -1}])
def test_query_with_malformed_limit_or_offset_is_bad_request_data(api, params):
    """5.8.4 / 5.5.9: limit and offset are non-negative integers."""
    create(api, subscription())
    assert_problem(api.get("/subscriptions", params=params), 400, "BadRequestData")


def test_query_compacts_with_the_request_context_and_honours_sys_attrs(api, user_context):
    """5.8.4 / 6.3.5: listed subscriptions are compacted like retrieved ones; options=sysAttrs adds createdAt."""
    create(api, subscription(watchedAttributes=["speed"]), headers=link(user_context))
    [short] = api.get("/subscriptions", headers=link(user_context), params={"options": "sysAttrs"}).json()
    assert short["watchedAttributes"] == ["speed"]
    assert DATETIME.match(short["createdAt"])
    [full] = api.get("/subscriptions").json()
    assert full["watchedAttributes"] == [EX + "speed"]
    assert "createdAt" not in full


# ------------------------------------------------------------------------------------------------ 5.8.2 update


def test_update_returns_204_and_merges_top_level_members(api):
    """5.8.2 / 5.5.8 / 6.11.3.2: 204; members of the fragment are added or replaced, the others are untouched."""
    sub_id = create(api, subscription(description="old", watchedAttributes=["speed"], q="speed>10"))
    response = patch(api, sub_id, {"type": "Subscription", "description": "new", "subscriptionName": "cars"})
    assert response.status_code == 204, response.text
    assert response.content == b""
    body = get(api, sub_id)
    assert body["description"] == "new"
    assert body["subscriptionName"] == "cars"
    assert body["watchedAttributes"] == ["speed"]
    assert body["q"] == "speed>10"
    assert body["notification"]["endpoint"]["uri"] == ENDPOINT


def test_update_replaces_the_notification_member_as_a_whole(api):
    """5.5.8: a top-level member of the fragment replaces the target member (no deep merge inside notification)."""
    sub_id = create(api, subscription(notification={"attributes": ["speed"], "format": "keyValues",
                                                    "endpoint": {"uri": ENDPOINT}}))
    new_uri = "http://127.0.0.1:9/second"
    assert patch(api, sub_id, {"notification": {"endpoint": {"uri": new_uri}}}).status_code == 204
    notification = get(api, sub_id)["notification"]
    assert notification["endpoint"]["uri"] == new_uri
    assert "attributes" not in notification
    assert notification["format"] == "normalized"


def test_update_notification_without_endpoint_is_bad_request_data(api):
    """5.8.2 / 5.5.8 / 5.2.14: the replaced notification must still hold an endpoint (card. 1)."""
    sub_id = create(api, subscription())
    assert_problem(patch(api, sub_id, {"notification": {"format": "keyValues"}}), 400, "BadRequestData")
    assert get(api, sub_id)["notification"]["format"] == "normalized"


def test_update_refreshes_modified_at_and_keeps_created_at(api):
    """5.8.2 / 5.2.12: after an update modifiedAt moves forward, createdAt stays (options=sysAttrs)."""
    sub_id = create(api, subscription())
    before = get(api, sub_id, options="sysAttrs")
    time.sleep(0.01)
    assert patch(api, sub_id, {"description": "touched"}).status_code == 204
    after = get(api, sub_id, options="sysAttrs")
    assert after["createdAt"] == before["createdAt"]
    assert after["modifiedAt"] > before["modifiedAt"]


def test_update_with_ngsi_ld_null_deletes_a_member(api):
    """5.5.8: a member whose value is NGSI-LD Null is deleted from the target."""
    sub_id = create(api, subscription(description="gone soon", throttling=5))
    assert patch(api, sub_id, {"description": "urn:ngsi-ld:null"}).status_code == 204
    body = get(api, sub_id)
    assert "description" not in body
    assert body["throttling"] == 5


def test_update_is_active_false_pauses_and_true_reactivates(api):
    """5.8.2: isActive false -> status paused; isActive true (no expiresAt, not expired) -> status active."""
    sub_id = create(api, subscription())
    assert patch(api, sub_id, {"isActive": False}).status_code == 204
    body = get(api, sub_id)
    assert (body["isActive"], body["status"]) == (False, "paused")
    assert patch(api, sub_id, {"isActive": True}).status_code == 204
    body = get(api, sub_id)
    assert (body["isActive"], body["status"]) == (True, "active")


def test_update_with_expires_at_in_the_past_is_bad_request_data(api):
    """5.8.2: expiresAt in the past -> BadRequestData regardless of isActive; the subscription is unchanged."""
    sub_id = create(api, subscription(isActive=False))
    assert_problem(patch(api, sub_id, {"expiresAt": "2001-01-01T00:00:00Z", "isActive": True}), 400, "BadRequestData")
    body = get(api, sub_id)
    assert body["status"] == "paused"
    assert "expiresAt" not in body


def test_update_with_future_expires_at_is_kept(api):
    """5.8.2: a future expiresAt is stored and the subscription stays active."""
    sub_id = create(api, subscription())
    expires = iso_in(3600)
    assert patch(api, sub_id, {"expiresAt": expires}).status_code == 204
    body = get(api, sub_id)
    assert body["expiresAt"] == expires
    assert body["status"] == "active"


def test_update_with_mismatching_id_is_bad_request_data(api):
    """5.2.12 / 5.8.2: the id cannot be modified in update operations -> BadRequestData."""
    sub_id = create(api, subscription(id=SID))
    assert_problem(patch(api, sub_id, {"id": "urn:ngsi-ld:Subscription:other"}), 400, "BadRequestData")
    assert get(api, SID)["id"] == SID
    assert patch(api, sub_id, {"id": SID, "description": "same id is fine"}).status_code == 204


@pytest.mark.parametrize("fragment", [{"throttling": -1}, {"timeInterval": 10}, {"entities": []},
                                      {"notificationTrigger": ["bogus"]}, {"q": "speed>>"}, {"type": "Entity"},
                                      {"isActive": "yes"}],
                         ids=["throttling", "timeInterval-with-watched", "empty-entities", "trigger", "q", "type",
                              "isActive"])
def test_update_violating_the_data_type_is_bad_request_data_and_changes_nothing(api, fragment):
    """5.8.2: a fragment that breaks the restrictions of 5.2.12 -> BadRequestData; the subscription is unchanged."""
    sub_id = create(api, subscription(watchedAttributes=["speed"]))
    before = get(api, sub_id)
    assert_problem(patch(api, sub_id, fragment), 400, "BadRequestData")
    assert get(api, sub_id) == before


def test_update_read_only_members_are_ignored(api):
    """5.2.12: read-only members in an update are ignored."""
    sub_id = create(api, subscription())
    assert patch(api, sub_id, {"status": "paused", "description": "d"}).status_code == 204
    body = get(api, sub_id)
    assert body["status"] == "active"
    assert body["description"] == "d"


def test_update_expands_names_with_the_request_context(api, user_context):
    """5.8.2 / 5.5.7: attribute names in the fragment are expanded with the update request's @context."""
    sub_id = create(api, subscription(watchedAttributes=["speed"]))
    assert patch(api, sub_id, {"watchedAttributes": ["speed"]}, headers=link(user_context)).status_code == 204
    assert get(api, sub_id)["watchedAttributes"] == [EX + "speed"]


def test_update_with_unreachable_jsonld_context_is_ld_context_not_available(api, context_server):
    """5.8.2: jsonldContext present but not available -> LdContextNotAvailable."""
    sub_id = create(api, subscription())
    missing = context_server.url + unique("/missing-update.jsonld")
    assert_problem(patch(api, sub_id, {"jsonldContext": missing}), 503, "LdContextNotAvailable")
    assert "jsonldContext" not in get(api, sub_id)


def test_update_unknown_subscription_is_404_resource_not_found(api):
    """5.8.2: unknown target subscription -> ResourceNotFound."""
    create(api, subscription())
    assert_problem(patch(api, "urn:ngsi-ld:Subscription:nope", {"description": "x"}), 404, "ResourceNotFound")


def test_update_with_invalid_id_is_bad_request_data(api):
    """5.8.2: a Subscription id that is not a valid URI -> BadRequestData."""
    create(api, subscription())
    assert_problem(patch(api, "not-a-uri", {"description": "x"}), 400, "BadRequestData")


def test_update_with_malformed_json_is_invalid_request(api):
    """6.3.2: a fragment that is not valid JSON -> InvalidRequest."""
    sub_id = create(api, subscription())
    response = api.patch(f"/subscriptions/{sub_id}", content=b"{", headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")


# ------------------------------------------------------------------------------------------------ 5.8.5 delete


def test_delete_returns_204_then_retrieve_and_delete_are_404(api):
    """5.8.5 / 6.11.3.3: 204 No Content; afterwards the subscription is gone (404 ResourceNotFound)."""
    sub_id = create(api, subscription())
    response = api.delete(f"/subscriptions/{sub_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(api.get(f"/subscriptions/{sub_id}"), 404, "ResourceNotFound")
    assert_problem(api.delete(f"/subscriptions/{sub_id}"), 404, "ResourceNotFound")
    assert api.get("/subscriptions").json() == []


def test_delete_unknown_subscription_is_404_and_invalid_id_is_400(api):
    """5.8.5: unknown id -> ResourceNotFound; id that is not a URI -> BadRequestData."""
    create(api, subscription())
    assert_problem(api.delete("/subscriptions/urn:ngsi-ld:Subscription:nope"), 404, "ResourceNotFound")
    assert_problem(api.delete("/subscriptions/not-a-uri"), 400, "BadRequestData")


def test_deleted_id_can_be_reused(api):
    """5.8.5 / 5.8.1: after deletion the id no longer exists, so creating it again is 201, not 409."""
    create(api, subscription(id=SID))
    assert api.delete(f"/subscriptions/{SID}").status_code == 204
    assert create(api, subscription(id=SID)) == SID


# ------------------------------------------------------------------------------------------------ tenants


def test_subscriptions_are_isolated_per_tenant(api, middleware):
    """4.14 / 6.3.14: a subscription made in one tenant is invisible, unmodifiable and undeletable in another."""
    create(api, subscription(id=SID))
    with Api(middleware.url, f"t{uuid.uuid4().hex[:12]}") as other:
        create(other, subscription(id="urn:ngsi-ld:Subscription:other-tenant"))
        assert [s["id"] for s in other.get("/subscriptions").json()] == ["urn:ngsi-ld:Subscription:other-tenant"]
        assert_problem(other.get(f"/subscriptions/{SID}"), 404, "ResourceNotFound")
        assert_problem(patch(other, SID, {"description": "x"}), 404, "ResourceNotFound")
        assert_problem(other.delete(f"/subscriptions/{SID}"), 404, "ResourceNotFound")
        assert create(other, subscription(id=SID)) == SID  # same id, other tenant: no conflict
    assert [s["id"] for s in api.get("/subscriptions").json()] == [SID]


def test_unknown_tenant_is_404_nonexistent_tenant_on_list_and_retrieve(api):
    """5.5.2 / 6.3.14: reading from a tenant that does not exist -> NonexistentTenant (404)."""
    assert_problem(api.get("/subscriptions"), 404, "NonexistentTenant")
    assert_problem(api.get(f"/subscriptions/{SID}"), 404, "NonexistentTenant")


def test_create_makes_the_tenant_exist(api):
    """4.14: a tenant is created by the first write, here a subscription; list then answers 200."""
    create(api, subscription())
    assert api.get("/subscriptions").status_code == 200


def test_default_tenant_does_not_see_named_tenant_subscriptions(api, middleware):
    """4.14: without NGSILD-Tenant the default tenant is used, separate from named tenants."""
    create(api, subscription(id=SID))
    with Api(middleware.url, "") as default:
        default.headers.pop("NGSILD-Tenant")
        assert default.get(f"/subscriptions/{SID}").status_code == 404
        listed = default.get("/subscriptions")
        assert listed.status_code == 200
        assert SID not in [s["id"] for s in listed.json()]


def test_numeric_mqtt_qos_is_taken_as_its_string(api):
    """7.2 / ETSI test 058_02: notifierInfo {"key": "MQTT-QoS", "value": 1} (a number) is accepted and kept as "1"."""
    sub_id = create(api, endpoint(uri="mqtt://127.0.0.1:1883/alerts", notifierInfo=[{"key": "MQTT-QoS", "value": 1}]))
    assert get(api, sub_id)["notification"]["endpoint"]["notifierInfo"] == [{"key": "MQTT-QoS", "value": "1"}]
