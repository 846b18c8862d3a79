"""Conformance: entity attributes (ETSI GS CIM 009 v1.8) at the HTTP level.

Update attributes (5.6.2), append attributes + noOverwrite (5.6.3), partial attribute update (5.6.4),
delete attribute with datasetId / deleteAll (5.6.5), replace attribute (5.6.19); multi-attributes (4.5.5)
and the UpdateResult of a 207 Multi-Status (5.2.18).
"""
from __future__ import annotations

import orjson

from tests.conftest import CORE, link
from tests.conftest import assert_problem

ERR = "https://uri.etsi.org/ngsi-ld/errors/"
EID = "urn:ngsi-ld:Vehicle:B1"
ATTRS = f"/entities/{EID}/attrs"
GPS, WHEEL = "urn:ngsi-ld:ds:gps", "urn:ngsi-ld:ds:wheel"


def prop(value, **extra) -> dict:
    """A normalized Property."""
    return {"type": "Property", "value": value, **extra}


def setup_vehicle(api, **attrs) -> None:
    """Create the test Vehicle with speed (KMH) and brand plus the given attributes."""
    entity = {"id": EID, "type": "Vehicle", "speed": prop(55, unitCode="KMH"), "brand": prop("Mercedes"), **attrs}
    response = api.post_json("/entities", entity)
    assert response.status_code == 201, response.text


def setup_multi(api) -> None:
    """Create the test Vehicle whose speed has a default instance and two datasetId instances."""
    setup_vehicle(api, speed=[prop(50), prop(51, datasetId=GPS), prop(52, datasetId=WHEEL)])


def get(api, **params) -> dict:
    """The test Vehicle (normalized unless asked otherwise)."""
    headers = params.pop("headers", {})
    response = api.get(f"/entities/{EID}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def by_dataset(attribute) -> dict:
    """An attribute's instances keyed by datasetId (None for the default instance)."""
    instances = attribute if isinstance(attribute, list) else [attribute]
    return {inst.get("datasetId"): inst for inst in instances}


# ------------------------------------------------------------------------------------------------ 5.6.3 append


def test_append_new_attribute_is_204_and_adds_it(api):
    """5.6.3: attributes not yet in the Entity are appended; all succeeded -> 204."""
    setup_vehicle(api)
    response = api.post_json(ATTRS, {"colour": prop("red")})
    assert response.status_code == 204 and response.content == b""
    got = get(api)
    assert got["colour"] == prop("red") and got["brand"] == prop("Mercedes")


def test_append_existing_attribute_overwrites_it_by_default(api):
    """5.6.3: without noOverwrite, an existing attribute is replaced."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"speed": prop(80)}).status_code == 204
    assert get(api)["speed"] == prop(80)


def test_append_with_no_overwrite_keeps_existing_and_reports_207(api):
    """5.6.3 options=noOverwrite: existing attributes are left alone and listed in notUpdated (207)."""
    setup_vehicle(api)
    response = api.post_json(ATTRS, {"speed": prop(80), "colour": prop("red")}, params={"options": "noOverwrite"})
    assert response.status_code == 207
    result = response.json()
    assert result["updated"] == ["colour"]
    assert [n["attributeName"] for n in result["notUpdated"]] == ["speed"]
    assert all(isinstance(n["reason"], str) and n["reason"] for n in result["notUpdated"])
    got = get(api)
    assert got["speed"] == prop(55, unitCode="KMH") and got["colour"] == prop("red")


def test_append_with_no_overwrite_and_only_new_attributes_is_204(api):
    """5.6.3: noOverwrite with nothing to skip is plain success."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"colour": prop("red")}, params={"options": "noOverwrite"}).status_code == 204


def test_append_with_no_overwrite_adds_new_dataset_instance(api):
    """5.6.3 / 4.5.5: a new datasetId is a new instance, so noOverwrite still appends it."""
    setup_vehicle(api)
    response = api.post_json(ATTRS, {"speed": prop(60, datasetId=GPS)}, params={"options": "noOverwrite"})
    assert response.status_code == 204
    instances = by_dataset(get(api)["speed"])
    assert instances[None]["value"] == 55 and instances[GPS]["value"] == 60


def test_append_instance_with_dataset_id_keeps_default_instance(api):
    """5.6.3 / 4.5.5: appending an instance with a datasetId does not touch the default instance."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"speed": prop(60, datasetId=GPS)}).status_code == 204
    instances = by_dataset(get(api)["speed"])
    assert set(instances) == {None, GPS}


def test_append_to_unknown_entity_is_404_resource_not_found(api):
    """5.6.3.4: target Entity does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    response = api.post_json("/entities/urn:ngsi-ld:Vehicle:nope/attrs", {"colour": prop("red")})
    assert_problem(response, 404, "ResourceNotFound")


def test_append_invalid_attribute_is_bad_request_data(api):
    """5.6.3.4: invalid fragment -> BadRequestData, nothing changes."""
    setup_vehicle(api)
    response = api.post_json(ATTRS, {"owner": {"type": "Relationship", "object": "not a uri"}})
    assert_problem(response, 400, "BadRequestData")
    assert "owner" not in get(api)


def test_append_with_entity_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.6.3.4: an invalid Entity id -> BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.post_json("/entities/not-a-uri/attrs", {"colour": prop("red")}), 400, "BadRequestData")


