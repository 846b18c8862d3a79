"""Conformance: Query Entities, GET /ngsi-ld/v1/entities (ETSI GS CIM 009 v1.8 clause 5.7.2, 6.4.3.2), with the
entity type selection language (4.17), the query language q (4.9), geo-queries (4.10), pagination (5.5.9) and
the representations keyValues / concise / GeoJSON (4.5)."""
from __future__ import annotations

import pytest

from tests.conftest import CORE, link

ERR = "https://uri.etsi.org/ngsi-ld/errors/"


def create(api, *entities):
    """Create each entity with POST /entities (5.6.1); fail loudly otherwise."""
    for entity in entities:
        response = api.post_json("/entities", entity)
        assert response.status_code == 201, response.text


def ids(response) -> list[str]:
    """The entity ids of a 200 query response, in response order."""
    assert response.status_code == 200, response.text
    return [e["id"] for e in response.json()]


def query(api, **params):
    """GET /entities with the given query parameters."""
    return api.get("/entities", params=params)


def assert_error(response, status: int, name: str) -> None:
    """The response is a ProblemDetails of the given NGSI-LD error type (5.5.2)."""
    assert response.status_code == status, response.text
    assert response.json()["type"] == ERR + name


def prop(value, **extra):
    """A normalized Property."""
    return {"type": "Property", "value": value, **extra}


# --------------------------------------------------------------------------------------------- type (4.17)


@pytest.fixture
def typed(api):
    """Entities of type A, B, C and one of both A and B."""
    create(api,
           {"id": "urn:ngsi-ld:T:a", "type": "A", "p": prop(1)},
           {"id": "urn:ngsi-ld:T:b", "type": "B", "p": prop(2)},
           {"id": "urn:ngsi-ld:T:c", "type": "C", "p": prop(3)},
           {"id": "urn:ngsi-ld:T:ab", "type": ["A", "B"], "p": prop(4)})
    return api


def test_type_single(typed):
    """4.17: a single type name selects the entities that have that type (among others)."""
    assert sorted(ids(query(typed, type="A"))) == ["urn:ngsi-ld:T:a", "urn:ngsi-ld:T:ab"]


def test_type_comma_is_or(typed):
    """4.17: ',' is the (legacy) OR of type names."""
    assert sorted(ids(query(typed, type="A,C"))) == ["urn:ngsi-ld:T:a", "urn:ngsi-ld:T:ab", "urn:ngsi-ld:T:c"]


def test_type_pipe_is_or(typed):
    """4.17: '|' is OR."""
    assert sorted(ids(query(typed, type="B|C"))) == ["urn:ngsi-ld:T:ab", "urn:ngsi-ld:T:b", "urn:ngsi-ld:T:c"]


def test_type_semicolon_is_and(typed):
    """4.17: ';' is AND: only entities having both types."""
    assert ids(query(typed, type="A;B")) == ["urn:ngsi-ld:T:ab"]


def test_type_parentheses(typed):
    """4.17: parentheses group; (A;B)|C and A;(B|C)."""
    assert sorted(ids(query(typed, type="(A;B)|C"))) == ["urn:ngsi-ld:T:ab", "urn:ngsi-ld:T:c"]
    assert ids(query(typed, type="A;(B|C)")) == ["urn:ngsi-ld:T:ab"]


def test_type_unknown_gives_empty_array(typed):
    """5.7.2: no match is an empty array, not an error."""
    assert ids(query(typed, type="Nope")) == []


def test_type_invalid_syntax_is_400(typed):
    """4.17 / 5.7.2: a malformed type selection is BadRequestData."""
    assert_error(query(typed, type="(A|B"), 400, "BadRequestData")
    assert_error(query(typed, type="A;;B"), 400, "BadRequestData")


# --------------------------------------------------------------------------------------------- id, idPattern, attrs


def test_id_list(typed):
    """5.7.2: id is a comma-separated list of entity ids."""
    assert sorted(ids(query(typed, id="urn:ngsi-ld:T:a,urn:ngsi-ld:T:c"))) == ["urn:ngsi-ld:T:a", "urn:ngsi-ld:T:c"]


def test_id_combined_with_type(typed):
    """5.7.2: all given filters apply together."""
    assert ids(query(typed, id="urn:ngsi-ld:T:a,urn:ngsi-ld:T:c", type="C")) == ["urn:ngsi-ld:T:c"]


def test_id_not_a_uri_is_400(typed):
    """5.7.2: entity ids are URIs."""
    assert_error(query(typed, id="not a uri"), 400, "BadRequestData")


def test_id_pattern(typed):
    """5.7.2: idPattern is a regular expression over entity ids."""
    assert sorted(ids(query(typed, idPattern="^urn:ngsi-ld:T:[ab]$"))) == ["urn:ngsi-ld:T:a", "urn:ngsi-ld:T:b"]


def test_id_pattern_invalid_is_400(typed):
    """5.7.2: an invalid regular expression is BadRequestData."""
    assert_error(query(typed, idPattern="urn:(unclosed"), 400, "BadRequestData")


