"""Shared benchmark plumbing: a real `python -m middleware.cli serve` process (SQLite in a temp dir, or a fresh
PostgreSQL database created and dropped around the run), entity generators, bulk loading, wrk / httpx load
generators, percentiles, machine description and optional py-spy profiling of the server.

Benchmarks PRINT figures; nothing here asserts timings.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
NGSI = "/ngsi-ld/v1"
ETYPE = "AirQualityObserved"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

# Busan, roughly 30 x 30 km (lon 128.95..129.28, lat 35.05..35.32)
BUSAN = (128.95, 35.05, 129.28, 35.32)
# the whole of South Korea's mainland, for entities that need "somewhere in Korea"
KOREA = (126.2, 34.4, 129.5, 38.5)

TARGETS = {
    "batch_upsert": "batch upsert >= 20,000 entities/s",
    "get_entity": "GET /entities/{id} >= 2,000 req/s (one worker)",
    "near_query": "near p99 < 50 ms over 100,000 located entities",
}


# ------------------------------------------------------------------ machine / printing

def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem_gb = int(mem.split()[1]) / 1024 / 1024
    except Exception:
        mem_gb = 0.0
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gb": round(mem_gb, 1), "python": platform.python_version(),
            "kernel": platform.release()}


def python_speed() -> float:
    """Seconds this machine takes for a pure-Python loop of 10 million additions (compare machines with it)."""
    started = time.perf_counter()
    total = 0
    for n in range(10_000_000):
        total += n
    return time.perf_counter() - started


def print_machine(store_label: str) -> None:
    m = machine_info()
    print(f"machine : nproc={m['nproc']}  cpu={m['cpu']}  mem={m['mem_gb']} GB  python={m['python']}  "
          f"kernel={m['kernel']}  speed={python_speed():.2f} s per 10M-add loop (lower is faster)")
    print(f"store   : {store_label}")
    if (m["nproc"] or 1) <= 4:
        print(f"note    : only {m['nproc']} cores - the load generator (wrk / python client) runs on the same "
              "machine and competes with the server for CPU; figures are a lower bound.")
    sys.stdout.flush()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a sequence of numbers."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="sqlite",
                        help="'sqlite' (temp dir, default), 'sqlite:///path.db', or a postgresql:// URL; for "
                             "PostgreSQL a fresh database is created (the URL's database is only used to connect "
                             "as admin) and dropped afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir / database after the run")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="record the server with py-spy during the measured phase into DIR "
                             "(flame graph .svg and collapsed-stack .txt; top hot spots printed)")
    parser.add_argument("--seed", type=int, default=42)


# ------------------------------------------------------------------ server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_admin(dsn: str, statement: str) -> None:
    import asyncpg

    async def run():
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
    asyncio.run(run())


class Server:
    """A middleware process on loopback (context manager)."""

    def __init__(self, store: str = "sqlite", *, keep: bool = False, **env: str):
        self.keep = keep
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="citybridge-bench-"))
        self._pg_db: str | None = None
        self._pg_admin: str | None = None
        if store == "sqlite":
            self.store = f"sqlite:///{self.workdir}/store.db"
            self.label = f"SQLite (WAL) file in {self.workdir}"
        elif store.startswith("sqlite:///"):
            self.store = store
            self.label = f"SQLite {store}"
        elif store.startswith(("postgresql://", "postgres://")):
            base, _, _db = store.rpartition("/") if store.count("/") >= 3 else (store, "", "")
            self._pg_admin = f"{base}/postgres" if _db == "" or _db == "postgres" else store
            name = f"citybridge_bench_{uuid.uuid4().hex[:10]}"
            _pg_admin(self._pg_admin, f"CREATE DATABASE {name}")
            self._pg_db = name
            self.store = f"{base}/{name}"
            try:
                ver = subprocess.run(["psql", self._pg_admin, "-Atc", "show server_version"], capture_output=True,
                                     text=True, timeout=10).stdout.strip()
            except Exception:
                ver = "?"
            self.label = f"PostgreSQL {ver} fresh database {self.store}"
        else:
            raise SystemExit(f"unknown --store {store!r}")
        self.env = {"CITYBRIDGE_LOG_LEVEL": "warning", "CITYBRIDGE_MQTT_ENABLED": "false", **env}
        self.process: subprocess.Popen | None = None
        self.log = None

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log = open(self.workdir / "middleware.log", "wb")
        environment = dict(os.environ, CITYBRIDGE_STORE=self.store, CITYBRIDGE_PORT=str(self.port), **self.env)
        environment["PYTHONPATH"] = str(ROOT) + os.pathsep + environment.get("PYTHONPATH", "")
        python = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
        self.process = subprocess.Popen([python, "-m", "middleware.cli", "serve"], cwd=self.workdir,
                                        env=environment, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"middleware exited: {(self.workdir / 'middleware.log').read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("middleware did not start in 30 s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes (the notification delivery process), MB."""
        return rss_mb(self.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log:
            self.log.close()
        if self._pg_db and not self.keep:
            try:
                _pg_admin(self._pg_admin, f"DROP DATABASE IF EXISTS {self._pg_db} WITH (FORCE)")
            except Exception as exc:  # pragma: no cover
                print(f"warning: could not drop {self._pg_db}: {exc}")
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"kept: {self.workdir} {self._pg_db or ''}")