def test_append_with_malformed_json_is_invalid_request(api):
    """6.3.2: a body that is not JSON -> InvalidRequest."""
    setup_vehicle(api)
    response = api.post(ATTRS, content=b"{nope", headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")


def test_append_with_unsupported_content_type_is_415(api):
    """6.3.4: the body must be application/json or application/ld+json."""
    setup_vehicle(api)
    response = api.post(ATTRS, content=orjson.dumps({"colour": prop("red")}), headers={"Content-Type": "text/csv"})
    assert response.status_code == 415
    assert response.json()["type"].startswith(ERR)


def test_append_with_ld_json_context_expands_names(api, context_server):
    """6.3.5: the @context of an application/ld+json body expands appended attribute names."""
    url = context_server.publish("/attrs-ctx.jsonld", {"colour": "https://example.org/colour"})
    setup_vehicle(api)
    response = api.send_json("POST", ATTRS, {"colour": prop("red"), "@context": url}, content_type="application/ld+json")
    assert response.status_code == 204
    assert get(api)["https://example.org/colour"] == prop("red")
    assert get(api, headers=link(url))["colour"] == prop("red")


def test_append_with_concise_attribute_is_stored_normalized(api):
    """4.5.x concise input is accepted by append."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"colour": "red", "owner": {"object": "urn:ngsi-ld:Person:Bob"}}).status_code == 204
    got = get(api)
    assert got["colour"] == prop("red")
    assert got["owner"] == {"type": "Relationship", "object": "urn:ngsi-ld:Person:Bob"}


def test_append_overwrite_keeps_attribute_created_at_and_advances_modified_at(api):
    """4.8: overwriting an attribute keeps its createdAt; the Entity's modifiedAt moves on."""
    setup_vehicle(api)
    before = get(api, options="sysAttrs")
    api.post_json(ATTRS, {"speed": prop(80)})
    after = get(api, options="sysAttrs")
    assert after["speed"]["createdAt"] == before["speed"]["createdAt"]
    assert after["speed"]["modifiedAt"] >= before["speed"]["modifiedAt"]
    assert after["modifiedAt"] >= before["modifiedAt"] and after["createdAt"] == before["createdAt"]


def test_append_with_ngsi_ld_null_is_bad_request_data(api):
    """5.2.1: append is neither merge nor partial update, so an NGSI-LD Null is BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.post_json(ATTRS, {"brand": "urn:ngsi-ld:null"}), 400, "BadRequestData")
    assert get(api)["brand"] == prop("Mercedes")


# ------------------------------------------------------------------------------------------------ 5.6.2 update


def test_update_existing_attributes_is_204(api):
    """5.6.2: all given attributes exist -> they are updated, 204."""
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"speed": prop(90), "brand": prop("Audi")})
    assert response.status_code == 204
    got = get(api)
    assert got["speed"]["value"] == 90 and got["brand"]["value"] == "Audi"


def test_update_never_creates_attributes_and_reports_207(api):
    """5.6.2: attributes that do not exist are not created; they are listed in notUpdated (207)."""
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"speed": prop(90), "colour": prop("red")})
    assert response.status_code == 207
    result = response.json()
    assert result["updated"] == ["speed"]
    assert [n["attributeName"] for n in result["notUpdated"]] == ["colour"]
    got = get(api)
    assert "colour" not in got and got["speed"]["value"] == 90


def test_update_with_only_unknown_attributes_is_207_with_nothing_updated(api):
    """5.6.2: nothing could be updated -> 207 with an empty updated list."""
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"colour": prop("red")})
    assert response.status_code == 207
    assert response.json()["updated"] == []
    assert response.json()["notUpdated"][0]["attributeName"] == "colour"


def test_update_207_attribute_names_are_compacted_with_the_request_context(api, context_server):
    """5.2.18 / 6.3.6: names in the UpdateResult are compacted with the request's @context."""
    url = context_server.publish("/upd-ctx.jsonld", {"colour": "https://example.org/upd/colour"})
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"colour": prop("red")}, headers=link(url))
    assert response.status_code == 207
    assert response.json()["notUpdated"][0]["attributeName"] == "colour"


