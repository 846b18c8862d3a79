"""GET /ngsi-ld/v1/entities?type=...&q=... over N entities: latency p50/p99 and result counts, per q shape,
once with limit=20 and once with limit=20&count=true.

Requests are sent one at a time on a keep-alive connection (httpx, closed loop), so the latency is the
server's service time plus ~0.2 ms of client overhead.

    .venv/bin/python bench/query_q.py --entities 100000 --requests 20 [--store postgresql://...]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [
    ("and", "pm25>50;temperature<10"),
    ("or", "pm10>=140|pm25>99"),
    ("range", "temperature==5..6"),
    ("relationship", "refDevice==urn:ngsi-ld:Device:0042"),
    ("selective", "pm25>99.5;temperature<-9"),
]


def run(args) -> dict:
    rng = random.Random(args.seed)
    out = {}
    with common.Server(args.store, keep=args.keep) as server:
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng)
        print(f"client  : python httpx, sequential (1 connection), {args.requests} requests per line")
        print(f"{'shape':13s} {'q':38s} {'mode':12s} {'p50':>10s} {'p99':>10s} {'max':>10s} {'results':>8s} {'count':>7s}")
        for name, q in SHAPES:
            for mode, extra in (("limit=20", "&limit=20"), ("count=true", "&limit=20&count=true")):
                path = f"{common.NGSI}/entities?type={common.ETYPE}&q={quote(q, safe='')}{extra}"
                with common.Profiler(server, args.profile if (name, mode) == ("and", "limit=20") else None,
                                     "query_q_and"):
                    lat, resps = common.timed_gets(server.url, [path] * args.requests, warmup=1)
                r = resps[-1]
                if r.status_code != 200:
                    print(f"{name}: {r.status_code} {r.text[:300]}")
                    continue
                results = len(r.json())
                count = r.headers.get("NGSILD-Results-Count", "-")
                row = {"q": q, "p50": common.percentile(lat, 50), "p99": common.percentile(lat, 99),
                       "max": max(lat), "results": results, "count": count}
                out[(name, mode)] = row
                print(f"{name:13s} {q:38s} {mode:12s} {common.fmt_ms(row['p50']):>10s} {common.fmt_ms(row['p99']):>10s} "
                      f"{common.fmt_ms(row['max']):>10s} {results:8d} {count:>7s}")
                sys.stdout.flush()
        out["store"] = server.label
    print("target  : none set for q queries (figures for reference)")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=5, help="requests per (shape, mode)")
    args = parser.parse_args(argv)
    print(f"== query_q: {args.entities:,} entities of type {common.ETYPE}, {args.requests} requests per line")
    return run(args)


if __name__ == "__main__":
    main()
