"""Conformance: batch entity operations (ETSI GS CIM 009 v1.8 clauses 5.6.7 create, 5.6.8 upsert, 5.6.9 update,
5.6.10 delete, 5.6.20 merge; 6.14-6.17, 6.31) and Query by POST (5.7.2 with a Query body, 6.23).

201 / 204 when every entity succeeds, else 207 Multi-Status with a BatchOperationResult (5.2.16):
{"success": [entity ids], "errors": [BatchEntityError {"entityId", "error": ProblemDetails}]}."""
from __future__ import annotations

import pytest

from tests.conftest import CORE, assert_problem, link

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
OPS = "/entityOperations"


def eid(n) -> str:
    """An entity id."""
    return f"urn:ngsi-ld:Car:{n}"


def car(n, **attrs) -> dict:
    """A Car entity with Property attributes."""
    return {"id": eid(n), "type": "Car", **{k: {"type": "Property", "value": v} for k, v in attrs.items()}}


def get(api, n) -> dict | None:
    """The entity in keyValues form, or None if it does not exist."""
    response = api.get(f"/entities/{eid(n)}", params={"options": "keyValues"})
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def error_of(result: dict, entity_id: str) -> dict:
    """The ProblemDetails reported for entity_id in a BatchOperationResult."""
    (entry,) = [e for e in result["errors"] if e["entityId"] == entity_id]
    return entry["error"]


def check_multi_status(response, success: list[str], failed: dict[str, str]) -> dict:
    """A 207 with exactly these successes and these failures (entity id -> NGSI-LD error type)."""
    assert response.status_code == 207, response.text
    result = response.json()
    assert sorted(result["success"]) == sorted(success)
    assert sorted(e["entityId"] for e in result["errors"]) == sorted(failed)
    for entity_id, name in failed.items():
        problem = error_of(result, entity_id)
        assert problem["type"] == ERR + name
        assert isinstance(problem.get("status"), int) or "title" in problem
    return result


# --------------------------------------------------------------------------------------------- create (5.6.7)


def test_create_all_ok_is_201_with_ids(api):
    """5.6.7: all created -> 201 with the array of created entity ids."""
    response = api.post_json(f"{OPS}/create", [car(1, speed=10), car(2, speed=20)])
    assert response.status_code == 201, response.text
    assert sorted(response.json()) == [eid(1), eid(2)]
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 10}
    assert get(api, 2)["speed"] == 20


def test_create_existing_is_207_already_exists(api):
    """5.6.7: an existing entity fails alone (AlreadyExists), the others are created."""
    api.post_json("/entities", car(1, speed=10))
    response = api.post_json(f"{OPS}/create", [car(1, speed=99), car(2, speed=20)])
    check_multi_status(response, [eid(2)], {eid(1): "AlreadyExists"})
    assert get(api, 1)["speed"] == 10
    assert get(api, 2)["speed"] == 20


def test_create_duplicate_in_same_batch(api):
    """5.6.7: the second entity with an id already created by the batch fails with AlreadyExists."""
    response = api.post_json(f"{OPS}/create", [car(1, speed=1), car(1, speed=2)])
    result = check_multi_status(response, [eid(1)], {eid(1): "AlreadyExists"})
    assert len(result["errors"]) == 1
    assert get(api, 1)["speed"] == 1


def test_create_invalid_entity_is_207_bad_request_data(api):
    """5.6.7: an invalid entity (no type) fails alone with BadRequestData."""
    response = api.post_json(f"{OPS}/create", [{"id": eid(1)}, car(2, speed=20)])
    check_multi_status(response, [eid(2)], {eid(1): "BadRequestData"})
    assert get(api, 1) is None


def test_create_invalid_id(api):
    """5.6.7: an entity whose id is not a URI fails with BadRequestData."""
    response = api.post_json(f"{OPS}/create", [{"id": "not a uri", "type": "Car"}, car(2)])
    assert response.status_code == 207
    result = response.json()
    assert result["success"] == [eid(2)]
    assert result["errors"][0]["error"]["type"] == ERR + "BadRequestData"


def test_create_all_failed_is_207_with_empty_success(api):
    """5.6.7: if no entity is created the answer is still 207, with an empty success list."""
    api.post_json("/entities", car(1))
    check_multi_status(api.post_json(f"{OPS}/create", [car(1)]), [], {eid(1): "AlreadyExists"})


def test_create_body_not_an_array_is_400(api):
    """5.6.7 / 6.14: the body shall be an array of entities."""
    for body in [{"id": "urn:ngsi-ld:Car:1", "type": "Car"}, "x", 3]:
        response = api.post_json(f"{OPS}/create", body)
        assert response.status_code == 400
        assert response.json()["type"] in (ERR + "BadRequestData", ERR + "InvalidRequest")


