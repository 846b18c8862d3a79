"""Private time-series servers for the benchmarks: influxd (InfluxDB 1.x) and victoria-metrics (the v2 write API),
each on free loopback ports with its own folder, plus a wait for the middleware's InfluxDB backlog to drain."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx

import common


class Influxd:
    """An influxd process (Debian's influxdb 1.x) with its data in workdir."""

    def __init__(self, workdir: Path):
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "influxdb.conf"
        config.write_text(
            f'reporting-disabled = true\nbind-address = "127.0.0.1:{common.free_port()}"\n'
            f'[meta]\n  dir = "{workdir}/meta"\n[data]\n  dir = "{workdir}/data"\n  wal-dir = "{workdir}/wal"\n'
            f'  query-log-enabled = false\n[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n')
        binary = shutil.which("influxd") or "/usr/bin/influxd"
        self.process = subprocess.Popen([binary, "-config", str(config)], stdout=open(workdir / "influxd.log", "wb"),
                                        stderr=subprocess.STDOUT)
        _wait(self.url + "/ping", 204)
        self.version = subprocess.run([binary, "version"], capture_output=True, text=True).stdout.strip()

    def stop(self) -> None:
        """Stop it."""
        self.process.terminate()
        self.process.wait(30)


class VictoriaMetrics:
    """A victoria-metrics process (Debian's package), a real server of InfluxDB's /api/v2/write."""

    def __init__(self, workdir: Path):
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        binary = shutil.which("victoria-metrics")
        if binary is None:
            raise SystemExit("victoria-metrics is not installed (apt-get install victoria-metrics)")
        self.process = subprocess.Popen(
            [binary, f"-storageDataPath={workdir}/vm-data", f"-httpListenAddr=127.0.0.1:{self.port}",
             "-retentionPeriod=100y"], stdout=open(workdir / "vm.log", "wb"), stderr=subprocess.STDOUT)
        _wait(self.url + "/health", 200)
        self.version = "victoria-metrics " + subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "victoria-metrics"], capture_output=True, text=True).stdout

    def stop(self) -> None:
        """Stop it."""
        self.process.terminate()
        self.process.wait(30)


def _wait(url: str, status: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def metric(url: str, sample: str) -> float:
    """One sample of a middleware's /metrics, e.g. 'citybridge_influx_points_total{outcome="written"}' (0 if absent)."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def backlog(url: str) -> float:
    """citybridge_influx_backlog_rows of a middleware."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("citybridge_influx_backlog_rows "):
            return float(line.split()[-1])
    raise RuntimeError("no citybridge_influx_backlog_rows in /metrics (CITYBRIDGE_INFLUX_URL unset?)")


def drain(url: str, timeout: float = 3600) -> float:
    """Wait until the middleware's InfluxDB backlog is empty; the seconds it took."""
    t0 = time.perf_counter()
    while backlog(url) > 0:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("the backlog did not drain")
        time.sleep(0.2)
    return time.perf_counter() - t0
