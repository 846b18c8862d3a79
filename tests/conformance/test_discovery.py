"""Conformance: discovery of available entity types and attributes (ETSI GS CIM 009 v1.8 clauses 5.7.5-5.7.10,
data types 5.2.24 EntityTypeList, 5.2.25 EntityType, 5.2.26 EntityTypeInfo, 5.2.27 AttributeList, 5.2.28 Attribute)."""
from __future__ import annotations

from urllib.parse import quote

import pytest

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
DEFAULT = "https://uri.etsi.org/ngsi-ld/default-context/"
LINK_REL = "http://www.w3.org/ns/json-ld#context"


def is_uri(value) -> bool:
    """A string with a scheme."""
    return isinstance(value, str) and ":" in value and value.split(":", 1)[0].isalpha()


@pytest.fixture
def catalogue(api):
    """Two Buildings, one Shop (also a Building), a Sensor; properties, relationships and a GeoProperty."""
    entities = [
        {"id": "urn:ngsi-ld:Building:1", "type": "Building", "name": {"type": "Property", "value": "B1"},
         "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1, 2]}}},
        {"id": "urn:ngsi-ld:Building:2", "type": "Building", "name": {"type": "Property", "value": "B2"},
         "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1"}},
        {"id": "urn:ngsi-ld:Shop:1", "type": ["Shop", "Building"], "name": {"type": "Property", "value": "S"}},
        {"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor", "temperature": {"type": "Property", "value": 20},
         "owner": {"type": "Property", "value": "city"}},
    ]
    for entity in entities:
        assert api.post_json("/entities", entity).status_code == 201
    return api


def test_types_list(catalogue):
    """5.7.5 / 5.2.24: GET /types is an EntityTypeList with typeList of (short) type names."""
    got = catalogue.get("/types")
    assert got.status_code == 200
    body = got.json()
    assert body["type"] == "EntityTypeList"
    assert is_uri(body["id"])
    assert sorted(body["typeList"]) == ["Building", "Sensor", "Shop"]


def test_types_details(catalogue):
    """5.7.6 / 5.2.25: details=true gives an array of EntityType: id (FQN), typeName, attributeNames."""
    got = catalogue.get("/types", params={"details": "true"})
    assert got.status_code == 200
    by_name = {t["typeName"]: t for t in got.json()}
    assert sorted(by_name) == ["Building", "Sensor", "Shop"]
    building = by_name["Building"]
    assert building["type"] == "EntityType"
    assert building["id"] == DEFAULT + "Building"
    assert sorted(building["attributeNames"]) == ["location", "name", "owner"]
    assert sorted(by_name["Sensor"]["attributeNames"]) == ["owner", "temperature"]
    assert by_name["Shop"]["attributeNames"] == ["name"]


def test_type_info(catalogue):
    """5.7.7 / 5.2.26: GET /types/{type} is an EntityTypeInfo with entityCount and attributeDetails."""
    got = catalogue.get("/types/Building")
    assert got.status_code == 200
    info = got.json()
    assert info["type"] == "EntityTypeInfo"
    assert info["id"] == DEFAULT + "Building"
    assert info["typeName"] == "Building"
    assert info["entityCount"] == 3  # Shop:1 is also a Building
    details = {a["attributeName"]: a for a in info["attributeDetails"]}
    assert sorted(details) == ["location", "name", "owner"]
    assert details["owner"]["type"] == "Attribute"
    assert details["owner"]["id"] == DEFAULT + "owner"
    assert details["owner"]["attributeTypes"] == ["Relationship"]
    assert details["location"]["attributeTypes"] == ["GeoProperty"]
    assert details["location"]["id"] == "https://uri.etsi.org/ngsi-ld/location"


def test_type_info_unknown_is_404(catalogue):
    """5.7.7: a type no entity has is ResourceNotFound."""
    got = catalogue.get("/types/Nope")
    assert got.status_code == 404
    assert got.json()["type"] == ERR + "ResourceNotFound"


def test_type_info_by_encoded_iri(catalogue):
    """5.7.7 / 6.25.3: the type may be named by its expanded IRI, percent-encoded in the path (ETSI 024_02_02)."""
    got = catalogue.get("/types/" + quote(DEFAULT + "Building", safe=""))
    assert got.status_code == 200, got.text
    assert got.json()["id"] == DEFAULT + "Building"
    assert got.json()["entityCount"] == 3
    assert catalogue.get("/types/" + quote(DEFAULT + "Nope#x", safe="")).status_code == 404
    assert catalogue.get("/types/").status_code == 307  # still the trailing-slash redirect to /types


