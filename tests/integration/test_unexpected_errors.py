"""Integration: an unexpected exception in a route is a 500 InternalError ProblemDetails on a connection that stays
open (a real uvicorn server on loopback, one raw keep-alive socket)."""
from __future__ import annotations

import socket
import threading
import time

import orjson
import uvicorn

from middleware.app import create_app
from middleware.config import Settings


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(lines[0].split()[1]), body


def test_an_unexpected_error_is_a_problem_and_the_connection_lives_on(tmp_path):
    """GET of a route that raises gives 500 InternalError; the next request on the same socket is answered."""
    app = create_app(Settings(store=f"sqlite:///{tmp_path}/store.db", mqtt_enabled=False))

    async def boom():
        raise RuntimeError("a bug")
    app.add_api_route("/boom", boom)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /boom HTTP/1.1\r\nHost: test\r\n\r\n")
            status, body = read_response(sock)
            assert status == 500
            problem = orjson.loads(body)
            assert problem["type"] == "https://uri.etsi.org/ngsi-ld/errors/InternalError"
            assert "RuntimeError: a bug" in problem["detail"]
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")  # the same connection
            status, body = read_response(sock)
            assert status == 200 and orjson.loads(body)["status"] == "ok"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