def test_update_unknown_entity_is_404_resource_not_found(api):
    """5.6.2.4: target Entity does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    response = api.send_json("PATCH", "/entities/urn:ngsi-ld:Vehicle:nope/attrs", {"speed": prop(1)})
    assert_problem(response, 404, "ResourceNotFound")


def test_update_of_unknown_dataset_instance_is_reported_not_updated(api):
    """5.6.2 / 4.5.5: the instance is selected by datasetId; an unknown datasetId is not created."""
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"speed": prop(1, datasetId=GPS)})
    assert response.status_code == 207
    assert response.json()["notUpdated"][0]["attributeName"] == "speed"
    assert set(by_dataset(get(api)["speed"])) == {None}


def test_update_targets_only_the_instance_with_the_given_dataset_id(api):
    """5.6.2 / 4.5.5: other instances of the attribute are untouched."""
    setup_multi(api)
    assert api.send_json("PATCH", ATTRS, {"speed": prop(99, datasetId=GPS)}).status_code == 204
    values = {k: v["value"] for k, v in by_dataset(get(api)["speed"]).items()}
    assert values == {None: 50, GPS: 99, WHEEL: 52}


def test_update_with_invalid_attribute_is_bad_request_data(api):
    """5.6.2.4: an invalid fragment -> BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.send_json("PATCH", ATTRS, {"speed": {"type": "Property"}}), 400, "BadRequestData")


def test_update_with_ngsi_ld_null_deletes_the_attribute(api):
    """5.6.2 / 5.5.8 / 5.2.1: in a partial update an NGSI-LD Null removes the target."""
    setup_vehicle(api)
    assert api.send_json("PATCH", ATTRS, {"brand": "urn:ngsi-ld:null"}).status_code == 204
    assert "brand" not in get(api)


# ------------------------------------------------------------------------------------------------ 5.6.4 partial attribute update


def test_partial_attribute_update_changes_given_members_and_keeps_the_rest(api):
    """5.6.4: the given members change (value, observedAt); others (unitCode) are kept; 204."""
    setup_vehicle(api)
    body = prop(100, observedAt="2024-03-14T13:00:00Z")
    response = api.send_json("PATCH", f"{ATTRS}/speed", body)
    assert response.status_code == 204
    assert get(api)["speed"] == prop(100, unitCode="KMH", observedAt="2024-03-14T13:00:00Z")


def test_partial_attribute_update_accepts_concise_value(api):
    """5.6.4 / 4.5.x concise: {"value": ...} suffices."""
    setup_vehicle(api)
    assert api.send_json("PATCH", f"{ATTRS}/speed", {"value": 77}).status_code == 204
    assert get(api)["speed"] == prop(77, unitCode="KMH")


def test_partial_attribute_update_merges_sub_attributes(api):
    """5.6.4 / 5.5.8: sub-attributes merge; an NGSI-LD Null sub-attribute is removed."""
    setup_vehicle(api, speed=prop(55, source=prop("gps"), accuracy=prop(0.9)))
    body = {"value": 56, "source": "urn:ngsi-ld:null", "accuracy": prop(0.8)}
    assert api.send_json("PATCH", f"{ATTRS}/speed", body).status_code == 204
    assert get(api)["speed"] == prop(56, accuracy=prop(0.8))


