"""Batch upsert throughput: POST /ngsi-ld/v1/entityOperations/upsert with pre-serialised 1,000-entity bodies.

Pass 1 inserts N new entities, pass 2 upserts (replace) the same ids with new values. Prints entities/s per pass.

    .venv/bin/python bench/batch_upsert.py --entities 100000 --batch 1000 --concurrency 2 [--store postgresql://...]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(args) -> dict:
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    insert_bodies = common.batch_bodies(args.entities, args.batch, rng, common.KOREA, "2024-05-01T12:00:00Z")
    update_bodies = common.batch_bodies(args.entities, args.batch, rng, common.KOREA, "2024-05-01T12:10:00Z")
    size = sum(map(len, insert_bodies)) / len(insert_bodies)
    print(f"prepared: {len(insert_bodies)} + {len(update_bodies)} bodies of ~{size / 1024:.0f} KiB "
          f"({args.batch} entities each) in {time.perf_counter() - t0:.1f} s (client side, not timed)")
    results = {}
    with common.Server(args.store, keep=args.keep) as server:
        common.print_machine(server.label)
        print(f"client  : httpx asyncio, {args.concurrency} connection(s), bodies serialised with orjson up front")
        for name, bodies in (("insert", insert_bodies), ("update", update_bodies)):
            with common.Profiler(server, args.profile, f"batch_upsert_{name}"):
                elapsed, lat, statuses = common.post_batches(server.url, bodies, args.concurrency)
            rate = args.entities / elapsed
            results[name] = {"rate": rate, "elapsed": elapsed, "p50": common.percentile(lat, 50),
                             "p99": common.percentile(lat, 99), "statuses": statuses}
            print(f"{name:7s} : {args.entities:,} entities in {elapsed:.2f} s = {rate:,.0f} entities/s   "
                  f"per-batch latency p50 {common.fmt_ms(results[name]['p50'])} p99 {common.fmt_ms(results[name]['p99'])}"
                  f"   statuses {statuses}")
            sys.stdout.flush()
        results["rss_mb"] = server.rss_mb()
        results["store"] = server.label
    print(f"server RSS after run: {results['rss_mb']:.0f} MB")
    target = 20000
    for name in ("insert", "update"):
        verdict = "MET" if results[name]["rate"] >= target else "MISSED"
        print(f"target  : {common.TARGETS['batch_upsert']} -> {name}: {results[name]['rate']:,.0f} ({verdict})")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2, choices=(1, 2, 3, 4))
    args = parser.parse_args(argv)
    print(f"== batch_upsert: {args.entities:,} entities, batches of {args.batch}, {args.concurrency} connection(s)")
    return run(args)


if __name__ == "__main__":
    main()
