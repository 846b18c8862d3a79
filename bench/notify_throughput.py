"""Entity update throughput with 0, 1,000 and 10,000 active subscriptions (the cost of matching + notifying).

For every subscription count a fresh server gets N entities (default 10,000) and the subscriptions:
 * S per-device subscriptions (a guardian / app per device): entities=[{id: <one entity>}], watchedAttributes
   [pm10], q "pm10>100" (`--q`), keyValues attributes [pm10, pm25] (subscription k watches entity k mod N), and
 * (when S > 0) 5 type-wide alert subscriptions over all AirQualityObserved: pm25>95, temperature>34,
   relativeHumidity>0.99, pm10>149, and pm10 within 2 km of Busan city hall (geoQ).
All notify one fast sink (the raw asyncio receiver of notify_latency.py, in its own process).

Measured phases (each followed by a drain: the time until the sink has every notification):
 1. batch upserts: `--rounds` passes over all N entities in bodies of `--batch` (1,000) entities, 2 connections,
    fresh random values every pass (about 1/3 of the entities cross pm10>100);
 2. single PATCH /entities/{id}/attrs of pm10 (random 0..150) with wrk (`--connections`, `--duration` s).
Reported: updates/s and the % change vs 0 subscriptions, notifications received at the sink (and the entities they
carry), timesSent / timesFailed summed over all subscriptions, duplicates, rows left in the outbox.

    .venv/bin/python bench/notify_throughput.py [--entities 10000 --subs 0,1000,10000 --rounds 3 --duration 10 --repeat 1]
                                                [--store postgresql://postgres@127.0.0.1:5432/postgres] [--profile DIR]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from notify_latency import (Receiver, create_subscriptions, outbox_pending,  # noqa: E402
                            subscription_totals)

TARGET = "10,000 subscriptions cost < 20% of update throughput"
BUSAN_CITY_HALL = [129.0756, 35.1796]


def subscriptions(uri: str, n: int, n_entities: int, q: str = "pm10>100") -> list[dict]:
    endpoint = {"uri": uri, "accept": "application/json"}
    docs = []
    for k in range(n):
        docs.append({"type": "Subscription", "subscriptionName": f"guardian-{k}",
                     "entities": [{"id": common.entity_id(k % n_entities), "type": common.ETYPE}],
                     "watchedAttributes": ["pm10"], "q": q,
                     "notification": {"attributes": ["pm10", "pm25"], "format": "keyValues", "endpoint": endpoint}})
    if n:
        wide = [(["pm25"], "pm25>95", None), (["temperature"], "temperature>34", None),
                (["relativeHumidity"], "relativeHumidity>0.99", None), (["pm10"], "pm10>149", None),
                (["pm10"], None, {"georel": "near;maxDistance==2000", "geometry": "Point",
                                  "coordinates": BUSAN_CITY_HALL})]
        for watched, q, geo in wide:
            doc = {"type": "Subscription", "entities": [{"type": common.ETYPE}], "watchedAttributes": watched,
                   "notification": {"format": "keyValues", "attributes": watched, "endpoint": endpoint}}
            if q:
                doc["q"] = q
            if geo:
                doc["geoQ"] = geo
            docs.append(doc)
    return docs


def patch_script(directory: Path, n_entities: int, seed: int) -> Path:
    script = directory / "patch_pm10.lua"
    script.write_text(f"""
math.randomseed({seed})
local n = {n_entities}
local i = 0
request = function()
  i = i + 1
  local path = string.format("{common.NGSI}/entities/urn:ngsi-ld:{common.ETYPE}:%07d/attrs", i % n)
  local body = string.format('{{"pm10":{{"type":"Property","value":%.1f,"unitCode":"GQ"}}}}', math.random() * 150)
  return wrk.format("PATCH", path, {{["Content-Type"] = "application/json"}}, body)