# ------------------------------------------------------------------ the server's processes

def tree(pid: int) -> list[int]:
    """A process and all its descendants (the uvicorn workers of `--workers N`), from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def cpu_seconds(pid: int, own_only: bool = False) -> float:
    """User + system CPU time of a process and its descendants (from /proc); own_only: of the process alone."""
    total = 0
    for member in [pid] if own_only else tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_pair(pid: int) -> tuple[float, float]:
    """CPU seconds of the process tree and of the process alone (the API process without its delivery process)."""
    return cpu_seconds(pid), cpu_seconds(pid, own_only=True)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB."""
    total = 0
    for member in tree(pid):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{member}/status").read_text().splitlines()
                          if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total / 1024


# ------------------------------------------------------------------ profiling

class Profiler:
    """py-spy record attached to the server for the duration of a `with` block (no-op when dir is None)."""

    def __init__(self, server: Server, directory: str | None, name: str):
        self.server, self.directory, self.name = server, directory, name
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        if not self.directory:
            return self
        pyspy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
        out = Path(self.directory)
        out.mkdir(parents=True, exist_ok=True)
        self.svg = out / f"{self.name}.svg"
        self.raw = out / f"{self.name}.txt"
        for fmt, path in (("flamegraph", self.svg), ("raw", self.raw)):
            self.procs.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(self.server.pid), "--subprocesses", "--rate", "200", "--format", fmt, "-o", str(path),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        if not self.procs:
            return
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"profile : {self.svg} (flame graph), {self.raw} (collapsed stacks)")
        try:
            print_hotspots(self.raw)
        except Exception as exc:  # noqa: BLE001 - a summary is a courtesy; the raw file stays
            print(f"profile : could not summarise {self.raw}: {exc}")


