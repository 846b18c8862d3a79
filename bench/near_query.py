"""near geo-queries: N located entities spread over Busan (~30 x 30 km);
GET /entities?type=...&georel=near;maxDistance==500&geometry=Point&coordinates=[lon,lat]&limit=20 at random points.

Latency: wrk --latency with one connection (closed loop, service time) and with 4 connections (throughput),
random points from a Lua list; result counts from a sequential Python pass over a sample of the same points.

    .venv/bin/python bench/near_query.py --entities 100000 --max-distance 500 --duration 15 [--store postgresql://...]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(args) -> dict:
    rng = random.Random(args.seed)
    out = {}
    with common.Server(args.store, keep=args.keep) as server:
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng, area=common.BUSAN)
        area = common.BUSAN
        prng = random.Random(args.seed + 1)
        paths = []
        for _ in range(args.points):
            lon, lat = prng.uniform(area[0], area[2]), prng.uniform(area[1], area[3])
            georel = quote(f"near;maxDistance=={args.max_distance}", safe="")
            coords = quote(f"[{lon:.6f},{lat:.6f}]", safe="")
            paths.append(f"{common.NGSI}/entities?type={common.ETYPE}&georel={georel}&geometry=Point"
                         f"&coordinates={coords}&limit={args.limit}")
        # result counts (and python-side latency) over a sample, with count=true
        sample = [p + "&count=true" for p in paths[:args.sample]]
        lat, resps = common.timed_gets(server.url, sample)
        bad = [r for r in resps if r.status_code != 200]
        if bad:
            print(f"error   : {bad[0].status_code} {bad[0].text[:300]}")
        returned = [len(r.json()) for r in resps if r.status_code == 200]
        matched = [int(r.headers.get("NGSILD-Results-Count", 0)) for r in resps if r.status_code == 200]
        density = args.entities / ((area[2] - area[0]) * 88_000 * (area[3] - area[1]) * 111_000) * 1e6
        print(f"data    : {args.entities:,} points over Busan bbox {area} (~{density:.0f} per km^2)")
        print(f"results : mean returned {sum(returned) / len(returned):.1f} (limit {args.limit}), "
              f"mean matched within {args.max_distance} m {sum(matched) / len(matched):.1f} "
              f"(min {min(matched)}, max {max(matched)}) over {len(returned)} random points")
        print(f"python  : sequential httpx p50 {common.fmt_ms(common.percentile(lat, 50))} "
              f"p99 {common.fmt_ms(common.percentile(lat, 99))} (count=true, {len(lat)} requests)")
        out["mean_results"] = sum(returned) / len(returned)
        out["mean_matched"] = sum(matched) / len(matched)
        out["py_p50"], out["py_p99"] = common.percentile(lat, 50), common.percentile(lat, 99)
        if common.have_wrk():
            with tempfile.TemporaryDirectory() as tmp:
                script = common.lua_paths_script(paths, Path(tmp))
                common.run_wrk(server.url, script, connections=1, duration=2)
                for conns in args.connection_list:
                    with common.Profiler(server, args.profile if conns == 1 else None, f"near_c{conns}"):
                        res = common.run_wrk(server.url, script, connections=conns, duration=args.duration)
                    out[f"c{conns}"] = res
                    print(f"wrk c={conns:<2d}: {res['rps']:,.0f} req/s   p50 {common.fmt_ms(res['p50'])}   "
                          f"p90 {common.fmt_ms(res['p90'])}   p99 {common.fmt_ms(res['p99'])}   "
                          f"({res['requests']:,} requests, non-2xx {res['non2xx']})")
                    sys.stdout.flush()
            p99 = out[f"c{args.connection_list[0]}"]["p99"]
        else:
            p99 = out["py_p99"]
        out["p99"] = p99
        out["store"] = server.label
    verdict = "MET" if p99 < 0.050 else "MISSED"
    print(f"target  : {common.TARGETS['near_query']} -> p99 {common.fmt_ms(p99)} at "
          f"c={args.connection_list[0]} ({verdict})")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--max-distance", type=int, default=500)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--points", type=int, default=5000, help="random query points in the wrk Lua list")
    parser.add_argument("--sample", type=int, default=300, help="points queried sequentially for result counts")
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connection-list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    args = parser.parse_args(argv)
    print(f"== near_query: {args.entities:,} located entities, near;maxDistance=={args.max_distance}, "
          f"limit={args.limit}")
    return run(args)


if __name__ == "__main__":
    main()
