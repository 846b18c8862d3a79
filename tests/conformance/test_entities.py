"""Conformance: entities (ETSI GS CIM 009 v1.8) at the HTTP level.

Create (5.6.1), retrieve (5.7.1), merge (5.6.17), replace (5.6.18), delete (5.6.6); representations (4.5):
normalized, concise, simplified/keyValues; attribute kinds (4.5.x); sysAttrs, pick/omit, lang; content
negotiation (6.3) and ProblemDetails errors (5.5.2 / 6.3.2).
"""
from __future__ import annotations

import re

import orjson
import pytest

from tests.conftest import CORE, link
from tests.conftest import assert_problem

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
CTX_REL = "http://www.w3.org/ns/json-ld#context"
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
EID = "urn:ngsi-ld:Vehicle:A4567"


def vehicle(**attrs) -> dict:
    """A Vehicle entity with a speed Property plus the given attributes."""
    return {"id": EID, "type": "Vehicle", "speed": {"type": "Property", "value": 55}, **attrs}


def create(api, entity: dict, **kwargs) -> None:
    """Create an entity and insist on 201."""
    response = api.post_json("/entities", entity, **kwargs)
    assert response.status_code == 201, response.text


def get(api, entity_id: str = EID, **params) -> dict:
    """Retrieve an entity (200) and return its body."""
    headers = params.pop("headers", {})
    response = api.get(f"/entities/{entity_id}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------------------ 5.6.1 create


def test_create_entity_returns_201_with_location_of_the_new_entity(api):
    """5.6.1 / 6.4.3.1: success is 201 Created with a Location header naming /ngsi-ld/v1/entities/{entityId}."""
    response = api.post_json("/entities", vehicle())
    assert response.status_code == 201
    assert response.headers["location"] == f"/ngsi-ld/v1/entities/{EID}"
    assert response.content == b""


def test_created_entity_is_retrievable_unchanged_in_normalized_form(api):
    """5.6.1 + 5.7.1: the normalized representation is lossless."""
    entity = vehicle(isParked={"type": "Relationship", "object": "urn:ngsi-ld:OffStreetParking:Downtown1"})
    create(api, entity)
    assert get(api) == entity


def test_create_existing_entity_is_409_already_exists(api):
    """5.6.1.4: an Entity with the same id already exists -> AlreadyExists (409)."""
    create(api, vehicle())
    assert_problem(api.post_json("/entities", vehicle()), 409, "AlreadyExists")


def test_create_entity_without_id_is_bad_request_data(api):
    """5.6.1.4: the id is mandatory -> BadRequestData."""
    assert_problem(api.post_json("/entities", {"type": "Vehicle"}), 400, "BadRequestData")


def test_create_entity_with_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.6.1.4 / 4.5.2: an Entity id shall be a URI."""
    assert_problem(api.post_json("/entities", {"id": "not a uri", "type": "Vehicle"}), 400, "BadRequestData")


def test_create_entity_without_type_is_bad_request_data(api):
    """5.6.1.4: the type is mandatory -> BadRequestData."""
    assert_problem(api.post_json("/entities", {"id": EID}), 400, "BadRequestData")


def test_create_entity_with_malformed_json_is_invalid_request(api):
    """6.3.2 / 5.5.2: a payload that is not valid JSON -> InvalidRequest (400)."""
    response = api.post("/entities", content=b'{"id": "urn:x:1", "type": ', headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")


def test_create_entity_with_json_array_body_is_rejected(api):
    """5.6.1.4: the payload of Create Entity is one Entity (a JSON object)."""
    response = api.post_json("/entities", [vehicle()])
    assert response.status_code == 400
    assert response.json()["type"] in (ERR + "BadRequestData", ERR + "InvalidRequest")


def test_create_entity_with_unknown_attribute_type_is_bad_request_data(api):
    """4.5.x: an attribute type must be one of the NGSI-LD attribute types."""
    body = vehicle(speed={"type": "Gizmo", "value": 1})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_property_without_value_is_bad_request_data(api):
    """4.5.2: a normalized Property shall have a value member."""
    body = vehicle(speed={"type": "Property", "unitCode": "KMH"})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_relationship_whose_object_is_not_a_uri_is_bad_request_data(api):
    """4.5.3: the object of a Relationship shall be a URI."""
    body = vehicle(isParked={"type": "Relationship", "object": "downtown car park"})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


@pytest.mark.parametrize("name", ["bad name", "a<b", "x=1", "semi;colon", "quo\"te", "paren("])
def test_create_attribute_with_forbidden_characters_in_name_is_bad_request_data(api, name):
    """4.6.2: attribute names shall not contain the characters forbidden in URIs / the query language."""
    body = vehicle(**{name: {"type": "Property", "value": 1}})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_attribute_with_json_null_is_bad_request_data(api):
    """5.2.1: no member admits a null value."""
    assert_problem(api.post_json("/entities", vehicle(speed=None)), 400, "BadRequestData")


def test_create_property_value_null_is_bad_request_data(api):
    """5.2.1: no member admits a null value."""
    body = vehicle(speed={"type": "Property", "value": None})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


@pytest.mark.parametrize("attribute", [
    "urn:ngsi-ld:null",
    {"type": "Property", "value": "urn:ngsi-ld:null"},
    {"type": "Relationship", "object": "urn:ngsi-ld:null"},
    {"type": "Property", "value": 1, "source": {"type": "Property", "value": "urn:ngsi-ld:null"}},
])
def test_create_with_ngsi_ld_null_is_bad_request_data(api, attribute):
    """5.2.1: outside partial update and merge, an NGSI-LD Null shall raise BadRequestData."""
    assert_problem(api.post_json("/entities", vehicle(brand=attribute)), 400, "BadRequestData")
    api.post_json("/entities", {"id": "urn:ngsi-ld:Other:1", "type": "Other"})
    assert_problem(api.get(f"/entities/{EID}"), 404, "ResourceNotFound")


def test_create_with_invalid_observed_at_is_bad_request_data(api):
    """4.5.2 / 4.6.3: observedAt is a DateTime in ISO 8601 format."""
    body = vehicle(speed={"type": "Property", "value": 55, "observedAt": "yesterday"})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


@pytest.mark.parametrize("stamp", ["2026-08-10T12:00:00+02:00", "2026-08-10T12:00Z", "2026-08-10T12:00:00",
                                   "2026-08-10T12:00:00.1234567Z"])
def test_observed_at_must_be_a_complete_utc_datetime(api, stamp):
    """4.6.3: YYYY-MM-DDThh:mm:ss[.ssssss]Z: every component, at most six decimals, always "Z" (UTC)."""
    body = vehicle(speed={"type": "Property", "value": 55, "observedAt": stamp})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_observed_at_with_a_decimal_comma_is_accepted_and_returned_with_a_point(api):
    """4.6.3: "In requests, also a comma instead of a decimal point may be used as separator"."""
    create(api, vehicle(speed={"type": "Property", "value": 55, "observedAt": "2026-08-10T12:00:00,250Z"}))
    assert get(api)["speed"]["observedAt"] == "2026-08-10T12:00:00.250Z"


def test_geometry_collection_value_is_bad_request_data(api):
    """4.6.3: values may be "All the GeoJSON Geometries with the exception of GeometryCollection"."""
    collection = {"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [1, 2]}]}
    assert_problem(api.post_json("/entities", vehicle(location={"type": "GeoProperty", "value": collection})),
                   400, "BadRequestData")


def test_create_with_two_instances_sharing_a_dataset_id_is_bad_request_data(api):
    """4.5.5: instances of a multi-attribute are told apart by datasetId, which must be unique per attribute."""
    body = vehicle(speed=[{"type": "Property", "value": 1, "datasetId": "urn:ngsi-ld:ds:a"},
                          {"type": "Property", "value": 2, "datasetId": "urn:ngsi-ld:ds:a"}])
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_with_two_default_instances_is_bad_request_data(api):
    """4.5.5: at most one instance of an attribute has no datasetId (the default instance)."""
    body = vehicle(speed=[{"type": "Property", "value": 1}, {"type": "Property", "value": 2}])
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_with_dataset_id_that_is_not_a_uri_is_bad_request_data(api):
    """4.5.5: datasetId is a URI."""
    body = vehicle(speed={"type": "Property", "value": 1, "datasetId": "not a uri"})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_create_with_invalid_geojson_is_bad_request_data(api):
    """4.5.x GeoProperty: the value shall be a valid GeoJSON geometry."""
    body = vehicle(location={"type": "GeoProperty", "value": {"type": "Point", "coordinates": "here"}})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_entity_with_several_types_and_scope_round_trips(api):
    """4.5.2 / 4.18: an Entity may have several types and a scope."""
    entity = {"id": EID, "type": ["Vehicle", "Car"], "scope": ["/Madrid/Centro", "/Madrid/Norte"],
              "speed": {"type": "Property", "value": 1}}
    create(api, entity)
    got = get(api)
    assert sorted(got["type"]) == ["Car", "Vehicle"]
    assert sorted(got["scope"]) == ["/Madrid/Centro", "/Madrid/Norte"]


# ------------------------------------------------------------------------------------------------ attribute kinds


def test_property_with_unit_code_observed_at_and_nested_sub_attributes_round_trips(api):
    """4.5.2 / 4.5.x: sub-Properties, sub-Relationships, unitCode and observedAt are kept (normalized)."""
    speed = {"type": "Property", "value": 55, "unitCode": "KMH", "observedAt": "2024-01-01T10:00:00Z",
             "source": {"type": "Property", "value": "Speedometer",
                        "accuracy": {"type": "Property", "value": 0.9}},
             "measuredBy": {"type": "Relationship", "object": "urn:ngsi-ld:Device:1"}}
    create(api, vehicle(speed=speed))
    assert get(api)["speed"] == speed


def test_geoproperty_round_trips(api):
    """4.5.x: a GeoProperty holds a GeoJSON geometry as its value."""
    location = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [-3.7, 40.4]}}
    create(api, vehicle(location=location))
    assert get(api)["location"] == location


def test_relationship_with_object_type_round_trips(api):
    """4.5.3: a Relationship may carry objectType."""
    rel = {"type": "Relationship", "object": "urn:ngsi-ld:OffStreetParking:D1", "objectType": "OffStreetParking"}
    create(api, vehicle(isParked=rel))
    assert get(api)["isParked"] == rel


def test_language_property_round_trips(api):
    """4.5.18: a LanguageProperty holds a languageMap."""
    street = {"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}
    create(api, vehicle(street=street))
    assert get(api)["street"] == street


def test_language_property_with_lang_is_returned_as_property_with_lang(api):
    """4.5.18 / 5.7.1 lang: with lang, a LanguageProperty is returned as a Property holding one string + lang."""
    create(api, vehicle(street={"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}))
    assert get(api, lang="nl")["street"] == {"type": "Property", "value": "Grote Markt", "lang": "nl"}


def test_language_property_lang_prefers_higher_quality_value(api):
    """4.15 / 5.7.1: lang follows the Accept-Language syntax, q weights included."""
    create(api, vehicle(street={"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}))
    assert get(api, lang="fr;q=0.5,nl;q=0.9")["street"]["lang"] == "nl"


def test_language_property_with_lang_in_simplified_form_is_the_string(api):
    """4.5.18 / 4.5.4: in simplified form with lang, the value is the chosen string."""
    create(api, vehicle(street={"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}))
    assert get(api, lang="fr", options="keyValues")["street"] == "Grand Place"


def test_language_property_in_simplified_form_without_lang_is_a_language_map_object(api):
    """4.5.4: the simplified form of a LanguageProperty is {"languageMap": {...}}."""
    create(api, vehicle(street={"type": "LanguageProperty", "languageMap": {"fr": "Grand Place"}}))
    assert get(api, options="keyValues")["street"] == {"languageMap": {"fr": "Grand Place"}}


def test_language_map_with_non_string_values_is_bad_request_data(api):
    """4.5.18: a languageMap maps language tags to strings."""
    body = vehicle(street={"type": "LanguageProperty", "languageMap": {"fr": 12}})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_list_property_round_trips_and_simplifies_to_the_list(api):
    """4.5.21 ListProperty: valueList keeps order; simplified form is the array."""
    depths = {"type": "ListProperty", "valueList": [300, 300, 120, 6], "unitCode": "MMT"}
    create(api, vehicle(tyreTreadDepths=depths))
    assert get(api)["tyreTreadDepths"] == depths
    assert get(api, options="keyValues")["tyreTreadDepths"] == [300, 300, 120, 6]


def test_list_property_whose_value_list_is_not_an_array_is_bad_request_data(api):
    """4.5.21: valueList is an array."""
    body = vehicle(depths={"type": "ListProperty", "valueList": 3})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_list_relationship_round_trips(api):
    """4.5.22 ListRelationship: objectList keeps order."""
    route = {"type": "ListRelationship", "objectList": [{"object": "urn:ngsi-ld:City:Antwerp"},
                                                         {"object": "urn:ngsi-ld:City:Rotterdam"}]}
    create(api, vehicle(route=route))
    assert get(api)["route"] == route


def test_json_property_is_kept_verbatim_and_simplifies_to_json_object(api):
    """4.5.24 JsonProperty: the json member is never expanded/compacted; simplified form is {"json": ...}."""
    payload = {"type": "Feature", "speed": 1, "nested": {"@id": "x", "value": None}}
    create(api, vehicle(config={"type": "JsonProperty", "json": payload}))
    assert get(api)["config"] == {"type": "JsonProperty", "json": payload}
    assert get(api, options="keyValues")["config"] == {"json": payload}


def test_vocab_property_is_compacted_with_the_request_context(api, context_server):
    """4.5.20: the vocab of a VocabProperty is expanded on input and compacted with the response @context."""
    url = context_server.publish("/vocab-ctx.jsonld", {"car": "https://example.org/vocab/car", "category": "https://example.org/category"})
    create(api, vehicle(category={"type": "VocabProperty", "vocab": "car"}), headers=link(url))
    assert get(api, headers=link(url))["category"] == {"type": "VocabProperty", "vocab": "car"}
    assert get(api)["https://example.org/category"] == {"type": "VocabProperty", "vocab": "https://example.org/vocab/car"}


# ------------------------------------------------------------------------------------------------ representations


def test_simplified_representation_via_options_key_values(api):
    """4.5.4: simplified: each attribute is its value (Relationship: its object)."""
    create(api, vehicle(isParked={"type": "Relationship", "object": "urn:ngsi-ld:P:1"},
                        location={"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1.0, 2.0]}}))
    assert get(api, options="keyValues") == {"id": EID, "type": "Vehicle", "speed": 55, "isParked": "urn:ngsi-ld:P:1",
                                             "location": {"type": "Point", "coordinates": [1.0, 2.0]}}


def test_simplified_representation_via_format_parameter(api):
    """6.3.x format=simplified is the same as options=keyValues."""
    create(api, vehicle())
    assert get(api, format="simplified") == {"id": EID, "type": "Vehicle", "speed": 55}
    assert get(api, format="keyValues") == {"id": EID, "type": "Vehicle", "speed": 55}


def test_concise_representation_drops_redundant_type_members(api):
    """4.5.x concise: a Property without sub-attributes is its value; type members are omitted."""
    create(api, vehicle(temperature={"type": "Property", "value": 20, "unitCode": "CEL"},
                        isParked={"type": "Relationship", "object": "urn:ngsi-ld:P:1"},
                        street={"type": "LanguageProperty", "languageMap": {"fr": "Rue"}}))
    got = get(api, options="concise")
    assert got["speed"] == 55
    assert got["temperature"] == {"value": 20, "unitCode": "CEL"}
    assert got["isParked"] == {"object": "urn:ngsi-ld:P:1"}
    assert got["street"] == {"languageMap": {"fr": "Rue"}}
    assert got["id"] == EID and got["type"] == "Vehicle"
    assert get(api, format="concise") == got


def test_concise_input_is_stored_as_normalized(api):
    """4.5.x concise input: type is inferred from the members (value -> Property, object -> Relationship, ...)."""
    create(api, {"id": EID, "type": "Vehicle", "speed": 55,
                 "temperature": {"value": 20, "unitCode": "CEL"},
                 "isParked": {"object": "urn:ngsi-ld:P:1"},
                 "street": {"languageMap": {"fr": "Rue"}},
                 "location": {"type": "Point", "coordinates": [1.0, 2.0]}})
    got = get(api)
    assert got["speed"] == {"type": "Property", "value": 55}
    assert got["temperature"] == {"type": "Property", "value": 20, "unitCode": "CEL"}
    assert got["isParked"] == {"type": "Relationship", "object": "urn:ngsi-ld:P:1"}
    assert got["street"] == {"type": "LanguageProperty", "languageMap": {"fr": "Rue"}}
    assert got["location"] == {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1.0, 2.0]}}


def test_unknown_format_is_bad_request_data(api):
    """6.3.x: format takes normalized, concise or simplified (keyValues)."""
    create(api, vehicle())
    assert_problem(api.get(f"/entities/{EID}", params={"format": "fancy"}), 400, "BadRequestData")


def test_multi_attribute_instances_are_returned_as_an_array(api):
    """4.5.5: an attribute with several datasetId instances is an array of instances."""
    speed = [{"type": "Property", "value": 55, "datasetId": "urn:ngsi-ld:ds:gps"},
             {"type": "Property", "value": 54, "datasetId": "urn:ngsi-ld:ds:wheel"}]
    create(api, vehicle(speed=speed))
    got = get(api)["speed"]
    assert sorted(got, key=lambda i: i["datasetId"]) == speed


# ------------------------------------------------------------------------------------------------ 5.7.1 retrieve


def test_retrieve_unknown_entity_is_404_resource_not_found(api):
    """5.7.1.4: no Entity with that id -> ResourceNotFound."""
    create(api, vehicle())
    assert_problem(api.get("/entities/urn:ngsi-ld:Vehicle:nope"), 404, "ResourceNotFound")


def test_retrieve_with_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.7.1.4: an invalid Entity id -> BadRequestData."""
    create(api, vehicle())
    assert_problem(api.get("/entities/not-a-uri"), 400, "BadRequestData")


def test_retrieve_with_attrs_returns_only_those_attributes(api):
    """5.7.1: attrs restricts the attributes returned."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}, colour={"type": "Property", "value": "red"}))
    assert get(api, attrs="brand,colour") == {"id": EID, "type": "Vehicle",
                                               "brand": {"type": "Property", "value": "Mercedes"},
                                               "colour": {"type": "Property", "value": "red"}}


def test_retrieve_with_pick_projects_members(api):
    """4.21 / 5.7.1 pick: only the listed Entity members (id, type and attributes) are returned."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}))
    assert get(api, pick="id,brand") == {"id": EID, "brand": {"type": "Property", "value": "Mercedes"}}


def test_retrieve_with_omit_leaves_members_out(api):
    """4.21 / 5.7.1 omit: the listed Entity members are left out."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}))
    assert get(api, omit="type,speed") == {"id": EID, "brand": {"type": "Property", "value": "Mercedes"}}


def test_retrieve_with_both_pick_and_omit_is_bad_request_data(api):
    """4.21: pick and omit are mutually exclusive."""
    create(api, vehicle())
    assert_problem(api.get(f"/entities/{EID}", params={"pick": "id", "omit": "type"}), 400, "BadRequestData")


def test_retrieve_geojson_feature_carries_the_context(api, context_server):
    """4.5.16 / 6.3.15: a retrieved GeoJSON Feature holds an @context member (ETSI 018_05), and the Link header."""
    url = context_server.publish("/feature-ctx.jsonld", {"Vehicle": "https://example.org/Vehicle"})
    create(api, vehicle(location={"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1, 2]}}),
           headers=link(url))
    feature = get(api, headers={"Accept": "application/geo+json", **link(url)})
    assert feature["type"] == "Feature" and feature["id"] == EID
    assert feature["geometry"] == {"type": "Point", "coordinates": [1, 2]}
    assert feature["properties"]["type"] == "Vehicle"
    assert feature["@context"] == url
    assert get(api, headers={"Accept": "application/geo+json"})["@context"] == CORE


def test_retrieve_without_sys_attrs_shows_no_system_attributes(api):
    """4.8: createdAt/modifiedAt are only returned when options=sysAttrs."""
    create(api, vehicle())
    got = get(api)
    assert "createdAt" not in got and "modifiedAt" not in got
    assert "createdAt" not in got["speed"] and "modifiedAt" not in got["speed"]


def test_retrieve_with_sys_attrs_shows_created_and_modified_at(api):
    """4.8 / 5.7.1 options=sysAttrs: createdAt and modifiedAt of the Entity and its attributes."""
    create(api, vehicle(speed={"type": "Property", "value": 55, "source": {"type": "Property", "value": "gps"}}))
    got = get(api, options="sysAttrs")
    for node in (got, got["speed"], got["speed"]["source"]):
        assert DATETIME.match(node["createdAt"]) and DATETIME.match(node["modifiedAt"])
        assert node["createdAt"] <= node["modifiedAt"]


def test_sys_attrs_are_also_returned_in_concise_form(api):
    """4.5.x: concise is lossless, so options=concise,sysAttrs returns createdAt/modifiedAt too."""
    create(api, vehicle())
    got = get(api, options="concise,sysAttrs")
    assert DATETIME.match(got["createdAt"]) and DATETIME.match(got["modifiedAt"])
    assert got["speed"]["value"] == 55 and DATETIME.match(got["speed"]["createdAt"])


def test_sys_attrs_given_by_the_client_are_ignored(api):
    """4.8: createdAt/modifiedAt are system generated; values given on input are not taken."""
    body = vehicle(speed={"type": "Property", "value": 1, "createdAt": "2000-01-01T00:00:00Z"})
    body["createdAt"] = "2000-01-01T00:00:00Z"
    create(api, body)
    got = get(api, options="sysAttrs")
    assert got["createdAt"] != "2000-01-01T00:00:00Z"
    assert got["speed"]["createdAt"] != "2000-01-01T00:00:00Z"


# ------------------------------------------------------------------------------------------------ 6.3 content negotiation


def test_response_to_accept_json_carries_the_context_in_a_link_header(api):
    """6.3.6 / 6.3.11: application/json responses carry the @context in a Link header, not in the body."""
    create(api, vehicle())
    response = api.get(f"/entities/{EID}", headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "@context" not in response.json()
    header = response.headers["link"]
    assert f'rel="{CTX_REL}"' in header and CORE in header


def test_response_to_accept_ld_json_carries_the_context_in_the_body(api):
    """6.3.6: application/ld+json responses carry @context in the body and no context Link header."""
    create(api, vehicle())
    response = api.get(f"/entities/{EID}", headers={"Accept": "application/ld+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/ld+json")
    assert "@context" in response.json()
    assert CTX_REL not in response.headers.get("link", "")


def test_accept_any_media_type_gives_json(api):
    """6.3.4: */* -> application/json."""
    create(api, vehicle())
    response = api.get(f"/entities/{EID}", headers={"Accept": "*/*"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")


