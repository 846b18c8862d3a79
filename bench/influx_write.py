"""Points/s sustained into InfluxDB: the forwarder draining a large history backlog (InfluxDB 1.x or the v2 API).

1,000 entities are loaded through the API and one day of 1-minute pm10 readings per entity (1.44 million history
rows by default) is written through the store (as bench/temporal_query.py does) while no
forwarder runs. The middleware is then restarted with CITYBRIDGE_INFLUX_URL pointing at a private server, and the
time from the restart until its backlog gauge (citybridge_influx_backlog_rows) reaches 0 is measured; the points
are those the middleware counted as written (citybridge_influx_points_total), so points / seconds is the
sustained write rate, batches of CITYBRIDGE_INFLUX_BATCH_SIZE, one write at a time.

    .venv/bin/python bench/influx_write.py [--sink v1|v2] [--entities 1000 --minutes 1440] [--batch-size 5000]
        [--instances]   # also the full-row points of citybridge_instances (the temporal source's data): 2 per row

--sink v1: a private influxd (Debian's influxdb 1.x), /write; v2: a private victoria-metrics, /api/v2/write through
influxdb-client (no InfluxDB 2.x is packaged here; its ingest speed is not InfluxDB's).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import influx_servers  # noqa: E402
from temporal_query import write_history  # noqa: E402


def run(args) -> dict:
    rng = random.Random(args.seed)
    sinkdir = Path(tempfile.mkdtemp(prefix="citybridge-bench-influx-"))
    sink = influx_servers.Influxd(sinkdir) if args.sink == "v1" else influx_servers.VictoriaMetrics(sinkdir)
    server = common.Server("sqlite", keep=True)
    try:
        server.start()
        common.print_machine(server.label)
        print(f"sink    : {sink.version} on {sink.url}")
        common.load_entities(server, args.entities, rng)
        server.stop()
        rows = write_history(server.store, args.minutes, rng)
        env = {"CITYBRIDGE_INFLUX_URL": sink.url, "CITYBRIDGE_INFLUX_BATCH_SIZE": str(args.batch_size),
               "CITYBRIDGE_INFLUX_MAX_BACKLOG": "0", "CITYBRIDGE_INFLUX_INSTANCES": str(args.instances).lower()}
        if args.sink == "v2":
            env.update(CITYBRIDGE_INFLUX_ORG="city", CITYBRIDGE_INFLUX_BUCKET="history",
                       CITYBRIDGE_INFLUX_TOKEN="bench", CITYBRIDGE_INFLUX_PRECISION="ms")
        server.env.update(env)
        t0 = time.perf_counter()
        server.start()
        pending = influx_servers.backlog(server.url)
        influx_servers.drain(server.url)
        seconds = time.perf_counter() - t0  # from the restart
        points = influx_servers.metric(server.url, 'citybridge_influx_points_total{outcome="written"}')
        print(f"history : {rows:,} pm10 rows written through the store; {pending:,.0f} rows pending at restart")
        print(f"forward : {pending:,.0f} backlog rows -> {points:,.0f} points in {seconds:.1f} s (from the restart) = "
              f"{points / seconds:,.0f} points/s ({args.sink}, batches of {args.batch_size})")
        if args.sink == "v1":
            reply = httpx.get(sink.url + "/query", params={"db": "citybridge", "q": 'SELECT count(pm10) FROM '
                              f'"{common.ETYPE}"'}, timeout=120).json()
            stored = reply["results"][0]["series"][0]["values"][0][1]
            print(f"check   : count(pm10) in InfluxDB = {stored:,} (expected {rows + args.entities:,})")
        print(f"server RSS after run: {server.rss_mb():.0f} MB")
        return {"points_per_s": points / seconds, "seconds": seconds, "points": points}
    finally:
        server.stop()
        sink.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        shutil.rmtree(sinkdir, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sink", choices=["v1", "v2"], default="v1")
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=1440)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--instances", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    print(f"== influx_write: {args.entities:,} entities x {args.minutes} minutes of pm10 into {args.sink}")
    return run(args)


if __name__ == "__main__":
    main()