def test_create_invalid_json_is_400(api):
    """6.3.x: a body that is not JSON is InvalidRequest."""
    response = api.post(f"{OPS}/create", content=b"[{", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["type"] == ERR + "InvalidRequest"


@pytest.mark.parametrize("op", ["create", "upsert", "update", "merge"])
def test_json_entity_with_body_context_fails_alone(api, op):
    """6.3.5 / 5.6.7-5.6.9, 5.6.20 (ETSI 003_06_01): with application/json an entity carrying an @context is a
    BadRequestData error of a 207; its siblings go ahead."""
    api.post_json(f"{OPS}/create", [car(1, speed=1), car(2, speed=2)])
    batch = [{**car(1 if op != "create" else 3, speed=10), "@context": CORE}, car(2 if op != "create" else 4, speed=20)]
    response = api.post_json(f"{OPS}/{op}", batch)
    bad, good = batch[0]["id"], batch[1]["id"]
    check_multi_status(response, [good], {bad: "BadRequestData"})
    assert api.get(f"/entities/{good}", params={"options": "keyValues"}).json()["speed"] == 20


@pytest.mark.parametrize("op", ["create", "upsert", "update", "merge"])
def test_jsonld_entity_without_context_fails_alone(api, op):
    """6.3.5 / 5.6.7-5.6.9, 5.6.20 (ETSI 003_08_01): with application/ld+json an entity without an @context is a
    BadRequestData error of a 207; its siblings go ahead."""
    api.post_json(f"{OPS}/create", [car(1, speed=1), car(2, speed=2)])
    batch = [car(1 if op != "create" else 3, speed=10), {**car(2 if op != "create" else 4, speed=20), "@context": CORE}]
    response = api.send_json("POST", f"{OPS}/{op}", batch, content_type="application/ld+json")
    bad, good = batch[0]["id"], batch[1]["id"]
    check_multi_status(response, [good], {bad: "BadRequestData"})
    assert api.get(f"/entities/{good}", params={"options": "keyValues"}).json()["speed"] == 20


def test_jsonld_batch_with_link_header_is_400(api):
    """6.3.5 (ETSI 003_09_01): application/ld+json with a JSON-LD Link header fails the whole request."""
    response = api.send_json("POST", f"{OPS}/create", [{**car(1), "@context": CORE}],
                             content_type="application/ld+json", headers=link(CORE))
    assert_problem(response, 400, "BadRequestData")
    assert get(api, 1) is None


@pytest.mark.parametrize("media", ["application/json", "application/ld+json"])
@pytest.mark.parametrize("op", ["create", "upsert", "update", "merge", "delete"])
def test_empty_batch_is_400(api, op, media):
    """5.6.7.4-5.6.10.4, 5.6.20.4 (ETSI 003_03_02, 006_03_02): an empty array is BadRequestData (never a 500)."""
    assert_problem(api.send_json("POST", f"{OPS}/{op}", [], content_type=media), 400, "BadRequestData")


@pytest.mark.parametrize("op", ["create", "upsert", "update", "merge", "delete"])
def test_batch_with_a_null_item_is_400(api, op):
    """5.6.7.4-5.6.10.4, 5.6.20.4: an array with a null item is BadRequestData; nothing is changed."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    item = eid(1) if op == "delete" else (car(2, speed=2) if op in ("create", "upsert") else car(1, speed=5))
    assert_problem(api.post_json(f"{OPS}/{op}", [item, None]), 400, "BadRequestData")
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 1}
    assert get(api, 2) is None


# --------------------------------------------------------------------------------------------- upsert (5.6.8)


def test_upsert_all_new_is_201(api):
    """5.6.8: entities that did not exist are created: 201 with their ids."""
    response = api.post_json(f"{OPS}/upsert", [car(1, speed=1), car(2, speed=2)])
    assert response.status_code == 201
    assert sorted(response.json()) == [eid(1), eid(2)]


def test_upsert_all_existing_is_204(api):
    """5.6.8: if every entity existed and was updated: 204."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/upsert", [car(1, speed=5)])
    assert response.status_code == 204
    assert get(api, 1)["speed"] == 5


def test_upsert_mixed_is_201_with_created_ids_only(api):
    """5.6.8: 201 lists only the ids of the entities created by the request."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/upsert", [car(1, speed=5), car(2, speed=6)])
    assert response.status_code == 201
    assert response.json() == [eid(2)]


def test_upsert_default_replaces(api):
    """5.6.8: by default (options=replace) an existing entity is replaced: attributes not given are gone."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red")])
    assert api.post_json(f"{OPS}/upsert", [car(1, speed=5)]).status_code == 204
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 5}


