"""Conformance: JSON-LD @context handling (ETSI GS CIM 009 v1.8 clauses 5.5.7, 6.3.5, 6.3.6, Annex B).

Short names are expanded with the request's @context (Link header for application/json, the body's @context for
application/ld+json), stored expanded, and compacted back with the @context of each reading request. Remote
contexts are fetched and cached; one that cannot be retrieved is 503 LdContextNotAvailable."""
from __future__ import annotations

import uuid

import pytest

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
DEFAULT = "https://uri.etsi.org/ngsi-ld/default-context/"
CORE = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"
EX = "https://example.org/vocab/"


def link(url: str) -> dict:
    """The JSON-LD Link header for a context URL (6.3.5)."""
    return {"Link": f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"'}


def unique(path: str) -> str:
    """A context path no other test (nor the other store's middleware) has fetched."""
    return f"/{uuid.uuid4().hex}{path}"


def ld(api, method, path, body, **kwargs):
    """Send a body as application/ld+json."""
    return api.send_json(method, path, body, content_type="application/ld+json", **kwargs)


def vehicle(**extra) -> dict:
    """A Vehicle with a speed property, in whatever short names the caller's context defines."""
    return {"id": "urn:ngsi-ld:Vehicle:1", "type": "Vehicle", **extra}


# --------------------------------------------------------------------------------------------- core context


def test_core_context_versions_resolve_offline(api):
    """Annex B / 5.5.7: the core context URLs v1.3..v1.9 are known to the broker (no fetch needed)."""
    assert api.post_json("/entities", vehicle(speed={"type": "Property", "value": 3})).status_code == 201
    for version in ["1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "1.9"]:
        url = f"https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v{version}.jsonld"
        got = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(url))
        assert got.status_code == 200, (version, got.text)
        assert got.json()["speed"] == {"type": "Property", "value": 3}
        assert got.json()["type"] == "Vehicle"
        body = {"id": f"urn:ngsi-ld:Vehicle:v{version}", "type": "Vehicle", "@context": url}
        assert ld(api, "POST", "/entities", body).status_code == 201, version


def test_user_vocab(api):
    """Annex B (JSON-LD @vocab): a user @vocab expands every undefined name and compacts it back."""
    ctx = {"@vocab": EX}
    body = {"id": "urn:ngsi-ld:Vehicle:1", "type": "Bus", "foo": {"type": "Property", "value": 1}}
    assert ld(api, "POST", "/entities", {**body, "@context": ctx}).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1").json()
    assert got["type"] == EX + "Bus" and got[EX + "foo"]["value"] == 1
    again = ld(api, "POST", "/entityOperations/query", {"type": "Query", "entities": [{"type": "Bus"}], "@context": ctx})
    assert [{k: v for k, v in e.items() if k != "@context"} for e in again.json()] == [body]


def test_same_short_name_different_iris_do_not_mix(api, two_apps):
    """5.5.7: `temperature` of the default vocabulary and app two's `temperature` are different attributes."""
    _, two = two_apps
    api.post_json("/entities", vehicle(temperature={"type": "Property", "value": 1}))
    seen_by_two = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(two)).json()
    assert "temperature" not in seen_by_two
    # JSON-LD IRI compaction: the absolute IRI, or the compact IRI through the core `ngsi-ld` prefix
    (key,) = [k for k in seen_by_two if k not in ("id", "type")]
    assert key in (DEFAULT + "temperature", "ngsi-ld:default-context/temperature")
    assert seen_by_two[key]["value"] == 1
    assert api.get("/entities", params={"q": "temperature==1"}, headers=link(two)).json() == []
    assert len(api.get("/entities", params={"q": "temperature==1"}).json()) == 1


def test_without_context_default_vocab(api):
    """5.5.7: without a user context, names expand with the core context's default vocabulary."""
    api.post_json("/entities", vehicle(speed={"type": "Property", "value": 3}))
    info = api.get("/attributes/speed").json()
    assert info["id"] == DEFAULT + "speed"
    assert api.get("/types/Vehicle").json()["id"] == DEFAULT + "Vehicle"


def test_full_iris_in_input(api):
    """5.5.7: an absolute IRI used as a name is kept; it is compacted to the default short name on output."""
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": DEFAULT + "Vehicle",
                                DEFAULT + "speed": {"type": "Property", "value": 3}})
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1").json()
    assert got["type"] == "Vehicle" and got["speed"]["value"] == 3


# --------------------------------------------------------------------------------------------- user contexts


@pytest.fixture
def two_apps(context_server):
    """Two applications: one says `temp`, the other `temperature`, for the same IRI (and `Car` / `Vehicle`)."""
    one = context_server.publish(unique("/app1.jsonld"), {"temp": EX + "temperature", "Car": EX + "Vehicle"})
    two = context_server.publish(unique("/app2.jsonld"), {"temperature": EX + "temperature", "Vehicle": EX + "Vehicle"})
    return one, two


