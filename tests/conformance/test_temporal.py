"""Conformance: history and the temporal API (ETSI GS CIM 009 v1.8 clauses 5.7.3, 5.7.4; representations 4.5.7,
4.5.9, 4.5.19; temporal query 4.11; temporal pagination 6.3.10) at the HTTP level, on SQLite and PostgreSQL, and
from both temporal sources: the store, and InfluxDB 1.x (a second middleware on the same store forwarding to a
private influxd with CITYBRIDGE_TEMPORAL_SOURCE=influxdb; temporal requests go to it once its backlog is empty).
"""
from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from tests.conftest import Api, Middleware, assert_problem, link

EID = "urn:ngsi-ld:Sensor:t1"
INSTANCE_ID = re.compile(r"^urn:ngsi-ld:attribute:instance:\d+$")


class TemporalApi(Api):
    """The test's client: writes go to the store-backed middleware, temporal requests to the temporal source's
    middleware (when it is another one) after waiting until its forwarder has sent every history row."""

    def __init__(self, base_url: str, tenant: str, reader_url: str | None = None, settle=None):
        super().__init__(base_url, tenant)
        self.reader_url = reader_url
        self.settle = settle or (self._settle if reader_url else None)

    def _settle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in httpx.get(self.reader_url + "/metrics", timeout=10).text.splitlines():
                if line.startswith("citybridge_influx_backlog_rows ") and float(line.split()[-1]) == 0:
                    return
            time.sleep(0.02)
        raise AssertionError("the forwarder did not catch up with the history table")

    def request(self, method, url, *args, **kwargs):
        """Send; a temporal request waits for InfluxDB to hold every row and goes to the reading middleware."""
        if "/temporal/" in str(url) and self.settle is not None:
            self.settle()
            if self.reader_url is not None:
                url = self.reader_url + "/ngsi-ld/v1" + str(url)
        return super().request(method, url, *args, **kwargs)


@pytest.fixture(scope="module", params=["store", "influxdb"])
def temporal_source(request, middleware, tmp_path_factory):
    """None (the temporal API reads the store), or (middleware reading InfluxDB and forwarding to it, influxd)."""
    if request.param == "store":
        yield None
        return
    from tests.integration.test_influx import Influxd
    influxd = Influxd(tmp_path_factory.mktemp("temporal-influxd"))
    reader = Middleware(middleware.store, tmp_path_factory.mktemp("temporal-influx"), CITYBRIDGE_INFLUX_URL=influxd.url,
                        CITYBRIDGE_TEMPORAL_SOURCE="influxdb", CITYBRIDGE_INFLUX_FLUSH_INTERVAL="0.05",
                        CITYBRIDGE_CONTEXT_TIMEOUT="1.0")
    yield reader, influxd
    reader.stop()
    influxd.stop()


@pytest.fixture
def api(middleware, temporal_source):
    """A client bound to a fresh tenant whose temporal requests are answered by the source under test."""
    reader_url = temporal_source[0].url if temporal_source else None
    client = TemporalApi(middleware.url, f"t{uuid.uuid4().hex[:12]}", reader_url)
    yield client
    client.close()


def create(api, entity: dict) -> None:
    """Create an entity and insist on 201."""
    response = api.post_json("/entities", entity)
    assert response.status_code == 201, response.text


def sensor(entity_id: str = EID, temperature: float = 20.0, observed: str = "2026-01-01T00:00:00Z", **attrs) -> dict:
    """A Sensor with a temperature observed at a given time."""
    return {"id": entity_id, "type": "Sensor",
            "temperature": {"type": "Property", "value": temperature, "observedAt": observed}, **attrs}


def observe(api, value, observed: str, entity_id: str = EID, attr: str = "temperature", **extra) -> None:
    """Update one attribute (PATCH .../attrs, clause 5.6.2) with a value observed at a time."""
    body = {attr: {"type": "Property", "value": value, "observedAt": observed, **extra}}
    response = api.send_json("PATCH", f"/entities/{entity_id}/attrs", body)
    assert response.status_code == 204, response.text


def series(api, values: list, entity_id: str = EID, hour0: int = 0) -> None:
    """Create the sensor with values[0] at 00:00 and update it with the others one per 10 minutes (hour0 offset)."""
    create(api, sensor(entity_id, values[0], f"2026-01-01T{hour0:02d}:00:00Z"))
    for k, value in enumerate(values[1:], start=1):
        minutes = hour0 * 60 + 10 * k
        observe(api, value, f"2026-01-01T{minutes // 60:02d}:{minutes % 60:02d}:00Z", entity_id)


