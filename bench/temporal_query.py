"""Temporal query latency over one day of 1-minute data for 1,000 entities (embedded store).

The entities are loaded through the API (batch upsert); their pm10 history (1,440 points each, 1.44 million
rows by default) is then written straight into the SQLite history table by this script, in the stored form
the middleware itself writes (a copy of each entity's own first history row with a new value and time):
loading 1.44 million points through HTTP would take longer than the measurement and is what
bench/batch_upsert.py and bench/mqtt_ingest.py already measure. Queries are then sent one at a time on a
keep-alive connection and timed (p50 / p99):

 * one entity, one attribute, the whole day, temporalValues (1,440 points: 1,000 then 206 Content-Range);
 * one entity, one hour (timerel=between), normalized;
 * one entity, the day in hourly averages and maxima (aggrMethods=avg,max&aggrPeriodDuration=PT1H);
 * the last 10 points of 20 entities by type (GET /temporal/entities?type=...&lastN=10&limit=20).

    .venv/bin/python bench/temporal_query.py [--entities 1000 --minutes 1440 --requests 100]
"""
from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DAY_START = 1714478400 * 1_000_000  # 2024-04-30T12:00:00Z in µs


def iso(micros: int) -> str:
    """µs since the epoch → NGSI-LD DateTime."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(micros // 1_000_000))


def write_history(db: Path, minutes: int, rng: random.Random) -> int:
    """Append `minutes` pm10 points per entity, one per minute from DAY_START; return the rows written."""
    conn = sqlite3.connect(db, timeout=60)
    firsts = conn.execute("SELECT tenant, entity_id, entity_type, attr, instance FROM history "
                          "WHERE attr LIKE '%pm10' GROUP BY entity_id").fetchall()
    written = 0
    for tenant, entity_id, entity_type, attr, instance in firsts:
        template = orjson.loads(instance)
        rows = []
        for minute in range(minutes):
            at = DAY_START + minute * 60_000_000
            inst = dict(template, value=round(rng.uniform(0, 150), 1), observedAt=iso(at))
            rows.append((tenant, entity_id, entity_type, attr, "", "Property", at, at, at, 0, orjson.dumps(inst)))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO history(tenant, entity_id, entity_type, attr, dataset_id, kind, observed_at, "
                         "created_at, modified_at, deleted, instance) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        written += len(rows)
    conn.close()
    return written


def run(args) -> dict:
    rng = random.Random(args.seed)
    results = {}
    with common.Server("sqlite", keep=args.keep) as server:
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng)
        t0 = time.perf_counter()
        rows = write_history(server.workdir / "store.db", args.minutes, rng)
        print(f"history : {rows:,} pm10 points ({args.minutes} per entity) written in {time.perf_counter() - t0:.1f} s "
              f"(straight into the table, not timed)")
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
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=1440)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"== temporal_query: {args.entities:,} entities x {args.minutes} minutes of pm10")
    return run(args)


if __name__ == "__main__":
    main()