def test_link_header_context_expands_and_compacts(api, two_apps):
    """6.3.5: with application/json the @context comes from the Link header; names are compacted back with it."""
    one, _ = two_apps
    body = {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}}
    assert api.post_json("/entities", body, headers=link(one)).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(one))
    assert got.json() == body


def test_stored_expanded_returned_as_iri_without_context(api, two_apps):
    """5.5.7: names not in the reader's context come back as absolute IRIs."""
    one, _ = two_apps
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}},
                  headers=link(one))
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1").json()
    assert got["type"] == EX + "Vehicle"
    assert got[EX + "temperature"] == {"type": "Property", "value": 21}


def test_two_apps_see_own_short_names(api, two_apps):
    """5.5.7: two apps with different contexts see the same entity under their own short names."""
    one, two = two_apps
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}},
                  headers=link(one))
    seen_by_two = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(two)).json()
    assert seen_by_two == {"id": "urn:ngsi-ld:Vehicle:1", "type": "Vehicle",
                           "temperature": {"type": "Property", "value": 21}}


def test_two_apps_query_with_own_names(api, two_apps):
    """5.5.7 / 5.7.2: type, q and attrs of a query use the caller's context."""
    one, two = two_apps
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}},
                  headers=link(one))
    got = api.get("/entities", params={"type": "Vehicle", "q": "temperature>20", "attrs": "temperature"},
                  headers=link(two))
    assert [e["id"] for e in got.json()] == ["urn:ngsi-ld:Vehicle:1"]
    assert "temperature" in got.json()[0]
    assert api.get("/entities", params={"type": "Car", "q": "temp==21"}, headers=link(one)).json()[0]["type"] == "Car"
    assert api.get("/entities", params={"type": "Vehicle"}, headers=link(one)).json() == []


def test_two_apps_update_each_others_attribute(api, two_apps):
    """5.5.7: an update by app two under its name changes the attribute app one created."""
    one, two = two_apps
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}},
                  headers=link(one))
    patch = api.send_json("PATCH", "/entities/urn:ngsi-ld:Vehicle:1/attrs",
                          {"temperature": {"type": "Property", "value": 30}}, headers=link(two))
    assert patch.status_code == 204
    assert api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(one)).json()["temp"]["value"] == 30


def test_body_context_with_ld_json(api, two_apps):
    """6.3.5: with application/ld+json the @context is taken from the body."""
    one, _ = two_apps
    body = {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}, "@context": one}
    assert ld(api, "POST", "/entities", body).status_code == 201
    assert api.get("/entities/urn:ngsi-ld:Vehicle:1").json()[EX + "temperature"]["value"] == 21


def test_inline_and_array_body_context(api, context_server):
    """6.3.5 / Annex B: the body @context may be an inline object or an array of URLs and objects."""
    remote = context_server.publish(unique("/part.jsonld"), {"Car": EX + "Vehicle"})
    body = {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 1},
            "@context": [remote, {"temp": EX + "temperature"}, CORE]}
    assert ld(api, "POST", "/entities", body).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1").json()
    assert got["type"] == EX + "Vehicle" and EX + "temperature" in got


def test_prefix_compact_iri(api):
    """Annex B (JSON-LD compact IRIs): a prefix in the context expands `ex:speed` and compacts back to it."""
    ctx = {"ex": EX}
    body = {"id": "urn:ngsi-ld:Vehicle:1", "type": "ex:Car", "ex:speed": {"type": "Property", "value": 5}, "@context": ctx}
    assert ld(api, "POST", "/entities", body).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers={"Accept": "application/json"}).json()
    assert got["type"] == EX + "Car" and EX + "speed" in got
    post_query = ld(api, "POST", "/entityOperations/query",
                    {"type": "Query", "entities": [{"type": "ex:Car"}], "@context": ctx})
    assert post_query.status_code == 200, post_query.text
    assert post_query.json()[0]["ex:speed"]["value"] == 5


def test_ld_json_without_context_is_400(api):
    """6.3.5: application/ld+json without an @context in the body is BadRequestData."""
    got = ld(api, "POST", "/entities", vehicle())
    assert got.status_code == 400
    assert got.json()["type"] == ERR + "BadRequestData"


def test_json_with_body_context_is_400(api, two_apps):
    """6.3.5: application/json with an @context member in the body is BadRequestData."""
    got = api.post_json("/entities", {**vehicle(), "@context": two_apps[0]})
    assert got.status_code == 400
    assert got.json()["type"] == ERR + "BadRequestData"


