"""Fine-dust sensors over MQTT (QoS 1): N devices publish PM10, PM2.5, PM1, temperature, humidity, battery.

Readings follow a daily rhythm plus noise and rare pollution spikes; mobile sensors (on buses) move along a line
through Busan. Every message carries `seq` (per device, from 1) and `ts` (publish time, epoch ms), so a receiver can
count what arrived against what was sent and measure latency.

    python -m simulators.mqtt_dust --devices 2400 --interval 60              # the field: every minute
    python -m simulators.mqtt_dust --devices 200 --rate 5000 --count 50000   # a load test: 5,000 msg/s in total
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import sys
import threading
import time
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt

BUSAN = (128.95, 35.05, 129.28, 35.32)


class DustSensor:
    """One simulated sensor: deterministic per id, a value walk around a daily PM curve."""

    def __init__(self, device_id: str, index: int, mobile: bool):
        self.device_id = device_id
        self.rng = random.Random(device_id)
        self.base = self.rng.uniform(15, 45)
        self.mobile = mobile
        self.seq = 0
        self.battery = self.rng.uniform(0.6, 1.0)
        self.lon = self.rng.uniform(BUSAN[0], BUSAN[2])
        self.lat = self.rng.uniform(BUSAN[1], BUSAN[3])
        self.heading = self.rng.uniform(0, 2 * math.pi)

    def reading(self, now: float) -> dict:
        """The next measurement (seq increases by one)."""
        self.seq += 1
        hour = (now / 3600 + 9) % 24                             # KST
        rush = 1 + 0.5 * math.exp(-((hour - 8) ** 2) / 4) + 0.4 * math.exp(-((hour - 19) ** 2) / 4)
        spike = 3.0 if self.rng.random() < 0.002 else 1.0
        pm10 = max(1.0, self.rng.gauss(self.base * rush * spike, 4))
        pm25 = max(0.5, pm10 * self.rng.uniform(0.45, 0.65))
        self.battery = max(0.05, self.battery - 0.00002)
        doc = {"pm10": round(pm10, 1), "pm25": round(pm25, 1), "pm1": round(pm25 * 0.7, 1),
               "temperature": round(12 + 8 * math.sin((hour - 9) / 24 * 2 * math.pi) + self.rng.gauss(0, 0.3), 1),
               "humidity": round(min(100.0, max(5.0, 60 + self.rng.gauss(0, 5))), 1),
               "battery": round(self.battery, 3), "seq": self.seq, "ts": int(now * 1000)}
        if self.mobile:
            self.lon += 0.0003 * math.cos(self.heading)
            self.lat += 0.0003 * math.sin(self.heading)
            if not (BUSAN[0] < self.lon < BUSAN[2] and BUSAN[1] < self.lat < BUSAN[3]):
                self.heading += math.pi
            doc["latitude"], doc["longitude"] = round(self.lat, 6), round(self.lon, 6)
        return doc


def topic_for(template: str, apikey: str, device_id: str) -> str:
    """The topic of a device: an IoT Agent topic (iota) or a template with {apikey} and {device_id}."""
    if template == "iota":
        return f"/{apikey}/{device_id}/attrs"
    return template.format(apikey=apikey, device_id=device_id)


def connect(url: str, client_id: str = "") -> mqtt.Client:
    """A connected paho client (QoS 1 publishes in flight without limit), network loop running."""
    parts = urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
    if parts.scheme == "mqtts":
        client.tls_set()
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883))
    client.loop_start()
    return client


def publish(url: str, device_ids: list[str], *, apikey: str = "dust", template: str = "iota", rate: float = 0.0,
            count: int = 0, duration: float = 0.0, mobile_share: float = 0.2, stop: threading.Event | None = None,
            start_seq: int = 0) -> dict:
    """Publish round-robin over the devices at `rate` msg/s in total (0: as fast as possible) until `count`
    messages (0: no limit), `duration` seconds (0: no limit) or `stop`; wait for every PUBACK; return counts."""
    sensors = [DustSensor(d, i, i < len(device_ids) * mobile_share) for i, d in enumerate(device_ids)]
    for sensor in sensors:
        sensor.seq = start_seq
    topics = [topic_for(template, apikey, d) for d in device_ids]
    acked = [0]
    lock = threading.Lock()
    client = connect(url)

    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            acked[0] += 1
    client.on_publish = on_publish
    started = time.time()
    sent = 0
    while (not count or sent < count) and (not duration or time.time() - started < duration) \
            and not (stop is not None and stop.is_set()):
        if rate:
            ahead = sent / rate - (time.time() - started)
            if ahead > 0:
                time.sleep(ahead)
        now = time.time()
        i = sent % len(sensors)
        info = client.publish(topics[i], orjson.dumps(sensors[i].reading(now)), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        sent += 1
    elapsed = time.time() - started
    deadline = time.time() + 60
    while acked[0] < sent and time.time() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    return {"sent": sent, "acked": acked[0], "seconds": elapsed,
            "last_seq": {d: s.seq for d, s in zip(device_ids, sensors)}}


def _worker(args: tuple) -> dict:
    url, ids, kwargs = args
    return publish(url, ids, **kwargs)


def publish_parallel(url: str, device_ids: list[str], processes: int, **kwargs) -> dict:
    """Split the devices over several publisher processes (rate and count are split too); merged counts."""
    processes = max(1, min(processes, len(device_ids)))
    shares = [device_ids[p::processes] for p in range(processes)]
    jobs = []
    for share in shares:
        part = dict(kwargs)
        for key in ("rate", "count"):
            if part.get(key):
                part[key] = part[key] * len(share) / len(device_ids)
        if part.get("count"):
            part["count"] = int(round(part["count"]))
        jobs.append((url, share, part))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_worker, jobs)
    merged = {"sent": sum(r["sent"] for r in results), "acked": sum(r["acked"] for r in results),
              "seconds": max(r["seconds"] for r in results), "last_seq": {}}
    for r in results:
        merged["last_seq"].update(r["last_seq"])
    return merged


def main(argv: list[str] | None = None) -> int:
    """Command line: simulate dust sensors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker, mqtt[s]://[user:pass@]host:port")
    parser.add_argument("--devices", type=int, default=10, help="number of sensors")
    parser.add_argument("--prefix", default="dust-", help="device id prefix (ids are <prefix><n>)")
    parser.add_argument("--apikey", default="dust", help="IoT Agent apikey of the topics")
    parser.add_argument("--topic", default="iota", help="'iota' (/<apikey>/<id>/attrs) or a template, e.g. city/dust/{device_id}/up")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between two readings of one sensor")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second in total (overrides --interval)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many messages (0: never)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: never)")
    parser.add_argument("--processes", type=int, default=1, help="publisher processes")
    parser.add_argument("--mobile", type=float, default=0.2, help="share of sensors on buses (they move)")
    args = parser.parse_args(argv)
    rate = args.rate or (args.devices / args.interval if args.interval else 0.0)
    ids = [f"{args.prefix}{n}" for n in range(args.devices)]
    kwargs = dict(apikey=args.apikey, template=args.topic, rate=rate, count=args.count, duration=args.duration,
                  mobile_share=args.mobile)
    try:
        result = publish_parallel(args.url, ids, args.processes, **kwargs) if args.processes > 1 else \
            publish(args.url, ids, **kwargs)
    except KeyboardInterrupt:
        return 130
    print(f"sent {result['sent']} messages ({result['acked']} acknowledged by the broker) in {result['seconds']:.1f} s "
          f"= {result['sent'] / max(result['seconds'], 1e-9):,.0f} msg/s from {args.devices} sensors")
    return 0 if result["acked"] == result["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