def temporal(api, entity_id: str = EID, status: int = 200, **params) -> dict:
    """GET /temporal/entities/{id} and return the body."""
    response = api.get(f"/temporal/entities/{entity_id}", params=params)
    assert response.status_code == status, response.text
    return response.json()


def values_of(attr: list[dict]) -> list:
    """The values of a normalized temporal attribute, in order."""
    return [inst["value"] for inst in attr]


# ------------------------------------------------------------------------------------------------ what is recorded


def test_every_accepted_write_of_an_attribute_is_one_instance_in_time_order(api):
    """4.5.7: the temporal representation lists each written instance with its value, observedAt and an instanceId."""
    series(api, [20.0, 21.5, 19.0])
    body = temporal(api)
    assert body["id"] == EID and body["type"] == "Sensor"
    instances = body["temperature"]
    assert values_of(instances) == [20.0, 21.5, 19.0]
    assert [i["observedAt"] for i in instances] == ["2026-01-01T00:00:00Z", "2026-01-01T00:10:00Z",
                                                   "2026-01-01T00:20:00Z"]
    assert all(i["type"] == "Property" and INSTANCE_ID.match(i["instanceId"]) for i in instances)
    assert len({i["instanceId"] for i in instances}) == 3


def test_same_value_with_a_new_observedAt_is_recorded_untouched_attributes_are_not(api):
    """A repeated reading is a new point; an attribute the request does not write gets no new instance."""
    create(api, sensor(humidity={"type": "Property", "value": 40, "observedAt": "2026-01-01T00:00:00Z"}))
    observe(api, 20.0, "2026-01-01T00:10:00Z")
    body = temporal(api)
    assert values_of(body["temperature"]) == [20.0, 20.0]
    assert values_of(body["humidity"]) == [40]


def test_a_batch_naming_one_entity_three_times_records_three_instances(api):
    """Batch upsert (update) with the same entity three times: each write is an instance, and the entity keeps the last."""
    create(api, sensor())
    body = [sensor(temperature=value, observed=f"2026-01-01T00:{minute:02d}:00Z")
            for value, minute in ((21.0, 10), (22.0, 20), (23.0, 30))]
    response = api.post_json("/entityOperations/upsert?options=update", body)
    assert response.status_code == 204, response.text
    got = temporal(api)
    assert values_of(got["temperature"]) == [20.0, 21.0, 22.0, 23.0]
    assert len({i["instanceId"] for i in got["temperature"]}) == 4
    assert api.get(f"/entities/{EID}").json()["temperature"]["value"] == 23.0


def test_rejected_write_records_nothing(api):
    """History is written in the entity change's transaction: a create that fails (409) leaves no instance."""
    create(api, sensor())
    response = api.post_json("/entities", sensor(temperature=99.0))
    assert_problem(response, 409, "AlreadyExists")
    assert values_of(temporal(api)["temperature"]) == [20.0]


def test_append_merge_replace_and_batch_upsert_are_all_recorded(api):
    """Every kind of accepted write records the instances it writes (5.6.3 append, 5.6.17 merge, 5.6.18 replace, 5.6.8)."""
    create(api, sensor())
    response = api.post_json(f"/entities/{EID}/attrs", {"temperature": {"type": "Property", "value": 21.0,
                                                                         "observedAt": "2026-01-01T00:10:00Z"}})
    assert response.status_code == 204, response.text
    response = api.send_json("PATCH", f"/entities/{EID}", {"temperature": {"type": "Property", "value": 22.0,
                                                                            "observedAt": "2026-01-01T00:20:00Z"}})
    assert response.status_code == 204, response.text
    response = api.send_json("PUT", f"/entities/{EID}", sensor(temperature=23.0, observed="2026-01-01T00:30:00Z"))
    assert response.status_code == 204, response.text
    response = api.post_json("/entityOperations/upsert",
                             [sensor(temperature=24.0, observed="2026-01-01T00:40:00Z")], params={"options": "update"})
    assert response.status_code == 204, response.text
    assert values_of(temporal(api)["temperature"]) == [20.0, 21.0, 22.0, 23.0, 24.0]


def test_deleted_attribute_is_an_instance_with_null_value_and_deletedAt(api):
    """Deleting an attribute (5.6.5) ends its evolution with urn:ngsi-ld:null and deletedAt (the request time)."""
    create(api, sensor())
    response = api.delete(f"/entities/{EID}/attrs/temperature")
    assert response.status_code == 204, response.text
    instances = temporal(api)["temperature"]
    assert values_of(instances) == [20.0, "urn:ngsi-ld:null"]
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$", instances[1]["deletedAt"])