def test_batch_with_body_contexts(api, two_apps):
    """6.3.5 / 5.6.7: in an ld+json batch every entity carries its @context."""
    one, two = two_apps
    batch = [{"id": f"urn:ngsi-ld:Vehicle:{i}", "type": "Car", "temp": {"type": "Property", "value": i}, "@context": one}
             for i in (1, 2)]
    assert ld(api, "POST", "/entityOperations/create", batch).status_code == 201
    got = api.get("/entities", params={"type": "Vehicle", "options": "keyValues"}, headers=link(two)).json()
    assert sorted((e["id"], e["temperature"]) for e in got) == [("urn:ngsi-ld:Vehicle:1", 1), ("urn:ngsi-ld:Vehicle:2", 2)]


def test_batch_entities_may_carry_different_contexts(api, two_apps):
    """5.6.7 / 6.3.5: each entity of an ld+json batch is expanded with its own @context."""
    one, two = two_apps
    batch = [{"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 1}, "@context": one},
             {"id": "urn:ngsi-ld:Vehicle:2", "type": "Vehicle", "temperature": {"type": "Property", "value": 2},
              "@context": two}]
    assert ld(api, "POST", "/entityOperations/upsert", batch).status_code == 201
    got = api.get("/entities", params={"type": "Vehicle", "options": "keyValues"}, headers=link(two)).json()
    assert sorted((e["id"], e["temperature"]) for e in got) == [("urn:ngsi-ld:Vehicle:1", 1), ("urn:ngsi-ld:Vehicle:2", 2)]


def test_batch_entity_with_an_unavailable_context_fails_alone(api, two_apps, context_server):
    """5.6.7 / 5.5.2: an entity whose @context cannot be fetched is an LdContextNotAvailable error of a 207;
    the others are created."""
    one, _ = two_apps
    missing = context_server.url + unique("/missing.jsonld")
    batch = [{"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "@context": one},
             {"id": "urn:ngsi-ld:Vehicle:2", "type": "Car", "@context": missing}]
    got = ld(api, "POST", "/entityOperations/create", batch)
    assert got.status_code == 207, got.text
    body = got.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:1"]
    assert [(e["entityId"], e["error"]["type"]) for e in body["errors"]] == [
        ("urn:ngsi-ld:Vehicle:2", ERR + "LdContextNotAvailable")]
    assert api.get("/entities/urn:ngsi-ld:Vehicle:2").status_code == 404


# --------------------------------------------------------------------------------------------- remote fetching


def test_remote_context_fetched_once(api, context_server):
    """5.5.7 / 6.3.5: a remote context is retrieved once and cached for later requests."""
    path = unique("/cached.jsonld")
    url = context_server.publish(path, {"temp": EX + "temperature"})
    api.post_json("/entities", vehicle(temp={"type": "Property", "value": 1}), headers=link(url))
    for _ in range(3):
        assert api.get("/entities/urn:ngsi-ld:Vehicle:1", headers=link(url)).json()["temp"]["value"] == 1
    assert api.get("/entities", params={"q": "temp==1"}, headers=link(url)).status_code == 200
    assert context_server.hits[path] == 1


def test_remote_context_in_body_fetched_once(api, context_server):
    """5.5.7: a URL in a body @context is cached too (shared with the Link-header use)."""
    path = unique("/body.jsonld")
    url = context_server.publish(path, {"temp": EX + "temperature"})
    for i in (1, 2):
        body = {"id": f"urn:ngsi-ld:Vehicle:{i}", "type": "Vehicle", "temp": {"type": "Property", "value": i}, "@context": url}
        assert ld(api, "POST", "/entities", body).status_code == 201
    assert api.get("/entities/urn:ngsi-ld:Vehicle:2", headers=link(url)).json()["temp"]["value"] == 2
    assert context_server.hits[path] == 1


def test_context_404_is_503(api, context_server):
    """6.3.5 / 5.5.2: a context URL that answers 404 is LdContextNotAvailable (503)."""
    got = api.get("/entities", params={"type": "Vehicle"}, headers=link(context_server.url + unique("/missing.jsonld")))
    assert got.status_code == 503
    assert got.json()["type"] == ERR + "LdContextNotAvailable"


def test_context_unreachable_is_503(api):
    """6.3.5 / 5.5.2: a context host that cannot be reached is LdContextNotAvailable."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    got = api.post_json("/entities", vehicle(), headers=link(f"http://127.0.0.1:{port}/ctx.jsonld"))
    assert got.status_code == 503
    assert got.json()["type"] == ERR + "LdContextNotAvailable"


def test_context_slow_is_503(api, context_server):
    """6.3.5 / 5.5.2: a context not retrieved in time is LdContextNotAvailable (the broker does not hang)."""
    path = "/slow" + unique(".jsonld")
    url = context_server.publish(path, {"temp": EX + "temperature"})
    got = api.get("/entities", params={"type": "Vehicle"}, headers=link(url))
    assert got.status_code == 503
    assert got.json()["type"] == ERR + "LdContextNotAvailable"


def test_body_context_404_is_503_and_nothing_created(api, context_server):
    """6.3.5: an unavailable context in an ld+json body is 503 and the entity is not created."""
    body = {**vehicle(), "@context": context_server.url + unique("/gone.jsonld")}
    got = ld(api, "POST", "/entities", body)
    assert got.status_code == 503
    assert got.json()["type"] == ERR + "LdContextNotAvailable"
    assert api.get("/entities/urn:ngsi-ld:Vehicle:1").status_code == 404


def test_not_a_context_document_is_503(api, context_server):
    """6.3.5: a URL that does not serve a JSON-LD context document is LdContextNotAvailable."""
    path = unique("/notctx.jsonld")
    context_server.documents[path] = b'{"hello": "world"}'
    got = api.get("/entities", params={"type": "Vehicle"}, headers=link(context_server.url + path))
    assert got.status_code == 503
    assert got.json()["type"] == ERR + "LdContextNotAvailable"


# --------------------------------------------------------------------------------------------- responses (6.3.6)


@pytest.fixture
def stored(api, two_apps):
    """One vehicle created with app one's context; returns (api, context url of app one)."""
    one, _ = two_apps
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:1", "type": "Car", "temp": {"type": "Property", "value": 21}},
                  headers=link(one))
    return api, one


def test_json_response_has_link_header(stored):
    """6.3.6: an application/json response carries the @context in a JSON-LD Link header, none in the body."""
    api, one = stored
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers={**link(one), "Accept": "application/json"})
    assert got.headers["content-type"].startswith("application/json")
    assert "@context" not in got.json()
    assert f"<{one}>" in got.headers["Link"]
    assert 'rel="http://www.w3.org/ns/json-ld#context"' in got.headers["Link"]


