"""Temporal query latency over one day of 1-minute data for 1,000 entities (embedded store, or InfluxDB 1.x).

The entities are loaded through the API (batch upsert); their pm10 history (1,440 points each, 1.44 million
rows by default) is then written by this script through the store's own write (middleware stopped), in the
stored form the middleware itself writes (a copy of each entity's own first history row with a new value and time):
loading 1.44 million points through HTTP would take longer than the measurement and is what
bench/batch_upsert.py and bench/mqtt_ingest.py already measure. Queries are then sent one at a time on a
keep-alive connection and timed (p50 / p99):

 * one entity, one attribute, the whole day, temporalValues (1,440 points: 1,000 then 206 Content-Range);
 * one entity, one hour (timerel=between), normalized;
 * one entity, the day in hourly averages and maxima (aggrMethods=avg,max&aggrPeriodDuration=PT1H);
 * the last 10 points of 20 entities by type (GET /temporal/entities?type=...&lastN=10&limit=20).

    .venv/bin/python bench/temporal_query.py [--entities 1000 --minutes 1440 --requests 100] [--source influxdb]

With --source influxdb the middleware is restarted forwarding to a private influxd with
CITYBRIDGE_TEMPORAL_SOURCE=influxdb; the queries start once the backlog has drained.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

DAY_START = 1714478400 * 1_000_000  # 2024-04-30T12:00:00Z in µs


def iso(micros: int) -> str:
    """µs since the epoch → NGSI-LD DateTime."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(micros // 1_000_000))


def write_history(store_url: str, minutes: int, rng: random.Random) -> int:
    """Append `minutes` pm10 points per entity, one per minute from DAY_START, through the store's own write (so
    whatever the history layout); run it while no middleware uses the store. Return the rows written."""
    from middleware.store import open_store
    from middleware.store.base import HistoryRow

    async def fill() -> int:
        store = open_store(store_url)
        await store.open()
        try:
            firsts: dict[tuple[str, str], tuple] = {}
            for tenant, row in await store.history_after(0, 10_000_000):
                if row.attr.endswith("pm10") and not row.deleted:
                    firsts.setdefault((tenant, row.entity_id), (row.entity_type, row.attr, orjson.loads(row.instance)))
            written = 0
            for (tenant, entity_id), (entity_type, attr, template) in firsts.items():
                rows = []
                for minute in range(minutes):
                    at = DAY_START + minute * 60_000_000
                    inst = dict(template, value=round(rng.uniform(0, 150), 1), observedAt=iso(at))
                    rows.append(HistoryRow(entity_id, entity_type, attr, "", "Property", at, at, at, False,
                                           orjson.dumps(inst)))
                await store.write(tenant, [], plan=lambda conflicts, rows=rows: rows)
                written += len(rows)
            return written
        finally:
            await store.close()

    return asyncio.run(fill())


def run(args) -> dict:
    rng = random.Random(args.seed)
    results = {}
    sink = None
    server = common.Server("sqlite", keep=True)
    try:
        server.start()
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng)
        server.stop()
        t0 = time.perf_counter()
        rows = write_history(server.store, args.minutes, rng)
        print(f"history : {rows:,} pm10 points ({args.minutes} per entity) written in {time.perf_counter() - t0:.1f} s "
              f"(through the store, the middleware stopped; not timed)")
        if args.source == "influxdb":
            import influx_servers
            sink = influx_servers.Influxd(Path(tempfile.mkdtemp(prefix="citybridge-bench-influxd-")))
            server.env.update(CITYBRIDGE_INFLUX_URL=sink.url, CITYBRIDGE_TEMPORAL_SOURCE="influxdb",
                              CITYBRIDGE_INFLUX_MAX_BACKLOG="0")
        server.start()
        if sink is not None:
            print(f"source  : {sink.version} (InfluxQL /query); forwarding the history first ...")
            print(f"forward : drained in {influx_servers.drain(server.url):.1f} s (value + full-row points)")
        else:
            print("source  : the store's history table")
        day = f"timerel=between&timeAt={iso(DAY_START)}&endTimeAt={iso(DAY_START + args.minutes * 60_000_000)}"
        hour = f"timerel=between&timeAt={iso(DAY_START + 3600_000_000)}&endTimeAt={iso(DAY_START + 7200_000_000)}"
        base = common.NGSI + "/temporal/entities"
        shapes = {
            "day, temporalValues": lambda i: f"{base}/{common.entity_id(i)}?attrs=pm10&options=temporalValues&{day}",
            "one hour, normalized": lambda i: f"{base}/{common.entity_id(i)}?attrs=pm10&{hour}",
            "day, hourly avg+max": lambda i: (f"{base}/{common.entity_id(i)}?attrs=pm10&aggrMethods=avg,max"
                                             f"&aggrPeriodDuration=PT1H&{day}"),
            "lastN=10, 20 entities": lambda i: f"{base}?type={common.ETYPE}&attrs=pm10&lastN=10&limit=20&offset={i % 50 * 20}",
        }
        print(f"{'query':24s} {'p50':>10s} {'p99':>10s} {'max':>10s}  status  size")
        for name, path in shapes.items():
            paths = [path(rng.randrange(args.entities)) for _ in range(args.requests)]
            lat, responses = common.timed_gets(server.url, paths)
            statuses = sorted({r.status_code for r in responses})
            size = sum(len(r.content) for r in responses) / len(responses)
            results[name] = {"p50": common.percentile(lat, 50), "p99": common.percentile(lat, 99), "max": max(lat),
                             "statuses": statuses}
            print(f"{name:24s} {common.fmt_ms(results[name]['p50']):>10s} {common.fmt_ms(results[name]['p99']):>10s} "
                  f"{common.fmt_ms(results[name]['max']):>10s}  {statuses}  {size / 1024:.0f} KiB")
            sys.stdout.flush()
        print(f"server RSS after run: {server.rss_mb():.0f} MB")
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(server.workdir, ignore_errors=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=1440)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--source", choices=["store", "influxdb"], default="store",
                        help="temporal source: the store's history table, or a private InfluxDB 1.x the history is "
                             "forwarded to first (CITYBRIDGE_TEMPORAL_SOURCE=influxdb)")
    args = parser.parse_args(argv)
    print(f"== temporal_query: {args.entities:,} entities x {args.minutes} minutes of pm10")
    return run(args)


if __name__ == "__main__":
    main()