def test_attrs_selects_entities_and_projects(api):
    """5.7.2: attrs keeps only entities having at least one listed attribute, and only those attributes."""
    create(api,
           {"id": "urn:ngsi-ld:S:1", "type": "S", "temperature": prop(20), "humidity": prop(50)},
           {"id": "urn:ngsi-ld:S:2", "type": "S", "humidity": prop(40)},
           {"id": "urn:ngsi-ld:S:3", "type": "S", "noise": prop(3)})
    got = query(api, attrs="temperature,noise")
    assert got.status_code == 200
    by_id = {e["id"]: e for e in got.json()}
    assert sorted(by_id) == ["urn:ngsi-ld:S:1", "urn:ngsi-ld:S:3"]
    assert by_id["urn:ngsi-ld:S:1"] == {"id": "urn:ngsi-ld:S:1", "type": "S", "temperature": prop(20)}


def test_local_true_is_a_selection(api):
    """5.7.2 (v1.8): local=true alone selects every (local) entity."""
    create(api, {"id": "urn:ngsi-ld:S:1", "type": "S"}, {"id": "urn:ngsi-ld:R:1", "type": "R"})
    assert sorted(ids(query(api, local="true"))) == ["urn:ngsi-ld:R:1", "urn:ngsi-ld:S:1"]


def test_query_without_selection_is_400(api):
    """5.7.2 / 6.4.3.2: at least one of type, id, idPattern, attrs, q, geoQ is needed, else BadRequestData."""
    create(api, {"id": "urn:ngsi-ld:S:1", "type": "S"})
    assert_error(api.get("/entities"), 400, "BadRequestData")
    assert_error(query(api, limit="5"), 400, "BadRequestData")


# --------------------------------------------------------------------------------------------- q (4.9)