def test_partial_attribute_update_of_relationship_object(api):
    """5.6.4: a Relationship's object can be changed."""
    setup_vehicle(api, owner={"type": "Relationship", "object": "urn:ngsi-ld:Person:Alice"})
    assert api.send_json("PATCH", f"{ATTRS}/owner", {"object": "urn:ngsi-ld:Person:Bob"}).status_code == 204
    assert get(api)["owner"] == {"type": "Relationship", "object": "urn:ngsi-ld:Person:Bob"}


def test_partial_attribute_update_of_members_only_keeps_the_value(api):
    """5.6.4: a fragment without a value (unitCode, observedAt, sub-attributes) changes those and keeps the value."""
    setup_vehicle(api, speed=prop(55, unitCode="KMH", accuracy=prop(0.9)))
    body = {"unitCode": "MTS", "observedAt": "2024-03-14T13:00:00Z", "accuracy": prop(0.5)}
    assert api.send_json("PATCH", f"{ATTRS}/speed", body).status_code == 204
    assert get(api)["speed"] == prop(55, unitCode="MTS", observedAt="2024-03-14T13:00:00Z", accuracy=prop(0.5))


def test_partial_attribute_update_of_members_only_keeps_a_relationship_object(api):
    """5.6.4: the same for a Relationship: its object stays."""
    setup_vehicle(api, owner={"type": "Relationship", "object": "urn:ngsi-ld:Person:Alice"})
    body = {"observedAt": "2024-03-14T13:00:00Z"}
    assert api.send_json("PATCH", f"{ATTRS}/owner", body).status_code == 204
    assert get(api)["owner"] == {"type": "Relationship", "object": "urn:ngsi-ld:Person:Alice",
                                 "observedAt": "2024-03-14T13:00:00Z"}


def test_partial_attribute_update_accepts_merge_patch_json(api):
    """6.3.4: PATCH bodies may be application/merge-patch+json."""
    setup_vehicle(api)
    got = api.send_json("PATCH", f"{ATTRS}/speed", {"value": 60}, content_type="application/merge-patch+json")
    assert got.status_code == 204
    got = api.send_json("PATCH", ATTRS, {"brand": prop("Kia")}, content_type="application/merge-patch+json")
    assert got.status_code == 204
    assert get(api)["speed"]["value"] == 60 and get(api)["brand"]["value"] == "Kia"


def test_dataset_id_must_not_be_ngsi_ld_null(api):
    """4.5.5 / 5.2.1: a datasetId is a URI naming an instance; urn:ngsi-ld:null is not one."""
    setup_vehicle(api)
    got = api.send_json("PATCH", f"{ATTRS}/speed", {"value": 1, "datasetId": "urn:ngsi-ld:null"})
    assert_problem(got, 400, "BadRequestData")
    assert get(api)["speed"] == prop(55, unitCode="KMH")


def test_partial_attribute_update_of_unknown_attribute_is_404(api):
    """5.6.4.4: the target attribute does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.send_json("PATCH", f"{ATTRS}/colour", prop("red")), 404, "ResourceNotFound")
    assert "colour" not in get(api)


def test_partial_attribute_update_of_unknown_entity_is_404(api):
    """5.6.4.4: the target Entity does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    response = api.send_json("PATCH", "/entities/urn:ngsi-ld:Vehicle:nope/attrs/speed", prop(1))
    assert_problem(response, 404, "ResourceNotFound")


def test_partial_attribute_update_selects_instance_by_dataset_id(api):
    """5.6.4 / 4.5.5: the datasetId in the fragment selects the instance to update."""
    setup_multi(api)
    assert api.send_json("PATCH", f"{ATTRS}/speed", prop(70, datasetId=WHEEL)).status_code == 204
    values = {k: v["value"] for k, v in by_dataset(get(api)["speed"]).items()}
    assert values == {None: 50, GPS: 51, WHEEL: 70}


def test_partial_attribute_update_without_dataset_id_targets_default_instance(api):
    """5.6.4 / 4.5.5: no datasetId -> the default instance."""
    setup_multi(api)
    assert api.send_json("PATCH", f"{ATTRS}/speed", {"value": 10}).status_code == 204
    values = {k: v["value"] for k, v in by_dataset(get(api)["speed"]).items()}
    assert values == {None: 10, GPS: 51, WHEEL: 52}


