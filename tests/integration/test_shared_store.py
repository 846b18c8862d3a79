"""Several middleware processes sharing one PostgreSQL store lose none of each other's writes."""
from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import orjson
import pytest

from tests.conftest import Middleware

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def two_workers(pg_database, tmp_path_factory):
    """Two middleware processes on the same PostgreSQL database."""
    workdir = tmp_path_factory.mktemp("shared")
    first, second = Middleware(pg_database, workdir), Middleware(pg_database, workdir)
    yield first, second
    first.stop()
    second.stop()


def test_concurrent_appends_through_two_processes_all_survive(two_workers):
    """200 attributes appended to one entity, alternately through two processes, in parallel: all 200 remain."""
    tenant = {"NGSILD-Tenant": f"t{uuid.uuid4().hex[:10]}"}
    entity_id = "urn:ngsi-ld:Counter:shared"
    first, second = two_workers
    created = httpx.post(first.url + "/ngsi-ld/v1/entities", headers={**JSON, **tenant},
                         content=orjson.dumps({"id": entity_id, "type": "Counter"}))
    assert created.status_code == 201

    def append(n: int) -> int:
        server = (first, second)[n % 2]
        body = {f"a{n}": {"type": "Property", "value": n}}
        response = httpx.post(f"{server.url}/ngsi-ld/v1/entities/{entity_id}/attrs", headers={**JSON, **tenant},
                              content=orjson.dumps(body), timeout=30)
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(append, range(200)))
    assert codes == [204] * 200
    entity = httpx.get(f"{second.url}/ngsi-ld/v1/entities/{entity_id}", headers=tenant).json()
    assert {k: v["value"] for k, v in entity.items() if k.startswith("a")} == {f"a{n}": n for n in range(200)}


def test_concurrent_creates_of_one_id_through_two_processes_one_wins(two_workers):
    """The same entity created 20 times through two processes: exactly one 201, the rest 409 AlreadyExists."""
    tenant = {"NGSILD-Tenant": f"t{uuid.uuid4().hex[:10]}"}
    first, second = two_workers

    def create(n: int) -> int:
        server = (first, second)[n % 2]
        body = {"id": "urn:ngsi-ld:Race:1", "type": "Race", "by": {"type": "Property", "value": n}}
        return httpx.post(server.url + "/ngsi-ld/v1/entities", headers={**JSON, **tenant},
                          content=orjson.dumps(body), timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        codes = sorted(pool.map(create, range(20)))
    assert codes == [201] + [409] * 19
