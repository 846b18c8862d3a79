"""End-to-end MQTT ingest: simulated dust sensors (paho, QoS 1) → Mosquitto → middleware → store.

Prints measurements committed per second (the middleware's committed counter, checked against the store: every
device's entity must hold the last `seq` it sent, and committed must equal sent), publish → commit latency p50/p99
(sampled with an NGSI-LD subscription on a few devices: notification arrival − observedAt, an upper bound, and
modifiedAt − observedAt from the store, a lower bound), server CPU per message and RSS.

    .venv/bin/python bench/mqtt_ingest.py [--devices 200 --messages 100000 --rate 0 --publishers 2]
                                          [--store sqlite|postgresql://...] [--workers 1]
"""
from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from simulators.mqtt_dust import publish_parallel  # noqa: E402

TARGET = "MQTT ingest >= 10,000 measurements/s sustained, publish-to-commit p99 < 200 ms (SQLite, 2 cores)"
PROFILE = """entity_type: AirQualityObserved
interval: 60
codec: {format: json, timestamp: {source: ts, format: epoch_ms}}
attributes:
  - {name: pm10, unitCode: GQ, range: {min: 0, max: 2000}}
  - {name: pm25, unitCode: GQ}
  - {name: pm1, unitCode: GQ}
  - {name: temperature, unitCode: CEL}
  - {name: relativeHumidity, source: humidity, unitCode: P1}
  - {name: batteryLevel, source: battery}
  - {name: latitude}
  - {name: longitude}
  - {name: seq, type: integer}
"""