def test_partial_attribute_update_of_unknown_dataset_id_is_404(api):
    """5.6.4.4: no instance with that datasetId -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.send_json("PATCH", f"{ATTRS}/speed", prop(1, datasetId=GPS)), 404, "ResourceNotFound")


def test_partial_attribute_update_with_malformed_json_is_invalid_request(api):
    """6.3.2: a body that is not JSON -> InvalidRequest."""
    setup_vehicle(api)
    response = api.patch(f"{ATTRS}/speed", content=b"[1,", headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")


def test_partial_attribute_update_with_invalid_attribute_name_is_bad_request_data(api):
    """5.6.4.4 / 4.6.2: an invalid attribute name -> BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.send_json("PATCH", f"{ATTRS}/sp(eed", prop(1)), 400, "BadRequestData")


def test_partial_attribute_update_with_link_context_addresses_expanded_name(api, context_server):
    """5.6.4 / 6.3.5: the attribute name in the URL is expanded with the Link header @context."""
    url = context_server.publish("/pau-ctx.jsonld", {"colour": "https://example.org/pau/colour"})
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"colour": prop("red")}, headers=link(url)).status_code == 204
    assert_problem(api.send_json("PATCH", f"{ATTRS}/colour", prop("blue")), 404, "ResourceNotFound")
    assert api.send_json("PATCH", f"{ATTRS}/colour", prop("blue"), headers=link(url)).status_code == 204
    assert get(api, headers=link(url))["colour"] == prop("blue")


# ------------------------------------------------------------------------------------------------ 5.6.19 replace attribute


def test_replace_attribute_replaces_it_wholly(api):
    """5.6.19: the attribute is replaced: members not given (unitCode) are gone; 204."""
    setup_vehicle(api)
    response = api.send_json("PUT", f"{ATTRS}/speed", prop(120))
    assert response.status_code == 204
    assert get(api)["speed"] == prop(120)


def test_replace_attribute_can_change_its_kind(api):
    """5.6.19: a Property may be replaced by a Relationship."""
    setup_vehicle(api)
    body = {"type": "Relationship", "object": "urn:ngsi-ld:Brand:Mercedes"}
    assert api.send_json("PUT", f"{ATTRS}/brand", body).status_code == 204
    assert get(api)["brand"] == body


def test_replace_attribute_keeps_its_created_at(api):
    """5.6.19 / 4.8: the replaced attribute keeps its createdAt."""
    setup_vehicle(api)
    created = get(api, options="sysAttrs")["speed"]["createdAt"]
    api.send_json("PUT", f"{ATTRS}/speed", prop(120))
    assert get(api, options="sysAttrs")["speed"]["createdAt"] == created


def test_replace_unknown_attribute_is_404(api):
    """5.6.19.4: the target attribute does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.send_json("PUT", f"{ATTRS}/colour", prop("red")), 404, "ResourceNotFound")


def test_replace_attribute_of_unknown_entity_is_404(api):
    """5.6.19.4: the target Entity does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.send_json("PUT", "/entities/urn:ngsi-ld:Vehicle:nope/attrs/speed", prop(1)),
                   404, "ResourceNotFound")


def test_replace_attribute_instance_selected_by_dataset_id(api):
    """5.6.19 / 4.5.5: only the instance with the given datasetId is replaced."""
    setup_multi(api)
    assert api.send_json("PUT", f"{ATTRS}/speed", prop(33, datasetId=GPS)).status_code == 204
    values = {k: v["value"] for k, v in by_dataset(get(api)["speed"]).items()}
    assert values == {None: 50, GPS: 33, WHEEL: 52}


def test_replace_attribute_with_invalid_fragment_is_bad_request_data(api):
    """5.6.19.4: an invalid fragment -> BadRequestData, nothing changes."""
    setup_vehicle(api)
    assert_problem(api.send_json("PUT", f"{ATTRS}/speed", {"type": "Relationship", "object": 5}), 400, "BadRequestData")
    assert get(api)["speed"] == prop(55, unitCode="KMH")


def test_replace_attribute_with_ngsi_ld_null_is_bad_request_data(api):
    """5.2.1: replace is not a merge or partial update, so an NGSI-LD Null is BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.send_json("PUT", f"{ATTRS}/speed", prop("urn:ngsi-ld:null")), 400, "BadRequestData")


# ------------------------------------------------------------------------------------------------ 5.6.5 delete attribute


def test_delete_attribute_is_204_and_removes_it(api):
    """5.6.5: the attribute is removed; 204."""
    setup_vehicle(api)
    response = api.delete(f"{ATTRS}/brand")
    assert response.status_code == 204 and response.content == b""
    got = get(api)
    assert "brand" not in got and got["speed"]["value"] == 55


def test_delete_unknown_attribute_is_404(api):
    """5.6.5.4: the attribute does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.delete(f"{ATTRS}/colour"), 404, "ResourceNotFound")


