"""Shared fixtures: a real middleware process per store (SQLite, PostgreSQL), an HTTP client per test tenant,
and a real HTTP server that hosts user @context documents."""
from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

PG_ADMIN_DSN = os.environ.get("CITYBRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CORE = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """The direct child processes of pid (from /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class Middleware:
    """A `citybridge serve` process on loopback."""

    def __init__(self, store: str, workdir: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = store
        self.log = open(workdir / f"middleware-{self.port}.log", "wb")
        # MQTT ingest is off unless a test asks for it (it would otherwise join whatever broker is on 1883)
        environment = dict(os.environ, CITYBRIDGE_STORE=store, CITYBRIDGE_PORT=str(self.port),
                           CITYBRIDGE_MQTT_ENABLED="false")
        environment.update(env)
        self.process = subprocess.Popen([sys.executable, "-m", "middleware.cli", "serve"], cwd=workdir,
                                        env=environment, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"middleware exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("middleware did not start in 30 s")

    def kill(self) -> None:
        """SIGKILL the process and its children (the notification delivery process) at once: a crash of both."""
        taken = children(self.process.pid)
        self.process.kill()
        for child in taken:
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        self.log.close()

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _pg(statement: str) -> None:
    async def run():
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session (dropped at the end); its DSN."""
    name = f"citybridge_test_{uuid.uuid4().hex[:10]}"
    _pg(f"CREATE DATABASE {name}")
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def middleware(request, tmp_path_factory):
    """A running middleware, once with the SQLite store and once with PostgreSQL."""
    workdir = tmp_path_factory.mktemp(f"mw-{request.param}")
    store = f"sqlite:///{workdir}/store.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    server = Middleware(store, workdir, CITYBRIDGE_MAX_BODY_BYTES="1048576", CITYBRIDGE_CONTEXT_TIMEOUT="1.0")
    yield server
    server.stop()


class Api(httpx.Client):
    """An HTTP client for one test: its own tenant on the middleware, JSON helpers."""

    def __init__(self, base_url: str, tenant: str):
        super().__init__(base_url=base_url + "/ngsi-ld/v1", timeout=30, headers={"NGSILD-Tenant": tenant})
        self.tenant = tenant

    def post_json(self, path: str, body, **kwargs) -> httpx.Response:
        """POST a JSON body (application/json)."""
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return self.post(path, content=orjson.dumps(body), headers=headers, **kwargs)

    def send_json(self, method: str, path: str, body, content_type: str = "application/json", **kwargs) -> httpx.Response:
        """Send a JSON body with any method and content type."""
        headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
        return self.request(method, path, content=orjson.dumps(body), headers=headers, **kwargs)


@pytest.fixture
def api(middleware):
    """A client bound to a fresh tenant, so tests never see each other's entities."""
    client = Api(middleware.url, f"t{uuid.uuid4().hex[:12]}")
    yield client
    client.close()


class ContextServer:
    """A real HTTP server on loopback serving @context documents, a slow path and a broken path."""

    def __init__(self):
        self.documents: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if self.path.startswith("/slow"):
                    time.sleep(3)
                body = outer.documents.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/ld+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, path: str, context) -> str:
        """Serve {"@context": context} at path; return its URL."""
        self.documents[path] = orjson.dumps({"@context": context})
        return self.url + path


@pytest.fixture(scope="session")
def context_server():
    """The session's @context server."""
    server = ContextServer()
    yield server
    server.server.shutdown()


class Mosquitto:
    """A real Mosquitto broker on loopback with our configuration: persistence on, no queue limits (DESIGN.md)."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.config = workdir / f"mosquitto-{self.port}.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest file {workdir}/mosquitto-{self.port}.log\n"
            # as root, mosquitto would switch to user mosquitto, which cannot write pytest's 0700 temp folders
            + ("user root\n" if os.geteuid() == 0 else ""))
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the broker and wait until it accepts connections."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        """Stop the broker."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """The session's Mosquitto broker."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


def assert_problem(response, status: int, name: str) -> dict:
    """The response is a ProblemDetails of the given NGSI-LD error type and HTTP status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] in ("application/json", "application/problem+json")
    body = response.json()
    assert body["type"] == "https://uri.etsi.org/ngsi-ld/errors/" + name
    assert isinstance(body.get("title"), str) and body["title"]
    return body


def link(url: str) -> dict:
    """The JSON-LD Link header for a context URL."""
    return {"Link": f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"'}