class Mosquitto:
    """Mosquitto with the no-loss settings of docs/mqtt.md on a free loopback port."""

    def __init__(self, workdir: Path):
        self.port = common.free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"persistence_location {workdir}/\nmax_queued_messages 0\nmax_inflight_messages 0\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Receiver:
    """Notification receiver: records (arrival time, body) for later parsing."""

    def __init__(self):
        self.hits: list[tuple[float, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append((time.time(), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def latencies(self) -> list[float]:
        """Arrival − observedAt of every notified seq, in seconds."""
        out = []
        for arrived, body in self.hits:
            for entity in orjson.loads(body)["data"]:
                observed = entity["seq"]["observedAt"]
                out.append(arrived - _epoch(observed))
        return out


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def committed(url: str) -> float:
    """The middleware's committed-measurements counter."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("citybridge_measurements_committed_total"):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.0, help="total publish rate, msg/s (0: as fast as possible)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--sample", type=int, default=20, help="devices watched by the latency subscription")
    parser.add_argument("--batch-max", type=int, default=1000)
    parser.add_argument("--batch-wait", type=float, default=0.02)
    parser.add_argument("--log-level", default="warning", help="the server's log level (debug shows every batch)")
    parser.add_argument("--workers", type=int, default=1,
                        help="middleware worker processes sharing the store and a shared MQTT subscription")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="citybridge-mqtt-bench-"))
    (workdir / "profiles").mkdir()
    (workdir / "profiles" / "bench-dust.yaml").write_text(PROFILE)
    broker = Mosquitto(workdir)
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
    server = common.Server(args.store, keep=args.keep, CITYBRIDGE_MQTT_ENABLED="true", CITYBRIDGE_MQTT_URL=mqtt_url, CITYBRIDGE_MQTT_EMBEDDED="never",
                           CITYBRIDGE_MQTT_CLIENT_ID=f"bench-{uuid.uuid4().hex[:6]}",
                           CITYBRIDGE_PROFILES_DIR=str(workdir / "profiles"),
                           CITYBRIDGE_INGEST_BATCH_MAX=str(args.batch_max),
                           CITYBRIDGE_INGEST_BATCH_WAIT=str(args.batch_wait), CITYBRIDGE_LOG_LEVEL=args.log_level,
                           CITYBRIDGE_WORKERS=str(args.workers),
                           **({"PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics")} if args.workers > 1 else {}))
    (workdir / "metrics").mkdir()
    receiver = Receiver()
    try:
        server.start()
        print(f"== mqtt_ingest: {args.devices} devices, {args.messages:,} messages, QoS 1, "
              f"{args.publishers} publisher process(es), {args.workers} worker process(es), rate {'max' if not args.rate else f'{args.rate:,.0f}/s'}")
        common.print_machine(server.label)
        print(f"broker  : Mosquitto {mqtt_url} (persistence, max_queued_messages 0, max_inflight_messages 0)")
        tenant = "bench"
        iot = {"fiware-service": tenant, "fiware-servicepath": "/"}
        r = httpx.post(server.url + "/iot/services", headers=iot, json={"services": [
            {"apikey": "dust", "entity_type": "AirQualityObserved", "profile": "bench-dust", "resource": ""}]})
        assert r.status_code == 201, r.text
        ids = [f"dust-{n}" for n in range(args.devices)]
        for start in range(0, len(ids), 500):
            r = httpx.post(server.url + "/iot/devices", headers=iot, timeout=60,
                           json={"devices": [{"device_id": d} for d in ids[start:start + 500]]})
            assert r.status_code == 201, r.text
        sample = ids[:: max(1, len(ids) // args.sample)][:args.sample]
        r = httpx.post(server.url + "/ngsi-ld/v1/subscriptions", headers={"NGSILD-Tenant": tenant}, json={
            "type": "Subscription", "entities": [{"type": "AirQualityObserved", "id": f"urn:ngsi-ld:AirQualityObserved:{d}"}
                                                 for d in sample],
            "watchedAttributes": ["seq"],
            "notification": {"attributes": ["seq"], "format": "normalized", "endpoint": {"uri": receiver.url}}})
        assert r.status_code == 201, r.text

        if args.workers > 1:
            time.sleep(2.5)  # every worker has picked the latency subscription up (each looks every 2 s)
        cpu0 = common.cpu_seconds(server.pid)
        base = committed(server.url)
        series: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample_commits():
            while not stop.is_set():
                series.append((time.time(), committed(server.url) - base))
                time.sleep(0.5)
        sampler = threading.Thread(target=sample_commits, daemon=True)
        with common.Profiler(server, args.profile, "mqtt_ingest"):
            started = time.time()
            sampler.start()
            result = publish_parallel(mqtt_url, ids, args.publishers, apikey="dust", rate=args.rate, count=args.messages)
            published = time.time()
            deadline = published + 300
            done = 0.0
            while time.time() < deadline:
                done = committed(server.url) - base
                if done >= result["sent"]:
                    break
                time.sleep(0.1)
            finished = time.time()
            stop.set()
            sampler.join()
        cpu = common.cpu_seconds(server.pid) - cpu0
        time.sleep(1.0)  # the last notifications

        docs = []
        offset = 0
        while True:
            page = httpx.get(server.url + "/ngsi-ld/v1/entities", headers={"NGSILD-Tenant": tenant}, timeout=60,
                             params={"type": "AirQualityObserved", "attrs": "seq", "limit": 1000, "offset": offset,
                                     "options": "sysAttrs"}).json()
            docs += page
            if len(page) < 1000:
                break
            offset += 1000
        last = {d["id"].rsplit(":", 1)[-1]: d["seq"] for d in docs if "seq" in d}
        wrong = sum(1 for d, s in result["last_seq"].items() if last.get(d, {}).get("value") != s)
        lower = [_epoch(v["modifiedAt"]) - _epoch(v["observedAt"]) for v in last.values()]
        upper = receiver.latencies()
        window = [(t, c) for t, c in series if 0 < c < result["sent"]]
        steady = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 2 else float("nan")
        overall = done / (finished - started)
        print(f"publish : {result['sent']:,} sent, {result['acked']:,} acked by the broker in {result['seconds']:.1f} s "
              f"({result['sent'] / result['seconds']:,.0f} msg/s)")
        print(f"commit  : {done:,.0f} of {result['sent']:,} committed ({'all' if done == result['sent'] else 'MISSING ' + str(result['sent'] - done)}); "
              f"store: {len(last)} device entities, {wrong} with a seq other than the last sent")
        print(f"rate    : {overall:,.0f} measurements/s first publish → last commit; steady {steady:,.0f}/s "
              f"(committed counter sampled every 0.5 s)")
        print(f"latency : publish → notification p50 {common.fmt_ms(common.percentile(upper, 50))} "
              f"p99 {common.fmt_ms(common.percentile(upper, 99))} ({len(upper)} samples, upper bound); "
              f"publish → modifiedAt of the last value p50 {common.fmt_ms(common.percentile(lower, 50))} "
              f"p99 {common.fmt_ms(common.percentile(lower, 99))} ({len(lower)} devices, lower bound)")
        print(f"server  : {cpu / max(done, 1) * 1e6:,.1f} µs CPU per message ({cpu:.1f} s CPU), RSS {common.rss_mb(server.pid):.0f} MB")
        ok = done == result["sent"] and wrong == 0
        print(f"target  : {TARGET} -> {steady:,.0f}/s, p99 {common.fmt_ms(common.percentile(upper, 99))} "
              f"({'MET' if ok and steady >= 10_000 and common.percentile(upper, 99) < 0.2 else 'MISSED'})"
              + ("" if ok else " — LOSS OR MISMATCH"))
    finally:
        server.stop()
        broker.stop()
        receiver.server.shutdown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