def test_upsert_options_replace(api):
    """5.6.8: options=replace replaces the existing entities."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red")])
    assert api.post_json(f"{OPS}/upsert", [car(1, speed=5)], params={"options": "replace"}).status_code == 204
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 5}


def test_concise_attributes_get_system_attributes_and_can_be_updated(api):
    """4.5.x concise + 4.8: an attribute given as a bare value is a Property with createdAt/modifiedAt like any
    other, so a later update (options=update) of it succeeds."""
    assert api.post_json(f"{OPS}/create", [{"id": eid(1), "type": "Car", "speed": 3}]).status_code == 201
    got = api.get(f"/entities/{eid(1)}", params={"options": "sysAttrs"}).json()
    assert {"createdAt", "modifiedAt"} <= got["speed"].keys()
    got = api.post_json(f"{OPS}/upsert", [{"id": eid(1), "type": "Car", "speed": 4}], params={"options": "update"})
    assert got.status_code == 204, got.text
    assert get(api, 1)["speed"] == 4


def test_upsert_options_update(api):
    """5.6.8: options=update updates the given attributes and keeps the others."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red")])
    assert api.post_json(f"{OPS}/upsert", [car(1, speed=5, seats=4)], params={"options": "update"}).status_code == 204
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 5, "colour": "red", "seats": 4}


def test_upsert_replace_and_update_together_is_400(api):
    """5.6.8: options replace and update exclude each other."""
    response = api.post_json(f"{OPS}/upsert", [car(1)], params={"options": "replace,update"})
    assert response.status_code == 400
    assert response.json()["type"] == ERR + "BadRequestData"


def test_upsert_invalid_entity_is_207(api):
    """5.6.8: an invalid entity fails alone."""
    response = api.post_json(f"{OPS}/upsert", [car(1, speed=1), {"id": eid(2), "type": "Car", "bad": None}])
    check_multi_status(response, [eid(1)], {eid(2): "BadRequestData"})
    assert get(api, 1)["speed"] == 1


# --------------------------------------------------------------------------------------------- update (5.6.9)


def test_update_is_204_and_appends(api):
    """5.6.9: attributes are updated or added (append semantics, 5.6.3); others kept; 204."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red"), car(2, speed=2)])
    response = api.post_json(f"{OPS}/update", [car(1, speed=10, seats=5), car(2, speed=20)])
    assert response.status_code == 204, response.text
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 10, "colour": "red", "seats": 5}
    assert get(api, 2)["speed"] == 20


def test_update_missing_entity_is_207_resource_not_found(api):
    """5.6.9: an entity that does not exist is an error (ResourceNotFound) and is not created."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/update", [car(1, speed=10), car(2, speed=20)])
    check_multi_status(response, [eid(1)], {eid(2): "ResourceNotFound"})
    assert get(api, 2) is None
    assert get(api, 1)["speed"] == 10


def test_update_no_overwrite(api):
    """5.6.9 / 5.6.3 (ETSI 005_02_03): options=noOverwrite never changes existing attributes but adds new ones;
    an entity with skipped attributes is an error of a 207 that names them."""
    api.post_json(f"{OPS}/create", [car(1, speed=1), car(2, speed=2)])
    response = api.post_json(f"{OPS}/update", [car(1, speed=10, seats=5), car(2, seats=4)],
                             params={"options": "noOverwrite"})
    result = check_multi_status(response, [eid(2)], {eid(1): "AlreadyExists"})
    assert "speed" in error_of(result, eid(1))["detail"] and "seats" not in error_of(result, eid(1))["detail"]
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 1, "seats": 5}
    assert get(api, 2) == {"id": eid(2), "type": "Car", "speed": 2, "seats": 4}


def test_update_no_overwrite_with_only_new_attributes_is_204(api):
    """5.6.9 (ETSI 005_02_02): with options=noOverwrite and nothing skipped the answer is 204."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/update", [car(1, seats=5)], params={"options": "noOverwrite"})
    assert response.status_code == 204, response.text
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 1, "seats": 5}


def test_update_without_type(api):
    """5.6.9: the type may be omitted in an update fragment."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/update", [{"id": eid(1), "speed": {"type": "Property", "value": 3}}])
    assert response.status_code == 204
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 3}


# --------------------------------------------------------------------------------------------- delete (5.6.10)


