"""GET /ngsi-ld/v1/entities/{id} over random ids, one uvicorn worker: requests/s and latency p50/p99.

Load generator: wrk --latency with a Lua script picking random ids (preferred), else a Python asyncio/httpx
client in a separate process (--client python).

    .venv/bin/python bench/get_entity.py --entities 10000 --duration 15 --connections 8 [--store postgresql://...]
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PY_CLIENT = r'''
import asyncio, random, sys, time, httpx, orjson
url, n, conc, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
paths = [f"/ngsi-ld/v1/entities/urn:ngsi-ld:AirQualityObserved:{i:07d}" for i in range(n)]
async def main():
    lat, bad = [], 0
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        end = time.perf_counter() + dur
        async def w():
            nonlocal bad
            while time.perf_counter() < end:
                t0 = time.perf_counter(); r = await c.get(random.choice(paths)); lat.append(time.perf_counter() - t0)
                bad += r.status_code != 200
        t0 = time.perf_counter(); await asyncio.gather(*(w() for _ in range(conc))); el = time.perf_counter() - t0
    lat.sort()
    print(orjson.dumps({"rps": len(lat) / el, "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * .99)],
                        "requests": len(lat), "non2xx": bad}).decode())
asyncio.run(main())
'''


def run(args) -> dict:
    rng = random.Random(args.seed)
    out = {}
    with common.Server(args.store, keep=args.keep) as server:
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng)
        paths = [f"{common.NGSI}/entities/{common.entity_id(i)}" for i in range(args.entities)]
        # sanity check and response size
        import httpx
        r = httpx.get(server.url + paths[0])
        print(f"sample  : GET {paths[0]} -> {r.status_code}, {len(r.content)} bytes")
        use_wrk = args.client == "wrk" or (args.client == "auto" and common.have_wrk())
        with tempfile.TemporaryDirectory() as tmp:
            script = common.lua_paths_script(paths, Path(tmp)) if use_wrk else None
            if use_wrk:  # warm-up
                common.run_wrk(server.url, script, connections=args.connections, duration=2)
            for conns in args.connection_list:
                with common.Profiler(server, args.profile if conns == args.connections else None,
                                     f"get_entity_c{conns}"):
                    if use_wrk:
                        res = common.run_wrk(server.url, script, threads=1, connections=conns, duration=args.duration)
                        client = f"wrk -t1 -c{conns} (Lua: random id of {args.entities:,})"
                    else:
                        proc = subprocess.run([sys.executable, "-c", PY_CLIENT, server.url, str(args.entities),
                                               str(conns), str(args.duration)], capture_output=True, text=True)
                        import orjson
                        res = orjson.loads(proc.stdout.strip().splitlines()[-1])
                        client = f"python httpx asyncio, {conns} connections, separate process"
                out[conns] = res
                print(f"c={conns:<3d}   : {res['rps']:,.0f} req/s   p50 {common.fmt_ms(res['p50'])}   "
                      f"p99 {common.fmt_ms(res['p99'])}   ({res['requests']:,} requests, non-2xx {res['non2xx']}) "
                      f"[{client}]")
                sys.stdout.flush()
        best = max(out.values(), key=lambda r: r["rps"])
        out["best"] = best
        out["store"] = server.label
    verdict = "MET" if best["rps"] >= 2000 else "MISSED"
    print(f"target  : {common.TARGETS['get_entity']} -> best {best['rps']:,.0f} req/s ({verdict})")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--duration", type=int, default=15, help="seconds per load level")
    parser.add_argument("--connections", type=int, default=8, help="connection count that gets profiled")
    parser.add_argument("--connection-list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                        help="comma-separated connection counts to run (default 1,8,32)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args(argv)
    print(f"== get_entity: {args.entities:,} entities, {args.duration} s per level, connections {args.connection_list}")
    return run(args)


if __name__ == "__main__":
    main()