def test_dataset_instances_have_their_own_evolution(api):
    """Each (attribute, datasetId) instance is recorded on its own; both appear under the attribute."""
    create(api, sensor(temperature=20.0))
    response = api.post_json(f"/entities/{EID}/attrs", {"temperature": {
        "type": "Property", "value": 5.0, "observedAt": "2026-01-01T00:05:00Z", "datasetId": "urn:ngsi-ld:Dataset:outside"}})
    assert response.status_code == 204, response.text
    instances = temporal(api)["temperature"]
    assert [(i["value"], i.get("datasetId")) for i in instances] == [(20.0, None), (5.0, "urn:ngsi-ld:Dataset:outside")]
    simplified = temporal(api, options="temporalValues")["temperature"]
    assert isinstance(simplified, list) and len(simplified) == 2
    assert {s.get("datasetId") for s in simplified} == {None, "urn:ngsi-ld:Dataset:outside"}


def test_instance_without_observedAt_is_placed_at_its_modifiedAt(api):
    """With no observedAt, the time of an instance is its modifiedAt (the request time)."""
    create(api, {"id": EID, "type": "Sensor", "status": {"type": "Property", "value": "ok"}})
    body = temporal(api, options="temporalValues")
    ((value, at),) = body["status"]["values"]
    assert value == "ok" and re.match(r"^\d{4}-\d{2}-\d{2}T", at)
    sys_attrs = temporal(api, options="sysAttrs")["status"][0]
    assert at == sys_attrs["modifiedAt"]


# ------------------------------------------------------------------------------------------------ temporal query 4.11


def test_timerel_before_after_between(api):
    """before: t < timeAt; after: t > timeAt; between: timeAt <= t < endTimeAt."""
    series(api, [1, 2, 3, 4, 5])  # at 00:00, 00:10, 00:20, 00:30, 00:40
    before = temporal(api, timerel="before", timeAt="2026-01-01T00:20:00Z")
    assert values_of(before["temperature"]) == [1, 2]
    after = temporal(api, timerel="after", timeAt="2026-01-01T00:20:00Z")
    assert values_of(after["temperature"]) == [4, 5]
    between = temporal(api, timerel="between", timeAt="2026-01-01T00:10:00Z", endTimeAt="2026-01-01T00:30:00Z")
    assert values_of(between["temperature"]) == [2, 3]
    empty = temporal(api, timerel="after", timeAt="2026-01-02T00:00:00Z")
    assert empty == {"id": EID, "type": "Sensor"}


def test_lastN_returns_the_most_recent_instances_oldest_first(api):
    """lastN: the last N instances of each attribute."""
    series(api, [1, 2, 3, 4, 5])
    assert values_of(temporal(api, lastN="2")["temperature"]) == [4, 5]
    assert values_of(temporal(api, lastN="2", timerel="before", timeAt="2026-01-01T00:30:00Z")["temperature"]) == [2, 3]


def test_timeproperty_modifiedAt_and_createdAt(api):
    """timeproperty selects the time the range applies to; observedAt far in the past does not matter then."""
    series(api, [1, 2])
    assert values_of(temporal(api, timerel="after", timeAt="2026-01-01T00:05:00Z")["temperature"]) == [2]
    modified = temporal(api, timerel="after", timeAt="2026-01-01T00:05:00Z", timeproperty="modifiedAt")
    assert values_of(modified["temperature"]) == [1, 2]  # both written after 2026-01-01T00:05 wall-clock time
    created = temporal(api, timerel="before", timeAt="2000-01-01T00:00:00Z", timeproperty="createdAt")
    assert "temperature" not in created


def test_attrs_limits_the_attributes(api):
    """attrs: only the named attributes' evolution."""
    create(api, sensor(humidity={"type": "Property", "value": 40, "observedAt": "2026-01-01T00:00:00Z"}))
    body = temporal(api, attrs="humidity")
    assert "temperature" not in body and values_of(body["humidity"]) == [40]


# ------------------------------------------------------------------------------------------------ representations