def test_json_response_link_header_core_by_default(stored):
    """6.3.6: without a user context the Link header names the core context."""
    api, _ = stored
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1")
    assert "ngsi-ld-core-context" in got.headers["Link"]


def test_ld_json_response_has_body_context(stored):
    """6.3.6: an application/ld+json response carries the @context in the body (no JSON-LD Link header)."""
    api, one = stored
    got = api.get("/entities/urn:ngsi-ld:Vehicle:1", headers={**link(one), "Accept": "application/ld+json"})
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("application/ld+json")
    body = got.json()
    assert body["@context"] == one or one in body["@context"]
    assert body["temp"]["value"] == 21
    assert "json-ld#context" not in got.headers.get("Link", "")


def test_ld_json_query_each_entity_has_context(stored):
    """6.3.6: in an ld+json query response every entity carries the @context."""
    api, one = stored
    got = api.get("/entities", params={"type": "Car"}, headers={**link(one), "Accept": "application/ld+json"})
    assert got.status_code == 200
    (entity,) = got.json()
    assert entity["@context"] == one or one in entity["@context"]
    assert entity["type"] == "Car"


def test_ld_json_body_context_echoed(api):
    """6.3.6: an inline body context sent with ld+json is echoed back in ld+json responses to a query by POST."""
    ctx = {"temp": EX + "temperature"}
    ld(api, "POST", "/entities", {**vehicle(temp={"type": "Property", "value": 4}), "@context": ctx})
    got = ld(api, "POST", "/entityOperations/query", {"type": "Query", "attrs": ["temp"], "@context": ctx},
             headers={"Accept": "application/ld+json"})
    assert got.status_code == 200, got.text
    (entity,) = got.json()
    assert entity["temp"]["value"] == 4
    assert entity["@context"] == ctx


def test_link_header_with_non_http_url_is_400(api):
    """6.3.5: the JSON-LD Link header must hold a dereferenceable URL."""
    got = api.get("/entities", params={"type": "Vehicle"}, headers=link("urn:not-a-url"))
    assert got.status_code == 400


def test_ld_json_body_with_link_header_is_bad_request_data(api, context_server):
    """6.3.5: with Content-Type application/ld+json the @context comes from the body; a Link header as well is BadRequestData."""
    url = context_server.publish("/ctx-mixed.jsonld", {"speed": "http://example.org/speed"})
    body = {"@context": url, "id": "urn:ngsi-ld:Car:mixed", "type": "Car", "speed": {"type": "Property", "value": 1}}
    response = api.send_json("POST", "/entities", body, content_type="application/ld+json",
                             headers=link(url))
    assert response.status_code == 400
    assert response.json()["type"] == "https://uri.etsi.org/ngsi-ld/errors/BadRequestData"
    assert api.get("/entities/urn:ngsi-ld:Car:mixed").status_code in (404,)