@pytest.fixture
def sensors(api):
    """Four sensors with numbers, strings, booleans, dates, sub-attributes, compound values and relationships."""
    create(api,
           {"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor",
            "temperature": prop(18.5, observedAt="2024-01-01T10:00:00Z", accuracy=prop(0.2)),
            "status": prop("open"), "name": prop("Calle Mayor"), "active": prop(True),
            "address": prop({"city": "Madrid", "zip": "28013"}),
            "installedOn": prop("2020-05-01"),
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:ana"}},
           {"id": "urn:ngsi-ld:Sensor:2", "type": "Sensor",
            "temperature": prop(21, observedAt="2024-06-01T10:00:00Z", accuracy=prop(0.8)),
            "status": prop("closed"), "name": prop("Calle Alcala"), "active": prop(False),
            "address": prop({"city": "Madrid", "zip": "28014"}),
            "installedOn": prop("2022-01-15"),
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:bob"}},
           {"id": "urn:ngsi-ld:Sensor:3", "type": "Sensor",
            "temperature": prop(25, observedAt="2025-01-01T10:00:00Z"),
            "status": prop("broken"), "name": prop("Gran Via"), "active": prop(True),
            "address": prop({"city": "Sevilla", "zip": "41001"}),
            "humidity": prop(70)},
           {"id": "urn:ngsi-ld:Sensor:4", "type": "Sensor", "status": prop("open"), "name": prop("Plaza Mayor")})
    return api


def q(api, text, **extra) -> list[str]:
    """Sorted ids of Sensor entities matching q."""
    return sorted(ids(query(api, type="Sensor", q=text, **extra)))


def s(*numbers) -> list[str]:
    """Sorted sensor ids."""
    return sorted(f"urn:ngsi-ld:Sensor:{n}" for n in numbers)


def test_q_equal_number(sensors):
    """4.9: == on a number."""
    assert q(sensors, "temperature==21") == s(2)


def test_q_greater_and_less(sensors):
    """4.9: > >= < <= on numbers."""
    assert q(sensors, "temperature>21") == s(3)
    assert q(sensors, "temperature>=21") == s(2, 3)
    assert q(sensors, "temperature<21") == s(1)
    assert q(sensors, "temperature<=21") == s(1, 2)


def test_q_unequal_requires_the_attribute(sensors):
    """4.9: != matches entities that have the attribute with another value (Sensor:4 has no temperature)."""
    assert q(sensors, "temperature!=21") == s(1, 3)


def test_q_range(sensors):
    """4.9: a..b is an inclusive range."""
    assert q(sensors, "temperature==18.5..21") == s(1, 2)
    assert q(sensors, "temperature==19..30") == s(2, 3)


def test_q_unequal_range(sensors):
    """4.9: != with a range matches values outside the range."""
    assert q(sensors, "temperature!=18.5..21") == s(3)


def test_q_string_equal(sensors):
    """4.9: quoted strings compare as strings."""
    assert q(sensors, 'status=="open"') == s(1, 4)


def test_q_value_list(sensors):
    """4.9: == with a value list matches any of the values."""
    assert q(sensors, 'status=="closed","broken"') == s(2, 3)


def test_q_unequal_value_list(sensors):
    """4.9: != with a value list matches none of the values."""
    assert q(sensors, 'status!="closed","broken"') == s(1, 4)


def test_q_boolean(sensors):
    """4.9: true / false compare with JSON booleans."""
    assert q(sensors, "active==true") == s(1, 3)
    assert q(sensors, "active==false") == s(2)


def test_q_pattern(sensors):
    """4.9: ~= matches a regular expression; !~= its negation."""
    assert q(sensors, "name~=^Calle") == s(1, 2)
    assert q(sensors, "name~=Mayor") == s(1, 4)
    assert q(sensors, "name!~=Mayor") == s(2, 3)


def test_q_pattern_case_insensitive_flag(sensors):
    """4.9: the pattern is a regular expression; (?i) turns on case-insensitive matching."""
    assert q(sensors, "name~=(?i)^gran") == s(3)


def test_q_attribute_existence(sensors):
    """4.9: a bare attribute path matches entities having it."""
    assert q(sensors, "humidity") == s(3)


def test_q_and(sensors):
    """4.9: ';' is AND."""
    assert q(sensors, 'temperature>18;status=="open"') == s(1)


def test_q_or(sensors):
    """4.9: '|' is OR."""
    assert q(sensors, 'temperature>24|status=="closed"') == s(2, 3)


def test_q_and_binds_tighter_than_or(sensors):
    """4.9: ';' takes precedence over '|'."""
    assert q(sensors, 'status=="broken"|status=="open";temperature<20') == s(1, 3)


def test_q_parentheses(sensors):
    """4.9: parentheses are evaluated first."""
    assert q(sensors, '(status=="broken"|status=="open");temperature<20') == s(1)
    assert q(sensors, '(temperature<20|temperature>24);(active==true)') == s(1, 3)


def test_q_sub_attribute_path(sensors):
    """4.9: attr.sub addresses a sub-attribute (a Property of a Property)."""
    assert q(sensors, "temperature.accuracy<0.5") == s(1)
    assert q(sensors, "temperature.accuracy") == s(1, 2)


def test_q_compound_value_key(sensors):
    """4.9: attr[key] addresses a member of a compound (JSON object) value."""
    assert q(sensors, 'address[city]=="Madrid"') == s(1, 2)
    assert q(sensors, 'address[zip]=="41001"') == s(3)


def test_q_observed_at(sensors):
    """4.9: attr.observedAt compares the observedAt member as a DateTime."""
    assert q(sensors, "temperature.observedAt>=2024-06-01T00:00:00Z") == s(2, 3)
    assert q(sensors, "temperature.observedAt<2024-06-01T00:00:00Z") == s(1)


def test_q_date_values(sensors):
    """4.9: Date values compare temporally."""
    assert q(sensors, "installedOn>2021-01-01") == s(2)
    assert q(sensors, "installedOn==2019-01-01..2021-01-01") == s(1)


def test_q_relationship(sensors):
    """4.9: a Relationship's target is its object URI; == compares it."""
    assert q(sensors, "owner==urn:ngsi-ld:Person:bob") == s(2)
    assert q(sensors, 'owner=="urn:ngsi-ld:Person:ana"') == s(1)


def test_q_type_mismatch_is_no_match(sensors):
    """4.9: comparing values of different data types does not match (and is not an error)."""
    assert q(sensors, 'temperature=="21"') == []
    assert q(sensors, "status>3") == []


def test_q_with_user_context(sensors, context_server):
    """4.9 / 5.5.7: q attribute names are expanded with the request's @context."""
    url = context_server.publish("/q-ctx.jsonld", {"t": "https://uri.etsi.org/ngsi-ld/default-context/temperature",
                                                   "Sensor": "https://uri.etsi.org/ngsi-ld/default-context/Sensor"})
    got = sensors.get("/entities", params={"type": "Sensor", "q": "t>20"}, headers={
        "Link": f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"'})
    assert sorted(ids(got)) == s(2, 3)
    assert all("t" in e and "temperature" not in e for e in got.json())


def test_q_invalid_is_400(sensors):
    """4.9: a syntactically invalid q is BadRequestData."""
    for text in ["temperature>", "temperature===3", "(temperature>1", "temperature>1)", "temperature>1;",
                 "temperature>>1", "temperature>1..3"]:
        assert_error(query(sensors, type="Sensor", q=text), 400, "BadRequestData")


def test_q_alone_is_a_selection(sensors):
    """5.7.2: q alone (no type) is a valid query."""
    assert sorted(ids(query(sensors, q="humidity>50"))) == s(3)


# --------------------------------------------------------------------------------------------- geoQ (4.10)

LON, LAT = -3.70, 40.40
# Along the parallel at 40.4 deg, 0.01 deg of longitude is about 847 m.
SPOTS = {"far": 0.1, "mid": 0.03, "origin": 0.001, "near": 0.01}  # creation order differs from distance order
DISTRICT = [[[-3.72, 40.38], [-3.66, 40.38], [-3.66, 40.42], [-3.72, 40.42], [-3.72, 40.38]]]




def point(lon, lat):
    """A GeoJSON Point."""
    return {"type": "Point", "coordinates": [lon, lat]}


@pytest.fixture
def places(api):
    """Point spots at growing distance east of (LON, LAT), and a District polygon around the origin."""
    for name, dlon in SPOTS.items():
        create(api, {"id": f"urn:ngsi-ld:Spot:{name}", "type": "Spot",
                     "location": {"type": "GeoProperty", "value": point(LON + dlon, LAT)}})
    create(api, {"id": "urn:ngsi-ld:District:centre", "type": "District",
                 "location": {"type": "GeoProperty", "value": {"type": "Polygon", "coordinates": DISTRICT}},
                 "observationSpace": {"type": "GeoProperty", "value": point(10.0, 50.0)}})
    return api


def geo(api, georel, geometry, coordinates, **extra):
    """A geo-query (georel, geometry, coordinates as a JSON string)."""
    import orjson
    return query(api, georel=georel, geometry=geometry, coordinates=orjson.dumps(coordinates).decode(), **extra)


def spot(*names):
    """Spot ids."""
    return [f"urn:ngsi-ld:Spot:{n}" for n in names]


def test_geo_near_max_distance_ordered_nearest_first(places):
    """4.10: near;maxDistance==d selects entities within d metres, nearest first."""
    got = geo(places, "near;maxDistance==3000", "Point", [LON, LAT], type="Spot")
    assert ids(got) == spot("origin", "near", "mid")


def test_geo_near_min_distance_ordered_nearest_first(places):
    """4.10: near;minDistance==d selects entities at least d metres away, nearest first."""
    got = geo(places, "near;minDistance==2000", "Point", [LON, LAT], type="Spot")
    assert ids(got) == spot("mid", "far")


def test_geo_near_paginates_in_distance_order(places):
    """4.10 / 5.5.9: limit/offset apply to the distance-ordered result."""
    got = geo(places, "near;maxDistance==100000", "Point", [LON, LAT], type="Spot", limit="2", offset="1")
    assert ids(got) == spot("near", "mid")


def test_geo_near_without_distance_is_400(places):
    """4.10: near needs maxDistance or minDistance."""
    assert_error(geo(places, "near", "Point", [LON, LAT], type="Spot"), 400, "BadRequestData")


def test_geo_within_polygon(places):
    """4.10: within: the entity's geometry lies within the query Polygon."""
    square = [[[-3.71, 40.39], [-3.68, 40.39], [-3.68, 40.41], [-3.71, 40.41], [-3.71, 40.39]]]
    assert sorted(ids(geo(places, "within", "Polygon", square))) == sorted(spot("origin", "near"))


def test_geo_within_multipolygon(places):
    """4.10: a MultiPolygon query geometry (two small squares around two spots)."""
    def box(lon):
        return [[[lon - 0.001, LAT - 0.001], [lon + 0.001, LAT - 0.001], [lon + 0.001, LAT + 0.001],
                 [lon - 0.001, LAT + 0.001], [lon - 0.001, LAT - 0.001]]]
    got = geo(places, "within", "MultiPolygon", [box(LON + 0.001), box(LON + 0.1)])
    assert sorted(ids(got)) == sorted(spot("far", "origin"))


def test_geo_contains(places):
    """4.10: contains: the entity's geometry contains the query geometry."""
    assert ids(geo(places, "contains", "Point", [-3.69, 40.40])) == ["urn:ngsi-ld:District:centre"]


def test_geo_intersects_linestring(places):
    """4.10: intersects with a LineString query geometry."""
    line = [[-3.75, 40.43], [-3.70, 40.39]]  # crosses the district boundary, passes by no spot
    assert ids(geo(places, "intersects", "LineString", line)) == ["urn:ngsi-ld:District:centre"]


def test_geo_equals(places):
    """4.10: equals: the entity's geometry equals the query geometry."""
    assert ids(geo(places, "equals", "Point", [LON + 0.01, LAT])) == spot("near")
    assert ids(geo(places, "equals", "Polygon", DISTRICT)) == ["urn:ngsi-ld:District:centre"]


def test_geo_disjoint(places):
    """4.10: disjoint: no point in common with the query geometry."""
    square = [[[-3.71, 40.39], [-3.68, 40.39], [-3.68, 40.41], [-3.71, 40.41], [-3.71, 40.39]]]
    assert sorted(ids(geo(places, "disjoint", "Polygon", square, type="Spot"))) == sorted(spot("far", "mid"))


def test_geo_overlaps(places):
    """4.10: overlaps: same dimension, sharing some but not all interior (polygon partly over the district)."""
    half = [[[-3.69, 40.39], [-3.60, 40.39], [-3.60, 40.41], [-3.69, 40.41], [-3.69, 40.39]]]
    assert ids(geo(places, "overlaps", "Polygon", half)) == ["urn:ngsi-ld:District:centre"]


def test_geo_multipoint_near(places):
    """4.10: near with a MultiPoint query geometry measures to the nearest of its points."""
    got = geo(places, "near;maxDistance==200", "MultiPoint", [[LON + 0.1, LAT], [LON, LAT]], type="Spot")
    assert sorted(ids(got)) == sorted(spot("far", "origin"))


def test_geo_other_geoproperty(places):
    """4.10: geoproperty names the GeoProperty to test (default location)."""
    got = geo(places, "near;maxDistance==1000", "Point", [10.0, 50.0], geoproperty="observationSpace")
    assert ids(got) == ["urn:ngsi-ld:District:centre"]
    assert ids(geo(places, "near;maxDistance==1000", "Point", [10.0, 50.0])) == []


def test_geo_combined_with_q_and_type(places):
    """5.7.2: geoQ combines with the other filters."""
    got = geo(places, "near;maxDistance==3000", "Point", [LON, LAT], type="Spot", idPattern="near|mid")
    assert ids(got) == spot("near", "mid")


def test_geo_invalid_is_400(places):
    """4.10: an incomplete or invalid geo-query is BadRequestData."""
    for params in [{"georel": "within", "geometry": "Polygon"},
                   {"georel": "nearby", "geometry": "Point", "coordinates": "[0,0]"},
                   {"georel": "within", "geometry": "Circle", "coordinates": "[0,0]"},
                   {"georel": "within", "geometry": "Polygon", "coordinates": "[[[0,0],[1,0],[1,1]]]"},
                   {"georel": "within", "geometry": "Point", "coordinates": "not json"},
                   {"georel": "within;maxDistance==5", "geometry": "Point", "coordinates": "[0,0]"}]:
        assert_error(query(places, **params), 400, "BadRequestData")


# --------------------------------------------------------------------------------------------- pagination, count


@pytest.fixture
def many(api):
    """Seven entities of type P, created in order."""
    create(api, *({"id": f"urn:ngsi-ld:P:{i}", "type": "P", "n": prop(i)} for i in range(7)))
    return api


def test_limit_and_offset_page_through(many):
    """5.5.9: limit and offset page through the result, without overlap or gap."""
    pages = [ids(query(many, type="P", limit="3", offset=str(o))) for o in (0, 3, 6)]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(sum(pages, [])) == sorted(f"urn:ngsi-ld:P:{i}" for i in range(7))


def test_count_header(many):
    """5.5.9 / 6.3.13: count=true adds NGSILD-Results-Count with the total number of matches."""
    got = query(many, type="P", limit="2", count="true")
    assert got.status_code == 200
    assert len(got.json()) == 2
    assert got.headers["NGSILD-Results-Count"] == "7"


def test_count_header_absent_without_count(many):
    """6.3.13: without count=true there is no NGSILD-Results-Count header."""
    got = query(many, type="P")
    assert "NGSILD-Results-Count" not in got.headers


def test_count_with_limit_zero(many):
    """5.5.9: limit=0 with count=true returns no entities but the count."""
    got = query(many, type="P", limit="0", count="true")
    assert got.status_code == 200
    assert got.json() == []
    assert got.headers["NGSILD-Results-Count"] == "7"


def test_limit_zero_has_no_next_page_link(many):
    """5.5.9 / 6.3.10: limit=0 asks only for the count; there is no next page to link."""
    got = query(many, type="P", limit="0", count="true")
    assert 'rel="next"' not in got.headers.get("Link", "")


def test_count_zero_matches(many):
    """6.3.13: the count is 0 when nothing matches."""
    got = query(many, type="Nope", count="true")
    assert got.json() == [] and got.headers["NGSILD-Results-Count"] == "0"


def test_limit_above_maximum_is_too_many_results(many):
    """5.5.9: a limit above the broker's maximum (1000) is 403 TooManyResults."""
    assert_error(query(many, type="P", limit="1001"), 403, "TooManyResults")
    assert query(many, type="P", limit="1000").status_code == 200


def test_negative_or_malformed_limit_is_400(many):
    """5.5.9: limit and offset are non-negative integers."""
    assert_error(query(many, type="P", limit="-1"), 400, "BadRequestData")
    assert_error(query(many, type="P", offset="x"), 400, "BadRequestData")


# --------------------------------------------------------------------------------------------- representations


@pytest.fixture
def room(api):
    """One room with a plain property, a property with a sub-attribute and a relationship."""
    create(api, {"id": "urn:ngsi-ld:Room:1", "type": "Room", "temperature": prop(21),
                 "pressure": prop(1013, unitCode="HPA"),
                 "inBuilding": {"type": "Relationship", "object": "urn:ngsi-ld:Building:1"}})
    return api


def test_key_values(room):
    """4.5.4 / 5.7.2: options=keyValues gives the simplified representation."""
    got = query(room, type="Room", options="keyValues")
    assert got.json() == [{"id": "urn:ngsi-ld:Room:1", "type": "Room", "temperature": 21, "pressure": 1013,
                           "inBuilding": "urn:ngsi-ld:Building:1"}]


def test_format_key_values_and_simplified(room):
    """5.7.2 (v1.8 format=): format=keyValues (or its alias simplified) equals options=keyValues."""
    kv = query(room, type="Room", options="keyValues").json()
    assert query(room, type="Room", format="keyValues").json() == kv
    assert query(room, type="Room", format="simplified").json() == kv


def test_concise(room):
    """4.5.1 concise: Properties without extras are bare values, Relationships keep 'object', no 'type'."""
    got = query(room, type="Room", options="concise").json()
    assert got == [{"id": "urn:ngsi-ld:Room:1", "type": "Room", "temperature": 21,
                    "pressure": {"value": 1013, "unitCode": "HPA"},
                    "inBuilding": {"object": "urn:ngsi-ld:Building:1"}}]
    assert query(room, type="Room", format="concise").json() == got


def test_normalized_default(room):
    """4.5.1: without options the representation is normalized."""
    got = query(room, type="Room").json()[0]
    assert got["temperature"] == prop(21)
    assert got["inBuilding"] == {"type": "Relationship", "object": "urn:ngsi-ld:Building:1"}


def test_invalid_format_is_400(room):
    """5.7.2: an unknown format, or keyValues with concise, is BadRequestData."""
    assert_error(query(room, type="Room", format="fancy"), 400, "BadRequestData")
    assert_error(query(room, type="Room", options="keyValues,concise"), 400, "BadRequestData")


def test_attrs_naming_entity_members_is_400(room):
    """5.7.2 / 4.6.2: attrs lists Attribute names; id, type and the other Entity members are not (ETSI 019_03_03)."""
    for attrs in ("id,type", "type", "createdAt", "temperature,scope"):
        assert_error(query(room, attrs=attrs), 400, "BadRequestData")
    assert_error(post_query(room, {"type": "Query", "attrs": ["id"]}), 400, "BadRequestData")


def post_query(api, body, **params):
    """POST /entityOperations/query with a Query body (5.2.23)."""
    return api.post_json("/entityOperations/query", body, params=params)


def test_pick_or_omit_with_attrs_is_400(room):
    """4.21 / 5.7.2: pick and omit cannot be combined with attrs (ETSI 019_18_02, 019_18_03)."""
    assert_error(query(room, type="Room", pick="temperature", attrs="pressure"), 400, "BadRequestData")
    assert_error(query(room, type="Room", omit="temperature", attrs="pressure"), 400, "BadRequestData")
    body = {"type": "Query", "entities": [{"type": "Room"}], "attrs": ["pressure"], "pick": ["temperature"]}
    assert_error(post_query(room, body), 400, "BadRequestData")


@pytest.mark.parametrize("expression", ["id,inBuilding{name", "id,inBuilding{{name}", "id,inBuilding{,name}",
                                        "id,inBuilding{}", "temperature}", "{temperature}"])
def test_malformed_pick_or_omit_is_400(room, expression):
    """4.21: a pick/omit expression with unbalanced, empty or misplaced braces is BadRequestData (ETSI 019_18)."""
    assert_error(query(room, type="Room", pick=expression), 400, "BadRequestData")
    assert_error(query(room, type="Room", omit=expression), 400, "BadRequestData")


def test_pick_of_linked_entity_members_is_not_supported(room):
    """4.21 / 4.5.23: name{...} picks members of linked entities, which needs join: OperationNotSupported."""
    assert_error(query(room, type="Room", pick="id,inBuilding{name}"), 422, "OperationNotSupported")


def test_post_query_pick_omit_and_lang(room):
    """5.2.23: the Query body's pick, omit and lang mean what the GET parameters do."""
    body = {"type": "Query", "entities": [{"type": "Room"}]}
    assert ids(post_query(room, {**body, "pick": ["id", "temperature"]})) == ["urn:ngsi-ld:Room:1"]
    assert post_query(room, {**body, "pick": "id,temperature"}).json() == [
        {"id": "urn:ngsi-ld:Room:1", "temperature": prop(21)}]
    assert post_query(room, {**body, "omit": ["type", "pressure", "inBuilding"]}).json() == [
        {"id": "urn:ngsi-ld:Room:1", "temperature": prop(21)}]
    create(room, {"id": "urn:ngsi-ld:Square:1", "type": "Square",
                  "street": {"type": "LanguageProperty", "languageMap": {"fr": "Grand Place", "nl": "Grote Markt"}}})
    got = post_query(room, {"type": "Query", "entities": [{"type": "Square"}], "lang": "nl"})
    assert got.json()[0]["street"] == {"type": "Property", "value": "Grote Markt", "lang": "nl"}
    assert_error(post_query(room, {**body, "pick": "inBuilding{"}), 400, "BadRequestData")


def test_post_query_empty_attrs_entities_or_untyped_selector_is_400(room):
    """5.2.23 / 5.2.33: attrs and entities are non-empty arrays, and an EntitySelector has a type."""
    assert_error(post_query(room, {"type": "Query", "entities": [{"type": "Room"}], "attrs": []}), 400, "BadRequestData")
    assert_error(post_query(room, {"type": "Query", "entities": [], "q": "temperature>1"}), 400, "BadRequestData")
    assert_error(post_query(room, {"type": "Query", "entities": [{"id": "urn:ngsi-ld:Room:1"}]}), 400, "BadRequestData")


def test_join_is_not_supported_rather_than_ignored(room):
    """4.5.23: join=flat|inline is OperationNotSupported (not implemented) rather than a 200 without linked entities;
    an invalid join or joinLevel is BadRequestData; join=@none asks for no join."""
    for join in ("inline", "flat"):
        assert_error(query(room, type="Room", join=join, joinLevel="1"), 422, "OperationNotSupported")
        assert_error(room.get("/entities/urn:ngsi-ld:Room:1", params={"join": join}), 422, "OperationNotSupported")
    body = {"type": "Query", "entities": [{"type": "Room"}], "join": "inline"}
    assert_error(post_query(room, body), 422, "OperationNotSupported")
    assert_error(query(room, type="Room", join="deep"), 400, "BadRequestData")
    assert_error(query(room, type="Room", join="inline", joinLevel="0"), 400, "BadRequestData")
    assert ids(query(room, type="Room", join="@none")) == ["urn:ngsi-ld:Room:1"]


@pytest.fixture
def multi(api):
    """A building whose name has a default instance and two dataset instances."""
    create(api, {"id": "urn:ngsi-ld:Building:m", "type": "Building", "category": prop("shop"), "name": [
        prop("Tour Eiffel"), prop("Eiffelturm", datasetId="urn:ngsi-ld:Dataset:de"),
        prop("Torre Eiffel", datasetId="urn:ngsi-ld:Dataset:es")]})
    return api


def test_dataset_id_selects_attribute_instances(multi):
    """4.5.5 / 5.7.2 datasetId: only the instances of the listed datasets, @none for the default instance; the entity
    is returned even when no instance is left (ETSI 019_12)."""
    def names(**params):
        (entity,) = query(multi, type="Building", **params).json()
        return entity
    de = prop("Eiffelturm", datasetId="urn:ngsi-ld:Dataset:de")
    es = prop("Torre Eiffel", datasetId="urn:ngsi-ld:Dataset:es")
    assert names(datasetId="urn:ngsi-ld:Dataset:de") == {"id": "urn:ngsi-ld:Building:m", "type": "Building", "name": de}
    assert names(datasetId="urn:ngsi-ld:Dataset:de,urn:ngsi-ld:Dataset:es")["name"] == [de, es]
    assert names(datasetId="@none") == {"id": "urn:ngsi-ld:Building:m", "type": "Building",
                                        "category": prop("shop"), "name": prop("Tour Eiffel")}
    assert names(attrs="name", datasetId="urn:ngsi-ld:Dataset:fr") == {"id": "urn:ngsi-ld:Building:m", "type": "Building"}
    got = post_query(multi, {"type": "Query", "entities": [{"type": "Building"}], "datasetId": ["urn:ngsi-ld:Dataset:es"]})
    assert got.json()[0]["name"] == es
    assert_error(query(multi, type="Building", datasetId="not a uri"), 400, "BadRequestData")


def test_geojson_feature_collection(places):
    """4.5.16 / 6.3.15: Accept application/geo+json gives a FeatureCollection of Features."""
    got = places.get("/entities", params={"type": "District"}, headers={"Accept": "application/geo+json"})
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("application/geo+json")
    body = got.json()
    assert body["type"] == "FeatureCollection"
    (feature,) = body["features"]
    assert feature["type"] == "Feature"
    assert feature["id"] == "urn:ngsi-ld:District:centre"
    assert feature["geometry"] == {"type": "Polygon", "coordinates": DISTRICT}
    assert feature["properties"]["type"] == "District"
    assert feature["properties"]["location"]["type"] == "GeoProperty"


def test_geojson_geometry_property(places):
    """4.5.16: geometryProperty chooses which GeoProperty becomes the Feature geometry."""
    got = places.get("/entities", params={"type": "District", "geometryProperty": "observationSpace"},
                     headers={"Accept": "application/geo+json"})
    assert got.json()["features"][0]["geometry"] == point(10.0, 50.0)


def test_geojson_empty_collection(places):
    """4.5.16: no match gives an empty FeatureCollection."""
    got = places.get("/entities", params={"type": "Nope"}, headers={"Accept": "application/geo+json"})
    assert got.json() == {"type": "FeatureCollection", "features": [], "@context": CORE}


def test_geojson_carries_the_context_in_the_body(places, context_server):
    """4.5.16 / 6.3.15: a GeoJSON FeatureCollection holds an @context member (ETSI 019_05_01), by GET and POST."""
    url = context_server.publish("/geo-ctx.jsonld", {"District": "https://example.org/District"})
    entity = {"id": "urn:ngsi-ld:District:x", "type": "District", "location": {"type": "GeoProperty", "value": point(1, 2)}}
    assert places.post_json("/entities", entity, headers=link(url)).status_code == 201
    got = places.get("/entities", params={"type": "District"}, headers={"Accept": "application/geo+json"})
    assert got.json()["@context"] == CORE
    got = places.get("/entities", params={"type": "District"},
                     headers={"Accept": "application/geo+json", **link(url)})
    assert got.status_code == 200, got.text
    assert got.json()["@context"] == url
    assert [f["id"] for f in got.json()["features"]] == ["urn:ngsi-ld:District:x"]
    body = {"type": "Query", "entities": [{"type": "District"}]}
    got = places.post_json("/entityOperations/query", body, headers={"Accept": "application/geo+json", **link(url)})
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/geo+json")
    assert got.json()["type"] == "FeatureCollection" and got.json()["@context"] == url
    assert [f["geometry"] for f in got.json()["features"]] == [point(1, 2)]


def test_pages_link_to_next_and_previous(api):
    """5.5.9 / 6.3.10: a page that is not the last carries Link rel="next"; a page after the first carries rel="prev"."""
    for n in range(5):
        assert api.post_json("/entities", {"id": f"urn:ngsi-ld:Page:{n}", "type": "Page"}).status_code == 201
    first = api.get("/entities", params={"type": "Page", "limit": 2})
    assert [e["id"] for e in first.json()] == ["urn:ngsi-ld:Page:0", "urn:ngsi-ld:Page:1"]
    assert 'rel="next"' in first.headers["Link"] and 'rel="prev"' not in first.headers["Link"]
    assert "offset=2" in first.headers["Link"]
    last = api.get("/entities", params={"type": "Page", "limit": 2, "offset": 4})
    assert [e["id"] for e in last.json()] == ["urn:ngsi-ld:Page:4"]
    assert 'rel="next"' not in last.headers["Link"] and 'rel="prev"' in last.headers["Link"]
    assert 'rel="http://www.w3.org/ns/json-ld#context"' in last.headers["Link"]


def test_page_links_have_the_form_of_the_spec_example(api):
    """6.3.10: </ngsi-ld/v1/entities?...&limit=L&offset=O>;rel="next";type="application/ld+json", relative, keeping
    the other parameters as sent (the form the ETSI pagination tests compare)."""
    for n in range(5):
        assert api.post_json("/entities", {"id": f"urn:ngsi-ld:Page:{n}", "type": "Page"}).status_code == 201
    got = api.get("/entities?type=Page&idPattern=%5Eurn&offset=1&limit=2", headers={"Accept": "application/ld+json"})
    assert got.headers["Link"].split(",") == [
        '</ngsi-ld/v1/entities?type=Page&idPattern=%5Eurn&limit=2&offset=0>;rel="prev";type="application/ld+json"',
        '</ngsi-ld/v1/entities?type=Page&idPattern=%5Eurn&limit=2&offset=3>;rel="next";type="application/ld+json"']
    got = api.get("/entities?type=Page&limit=2&offset=3", headers={"Accept": "application/ld+json"})
    assert got.headers["Link"] == '</ngsi-ld/v1/entities?type=Page&limit=2&offset=1>;rel="prev";type="application/ld+json"'


# --------------------------------------------------------------------------------------------- scopeQ (4.19)


@pytest.fixture
def scoped(api):
    """Buildings in Madrid, its sub-scopes, Seoul, and one without a scope."""
    create(api,
           {"id": "urn:ngsi-ld:B:madrid", "type": "Building", "scope": "/Madrid"},
           {"id": "urn:ngsi-ld:B:gardens", "type": "Building", "scope": "/Madrid/Gardens"},
           {"id": "urn:ngsi-ld:B:rose", "type": "Building", "scope": "/Madrid/Gardens/Rose"},
           {"id": "urn:ngsi-ld:B:both", "type": "Building", "scope": ["/Seoul/Gangnam", "/Madrid/Parks"]},
           {"id": "urn:ngsi-ld:B:none", "type": "Building"})
    return api


@pytest.mark.parametrize("scope_q, expected", [
    ("/Madrid", ["madrid"]),
    ("/Madrid/#", ["both", "gardens", "madrid", "rose"]),
    ("/Madrid/+", ["both", "gardens"]),
    ("/Madrid/+/Rose", ["rose"]),
    ("/#", ["both", "gardens", "madrid", "rose"]),
    ("/Seoul/#;/Madrid/Parks", ["both"]),
    ("/Nowhere", []),
    ("/Madrid,/Seoul/Gangnam", ["both", "madrid"]),
    ("(/Madrid/Gardens,/Madrid/Gardens/Rose);/Madrid/Gardens/#", ["gardens", "rose"]),
])
def test_scope_query(scoped, scope_q, expected):
    """4.19: exact scopes, '+' one level, '#' any levels below (the scope itself included), ';' AND, ',' OR."""
    got = query(scoped, type="Building", scopeQ=scope_q)
    assert sorted(i.rsplit(":", 1)[1] for i in ids(got)) == expected


def test_scope_query_alone_is_a_valid_query(scoped):
    """5.7.2: scopeQ is a selection on its own."""
    assert sorted(ids(query(scoped, scopeQ="/Madrid"))) == ["urn:ngsi-ld:B:madrid"]


def test_scope_query_in_post_query(scoped):
    """5.7.2 / 5.2.23: the Query data type's scopeQ."""
    body = {"type": "Query", "entities": [{"type": "Building"}], "scopeQ": "/Madrid/Gardens/#"}
    got = scoped.post_json("/entityOperations/query", body)
    assert sorted(ids(got)) == ["urn:ngsi-ld:B:gardens", "urn:ngsi-ld:B:rose"]


@pytest.mark.parametrize("scope_q", ["Madrid", "/", "/Madrid/#/x", "(/Madrid", "/Madrid;", "/a b"])
def test_invalid_scope_query_is_bad_request_data(api, scope_q):
    """4.19 / 5.5.2: a malformed scopeQ is BadRequestData."""
    assert_error(query(api, type="Building", scopeQ=scope_q), 400, "BadRequestData")