def print_hotspots(raw_path: Path, top: int = 15) -> None:
    """Self time and inclusive time per function from py-spy's collapsed-stack output (idle frames dropped)."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in Path(raw_path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # drop the process/thread header frames
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf = _short(frames[-1])
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(_short(f) for f in frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        print("profile : no samples")
        return
    print(f"profile : {total} samples (all threads, idle samples dropped by py-spy)")
    print("  top self time:")
    for name, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {name}")
    print("  top inclusive (middleware code only):")
    mw = [(k, v) for k, v in incl.items() if "middleware/" in k]
    for name, n in sorted(mw, key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {name}")


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file-relative-path)"
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    func, path, _line = m.groups()
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# ------------------------------------------------------------------ entities

def entity_id(i: int) -> str:
    return f"urn:ngsi-ld:{ETYPE}:{i:07d}"


def make_entity(i: int, rng: random.Random, area=KOREA, observed: str = "2024-05-01T12:00:00Z") -> dict:
    """An AirQualityObserved-like entity (normalized, core @context): 4 measured Properties with unitCode and
    observedAt, a GeoProperty Point inside `area`, a Relationship and a plain Property."""
    lon = rng.uniform(area[0], area[2])
    lat = rng.uniform(area[1], area[3])
    return {
        "id": entity_id(i),
        "type": ETYPE,
        "pm10": {"type": "Property", "value": round(rng.uniform(0, 150), 1), "unitCode": "GQ", "observedAt": observed},
        "pm25": {"type": "Property", "value": round(rng.uniform(0, 100), 1), "unitCode": "GQ", "observedAt": observed},
        "temperature": {"type": "Property", "value": round(rng.uniform(-10, 35), 1), "unitCode": "CEL",
                        "observedAt": observed},
        "relativeHumidity": {"type": "Property", "value": round(rng.uniform(0, 1), 3), "unitCode": "P1",
                             "observedAt": observed},
        "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [round(lon, 6), round(lat, 6)]}},
        "refDevice": {"type": "Relationship", "object": f"urn:ngsi-ld:Device:{i % 1000:04d}"},
        "stationName": {"type": "Property", "value": f"station-{i}"},
    }


def batch_bodies(n: int, batch: int, rng: random.Random, area=KOREA, observed: str = "2024-05-01T12:00:00Z",
                 start: int = 0) -> list[bytes]:
    """Pre-serialised upsert bodies covering ids start..start+n-1."""
    bodies = []
    for lo in range(start, start + n, batch):
        hi = min(lo + batch, start + n)
        bodies.append(orjson.dumps([make_entity(i, rng, area, observed) for i in range(lo, hi)]))
    return bodies


async def _post_all(url: str, bodies: list[bytes], concurrency: int, path: str) -> tuple[float, list[float], dict]:
    queue = list(enumerate(bodies))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                _, body = queue.pop(0)
                t0 = time.perf_counter()
                r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 300:
                    raise RuntimeError(f"{path} -> {r.status_code}: {r.text[:500]}")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return elapsed, latencies, statuses


def post_batches(url: str, bodies: list[bytes], concurrency: int = 2,
                 path: str = NGSI + "/entityOperations/upsert") -> tuple[float, list[float], dict]:
    """POST every body (concurrency connections); returns (elapsed s, per-request latencies, status counts)."""
    return asyncio.run(_post_all(url, bodies, concurrency, path))


def load_entities(server: Server, n: int, rng: random.Random, area=KOREA, batch: int = 1000) -> float:
    """Load n entities by batch upsert; prints and returns entities/s."""
    bodies = batch_bodies(n, batch, rng, area)
    elapsed, _, _ = post_batches(server.url, bodies, 2)
    rate = n / elapsed
    print(f"loaded  : {n:,} entities in {elapsed:.1f} s ({rate:,.0f} entities/s)")
    sys.stdout.flush()
    return rate


# ------------------------------------------------------------------ wrk

def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def lua_paths_script(paths: list[str], directory: Path) -> Path:
    """A wrk Lua script picking a random path from the list for every request."""
    script = directory / f"paths-{uuid.uuid4().hex[:6]}.lua"
    entries = ",\n".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in paths)
    script.write_text(
        "math.randomseed(os.time())\n"
        f"local paths = {{\n{entries}\n}}\n"
        "local n = #paths\n"
        "request = function()\n"
        "  return wrk.format('GET', paths[math.random(n)])\n"
        "end\n")
    return script


_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _dur(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")


def run_wrk(url: str, script: Path, *, threads: int = 1, connections: int = 8, duration: int = 10) -> dict:
    """Run wrk --latency; returns rps, p50/p75/p90/p99 (s), requests, errors and non-2xx counts."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    result = {"cmd": " ".join(cmd), "raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else float("nan")
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = _dur(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = m.group(1) if m else ""
    return result


# ------------------------------------------------------------------ sequential python client

def timed_gets(url: str, paths: list[str], warmup: int = 3) -> tuple[list[float], list[httpx.Response]]:
    """GET each path in turn on one keep-alive connection; (latencies s, responses)."""
    latencies, responses = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for p in paths[:warmup]:
            client.get(p)
        for p in paths:
            t0 = time.perf_counter()
            r = client.get(p)
            latencies.append(time.perf_counter() - t0)
            responses.append(r)
    return latencies, responses