end
""")
    return script


def drain(receiver: Receiver, server: common.Server) -> dict:
    """Wait until the sink stops receiving; what arrived, what the subscriptions count, what is left."""
    _, waited = receiver.wait_quiet(quiet=3.0, limit=600)
    dump = receiver.dump()
    totals = subscription_totals(server.url)
    return {"drain_s": waited, "notifications": dump["notifications"], "entities": dump["entities"],
            "duplicate_ids": dump["duplicate_ids"], "receiver_cpu_s": dump["cpu_s"],
            "pending": outbox_pending(server), **totals}


def run_level(args, receiver: Receiver, n_subs: int, load_bodies, pass_bodies) -> dict:
    res: dict = {"subs": n_subs}
    with common.Server(args.store, keep=args.keep) as server:
        if n_subs == 0:
            common.print_machine(server.label)
        elapsed, _, _ = common.post_batches(server.url, load_bodies, 2)
        docs = subscriptions(receiver.uri, n_subs, args.entities, args.q)
        rate = create_subscriptions(server.url, docs) if docs else 0
        print(f"setup   : {args.entities:,} entities loaded in {elapsed:.1f} s; {n_subs:,} per-device + "
              f"{len(docs) - n_subs} type-wide subscriptions created ({rate:,.0f}/s); server RSS {server.rss_mb():.0f} MB")
        receiver.reset()
        base = subscription_totals(server.url) if docs else {"timesSent": 0, "timesFailed": 0}

        # phase 1: batch upserts
        start = common.cpu_pair(server.pid)
        with common.Profiler(server, args.profile, f"notify_throughput_batch_subs{n_subs}"):
            elapsed, lat, statuses = common.post_batches(server.url, pass_bodies, 2)
        cpu, own = (now - then for now, then in zip(common.cpu_pair(server.pid), start))
        n_upd = args.entities * args.rounds
        d = drain(receiver, server)
        b = {"rate": n_upd / elapsed, "elapsed": elapsed, "p50": common.percentile(lat, 50),
             "p99": common.percentile(lat, 99), "statuses": statuses, "server_cpu": cpu / elapsed,
             "api_cpu": own / elapsed,
             "sent_delta": d["timesSent"] - base["timesSent"], "failed_delta": d["timesFailed"] - base["timesFailed"],
             "rate_incl_drain": n_upd / (elapsed + d["drain_s"]), **d}
        res["batch"] = b
        print(f"batch   : {n_upd:,} entity updates in {elapsed:.2f} s = {b['rate']:,.0f} entities/s (batch p50 "
              f"{b['p50'] * 1000:.0f} ms, p99 {b['p99'] * 1000:.0f} ms, {statuses}), server CPU {100 * b['server_cpu']:.0f}% "
              f"(API process {100 * b['api_cpu']:.0f}%); "
              f"drain {d['drain_s']:.1f} s -> {b['rate_incl_drain']:,.0f} entities/s until all delivered")
        print(f"  notes : {d['notifications']:,} notifications ({d['entities']:,} entities) at the sink, timesSent "
              f"+{b['sent_delta']:,} timesFailed +{b['failed_delta']}, duplicate ids {d['duplicate_ids']}, outbox left "
              f"{d['pending']}")
        sys.stdout.flush()

        # phase 2: single PATCHes (wrk)
        receiver.reset()
        script = patch_script(server.workdir, args.entities, args.seed)
        base = subscription_totals(server.url) if docs else {"timesSent": 0, "timesFailed": 0}
        start = common.cpu_pair(server.pid)
        with common.Profiler(server, args.profile, f"notify_throughput_patch_subs{n_subs}"):
            w = common.run_wrk(server.url, script, threads=1, connections=args.connections, duration=args.duration)
        cpu, own = (now - then for now, then in zip(common.cpu_pair(server.pid), start))
        d = drain(receiver, server)
        p = {"rate": w["rps"], "p50": w["p50"], "p99": w["p99"], "requests": w["requests"], "non2xx": w["non2xx"],
             "socket_errors": w["socket_errors"], "server_cpu": cpu / args.duration,
             "api_cpu": own / args.duration,
             "sent_delta": d["timesSent"] - base["timesSent"], "failed_delta": d["timesFailed"] - base["timesFailed"],
             "rate_incl_drain": w["requests"] / (args.duration + d["drain_s"]), **d}
        res["patch"] = p
        print(f"patch   : {w['requests']:,} PATCHes in {args.duration} s = {w['rps']:,.0f} req/s (p50 {w['p50'] * 1000:.1f} ms, "
              f"p99 {w['p99'] * 1000:.1f} ms, non-2xx {w['non2xx']}{', socket errors ' + w['socket_errors'] if w['socket_errors'] else ''}), "
              f"server CPU {100 * p['server_cpu']:.0f}% (API process {100 * p['api_cpu']:.0f}%); drain {d['drain_s']:.1f} s -> {p['rate_incl_drain']:,.0f} updates/s "
              f"until all delivered")
        print(f"  notes : {d['notifications']:,} notifications ({d['entities']:,} entities) at the sink, timesSent "
              f"+{p['sent_delta']:,} timesFailed +{p['failed_delta']}, duplicate ids {d['duplicate_ids']}, outbox left "
              f"{d['pending']}")
        res["rss_mb"] = server.rss_mb()
        res["store"] = server.label
        sys.stdout.flush()
    return res


def changes_by_round(runs: list[dict]) -> dict:
    """{(level, phase): [% change of its rate against the 0-subscription run of the same round, ...]}."""
    out: dict = {}
    for round_ in runs:
        if 0 not in round_:
            continue
        for n, res in round_.items():
            for phase in ("batch", "patch"):
                out.setdefault((n, phase), []).append(100 * (res[phase]["rate"] / round_[0][phase]["rate"] - 1))
    return out


def print_table(results: dict, args) -> None:
    levels = [k for k in results if isinstance(k, int)]
    changes = results.get("changes", {})
    rounds = len(results.get("runs", [None]))
    print(f"\n## Update throughput vs active subscriptions ({args.entities:,} entities"
          + (f"; medians of {rounds} alternated rounds, each level against the 0 of its own round" if rounds > 1 else "")
          + ")\n")
    print("| subscriptions | updates | updates/s | vs 0 subs | until delivered /s | notifications (entities) at sink "
          "| timesSent / failed | outbox left | target (10k subs cost < 20%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for phase, label in (("batch", f"batch upsert {args.batch}/req, 2 conns"), ("patch", f"PATCH attrs, wrk c={args.connections}")):
        for n in levels:
            r = results[n][phase]
            cost = ""
            verdict = ""
            if n and (n, phase) in changes:
                each = changes[(n, phase)]
                change = statistics.median(each)
                cost = f"{change:+.1f}%" + (f" ({', '.join(f'{c:+.1f}' for c in each)})" if len(each) > 1 else "")
                if n >= 10000:
                    verdict = "met" if change > -20 else "**missed**"
            subs = f"{n:,}" + (" + 5 type-wide" if n else "")
            print(f"| {subs} | {label} | {r['rate']:,.0f} | {cost} | {r['rate_incl_drain']:,.0f} | "
                  f"{r['notifications']:,} ({r['entities']:,}) | {r['sent_delta']:,} / {r['failed_delta']} | "
                  f"{r['pending']} | {verdict} |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--subs", default="0,1000,10000", help="comma list of per-device subscription counts")
    parser.add_argument("--q", default="pm10>100", help="q of the per-device subscriptions: the default notifies about "
                        "1/3 of updates; pm10>1000 never does, which leaves the cost of matching alone")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="batch upsert passes over all entities")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk PATCH load")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections for the PATCH phase")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all levels, alternated (0, 1000, 10000, "
                        "0, ...): each level's cost is taken against the 0-subscription run of its own round and the "
                        "median is reported, as the machine's speed moves within minutes")
    args = parser.parse_args(argv)
    print(f"== notify_throughput: {args.entities:,} entities, subscriptions {args.subs}, {args.rounds} batch pass(es), "
          f"{args.duration} s of PATCHes")
    rng = random.Random(args.seed)
    load_bodies = common.batch_bodies(args.entities, args.batch, rng, common.KOREA, "2024-05-01T12:00:00Z")
    pass_bodies = []
    for r in range(args.rounds):
        pass_bodies += common.batch_bodies(args.entities, args.batch, rng, common.KOREA, f"2024-05-01T12:{10 + r:02d}:00Z")
    results: dict = {}
    runs: list[dict] = []
    with Receiver() as receiver:
        st = receiver.self_test()
        if st:
            print(f"sink    : raw asyncio HTTP/1.1 receiver in its own process, {st['rps']:,.0f} req/s alone (wrk, 8 conns)")
        for round_number in range(args.repeat):
            round_: dict = {}
            for n in (int(x) for x in args.subs.split(",")):
                print(f"\n-- {n:,} per-device subscription(s)" + (" + 5 type-wide" if n else "")
                      + (f", round {round_number + 1} of {args.repeat}" if args.repeat > 1 else ""))
                t0 = time.perf_counter()
                round_[n] = run_level(args, receiver, n, load_bodies, pass_bodies)
                results["store"] = round_[n]["store"]
                print(f"  wall  : {time.perf_counter() - t0:.0f} s")
            runs.append(round_)
    for n in runs[0]:  # per level: the first round's details, with the median rate of all rounds
        results[n] = {key: value for key, value in runs[0][n].items()}
        for phase in ("batch", "patch"):
            results[n][phase] = dict(runs[0][n][phase], rate=statistics.median(r[n][phase]["rate"] for r in runs))
    results["runs"] = runs
    results["changes"] = changes_by_round(runs)
    print_table(results, args)
    return results


if __name__ == "__main__":
    main()
