"""Smoke: create, retrieve and delete one entity on each store."""


def test_create_retrieve_delete(api):
    entity = {"id": "urn:ngsi-ld:Thing:1", "type": "Thing", "temperature": {"type": "Property", "value": 21.5}}
    assert api.post_json("/entities", entity).status_code == 201
    got = api.get("/entities/urn:ngsi-ld:Thing:1")
    assert got.status_code == 200
    assert got.json() == entity
    assert api.delete("/entities/urn:ngsi-ld:Thing:1").status_code == 204
    assert api.get("/entities/urn:ngsi-ld:Thing:1").status_code == 404
