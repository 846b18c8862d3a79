"""Conformance: multi-tenancy with the NGSILD-Tenant header (ETSI GS CIM 009 v1.8 clauses 4.14, 6.3.14, 5.5.2
NonexistentTenant): tenants are isolated, created implicitly by the first write, and reading a tenant that does
not exist is 404 NonexistentTenant."""
from __future__ import annotations

import uuid

import orjson

ERR = "https://uri.etsi.org/ngsi-ld/errors/"


def fresh() -> str:
    """A tenant name nobody has used."""
    return f"t{uuid.uuid4().hex[:12]}"


def th(tenant: str) -> dict:
    """The NGSILD-Tenant header."""
    return {"NGSILD-Tenant": tenant}


def entity(entity_id: str, value=1) -> dict:
    """A small entity."""
    return {"id": entity_id, "type": "Thing", "v": {"type": "Property", "value": value}}


def create(api, tenant: str, body: dict):
    """POST /entities in tenant."""
    return api.post("/entities", content=orjson.dumps(body),
                    headers={"Content-Type": "application/json", **th(tenant)})


def assert_nonexistent(response) -> None:
    """404 NonexistentTenant (5.5.2)."""
    assert response.status_code == 404, response.text
    assert response.json()["type"] == ERR + "NonexistentTenant"


def test_entities_are_isolated(api):
    """4.14: an entity created in one tenant is not visible in another."""
    a, b = fresh(), fresh()
    assert create(api, a, entity("urn:ngsi-ld:Thing:1")).status_code == 201
    assert create(api, b, entity("urn:ngsi-ld:Thing:2")).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(b))
    assert got.status_code == 404 and got.json()["type"] == ERR + "ResourceNotFound"
    assert [e["id"] for e in api.get("/entities", params={"type": "Thing"}, headers=th(b)).json()] == ["urn:ngsi-ld:Thing:2"]
    assert [e["id"] for e in api.get("/entities", params={"type": "Thing"}, headers=th(a)).json()] == ["urn:ngsi-ld:Thing:1"]


def test_geo_queries_are_per_tenant_even_at_the_same_place(api):
    """4.14 with 4.10: two tenants with entities at one point; near, within and the other GeoProperty stay apart."""
    a, b = fresh(), fresh()
    point = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [129.0756, 35.1796]}}
    assert create(api, a, {**entity("urn:ngsi-ld:Thing:a"), "location": point}).status_code == 201
    assert create(api, b, {**entity("urn:ngsi-ld:Thing:b"), "location": point}).status_code == 201
    assert create(api, b, {**entity("urn:ngsi-ld:Thing:c"), "observationSpace": point}).status_code == 201
    near = {"type": "Thing", "georel": "near;maxDistance==100", "geometry": "Point", "coordinates": "[129.0756,35.1796]"}
    assert [e["id"] for e in api.get("/entities", params=near, headers=th(a)).json()] == ["urn:ngsi-ld:Thing:a"]
    assert [e["id"] for e in api.get("/entities", params=near, headers=th(b)).json()] == ["urn:ngsi-ld:Thing:b"]
    other = {**near, "geoproperty": "observationSpace"}
    assert [e["id"] for e in api.get("/entities", params=other, headers=th(b)).json()] == ["urn:ngsi-ld:Thing:c"]
    assert api.get("/entities", params=other, headers=th(a)).json() == []


def test_same_id_in_two_tenants(api):
    """4.14: the same entity id can exist independently in two tenants."""
    a, b = fresh(), fresh()
    assert create(api, a, entity("urn:ngsi-ld:Thing:1", 1)).status_code == 201
    assert create(api, b, entity("urn:ngsi-ld:Thing:1", 2)).status_code == 201
    assert api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(a)).json()["v"]["value"] == 1
    assert api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(b)).json()["v"]["value"] == 2
    assert api.delete("/entities/urn:ngsi-ld:Thing:1", headers=th(a)).status_code == 204
    assert api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(b)).status_code == 200


def test_tenant_created_on_first_write(api):
    """4.14: a tenant that does not exist is created by the first creation of an entity in it."""
    t = fresh()
    assert_nonexistent(api.get("/entities", params={"type": "Thing"}, headers=th(t)))
    assert create(api, t, entity("urn:ngsi-ld:Thing:1")).status_code == 201
    got = api.get("/entities", params={"type": "Thing"}, headers=th(t))
    assert got.status_code == 200 and len(got.json()) == 1


def test_tenant_created_by_batch(api):
    """4.14 / 5.6.7: batch create also creates the tenant."""
    t = fresh()
    got = api.post("/entityOperations/create", content=orjson.dumps([entity("urn:ngsi-ld:Thing:1")]),
                   headers={"Content-Type": "application/json", **th(t)})
    assert got.status_code == 201
    assert api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(t)).status_code == 200


def test_failed_write_does_not_create_tenant(api):
    """4.14: a rejected creation (400) does not bring the tenant into existence."""
    t = fresh()
    assert create(api, t, {"id": "urn:ngsi-ld:Thing:1"}).status_code == 400
    assert_nonexistent(api.get("/entities", params={"type": "Thing"}, headers=th(t)))


def test_query_unknown_tenant(api):
    """5.7.2 / 5.5.2: querying a tenant that does not exist is NonexistentTenant."""
    assert_nonexistent(api.get("/entities", params={"type": "Thing"}, headers=th(fresh())))


def test_retrieve_unknown_tenant(api):
    """5.7.1 / 5.5.2: retrieving an entity in a tenant that does not exist is NonexistentTenant."""
    assert_nonexistent(api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(fresh())))