def test_temporal_values_simplified_representation(api):
    """4.5.9: options=temporalValues gives {type, values: [[value, time], ...]} per attribute."""
    series(api, [1, 2])
    create(api, {"id": "urn:ngsi-ld:Sensor:t2", "type": "Sensor",
                 "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:ana",
                           "observedAt": "2026-01-01T00:00:00Z"}})
    body = temporal(api, options="temporalValues")
    assert body["temperature"] == {"type": "Property", "values": [[1, "2026-01-01T00:00:00.000Z"],
                                                                  [2, "2026-01-01T00:10:00.000Z"]]}
    other = temporal(api, "urn:ngsi-ld:Sensor:t2", options="temporalValues")
    assert other["owner"] == {"type": "Relationship", "objects": [["urn:ngsi-ld:Person:ana", "2026-01-01T00:00:00.000Z"]]}


def test_aggregated_values_per_period(api):
    """4.5.19: aggrMethods over aggrPeriodDuration periods from timeAt: [[value, start, end], ...]."""
    series(api, [1, 3, 5, 7, 9, 11])             # 00:00 .. 00:50
    series(api, [2, 4], "urn:ngsi-ld:Sensor:t3", hour0=1)  # another entity, not aggregated with this one
    body = temporal(api, aggrMethods="totalCount,distinctCount,sum,avg,min,max,sumsq,stddev",
                    aggrPeriodDuration="PT30M", timerel="between", timeAt="2026-01-01T00:00:00Z",
                    endTimeAt="2026-01-01T01:00:00Z")
    attr = body["temperature"]
    assert attr["type"] == "Property"
    first, second = ["2026-01-01T00:00:00.000Z", "2026-01-01T00:30:00.000Z"], ["2026-01-01T00:30:00.000Z",
                                                                             "2026-01-01T01:00:00.000Z"]
    assert attr["totalCount"] == [[3, *first], [3, *second]]
    assert attr["distinctCount"] == [[3, *first], [3, *second]]
    assert attr["sum"] == [[9, *first], [27, *second]]
    assert attr["avg"] == [[3, *first], [9, *second]]
    assert attr["min"] == [[1, *first], [7, *second]]
    assert attr["max"] == [[5, *first], [11, *second]]
    assert attr["sumsq"] == [[35, *first], [251, *second]]
    assert attr["stddev"][0][0] == pytest.approx((8 / 3) ** 0.5)


def test_aggregation_over_the_whole_range_with_P0D(api):
    """aggrPeriodDuration P0D (the default): one period covering the whole requested range."""
    series(api, [1, 3, 5])
    body = temporal(api, aggrMethods="avg,max", timerel="between", timeAt="2026-01-01T00:00:00Z",
                    endTimeAt="2026-01-01T06:00:00Z")
    assert body["temperature"]["avg"] == [[3, "2026-01-01T00:00:00.000Z", "2026-01-01T06:00:00.000Z"]]
    assert body["temperature"]["max"] == [[5, "2026-01-01T00:00:00.000Z", "2026-01-01T06:00:00.000Z"]]


def test_compaction_follows_the_request_context(api, context_server):
    """Attribute and type names are compacted with the request's @context; ld+json carries it in the body."""
    url = context_server.publish("/temporal-ctx.jsonld", {"Sensor": "https://example.org/Sensor",
                                                           "temperature": "https://example.org/temperature"})
    response = api.post_json("/entities", sensor(), headers=link(url))
    assert response.status_code == 201, response.text
    compacted = api.get(f"/temporal/entities/{EID}", headers=link(url)).json()
    assert compacted["type"] == "Sensor" and values_of(compacted["temperature"]) == [20.0]
    core = temporal(api)
    assert core["type"] == "https://example.org/Sensor" and "https://example.org/temperature" in core
    ld = api.get(f"/temporal/entities/{EID}", headers={**link(url), "Accept": "application/ld+json"}).json()
    assert ld["@context"] == url and "temperature" in ld


# ------------------------------------------------------------------------------------------------ query operations


def test_query_temporal_selects_current_entities_by_type_q_and_id(api):
    """5.7.4: entities selected like a normal query (type, q, id, idPattern), each with its evolution."""
    series(api, [1, 2], "urn:ngsi-ld:Sensor:a")
    series(api, [10, 20], "urn:ngsi-ld:Sensor:b")
    create(api, {"id": "urn:ngsi-ld:Room:r1", "type": "Room", "temperature": {"type": "Property", "value": 0}})
    response = api.get("/temporal/entities", params={"type": "Sensor"})
    assert response.status_code == 200, response.text
    assert {e["id"]: values_of(e["temperature"]) for e in response.json()} == {
        "urn:ngsi-ld:Sensor:a": [1, 2], "urn:ngsi-ld:Sensor:b": [10, 20]}
    hot = api.get("/temporal/entities", params={"type": "Sensor", "q": "temperature>5"}).json()
    assert [e["id"] for e in hot] == ["urn:ngsi-ld:Sensor:b"]
    by_pattern = api.get("/temporal/entities", params={"idPattern": "^urn:ngsi-ld:Sensor:a$", "lastN": "1"}).json()
    assert [(e["id"], values_of(e["temperature"])) for e in by_pattern] == [("urn:ngsi-ld:Sensor:a", [2])]