def test_delete_attribute_of_unknown_entity_is_404(api):
    """5.6.5.4: the Entity does not exist -> ResourceNotFound."""
    setup_vehicle(api)
    assert_problem(api.delete("/entities/urn:ngsi-ld:Vehicle:nope/attrs/speed"), 404, "ResourceNotFound")


def test_delete_attribute_with_entity_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.6.5.4: an invalid Entity id -> BadRequestData."""
    setup_vehicle(api)
    assert_problem(api.delete("/entities/not-a-uri/attrs/speed"), 400, "BadRequestData")


def test_delete_attribute_with_dataset_id_removes_only_that_instance(api):
    """5.6.5 / 4.5.5: datasetId selects the instance to delete."""
    setup_multi(api)
    assert api.delete(f"{ATTRS}/speed", params={"datasetId": GPS}).status_code == 204
    assert set(by_dataset(get(api)["speed"])) == {None, WHEEL}


def test_delete_attribute_without_dataset_id_removes_only_the_default_instance(api):
    """5.6.5 / 4.5.5: without datasetId (and deleteAll) the default instance is deleted."""
    setup_multi(api)
    assert api.delete(f"{ATTRS}/speed").status_code == 204
    assert set(by_dataset(get(api)["speed"])) == {GPS, WHEEL}


def test_delete_attribute_with_delete_all_removes_every_instance(api):
    """5.6.5 deleteAll=true: all instances of the attribute are deleted."""
    setup_multi(api)
    assert api.delete(f"{ATTRS}/speed", params={"deleteAll": "true"}).status_code == 204
    assert "speed" not in get(api)


def test_delete_attribute_with_unknown_dataset_id_is_404(api):
    """5.6.5.4: no instance with that datasetId -> ResourceNotFound; nothing is deleted."""
    setup_multi(api)
    assert_problem(api.delete(f"{ATTRS}/speed", params={"datasetId": "urn:ngsi-ld:ds:none"}), 404, "ResourceNotFound")
    assert set(by_dataset(get(api)["speed"])) == {None, GPS, WHEEL}


def test_delete_default_instance_when_only_dataset_instances_exist_is_404(api):
    """5.6.5.4 / 4.5.5: there is no default instance to delete."""
    setup_vehicle(api, speed=[prop(1, datasetId=GPS)])
    assert_problem(api.delete(f"{ATTRS}/speed"), 404, "ResourceNotFound")


def test_delete_attribute_with_dataset_id_that_is_not_a_uri_is_bad_request_data(api):
    """5.6.5.4 / 4.5.5: datasetId is a URI."""
    setup_multi(api)
    assert_problem(api.delete(f"{ATTRS}/speed", params={"datasetId": "not a uri"}), 400, "BadRequestData")


def test_delete_last_dataset_instance_removes_the_attribute(api):
    """5.6.5: an attribute left with no instances is no longer part of the Entity."""
    setup_vehicle(api, colour=[prop("red", datasetId=GPS)])
    assert api.delete(f"{ATTRS}/colour", params={"datasetId": GPS}).status_code == 204
    assert "colour" not in get(api)


def test_delete_attribute_advances_entity_modified_at(api):
    """4.8: deleting an attribute modifies the Entity."""
    setup_vehicle(api)
    before = get(api, options="sysAttrs")
    api.delete(f"{ATTRS}/brand")
    after = get(api, options="sysAttrs")
    assert after["modifiedAt"] >= before["modifiedAt"] and after["createdAt"] == before["createdAt"]


def test_delete_attribute_name_is_expanded_with_the_link_context(api, context_server):
    """5.6.5 / 6.3.5: the attribute name in the URL is expanded with the Link header @context."""
    url = context_server.publish("/del-ctx.jsonld", {"colour": "https://example.org/del/colour"})
    setup_vehicle(api)
    api.post_json(ATTRS, {"colour": prop("red")}, headers=link(url))
    assert_problem(api.delete(f"{ATTRS}/colour"), 404, "ResourceNotFound")
    assert api.delete(f"{ATTRS}/colour", headers=link(url)).status_code == 204
    assert "https://example.org/del/colour" not in get(api)


# ------------------------------------------------------------------------------------------------ 5.2.1 LanguageProperty null

STREET = {"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}
LANGUAGE_NULL = {"type": "LanguageProperty", "languageMap": {"@none": "urn:ngsi-ld:null"}}


def test_language_null_deletes_in_merge_update_and_partial_update(api):
    """5.2.1 / 5.6.17, 5.6.2, 5.6.4 (ETSI 056_03_04): {"@none": "urn:ngsi-ld:null"} as a languageMap is the
    NGSI-LD Null of a LanguageProperty: merge, update and partial update delete the attribute with it."""
    for method, path, body in [("PATCH", f"/entities/{EID}", {"street": LANGUAGE_NULL}),
                               ("PATCH", ATTRS, {"street": LANGUAGE_NULL}),
                               ("PATCH", f"{ATTRS}/street", LANGUAGE_NULL)]:
        api.delete(f"/entities/{EID}")
        setup_vehicle(api, street=STREET)
        response = api.send_json(method, path, body)
        assert response.status_code == 204, (path, response.text)
        assert "street" not in get(api), path


def test_language_null_deletes_one_instance_in_merge(api):
    """5.2.1 / 5.6.17 (ETSI 056_04_04): a LanguageProperty Null with a datasetId deletes only that instance."""
    setup_vehicle(api, street=[STREET, {**STREET, "datasetId": GPS}])
    response = api.send_json("PATCH", f"/entities/{EID}", {"street": {**LANGUAGE_NULL, "datasetId": GPS}})
    assert response.status_code == 204, response.text
    assert get(api)["street"] == STREET


def test_language_null_where_nulls_are_not_allowed_is_bad_request_data(api):
    """5.2.1: an NGSI-LD Null is BadRequestData outside merge and partial updates: create, replace entity,
    append attributes and replace attribute refuse the LanguageProperty Null and store nothing."""
    assert_problem(api.post_json("/entities", {"id": EID, "type": "Vehicle", "street": LANGUAGE_NULL}),
                   400, "BadRequestData")
    setup_vehicle(api, street=STREET)
    for method, path, body in [("PUT", f"/entities/{EID}", {"type": "Vehicle", "street": LANGUAGE_NULL}),
                               ("POST", ATTRS, {"street": LANGUAGE_NULL}),
                               ("PUT", f"{ATTRS}/street", LANGUAGE_NULL)]:
        assert_problem(api.send_json(method, path, body), 400, "BadRequestData")
    assert get(api)["street"] == STREET


# ------------------------------------------------------------------------------------------------ 4.18 scope in attribute operations


def test_append_with_no_overwrite_adds_scopes(api):
    """4.18 / 5.6.3 (ETSI 010_07): with options=noOverwrite the given scopes join the entity's own."""
    setup_vehicle(api, scope="/Madrid")
    response = api.post_json(ATTRS, {"scope": ["/Nara", "/Madrid"]}, params={"options": "noOverwrite"})
    assert response.status_code == 204, response.text
    assert get(api)["scope"] == ["/Madrid", "/Nara"]
    assert api.post_json(ATTRS, {"scope": "/Kyoto"}).status_code == 204  # without noOverwrite: replaced
    assert get(api)["scope"] == "/Kyoto"