def test_discovery_unknown_tenant(api):
    """5.7.5-5.7.10 / 5.5.2: discovery in a tenant that does not exist is NonexistentTenant."""
    for path in ["/types", "/types/Thing", "/attributes", "/attributes/v", "/types?details=true",
                 "/attributes?details=true"]:
        assert_nonexistent(api.get(path, headers=th(fresh())))


def test_post_query_unknown_tenant(api):
    """5.7.2 (POST) / 5.5.2: a Query in a tenant that does not exist is NonexistentTenant."""
    got = api.post("/entityOperations/query", content=orjson.dumps({"type": "Query", "entities": [{"type": "Thing"}]}),
                   headers={"Content-Type": "application/json", **th(fresh())})
    assert_nonexistent(got)


def test_discovery_is_per_tenant(api):
    """4.14: types and attributes of one tenant do not appear in another."""
    a, b = fresh(), fresh()
    create(api, a, {"id": "urn:ngsi-ld:Alpha:1", "type": "Alpha", "x": {"type": "Property", "value": 1}})
    create(api, b, {"id": "urn:ngsi-ld:Beta:1", "type": "Beta", "y": {"type": "Property", "value": 1}})
    assert api.get("/types", headers=th(a)).json()["typeList"] == ["Alpha"]
    assert api.get("/types", headers=th(b)).json()["typeList"] == ["Beta"]
    assert api.get("/attributes", headers=th(b)).json()["attributeList"] == ["y"]
    assert api.get("/types/Beta", headers=th(a)).status_code == 404


def test_batch_delete_is_per_tenant(api):
    """4.14 / 5.6.10: a batch delete in one tenant leaves the other tenant's entity alone."""
    a, b = fresh(), fresh()
    create(api, a, entity("urn:ngsi-ld:Thing:1"))
    create(api, b, entity("urn:ngsi-ld:Thing:1"))
    got = api.post("/entityOperations/delete", content=orjson.dumps(["urn:ngsi-ld:Thing:1"]),
                   headers={"Content-Type": "application/json", **th(a)})
    assert got.status_code == 204
    assert api.get("/entities/urn:ngsi-ld:Thing:1", headers=th(b)).status_code == 200


def test_default_tenant_is_separate(api):
    """4.14: without NGSILD-Tenant the default tenant is used; it does not see named tenants' entities."""
    unique = f"urn:ngsi-ld:Thing:{uuid.uuid4().hex}"
    t = fresh()
    assert create(api, t, entity(unique)).status_code == 201
    default = api.get(f"/entities/{unique}", headers={"NGSILD-Tenant": ""})
    assert default.status_code == 404
    assert default.json()["type"] == ERR + "ResourceNotFound"
    other = f"urn:ngsi-ld:Thing:{uuid.uuid4().hex}"
    assert create(api, "", entity(other)).status_code == 201
    assert api.get(f"/entities/{other}", headers={"NGSILD-Tenant": ""}).status_code == 200
    assert api.get(f"/entities/{other}", headers=th(t)).status_code == 404
    assert api.delete(f"/entities/{other}", headers={"NGSILD-Tenant": ""}).status_code == 204


def test_writes_to_an_existing_entity_in_an_unknown_tenant_are_nonexistent_tenant(api):
    """5.6.2-5.6.6, 5.6.17-19 / 5.5.2: operations that need an existing entity say NonexistentTenant, not 404 entity."""
    eid = "urn:ngsi-ld:Thing:1"
    attr = {"type": "Property", "value": 2}
    json = {"Content-Type": "application/json"}
    calls = [("PATCH", f"/entities/{eid}/attrs", {"v": attr}), ("POST", f"/entities/{eid}/attrs", {"v": attr}),
             ("PATCH", f"/entities/{eid}/attrs/v", attr), ("PUT", f"/entities/{eid}/attrs/v", attr),
             ("PATCH", f"/entities/{eid}", {"v": attr}), ("PUT", f"/entities/{eid}", {"type": "Thing", "v": attr}),
             ("DELETE", f"/entities/{eid}/attrs/v", None), ("DELETE", f"/entities/{eid}", None)]
    for method, path, body in calls:
        content = orjson.dumps(body) if body is not None else None
        got = api.request(method, path, content=content, headers={**json, **th(fresh())} if body else th(fresh()))
        assert_nonexistent(got)


def test_missing_entity_in_a_known_tenant_stays_resource_not_found(api):
    """5.6.x: in a tenant that exists, a missing entity is ResourceNotFound."""
    tenant = fresh()
    assert create(api, tenant, entity("urn:ngsi-ld:Thing:1")).status_code == 201
    got = api.request("PATCH", "/entities/urn:ngsi-ld:Thing:2/attrs/v", content=b'{"value": 3}',
                      headers={"Content-Type": "application/json", **th(tenant)})
    assert got.status_code == 404 and got.json()["type"] == ERR + "ResourceNotFound"


def test_batch_operations_on_existing_entities_in_an_unknown_tenant_are_nonexistent_tenant(api):
    """5.6.9 / 5.6.10 / 5.6.20 / 5.5.2: batch update, merge and delete in a tenant that does not exist."""
    body = orjson.dumps([entity("urn:ngsi-ld:Thing:1")])
    for path, content in [("/entityOperations/update", body), ("/entityOperations/merge", body),
                          ("/entityOperations/delete", b'["urn:ngsi-ld:Thing:1"]')]:
        got = api.post(path, content=content, headers={"Content-Type": "application/json", **th(fresh())})
        assert_nonexistent(got)