def test_attributes_list(catalogue):
    """5.7.8 / 5.2.27: GET /attributes is an AttributeList with attributeList of (short) names."""
    got = catalogue.get("/attributes")
    assert got.status_code == 200
    body = got.json()
    assert body["type"] == "AttributeList"
    assert is_uri(body["id"])
    assert sorted(body["attributeList"]) == ["location", "name", "owner", "temperature"]


def test_attributes_details(catalogue):
    """5.7.9 / 5.2.28: details=true gives an array of Attribute with attributeTypes and typeNames."""
    got = catalogue.get("/attributes", params={"details": "true"})
    assert got.status_code == 200
    by_name = {a["attributeName"]: a for a in got.json()}
    assert sorted(by_name) == ["location", "name", "owner", "temperature"]
    owner = by_name["owner"]
    assert owner["type"] == "Attribute"
    assert owner["id"] == DEFAULT + "owner"
    assert sorted(owner["attributeTypes"]) == ["Property", "Relationship"]
    assert sorted(owner["typeNames"]) == ["Building", "Sensor"]
    assert sorted(by_name["name"]["typeNames"]) == ["Building", "Shop"]


def test_attribute_info(catalogue):
    """5.7.10 / 5.2.28: GET /attributes/{attr} is an Attribute with attributeCount, attributeTypes, typeNames."""
    got = catalogue.get("/attributes/name")
    assert got.status_code == 200
    attr = got.json()
    assert attr["type"] == "Attribute"
    assert attr["id"] == DEFAULT + "name"
    assert attr["attributeName"] == "name"
    assert attr["attributeCount"] == 3
    assert attr["attributeTypes"] == ["Property"]
    assert sorted(attr["typeNames"]) == ["Building", "Shop"]


def test_attribute_info_by_encoded_iri(catalogue):
    """5.7.10 / 6.28.3: the attribute may be named by its expanded IRI, percent-encoded (ETSI 027_02_02)."""
    got = catalogue.get("/attributes/" + quote("https://uri.etsi.org/ngsi-ld/location", safe=""))
    assert got.status_code == 200, got.text
    assert got.json()["attributeName"] == "location"
    assert got.json()["attributeCount"] == 1


def test_attribute_info_unknown_is_404(catalogue):
    """5.7.10: an attribute no entity has is ResourceNotFound."""
    got = catalogue.get("/attributes/nope")
    assert got.status_code == 404
    assert got.json()["type"] == ERR + "ResourceNotFound"


def test_discovery_follows_changes(catalogue):
    """5.7.5 / 5.7.8: deleting the last entity of a type removes the type and its only attributes."""
    assert catalogue.delete("/entities/urn:ngsi-ld:Sensor:1").status_code == 204
    assert sorted(catalogue.get("/types").json()["typeList"]) == ["Building", "Shop"]
    assert "temperature" not in catalogue.get("/attributes").json()["attributeList"]
    assert catalogue.get("/types/Sensor").status_code == 404


def test_discovery_compacts_with_request_context(catalogue, context_server):
    """5.7.5-5.7.10 / 5.5.7: names are compacted with the request's @context; ids stay expanded."""
    url = context_server.publish("/discovery.jsonld", {"Bldg": DEFAULT + "Building", "label": DEFAULT + "name"})
    header = {"Link": f'<{url}>; rel="{LINK_REL}"; type="application/ld+json"'}
    assert sorted(catalogue.get("/types", headers=header).json()["typeList"]) == ["Bldg", "Sensor", "Shop"]
    info = catalogue.get("/types/Bldg", headers=header).json()
    assert info["typeName"] == "Bldg" and info["id"] == DEFAULT + "Building"
    assert "label" in [a["attributeName"] for a in info["attributeDetails"]]
    attr = catalogue.get("/attributes/label", headers=header).json()
    assert attr["attributeName"] == "label" and attr["id"] == DEFAULT + "name"
    assert sorted(attr["typeNames"]) == ["Bldg", "Shop"]


def test_discovery_json_ld(catalogue):
    """6.3.6: with Accept application/ld+json the @context is in the body."""
    got = catalogue.get("/types", headers={"Accept": "application/ld+json"})
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("application/ld+json")
    assert "@context" in got.json()