def test_accept_of_unsupported_media_type_is_406(api):
    """6.3.4: an Accept header that names no supported media type -> 406 Not Acceptable."""
    create(api, vehicle())
    response = api.get(f"/entities/{EID}", headers={"Accept": "text/html"})
    assert response.status_code == 406
    assert response.json()["type"].startswith(ERR)


def test_unsupported_content_type_is_415(api):
    """6.3.4: a body that is neither application/json nor application/ld+json -> 415 Unsupported Media Type."""
    response = api.post("/entities", content=orjson.dumps(vehicle()), headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["type"].startswith(ERR)


def test_ld_json_body_without_context_is_bad_request_data(api):
    """6.3.5: with application/ld+json the @context shall be in the body."""
    response = api.send_json("POST", "/entities", vehicle(), content_type="application/ld+json")
    assert_problem(response, 400, "BadRequestData")


def test_json_body_with_context_member_is_bad_request_data(api):
    """6.3.5: with application/json the @context shall come from the Link header, never the body."""
    body = dict(vehicle(), **{"@context": CORE})
    assert_problem(api.post_json("/entities", body), 400, "BadRequestData")


def test_context_in_ld_json_body_expands_attribute_names(api, context_server):
    """6.3.5 / 5.5.7: terms are expanded with the @context given in an application/ld+json body."""
    url = context_server.publish("/fleet.jsonld", {"speed": "https://example.org/fleet/speed",
                                                   "Vehicle": "https://example.org/fleet/Vehicle"})
    body = dict(vehicle(), **{"@context": [url, CORE]})
    assert api.send_json("POST", "/entities", body, content_type="application/ld+json").status_code == 201
    plain = get(api)
    assert plain["type"] == "https://example.org/fleet/Vehicle"
    assert plain["https://example.org/fleet/speed"] == {"type": "Property", "value": 55}
    assert get(api, headers=link(url)) == vehicle()


def test_context_in_link_header_expands_and_compacts_names(api, context_server):
    """6.3.5 / 6.3.6: with application/json the Link header @context is used for expansion and compaction."""
    url = context_server.publish("/fleet2.jsonld", {"speed": "https://example.org/fleet2/speed"})
    create(api, vehicle(), headers=link(url))
    response = api.get(f"/entities/{EID}", headers=link(url))
    assert response.json()["speed"] == {"type": "Property", "value": 55}
    assert url in response.headers["link"]
    assert "https://example.org/fleet2/speed" in get(api)


def test_ld_json_response_echoes_the_request_context(api, context_server):
    """6.3.6: the @context used for compaction is given back in the body of an ld+json response."""
    url = context_server.publish("/fleet3.jsonld", {"speed": "https://example.org/fleet3/speed"})
    create(api, vehicle(), headers=link(url))
    body = get(api, headers={**link(url), "Accept": "application/ld+json"})
    assert body["@context"] == url or url in body["@context"]
    assert body["speed"]["value"] == 55


def test_oversized_body_is_413_problem_details(api):
    """Broker limit (CITYBRIDGE_MAX_BODY_BYTES = 1 MiB): a larger body is refused with 413, never a 500."""
    body = vehicle(blob={"type": "Property", "value": "x" * (1024 * 1024 + 10)})
    response = api.post_json("/entities", body)
    assert response.status_code == 413
    assert response.json()["type"].startswith(ERR)
    api.post_json("/entities", {"id": "urn:ngsi-ld:Other:1", "type": "Other"})
    assert api.get(f"/entities/{EID}").status_code == 404


# ------------------------------------------------------------------------------------------------ 5.6.17 merge


def test_merge_entity_adds_and_updates_attributes_and_keeps_the_rest(api):
    """5.6.17: merge adds new attributes, updates given ones, leaves others unchanged; 204."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}))
    response = api.send_json("PATCH", f"/entities/{EID}", {"speed": {"type": "Property", "value": 80},
                                                            "colour": {"type": "Property", "value": "red"}})
    assert response.status_code == 204
    got = get(api)
    assert got["speed"]["value"] == 80 and got["colour"]["value"] == "red" and got["brand"]["value"] == "Mercedes"


def test_merge_entity_with_ngsi_ld_null_deletes_the_attribute(api):
    """5.6.17 / 5.5.12: an attribute whose value is urn:ngsi-ld:null is removed."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}))
    assert api.send_json("PATCH", f"/entities/{EID}", {"brand": "urn:ngsi-ld:null"}).status_code == 204
    assert "brand" not in get(api)
    assert api.send_json("PATCH", f"/entities/{EID}", {"speed": {"type": "Property", "value": "urn:ngsi-ld:null"}}).status_code == 204
    assert "speed" not in get(api)


def test_merge_entity_merges_within_an_attribute(api):
    """5.5.12: merge patches members: unitCode stays when only value is given; a null sub-attribute is removed."""
    create(api, vehicle(speed={"type": "Property", "value": 55, "unitCode": "KMH",
                               "source": {"type": "Property", "value": "gps"}}))
    body = {"speed": {"type": "Property", "value": 60, "source": "urn:ngsi-ld:null"}}
    assert api.send_json("PATCH", f"/entities/{EID}", body).status_code == 204
    assert get(api)["speed"] == {"type": "Property", "value": 60, "unitCode": "KMH"}


def test_merge_entity_accepts_merge_patch_json(api):
    """6.3.4 / 5.6.17: PATCH on an Entity accepts application/merge-patch+json."""
    create(api, vehicle())
    response = api.send_json("PATCH", f"/entities/{EID}", {"speed": 70}, content_type="application/merge-patch+json")
    assert response.status_code == 204
    assert get(api)["speed"] == {"type": "Property", "value": 70}


def test_merge_entity_targets_the_instance_with_the_given_dataset_id(api):
    """5.6.17 / 4.5.5: only the instance with the same datasetId is merged."""
    create(api, vehicle(speed=[{"type": "Property", "value": 1, "datasetId": "urn:ngsi-ld:ds:a"},
                               {"type": "Property", "value": 2, "datasetId": "urn:ngsi-ld:ds:b"}]))
    body = {"speed": {"type": "Property", "value": 9, "datasetId": "urn:ngsi-ld:ds:b"}}
    assert api.send_json("PATCH", f"/entities/{EID}", body).status_code == 204
    values = {i["datasetId"]: i["value"] for i in get(api)["speed"]}
    assert values == {"urn:ngsi-ld:ds:a": 1, "urn:ngsi-ld:ds:b": 9}


def test_merge_unknown_entity_is_404_resource_not_found(api):
    """5.6.17.4: target Entity does not exist -> ResourceNotFound."""
    create(api, vehicle())
    assert_problem(api.send_json("PATCH", "/entities/urn:ngsi-ld:Vehicle:nope", {"speed": 1}), 404, "ResourceNotFound")


def test_merge_with_a_different_id_in_the_body_is_bad_request_data(api):
    """5.6.17.4: the id in the payload, if any, shall match the id in the URL."""
    create(api, vehicle())
    assert_problem(api.send_json("PATCH", f"/entities/{EID}", {"id": "urn:ngsi-ld:Vehicle:other", "speed": 1}),
                   400, "BadRequestData")


def test_merge_updates_modified_at_but_not_created_at(api):
    """4.8: modifications change modifiedAt and never createdAt."""
    create(api, vehicle())
    before = get(api, options="sysAttrs")
    api.send_json("PATCH", f"/entities/{EID}", {"speed": 99})
    after = get(api, options="sysAttrs")
    assert after["createdAt"] == before["createdAt"]
    assert after["modifiedAt"] >= before["modifiedAt"]
    assert after["speed"]["createdAt"] == before["speed"]["createdAt"]


# ------------------------------------------------------------------------------------------------ 5.6.18 replace


def test_replace_entity_replaces_all_attributes(api):
    """5.6.18: the Entity is replaced wholesale; attributes not given are gone; 204."""
    create(api, vehicle(brand={"type": "Property", "value": "Mercedes"}))
    response = api.send_json("PUT", f"/entities/{EID}", {"id": EID, "type": "Vehicle", "colour": {"type": "Property", "value": "red"}})
    assert response.status_code == 204
    assert get(api) == {"id": EID, "type": "Vehicle", "colour": {"type": "Property", "value": "red"}}


def test_replace_entity_keeps_created_at(api):
    """5.6.18 / 4.8: the replaced Entity keeps its creation time."""
    create(api, vehicle())
    created = get(api, options="sysAttrs")["createdAt"]
    api.send_json("PUT", f"/entities/{EID}", vehicle())
    assert get(api, options="sysAttrs")["createdAt"] == created


def test_replace_unknown_entity_is_404_resource_not_found(api):
    """5.6.18.4: target Entity does not exist -> ResourceNotFound."""
    create(api, vehicle())
    body = {"id": "urn:ngsi-ld:Vehicle:nope", "type": "Vehicle"}
    assert_problem(api.send_json("PUT", "/entities/urn:ngsi-ld:Vehicle:nope", body), 404, "ResourceNotFound")


def test_replace_with_a_different_id_in_the_body_is_bad_request_data(api):
    """5.6.18.4: the id in the payload shall match the id in the URL."""
    create(api, vehicle())
    body = {"id": "urn:ngsi-ld:Vehicle:other", "type": "Vehicle"}
    assert_problem(api.send_json("PUT", f"/entities/{EID}", body), 400, "BadRequestData")


def test_replace_with_invalid_attribute_leaves_the_entity_unchanged(api):
    """5.6.18.4: invalid content -> BadRequestData, and nothing changes."""
    create(api, vehicle())
    body = {"id": EID, "type": "Vehicle", "bad": {"type": "Relationship", "object": "nope"}}
    assert_problem(api.send_json("PUT", f"/entities/{EID}", body), 400, "BadRequestData")
    assert get(api) == vehicle()


# ------------------------------------------------------------------------------------------------ 5.6.6 delete


def test_delete_entity_is_204_and_the_entity_is_gone(api):
    """5.6.6: success is 204 No Content; the Entity can no longer be retrieved."""
    create(api, vehicle())
    response = api.delete(f"/entities/{EID}")
    assert response.status_code == 204 and response.content == b""
    assert_problem(api.get(f"/entities/{EID}"), 404, "ResourceNotFound")


def test_delete_unknown_entity_is_404_resource_not_found(api):
    """5.6.6.4: no such Entity -> ResourceNotFound."""
    create(api, vehicle())
    assert_problem(api.delete("/entities/urn:ngsi-ld:Vehicle:nope"), 404, "ResourceNotFound")


def test_delete_entity_with_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.6.6.4: an invalid Entity id -> BadRequestData."""
    create(api, vehicle())
    assert_problem(api.delete("/entities/not-a-uri"), 400, "BadRequestData")


def test_entity_id_can_be_reused_after_delete(api):
    """5.6.6 + 5.6.1: after deletion an Entity with the same id can be created again."""
    create(api, vehicle())
    api.delete(f"/entities/{EID}")
    create(api, vehicle(speed={"type": "Property", "value": 1}))
    assert get(api)["speed"]["value"] == 1


def test_accept_quality_values_select_the_preferred_media_type(api):
    """6.3.4: Accept is evaluated with its q weights (RFC 9110)."""
    create(api, vehicle())
    response = api.get(f"/entities/{EID}", headers={"Accept": "application/json;q=0.1, application/ld+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/ld+json")


def test_content_type_with_charset_parameter_is_accepted(api):
    """6.3.4: media type parameters such as charset do not change the media type."""
    response = api.post("/entities", content=orjson.dumps(vehicle()),
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 201
    assert get(api) == vehicle()


def test_method_not_allowed_is_405_with_allow_header(api):
    """6.3.2: an HTTP verb the resource does not support is 405 with an Allow header naming those it does."""
    got = api.put("/entities", content=b"{}", headers={"Content-Type": "application/json"})
    assert got.status_code == 405
    assert {m.strip() for m in got.headers["Allow"].split(",")} == {"GET", "POST"}
    got = api.post(f"/entities/{EID}", content=b"{}", headers={"Content-Type": "application/json"})
    assert got.status_code == 405
    assert {m.strip() for m in got.headers["Allow"].split(",")} == {"GET", "PUT", "PATCH", "DELETE"}


@pytest.mark.parametrize("method,path", [("PUT", ""), ("PATCH", ""), ("POST", "/attrs"), ("PATCH", "/attrs")])
def test_jsonld_array_body_is_400_not_500(api, method, path):
    """6.3.5: an application/ld+json body that is an empty array is BadRequestData, never an InternalError."""
    api.post_json("/entities", {"id": "urn:ngsi-ld:Vehicle:a1", "type": "Vehicle"})
    got = api.send_json(method, f"/entities/urn:ngsi-ld:Vehicle:a1{path}", [], content_type="application/ld+json")
    assert_problem(got, 400, "BadRequestData")


def test_trailing_slash_resource_uris_are_served_directly(api):
    """6.2 Table 6.2-1: the Entity List /entities/ and Attribute List /entities/{id}/attrs/ are answered by their
    handlers, with no redirect (the ETSI suite posts to these URIs)."""
    created = api.post_json("/entities/", {"id": "urn:ngsi-ld:Vehicle:s1", "type": "Vehicle"})
    assert created.status_code == 201, created.text
    listed = api.get("/entities/", params={"type": "Vehicle", "options": "keyValues"})
    assert listed.status_code == 200 and listed.json() == [{"id": "urn:ngsi-ld:Vehicle:s1", "type": "Vehicle"}]
    appended = api.post_json("/entities/urn:ngsi-ld:Vehicle:s1/attrs/", {"speed": {"type": "Property", "value": 1}})
    assert appended.status_code == 204, appended.text
    updated = api.send_json("PATCH", "/entities/urn:ngsi-ld:Vehicle:s1/attrs/", {"speed": {"type": "Property", "value": 2}})
    assert updated.status_code == 204, updated.text
    got = api.get("/entities/urn:ngsi-ld:Vehicle:s1", params={"options": "keyValues"}).json()
    assert got == {"id": "urn:ngsi-ld:Vehicle:s1", "type": "Vehicle", "speed": 2}


@pytest.mark.parametrize("method,path", [
    ("POST", "/entities//attrs"), ("POST", "/entities//attrs/"), ("PATCH", "/entities//attrs"),
    ("PATCH", "/entities//attrs/speed"), ("PUT", "/entities//attrs/speed"), ("DELETE", "/entities//attrs/speed"),
    ("PUT", "/entities/"), ("PATCH", "/entities/"), ("DELETE", "/entities/")])
def test_missing_entity_id_is_bad_request_data(api, method, path):
    """5.6.2.4-5.6.6.4, 5.6.17.4-5.6.19.4 (ETSI 010_02_01, 011_02_01, 012_02_01, 013_02_01, 054_02_02, 056_02_02):
    an empty entity id in the URL is BadRequestData, not 404 or 405."""
    body = None if method == "DELETE" else {"speed": {"type": "Property", "value": 1}}
    got = api.request(method, path, content=orjson.dumps(body) if body else None,
                      headers={"Content-Type": "application/json"} if body else {})
    assert_problem(got, 400, "BadRequestData")