def test_delete_all_existing_is_204(api):
    """5.6.10: the body is an array of entity ids; all deleted -> 204."""
    api.post_json(f"{OPS}/create", [car(1), car(2), car(3)])
    response = api.post_json(f"{OPS}/delete", [eid(1), eid(2)])
    assert response.status_code == 204
    assert get(api, 1) is None and get(api, 2) is None
    assert get(api, 3) is not None


def test_delete_missing_is_207(api):
    """5.6.10: an id that does not exist is a ResourceNotFound error; the others are deleted."""
    api.post_json(f"{OPS}/create", [car(1)])
    check_multi_status(api.post_json(f"{OPS}/delete", [eid(1), eid(9)]), [eid(1)], {eid(9): "ResourceNotFound"})
    assert get(api, 1) is None


def test_delete_invalid_id_is_207_bad_request(api):
    """5.6.10: an item that is not a URI fails with BadRequestData."""
    api.post_json(f"{OPS}/create", [car(1)])
    response = api.post_json(f"{OPS}/delete", [eid(1), "not a uri"])
    assert response.status_code == 207
    result = response.json()
    assert result["success"] == [eid(1)]
    assert result["errors"][0]["error"]["type"] == ERR + "BadRequestData"


def test_delete_body_not_an_array_is_400(api):
    """5.6.10: the body shall be an array of ids."""
    assert api.post_json(f"{OPS}/delete", {"id": eid(1)}).status_code == 400


# --------------------------------------------------------------------------------------------- merge (5.6.20)


def test_merge_is_204(api):
    """5.6.20: each entity is merged (5.6.17): given attributes change, others stay; 204."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red"), car(2, speed=2)])
    response = api.post_json(f"{OPS}/merge", [car(1, speed=10), car(2, seats=3)])
    assert response.status_code == 204, response.text
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 10, "colour": "red"}
    assert get(api, 2) == {"id": eid(2), "type": "Car", "speed": 2, "seats": 3}


def test_merge_null_deletes_attribute(api):
    """5.6.17 / 5.6.20: urn:ngsi-ld:null as a value deletes the attribute."""
    api.post_json(f"{OPS}/create", [car(1, speed=1, colour="red")])
    body = [{"id": eid(1), "type": "Car", "colour": {"type": "Property", "value": "urn:ngsi-ld:null"}}]
    assert api.post_json(f"{OPS}/merge", body).status_code == 204
    assert get(api, 1) == {"id": eid(1), "type": "Car", "speed": 1}


def test_merge_keeps_sub_attributes(api):
    """5.6.17: merging a Property keeps its sub-attributes that are not mentioned."""
    entity = {"id": eid(1), "type": "Car",
              "speed": {"type": "Property", "value": 1, "accuracy": {"type": "Property", "value": 0.5}}}
    api.post_json(f"{OPS}/create", [entity])
    assert api.post_json(f"{OPS}/merge", [{"id": eid(1), "speed": {"type": "Property", "value": 7}}]).status_code == 204
    got = api.get(f"/entities/{eid(1)}").json()
    assert got["speed"] == {"type": "Property", "value": 7, "accuracy": {"type": "Property", "value": 0.5}}


def test_merge_missing_entity_is_207(api):
    """5.6.20: an entity that does not exist is a ResourceNotFound error."""
    api.post_json(f"{OPS}/create", [car(1, speed=1)])
    response = api.post_json(f"{OPS}/merge", [car(1, speed=2), car(2, speed=3)])
    check_multi_status(response, [eid(1)], {eid(2): "ResourceNotFound"})
    assert get(api, 2) is None


# --------------------------------------------------------------------------------------------- query by POST (5.7.2)


@pytest.fixture
def fleet(api):
    """Five cars with speeds 0, 10, 20, 30, 40, a bus, and a located car."""
    api.post_json(f"{OPS}/create", [car(i, speed=i * 10) for i in range(5)] + [
        {"id": "urn:ngsi-ld:Bus:1", "type": "Bus", "speed": {"type": "Property", "value": 50}}])
    return api


def post_query(api, body, **params):
    """POST /entityOperations/query."""
    return api.post_json(f"{OPS}/query", body, params=params)


def test_post_query_by_type_and_q(fleet):
    """5.7.2 / 6.23: a Query with entities (type) and q."""
    response = post_query(fleet, {"type": "Query", "entities": [{"type": "Car"}], "q": "speed>=20"})
    assert response.status_code == 200
    assert sorted(e["id"] for e in response.json()) == [eid(2), eid(3), eid(4)]


def test_post_query_several_selectors(fleet):
    """5.2.23: several EntitySelectors are ORed."""
    body = {"type": "Query", "entities": [{"type": "Bus"}, {"type": "Car"}], "q": "speed>35"}
    response = post_query(fleet, body)
    assert sorted(e["id"] for e in response.json()) == ["urn:ngsi-ld:Bus:1", eid(4)]


def test_post_query_id_and_attrs(fleet):
    """5.2.23: a selector with id; attrs projects the attributes."""
    fleet.post_json(f"{OPS}/update", [car(1, colour="blue")])
    body = {"type": "Query", "entities": [{"id": eid(1), "type": "Car"}], "attrs": ["colour"]}
    response = post_query(fleet, body)
    assert response.json() == [{"id": eid(1), "type": "Car", "colour": {"type": "Property", "value": "blue"}}]


def test_post_query_id_pattern(fleet):
    """5.2.23: a selector with idPattern."""
    body = {"type": "Query", "entities": [{"idPattern": "Car:[13]$", "type": "Car"}]}
    assert sorted(e["id"] for e in post_query(fleet, body).json()) == [eid(1), eid(3)]


def test_post_query_pagination_and_count(fleet):
    """5.7.2 / 5.5.9: limit, offset and count come from the URL."""
    response = post_query(fleet, {"type": "Query", "entities": [{"type": "Car"}]}, limit="2", offset="1", count="true")
    assert response.status_code == 200
    assert len(response.json()) == 2
    assert response.headers["NGSILD-Results-Count"] == "5"


def test_post_query_geo(api):
    """5.2.13: geoQ in the body, coordinates as a JSON array."""
    api.post_json(f"{OPS}/create", [
        {"id": eid(1), "type": "Car", "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.0, 41.0]}}},
        {"id": eid(2), "type": "Car", "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.0, 42.0]}}}])
    body = {"type": "Query", "entities": [{"type": "Car"}],
            "geoQ": {"georel": "near;minDistance==50000", "geometry": "Point", "coordinates": [2.0, 41.0]}}
    response = post_query(api, body)
    assert response.status_code == 200, response.text
    assert [e["id"] for e in response.json()] == [eid(2)]


def test_post_query_key_values(fleet):
    """5.7.2: options=keyValues in the URL applies."""
    body = {"type": "Query", "entities": [{"type": "Bus"}]}
    assert post_query(fleet, body, options="keyValues").json() == [{"id": "urn:ngsi-ld:Bus:1", "type": "Bus", "speed": 50}]


def test_post_query_type_must_be_query(fleet):
    """5.2.23: the body's type shall be "Query"."""
    response = post_query(fleet, {"entities": [{"type": "Car"}]})
    assert response.status_code == 400
    assert response.json()["type"] == ERR + "BadRequestData"