def test_update_does_not_give_an_entity_a_scope(api):
    """4.18 / 5.6.2 (ETSI 011_05_02): update changes the scope of an entity that has one; on an entity without
    scope it is reported not updated (207) and no scope is added."""
    setup_vehicle(api)
    response = api.send_json("PATCH", ATTRS, {"scope": "/Nara", "brand": prop("Seat")})
    assert response.status_code == 207, response.text
    assert [item["attributeName"] for item in response.json()["notUpdated"]] == ["scope"]
    got = get(api)
    assert "scope" not in got and got["brand"] == prop("Seat")
    api.delete(f"/entities/{EID}")
    setup_vehicle(api, scope="/Madrid")
    assert api.send_json("PATCH", ATTRS, {"scope": "/Nara"}).status_code == 204
    assert get(api)["scope"] == "/Nara"


def test_scope_as_target_attribute_is_bad_request_data(api):
    """5.6.4.4 / 5.6.19.4 (ETSI 055_03_05): PATCH or PUT /attrs/scope is BadRequestData; the scope stays."""
    setup_vehicle(api, scope="/Madrid")
    for method in ("PUT", "PATCH"):
        for name in ("scope", "ngsi-ld:scope"):
            assert_problem(api.send_json(method, f"{ATTRS}/{name}", prop("/B")), 400, "BadRequestData")
    assert get(api)["scope"] == "/Madrid"


