"""Run every CityBridge benchmark in turn and print a Markdown summary table.

    .venv/bin/python bench/run_all.py [--quick] [--store sqlite|postgresql://postgres@127.0.0.1:5432/postgres]
                                      [--profile DIR] [--only batch_upsert,get_entity,query_q,near_query]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batch_upsert  # noqa: E402
import common  # noqa: E402
import get_entity  # noqa: E402
import near_query  # noqa: E402
import notify_latency  # noqa: E402
import notify_throughput  # noqa: E402
import query_q  # noqa: E402

FULL = {
    "batch_upsert": ["--entities", "100000"],
    "get_entity": ["--entities", "10000", "--duration", "15"],
    "query_q": ["--entities", "100000", "--requests", "5"],
    "near_query": ["--entities", "100000", "--duration", "15"],
    "notify_latency": ["--rate", "1000", "--duration", "20", "--entities", "1000", "--subs", "1,100"],
    "notify_throughput": ["--entities", "10000", "--subs", "0,1000,10000", "--rounds", "3", "--duration", "10"],
}
QUICK = {
    "batch_upsert": ["--entities", "10000"],
    "get_entity": ["--entities", "2000", "--duration", "4", "--connection-list", "1,8"],
    "query_q": ["--entities", "5000", "--requests", "3"],
    "near_query": ["--entities", "10000", "--duration", "4", "--sample", "50", "--points", "500"],
    "notify_latency": ["--rate", "1000", "--duration", "5", "--entities", "1000", "--subs", "1"],
    "notify_throughput": ["--entities", "2000", "--subs", "0,1000", "--rounds", "1", "--duration", "4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--store", default="sqlite")
    parser.add_argument("--profile", default=None, metavar="DIR")
    parser.add_argument("--only", default="batch_upsert,get_entity,query_q,near_query,notify_latency,notify_throughput")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    common_argv = ["--store", args.store] + (["--profile", args.profile] if args.profile else [])
    modules = {"batch_upsert": batch_upsert, "get_entity": get_entity, "query_q": query_q, "near_query": near_query,
               "notify_latency": notify_latency, "notify_throughput": notify_throughput}
    results, elapsed = {}, {}
    for name in args.only.split(","):
        argv = sizes[name] + common_argv
        print(f"\n$ bench/{name}.py {' '.join(argv)}")
        t0 = time.perf_counter()
        try:
            results[name] = modules[name].main(argv)
        except Exception as exc:  # keep going, report the failure in the table
            print(f"FAILED: {name}: {exc!r}")
            results[name] = None
        elapsed[name] = time.perf_counter() - t0

    m = common.machine_info()
    store = next((r["store"] for r in results.values() if r and "store" in r), args.store)
    print("\n## CityBridge benchmark summary" + (" (--quick)" if args.quick else ""))
    print(f"\nMachine: {m['nproc']} cores, {m['cpu']}, {m['mem_gb']} GB, Python {m['python']}. "
          f"Store: {store.split(' in /')[0]}. Load generator on the same {m['nproc']} cores (competes with the server).\n")
    print("| benchmark | size | figure | measured | target | verdict |")
    print("|---|---|---|---|---|---|")

    def row(bench, size, figure, measured, target="", verdict=""):
        print(f"| {bench} | {size} | {figure} | {measured} | {target} | {verdict} |")

    r = results.get("batch_upsert")
    if r:
        n = sizes["batch_upsert"][1]
        for phase in ("insert", "update"):
            v = r[phase]["rate"]
            row("batch upsert (1,000/batch, 2 conns)", f"{int(n):,}", f"{phase} pass entities/s", f"{v:,.0f}",
                ">= 20,000", "met" if v >= 20000 else "**missed**")
    r = results.get("get_entity")
    if r:
        n = sizes["get_entity"][1]
        for conns, res in r.items():
            if isinstance(conns, int):
                row("GET /entities/{id} (wrk)", f"{int(n):,}", f"c={conns}: req/s, p50 / p99",
                    f"{res['rps']:,.0f}, {res['p50'] * 1000:.2f} / {res['p99'] * 1000:.2f} ms",
                    ">= 2,000 req/s" if res is r["best"] else "",
                    ("met" if res["rps"] >= 2000 else "**missed**") if res is r["best"] else "")
    r = results.get("query_q")
    if r:
        n = sizes["query_q"][1]
        for key, res in r.items():
            if isinstance(key, tuple):
                row("q `" + res['q'].replace("|", "\\|") + "`", f"{int(n):,}", f"{key[1]}: p50 / p99 (results, count)",
                    f"{res['p50'] * 1000:.0f} / {res['p99'] * 1000:.0f} ms ({res['results']}, {res['count']})")
    r = results.get("near_query")
    if r:
        n = sizes["near_query"][1]
        for key in ("c1", "c4"):
            if key in r:
                res = r[key]
                first = key == "c1"
                row("near;maxDistance==500 limit=20 (wrk)", f"{int(n):,}", f"{key}: req/s, p50 / p99",
                    f"{res['rps']:,.0f}, {res['p50'] * 1000:.1f} / {res['p99'] * 1000:.1f} ms",
                    "p99 < 50 ms" if first else "", ("met" if res["p99"] < 0.05 else "**missed**") if first else "")
        row("near: mean results", f"{int(n):,}", "returned (limit 20) / matched", f"{r['mean_results']:.1f} / {r['mean_matched']:.1f}")
    r = results.get("notify_latency")
    if r:
        size = sizes["notify_latency"]
        for n, res in r.items():
            if isinstance(n, int):
                s = res["from_sched"]
                row(f"notify latency, {n} sub(s), {size[1]} upd/s paced", f"{int(size[5]):,}",
                    "sched. send -> arrival p50 / p99 / max (sent/recv/missing/dup)",
                    f"{s['p50'] * 1000:.1f} / {s['p99'] * 1000:.1f} / {s['max'] * 1000:.1f} ms "
                    f"({res['sent']}/{res['received_updates']}/{res['missing']}/{res['duplicates']})",
                    "p99 < 50 ms", "met" if s["p99"] < 0.05 else "**missed**")
    r = results.get("notify_throughput")
    if r:
        n_ent = int(sizes["notify_throughput"][1])
        base = r.get(0)
        for phase in ("batch", "patch"):
            for n, res in r.items():
                if isinstance(n, int):
                    v = res[phase]["rate"]
                    change = (v / base[phase]["rate"] - 1) * 100 if base and n else None
                    row(f"updates with {n:,} subs ({phase})", f"{n_ent:,}", "updates/s (vs 0 subs), notifications",
                        f"{v:,.0f}" + (f" ({change:+.1f}%)" if change is not None else "") + f", {res[phase]['notifications']:,}",
                        "cost < 20% at 10k" if n >= 10000 else "",
                        ("met" if change > -20 else "**missed**") if n >= 10000 and change is not None else "")
    for name, res in results.items():
        if res is None:
            row(name, "", "FAILED", "", "", "")
    print("\nWall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items()))


if __name__ == "__main__":
    main()