def test_post_query_without_selection_is_400(fleet):
    """5.7.2: a Query with no entities, attrs, q or geoQ is BadRequestData."""
    response = post_query(fleet, {"type": "Query"})
    assert response.status_code == 400
    assert response.json()["type"] == ERR + "BadRequestData"


def test_post_query_too_many_results(fleet):
    """5.5.9: limit above the maximum is 403 TooManyResults."""
    response = post_query(fleet, {"type": "Query", "entities": [{"type": "Car"}]}, limit="5000")
    assert response.status_code == 403
    assert response.json()["type"] == ERR + "TooManyResults"


def test_post_query_selectors_with_ids(fleet):
    """5.2.23 / 5.2.33: several EntitySelectors with ids are ORed (a list of ids of different types)."""
    body = {"type": "Query", "entities": [{"id": eid(1), "type": "Car"}, {"id": "urn:ngsi-ld:Bus:1", "type": "Bus"},
                                          {"id": eid(2), "type": "Bus"}]}
    response = post_query(fleet, body, count="true")
    assert response.status_code == 200, response.text
    assert sorted(e["id"] for e in response.json()) == ["urn:ngsi-ld:Bus:1", eid(1)]
    assert response.headers["NGSILD-Results-Count"] == "2"


def test_post_query_selectors_mixing_id_pattern_and_type(fleet):
    """5.2.33: one selector by idPattern, another by type only."""
    body = {"type": "Query", "entities": [{"idPattern": "Car:[03]$", "type": "Car"}, {"type": "Bus"}]}
    response = post_query(fleet, body)
    assert sorted(e["id"] for e in response.json()) == ["urn:ngsi-ld:Bus:1", eid(0), eid(3)]


def test_post_query_id_pattern_ignored_when_id_present(fleet):
    """5.2.33: idPattern is ignored when the selector has an id."""
    body = {"type": "Query", "entities": [{"id": eid(1), "idPattern": "^nomatch$", "type": "Car"}]}
    assert [e["id"] for e in post_query(fleet, body).json()] == [eid(1)]