# ------------------------------------------------------------------------------------------------ 4.6.2 / 4.5.1 attribute names

def test_entity_member_as_attribute_name_in_a_url_is_bad_request_data(api):
    """An entity member (id, type, scope, createdAt, ...) is no attribute: the attribute routes refuse it by name."""
    setup_vehicle(api)
    for method in ("PUT", "PATCH"):
        for name in ("id", "type", "createdAt"):
            assert_problem(api.send_json(method, f"{ATTRS}/{name}", prop(1)), 400, "BadRequestData")
    for name in ("id", "modifiedAt"):
        assert_problem(api.delete(f"{ATTRS}/{name}"), 400, "BadRequestData")


def test_attribute_member_terms_may_name_attributes(api):
    """v1.8 does not forbid an attribute named like an attribute member (devices publish readings named "value",
    which IoT Agents pass through): such attributes are created, read, changed and deleted like any other."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"value": prop(21.5), "observedAt": prop("x")}).status_code == 204
    assert get(api)["value"] == prop(21.5)
    assert api.send_json("PATCH", f"{ATTRS}/value", {"value": 22.0}).status_code == 204
    assert get(api)["value"] == prop(22.0)
    assert api.delete(f"{ATTRS}/value").status_code == 204
    assert "value" not in get(api)


def test_names_outside_the_strict_grammar_stay_accepted(api):
    """4.6.2 says "should": names with '-' (used by device profiles and data models) are still accepted."""
    setup_vehicle(api)
    assert api.post_json(ATTRS, {"co2-level": prop(400)}).status_code == 204
    assert get(api)["co2-level"] == prop(400)


# ------------------------------------------------------------------------------------------------ 5.6.4 / 5.6.19 fragment checks


def test_partial_attribute_update_cannot_change_the_attribute_type(api):
    """5.6.4.4 (ETSI 012_02_03): a fragment whose type differs from the target attribute's is BadRequestData; the
    attribute is unchanged (replace attribute, 5.6.19, may still change it)."""
    setup_vehicle(api)
    fragment = {"type": "Relationship", "object": "urn:ngsi-ld:Entity:01"}
    assert_problem(api.send_json("PATCH", f"{ATTRS}/speed", fragment), 400, "BadRequestData")
    assert get(api)["speed"] == prop(55, unitCode="KMH")


def test_partial_update_without_a_type_keeps_the_attribute_type(api):
    """5.6.4: a fragment that names no type changes the value of the attribute as it is: {"value": <GeoJSON>}
    on a GeoProperty stays a GeoProperty (and its value must be a geometry)."""
    point = {"type": "Point", "coordinates": [127.0, 37.5]}
    setup_vehicle(api, location={"type": "GeoProperty", "value": {"type": "Point", "coordinates": [126.9, 37.4]}})
    response = api.send_json("PATCH", f"{ATTRS}/location", {"value": point})
    assert response.status_code == 204, response.text
    assert get(api)["location"] == {"type": "GeoProperty", "value": point}
    assert_problem(api.send_json("PATCH", f"{ATTRS}/location", {"value": {"type": "Point", "coordinates": "here"}}),
                   400, "BadRequestData")
    assert get(api)["location"] == {"type": "GeoProperty", "value": point}


def test_empty_attribute_fragment_is_bad_request_data(api):
    """5.6.4.4 / 5.6.19.4 (ETSI 012_02_04): an empty fragment is BadRequestData for partial update and replace,
    with either media type; the attribute is unchanged."""
    setup_vehicle(api)
    for method in ("PATCH", "PUT"):
        assert_problem(api.send_json(method, f"{ATTRS}/speed", {}), 400, "BadRequestData")
        assert_problem(api.send_json(method, f"{ATTRS}/speed", {"@context": CORE}, content_type="application/ld+json"),
                       400, "BadRequestData")
    assert get(api)["speed"] == prop(55, unitCode="KMH")