def test_query_temporal_selects_by_geoQ(api):
    """geoQ selects among the current entities (here: within 10 km of a point)."""
    for name, lon in (("near", 129.08), ("far", 127.0)):
        create(api, sensor(f"urn:ngsi-ld:Sensor:{name}", location={
            "type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, 35.18]}}))
    response = api.get("/temporal/entities", params={"type": "Sensor", "georel": "near;maxDistance==10000",
                                                     "geometry": "Point", "coordinates": "[129.07,35.18]"})
    assert response.status_code == 200, response.text
    assert [(e["id"], values_of(e["temperature"])) for e in response.json()] == [("urn:ngsi-ld:Sensor:near", [20.0])]


def test_query_temporal_pages_entities_with_limit_and_offset(api):
    """Entities are paged like any query (limit, offset, Link rel=next, count)."""
    for name in "abc":
        create(api, sensor(f"urn:ngsi-ld:Sensor:{name}"))
    response = api.get("/temporal/entities", params={"type": "Sensor", "limit": "2", "count": "true"})
    assert response.status_code == 200
    assert [e["id"] for e in response.json()] == ["urn:ngsi-ld:Sensor:a", "urn:ngsi-ld:Sensor:b"]
    assert response.headers["NGSILD-Results-Count"] == "3"
    assert 'rel="next"' in response.headers["Link"]


def test_post_query_with_temporalQ(api):
    """5.7.4 by POST /temporal/entityOperations/query: a Query body with entities and temporalQ."""
    series(api, [1, 2, 3])
    body = {"type": "Query", "entities": [{"type": "Sensor"}], "attrs": ["temperature"],
            "temporalQ": {"timerel": "after", "timeAt": "2026-01-01T00:05:00Z"}}
    response = api.post_json("/temporal/entityOperations/query", body)
    assert response.status_code == 200, response.text
    (entity,) = response.json()
    assert values_of(entity["temperature"]) == [2, 3]
    values = api.post_json("/temporal/entityOperations/query", body, params={"options": "temporalValues"}).json()
    assert [v for v, _ in values[0]["temperature"]["values"]] == [2, 3]


# ------------------------------------------------------------------------------------------------ errors 5.5.2


@pytest.mark.parametrize("params", [
    {"timerel": "during", "timeAt": "2026-01-01T00:00:00Z"},
    {"timerel": "before"},
    {"timerel": "between", "timeAt": "2026-01-01T00:00:00Z"},
    {"timerel": "between", "timeAt": "2026-01-01T01:00:00Z", "endTimeAt": "2026-01-01T00:00:00Z"},
    {"timerel": "after", "timeAt": "yesterday"},
    {"timeAt": "2026-01-01T00:00:00Z"},
    {"timeproperty": "deletedAt"},
    {"lastN": "0"},
    {"lastN": "many"},
    {"aggrMethods": "median"},
    {"aggrMethods": "avg", "aggrPeriodDuration": "P1M"},
    {"aggrMethods": "avg", "aggrPeriodDuration": "one hour"},
    {"aggrPeriodDuration": "PT1H"},
    {"options": "temporalValues,aggregatedValues", "aggrMethods": "avg"},
    {"options": "aggregatedValues"},
])
def test_invalid_temporal_parameters_are_bad_request_data(api, params):
    """Malformed or contradictory temporal parameters are 400 BadRequestData."""
    create(api, sensor())
    assert_problem(api.get(f"/temporal/entities/{EID}", params=params), 400, "BadRequestData")


def test_unknown_entity_is_404_resource_not_found(api):
    """5.7.3: retrieving the evolution of an entity that does not exist is 404 ResourceNotFound."""
    create(api, sensor())
    assert_problem(api.get("/temporal/entities/urn:ngsi-ld:Sensor:nope"), 404, "ResourceNotFound")


def test_query_without_selection_is_bad_request_data(api):
    """A temporal query needs an entity selection (id, idPattern, type, attrs, q or geoQ)."""
    assert_problem(api.get("/temporal/entities", params={"timerel": "before", "timeAt": "2026-01-01T00:00:00Z"}),
                   400, "BadRequestData")


def test_post_query_with_malformed_json_is_invalid_request(api):
    """A body that is not JSON is 400 InvalidRequest; a body that is not a Query is BadRequestData."""
    response = api.post("/temporal/entityOperations/query", content=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "InvalidRequest")
    assert_problem(api.post_json("/temporal/entityOperations/query", {"type": "Subscription"}), 400, "BadRequestData")
    assert_problem(api.post_json("/temporal/entityOperations/query",
                                 {"type": "Query", "entities": [{"type": "Sensor"}], "temporalQ": {"timerel": "x"}}),
                   400, "BadRequestData")


# ------------------------------------------------------------------------------------------------ pagination 6.3.10


@pytest.fixture(scope="module")
def small_pages(middleware, temporal_source, tmp_path_factory):
    """A further middleware on the same store, reading the same temporal source, with at most 3 instances per attribute."""
    env = {}
    if temporal_source:
        env = dict(CITYBRIDGE_INFLUX_URL=temporal_source[1].url, CITYBRIDGE_TEMPORAL_SOURCE="influxdb",
                   CITYBRIDGE_INFLUX_FORWARD="false")
    server = Middleware(middleware.store, tmp_path_factory.mktemp("temporal-small"), CITYBRIDGE_TEMPORAL_LIMIT="3", **env)
    yield server
    server.stop()


def small_client(api: TemporalApi, small_pages: Middleware) -> TemporalApi:
    """A client of the small-page middleware for the test's tenant (waiting for the forwarder like api does)."""
    return TemporalApi(small_pages.url, api.tenant, settle=api.settle)


def test_more_instances_than_the_limit_is_206_with_content_range_forwards(api, small_pages):
    """Without lastN the page holds the oldest instances; 206 and Content-Range: date-time <first>-<last>/*."""
    series(api, [1, 2, 3, 4, 5])
    create(api, sensor("urn:ngsi-ld:Sensor:other", 100.0))
    small = small_client(api, small_pages)
    response = small.get(f"/temporal/entities/{EID}")
    assert response.status_code == 206, response.text
    assert response.headers["Content-Range"] == "date-time 2026-01-01T00:00:00.000Z-2026-01-01T00:20:00.000Z/*"
    assert values_of(response.json()["temperature"]) == [1, 2, 3]
    following = small.get(f"/temporal/entities/{EID}", params={"timerel": "after", "timeAt": "2026-01-01T00:20:00Z"})
    assert following.status_code == 200 and values_of(following.json()["temperature"]) == [4, 5]
    assert "Content-Range" not in following.headers
    small.close()


def test_lastN_beyond_the_limit_pages_backwards(api, small_pages):
    """With lastN above the limit the page holds the newest instances: Content-Range <newest>-<oldest>/<lastN>."""
    series(api, [1, 2, 3, 4, 5])
    small = small_client(api, small_pages)
    response = small.get(f"/temporal/entities/{EID}", params={"lastN": "5"})
    assert response.status_code == 206, response.text
    assert response.headers["Content-Range"] == "date-time 2026-01-01T00:40:00.000Z-2026-01-01T00:20:00.000Z/5"
    assert values_of(response.json()["temperature"]) == [3, 4, 5]
    within = small.get(f"/temporal/entities/{EID}", params={"lastN": "2"})
    assert within.status_code == 200 and values_of(within.json()["temperature"]) == [4, 5]
    small.close()


def test_every_attribute_is_cut_at_the_same_time(api, small_pages):
    """When one attribute is cut, the others are trimmed to the reported range so the page is complete within it."""
    create(api, sensor(humidity={"type": "Property", "value": 40, "observedAt": "2026-01-01T00:00:00Z"}))
    for k, minute in enumerate(("10", "20", "30", "40"), start=1):
        observe(api, 20 + k, f"2026-01-01T00:{minute}:00Z")
    observe(api, 41, "2026-01-01T00:50:00Z", attr="humidity")
    small = small_client(api, small_pages)
    response = small.get("/temporal/entities", params={"type": "Sensor"})
    assert response.status_code == 206
    (entity,) = response.json()
    assert values_of(entity["temperature"]) == [20.0, 21, 22]
    assert values_of(entity["humidity"]) == [40]
    assert response.headers["Content-Range"].startswith("date-time 2026-01-01T00:00:00.000Z-2026-01-01T00:20:00.000Z")
    small.close()
