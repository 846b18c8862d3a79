"""Notification latency: entity update (PATCH /entities/{id}/attrs, one attribute) -> notification at a receiver.

An open-loop paced load (default 1,000 updates/s for 20 s after a 2 s warm-up) PATCHes `pm10` of 1,000 entities
round-robin; every update carries a unique sequence number as the new pm10 value, so every update is a real change
and must produce exactly one notification (keyValues, attributes=[pm10]) whose data carries the same number.
The receiver is a raw asyncio HTTP/1.1 server in its own process that timestamps each notification when its body
has been read (CLOCK_MONOTONIC, shared by all processes), answers 200 at once and parses nothing until the run is
over. Latency is measured from the *scheduled* send time (includes any client lag: no coordinated omission) and
from the *actual* send time. Configurations: `--subs 1` (one type-wide subscription watching pm10) and
`--subs 100` (100 subscriptions, each naming 10 of the entities by id: still one notification per update, but
delivered by 100 subscription workers).

    .venv/bin/python bench/notify_latency.py [--rate 1000 --duration 20 --entities 1000 --subs 1,100]
                                             [--store postgresql://postgres@127.0.0.1:5432/postgres] [--profile DIR]

This module also provides the receiver and the raw HTTP client used by bench/notify_throughput.py.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = "notification latency p99 < 50 ms at 1,000 updates/s"
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


# ------------------------------------------------------------------ receiver (separate process)

async def _receiver_main(port: int, ready) -> None:
    arrivals: list[tuple[float, bytes]] = []
    state = {"t_reset": time.monotonic(), "cpu_reset": _cpu()}

    def reply(writer, body: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                     + body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                low = head.lower()
                i = low.find(b"content-length:")
                n = int(head[i + 15:head.index(b"\r\n", i)]) if i >= 0 else 0
                body = await reader.readexactly(n) if n else b""
                t = time.monotonic()
                if head.startswith(b"GET "):
                    path = head[4:head.index(b" ", 4)]
                    if path.startswith(b"/count"):
                        reply(writer, orjson.dumps({"count": len(arrivals)}))
                    elif path.startswith(b"/reset"):
                        arrivals.clear()
                        state["t_reset"], state["cpu_reset"] = time.monotonic(), _cpu()
                        reply(writer, b"{}")
                    elif path.startswith(b"/dump"):
                        reply(writer, _dump(arrivals, state, full=b"full=1" in path))
                    else:
                        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                else:
                    arrivals.append((t, body))
                    writer.write(_OK)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    ready.send(True)
    async with server:
        await server.serve_forever()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _dump(arrivals, state, full: bool) -> bytes:
    """Parse what arrived: per notification (arrival, id, subscription, sequence numbers of its entities)."""
    cpu = _cpu() - state["cpu_reset"]
    wall = time.monotonic() - state["t_reset"]
    ids: set[str] = set()
    dup = entities = bad = 0
    per: list = []
    for t, body in arrivals:
        try:
            note = orjson.loads(body)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(note, dict) or note.get("type") != "Notification":
            bad += 1
            continue
        if note["id"] in ids:
            dup += 1
        ids.add(note["id"])
        data = note.get("data") or []
        entities += len(data)
        if full:
            per.append([t, note["id"], note["subscriptionId"], [e.get("pm10") for e in data]])
    return orjson.dumps({"notifications": len(arrivals), "unique_ids": len(ids), "duplicate_ids": dup,
                         "entities": entities, "non_notifications": bad, "cpu_s": cpu, "wall_s": wall,
                         "arrivals": per})


def _receiver_process(port: int, ready) -> None:
    try:
        import uvloop  # noqa: F401  (only if installed; the plain loop is fast enough too)
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_receiver_main(port, ready))


class Receiver:
    """The notification receiver in its own process (context manager); uri is the endpoint to subscribe with."""

    def __init__(self):
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uri = self.url + "/notify"

    def __enter__(self) -> "Receiver":
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(target=_receiver_process, args=(self.port, child),
                                                                   daemon=True)
        self.process.start()
        if not parent.poll(10):
            raise RuntimeError("receiver did not start")
        parent.recv()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(5)

    def _get(self, path: str) -> dict:
        import httpx
        return httpx.get(self.url + path, timeout=120).json()

    def count(self) -> int:
        return self._get("/count")["count"]

    def reset(self) -> None:
        self._get("/reset")

    def dump(self, full: bool = False) -> dict:
        return self._get("/dump?full=1" if full else "/dump")

    def wait_quiet(self, expected: int | None = None, quiet: float = 3.0, limit: float = 120.0) -> tuple[int, float]:
        """Wait until `expected` notifications arrived, or none arrived for `quiet` s; (count, seconds waited)."""
        t0 = time.monotonic()
        last, last_change = -1, t0
        while time.monotonic() - t0 < limit:
            n = self.count()
            now = time.monotonic()
            if expected is not None and n >= expected:
                return n, now - t0
            if n != last:
                last, last_change = n, now
            elif now - last_change >= quiet:
                return n, last_change - t0
            time.sleep(0.05)
        return last, time.monotonic() - t0

    def self_test(self, duration: int = 3) -> dict | None:
        """wrk POSTs a notification-sized body at the receiver: its capacity, to show it is not the bottleneck."""
        if not common.have_wrk():
            return None
        body = orjson.dumps({"id": "urn:ngsi-ld:Notification:x", "type": "Notification", "subscriptionId": "urn:x",
                             "notifiedAt": "2024-05-01T12:00:00Z", "data": [{"id": common.entity_id(1),
                                                                             "type": common.ETYPE, "pm10": 1}]})
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"receiver-{self.port}.lua"
        script.write_text(f"wrk.method = 'POST'\nwrk.body = '{body.decode()}'\n"
                          "wrk.headers['Content-Type'] = 'application/json'\n")
        try:
            res = common.run_wrk(self.uri, script, threads=1, connections=8, duration=duration)
        finally:
            script.unlink(missing_ok=True)
        self.reset()
        return res


# ------------------------------------------------------------------ raw HTTP/1.1 client (cheap on the client CPU)

class RawConnection:
    """One keep-alive HTTP/1.1 connection sending pre-built requests and reading (status, body)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "RawConnection":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"content-length:")
        if i >= 0:
            n = int(head[i + 15:head.index(b"\r\n", i)])
            return status, (await self.reader.readexactly(n) if n else b"")
        if b"transfer-encoding: chunked" in low:
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, b"".join(chunks)
                chunks.append(chunk[:-2])
        return status, b""

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _send_all(host: str, port: int, requests: list[bytes], concurrency: int) -> list[tuple[int, bytes]]:
    out: list = [None] * len(requests)
    position = iter(range(len(requests)))

    async def worker():
        conn = await RawConnection.open(host, port)
        try:
            for i in position:
                out[i] = await conn.request(requests[i])
        finally:
            conn.close()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def send_all(url: str, requests: list[bytes], concurrency: int = 4) -> list[tuple[int, bytes]]:
    """Send pre-built requests over `concurrency` keep-alive connections; (status, body) per request."""
    host, port = url.split("//")[1].split(":")
    return asyncio.run(_send_all(host, int(port), requests, concurrency))


def create_subscriptions(url: str, docs: list[dict], concurrency: int = 4) -> float:
    """POST the subscriptions; raises on any non-201; returns subscriptions/s."""
    reqs = [http_request("POST", common.NGSI + "/subscriptions", orjson.dumps(d)) for d in docs]
    t0 = time.perf_counter()
    res = send_all(url, reqs, concurrency)
    elapsed = time.perf_counter() - t0
    bad = [(s, b[:300]) for s, b in res if s != 201]
    if bad:
        raise RuntimeError(f"{len(bad)} subscription(s) refused, e.g. {bad[0]}")
    return len(docs) / elapsed if elapsed else float("nan")


def subscription_totals(url: str) -> dict:
    """Sum timesSent / timesFailed over every subscription (GET /subscriptions paged by 1,000)."""
    import httpx
    sent = failed = n = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        offset = 0
        while True:
            page = client.get(common.NGSI + "/subscriptions", params={"limit": 1000, "offset": offset}).json()
            for sub in page:
                note = sub.get("notification", {})
                sent += note.get("timesSent", 0)
                failed += note.get("timesFailed", 0)
            n += len(page)
            if len(page) < 1000:
                break
            offset += 1000
    return {"subscriptions": n, "timesSent": sent, "timesFailed": failed}


def outbox_pending(server: common.Server) -> int | None:
    """Rows still in the store's outbox (notifications decided but not yet delivered)."""
    try:
        if server.store.startswith("sqlite:///"):
            import sqlite3
            conn = sqlite3.connect(f"file:{server.store[len('sqlite:///'):]}?mode=ro", uri=True, timeout=10)
            try:
                return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
            finally:
                conn.close()
        import asyncpg

        async def q():
            conn = await asyncpg.connect(server.store)
            try:
                return await conn.fetchval("SELECT count(*) FROM outbox")
            finally:
                await conn.close()
        return asyncio.run(q())
    except Exception as exc:  # informative only
        print(f"warning : could not read the outbox: {exc}")
        return None


def proc_cpu(pid: int) -> float:
    """utime + stime (s) of the server and its child processes (the notification delivery process), from /proc."""
    return common.cpu_seconds(pid)


# ------------------------------------------------------------------ paced open-loop PATCH load

def patch_request(seq: int, n_entities: int) -> bytes:
    body = b'{"pm10":{"type":"Property","value":%d,"unitCode":"GQ"}}' % seq
    return http_request("PATCH", f"{common.NGSI}/entities/{common.entity_id(seq % n_entities)}/attrs", body)


async def _paced(url: str, rate: float, seqs: range, n_entities: int, max_conns: int) -> dict:
    host, port = url.split("//")[1].split(":")
    port = int(port)
    idle: list[RawConnection] = []
    opened = 0
    sched: dict[int, float] = {}
    sent: dict[int, float] = {}
    done: dict[int, float] = {}
    statuses: dict[int, int] = {}
    slot = asyncio.Semaphore(max_conns)
    reopened = [0]
    requests = {s: patch_request(s, n_entities) for s in seqs}

    async def one(seq: int) -> None:
        nonlocal opened
        async with slot:
            if idle:
                conn = idle.pop()
            else:
                conn = await RawConnection.open(host, port)
                opened += 1
            sent[seq] = time.monotonic()
            try:
                status, _ = await conn.request(requests[seq])
            except (ConnectionError, asyncio.IncompleteReadError):
                # the server closed this pooled connection while it sat idle (its keep-alive timeout), before
                # reading the request: send it again on a new connection (before this, the PATCH was lost silently)
                conn.close()
                conn = await RawConnection.open(host, port)
                opened += 1
                reopened[0] += 1
                status, _ = await conn.request(requests[seq])
            done[seq] = time.monotonic()
            statuses[status] = statuses.get(status, 0) + 1
            idle.append(conn)

    tasks = []  # all kept, so that a request's exception surfaces in gather instead of vanishing
    start = time.monotonic() + 0.05
    lag_max = 0.0
    for i, seq in enumerate(seqs):
        t = start + i / rate
        sched[seq] = t
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag_max = max(lag_max, -delay)
        tasks.append(asyncio.create_task(one(seq)))
    end_sched = time.monotonic()
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return {"sched": sched, "sent": sent, "done": done, "statuses": statuses, "connections": opened,
            "reopened": reopened[0],
            "send_window": end_sched - start, "lag_max": lag_max,
            "completed_rate": len(done) / (max(done.values()) - start) if done else float("nan")}


def paced_patches(url: str, rate: float, seqs: range, n_entities: int, max_conns: int = 128) -> dict:
    """Send one PATCH per sequence number at fixed times (open loop); per-seq scheduled/sent/answered times."""
    try:
        import uvloop
        return uvloop.run(_paced(url, rate, seqs, n_entities, max_conns))
    except ImportError:
        return asyncio.run(_paced(url, rate, seqs, n_entities, max_conns))


# ------------------------------------------------------------------ benchmark

def latency_subscriptions(receiver_uri: str, n_subs: int, n_entities: int) -> list[dict]:
    notification = {"attributes": ["pm10"], "format": "keyValues", "endpoint": {"uri": receiver_uri,
                                                                                 "accept": "application/json"}}
    if n_subs == 1:
        return [{"type": "Subscription", "entities": [{"type": common.ETYPE}], "watchedAttributes": ["pm10"],
                 "notification": notification}]
    docs = []
    for j in range(n_subs):
        ids = [{"id": common.entity_id(i), "type": common.ETYPE} for i in range(j, n_entities, n_subs)]
        docs.append({"type": "Subscription", "entities": ids, "watchedAttributes": ["pm10"],
                     "notification": notification})
    return docs


def summarise(name: str, values: list[float]) -> dict:
    return {"name": name, "n": len(values), "p50": common.percentile(values, 50), "p90": common.percentile(values, 90),
            "p99": common.percentile(values, 99), "p999": common.percentile(values, 99.9),
            "max": max(values) if values else float("nan")}


def run_one(args, receiver: Receiver, n_subs: int) -> dict:
    import random
    rng = random.Random(args.seed)
    warm = int(args.rate * args.warmup)
    total = int(args.rate * args.duration)
    with common.Server(args.store, keep=args.keep) as server:
        common.print_machine(server.label)
        common.load_entities(server, args.entities, rng, batch=1000)
        rate = create_subscriptions(server.url, latency_subscriptions(receiver.uri, n_subs, args.entities))
        print(f"subs    : {n_subs} subscription(s) watching pm10 ({'type-wide' if n_subs == 1 else 'each naming ' + str(args.entities // n_subs) + ' entity ids'}), "
              f"created at {rate:,.0f}/s; notifications keyValues attributes=[pm10] to {receiver.uri}")
        receiver.reset()
        # warm-up (counted for completeness, not in the latency figures)
        w = paced_patches(server.url, args.rate, range(1, warm + 1), args.entities, args.max_conns)
        receiver.wait_quiet(expected=warm, quiet=2.0, limit=30)
        seqs = range(warm + 1, warm + total + 1)
        cpu0 = proc_cpu(server.pid)
        t0 = time.monotonic()
        with common.Profiler(server, args.profile, f"notify_latency_subs{n_subs}"):
            r = paced_patches(server.url, args.rate, seqs, args.entities, args.max_conns)
            got, drained = receiver.wait_quiet(expected=warm + total, quiet=5.0, limit=120)
        wall = time.monotonic() - t0
        server_cpu = proc_cpu(server.pid) - cpu0
        dump = receiver.dump(full=True)
        pending = outbox_pending(server)
        totals = subscription_totals(server.url)
    # correlate
    arrivals: dict[int, list[float]] = {}
    for t, _nid, _sid, values in dump["arrivals"]:
        for v in values:
            arrivals.setdefault(int(v), []).append(t)
    expected = set(range(1, warm + total + 1))
    missing = sorted(expected - arrivals.keys())
    dups = sum(len(v) - 1 for v in arrivals.values() if len(v) > 1)
    strays = len(arrivals.keys() - expected)
    from_sched = [arrivals[s][0] - r["sched"][s] for s in seqs if s in arrivals]
    from_sent = [arrivals[s][0] - r["sent"][s] for s in seqs if s in arrivals]
    resp = [r["done"][s] - r["sent"][s] for s in seqs if s in r["done"]]
    send_lag = [r["sent"][s] - r["sched"][s] for s in seqs if s in r["sent"]]
    achieved = r["completed_rate"]  # PATCHes answered per second (first scheduled send -> last answer)
    res = {"subs": n_subs, "rate": args.rate, "achieved": achieved, "sent": total + warm,
           "statuses": {**w["statuses"], **{k: v + w["statuses"].get(k, 0) for k, v in r["statuses"].items()}},
           "received_notifications": dump["notifications"], "received_updates": len(arrivals.keys() & expected),
           "missing": len(missing), "duplicates": dups, "duplicate_ids": dump["duplicate_ids"], "strays": strays,
           "from_sched": summarise("update scheduled -> notification arrived", from_sched),
           "from_sent": summarise("update sent -> notification arrived", from_sent),
           "patch": summarise("PATCH response time (sent -> 204)", resp),
           "lag": summarise("client send lag (scheduled -> sent)", send_lag),
           "server_cpu": server_cpu / wall, "receiver_cpu": dump["cpu_s"] / dump["wall_s"],
           "connections": r["connections"], "pending": pending, "totals": totals, "store": server.label,
           "drain": drained}
    print(f"load    : {total:,} PATCHes (+{warm:,} warm-up) scheduled at {args.rate:,.0f}/s, answered at "
          f"{achieved:,.0f}/s, {r['connections']} connection(s) opened ({r['reopened']} after the server closed an idle one), statuses {res['statuses']}, "
          f"max scheduling lag {r['lag_max'] * 1000:.1f} ms")
    print(f"count   : sent {res['sent']:,}  received {res['received_updates']:,} updates in "
          f"{res['received_notifications']:,} notifications  missing {res['missing']}  duplicates {dups} "
          f"(duplicate notification ids {dump['duplicate_ids']})  strays {strays}  outbox left {pending}  "
          f"timesSent {totals['timesSent']:,} timesFailed {totals['timesFailed']}")
    if missing:
        print(f"missing : first {missing[:10]}")
    print(f"cpu     : server {100 * res['server_cpu']:.0f}% of one core, receiver {100 * res['receiver_cpu']:.0f}% "
          f"of one core (over the measured window)")
    for key in ("from_sched", "from_sent", "patch", "lag"):
        s = res[key]
        print(f"  {s['name']:44s} n={s['n']:6,}  p50 {s['p50'] * 1000:7.2f}  p90 {s['p90'] * 1000:7.2f}  "
              f"p99 {s['p99'] * 1000:7.2f}  p99.9 {s['p999'] * 1000:7.2f}  max {s['max'] * 1000:7.2f} ms")
    sys.stdout.flush()
    return res


def print_table(results: dict, args) -> None:
    print(f"\n## Notification latency ({args.rate:,.0f} updates/s paced, {args.duration} s, {args.entities:,} entities)\n")
    print("| subscriptions | achieved upd/s | sent / received / missing / dup | from | p50 | p99 | p99.9 | max "
          "| target p99 < 50 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        if not isinstance(n, int):
            continue
        counts = f"{r['sent']:,} / {r['received_updates']:,} / {r['missing']} / {r['duplicates']}"
        for key, label in (("from_sched", "scheduled send"), ("from_sent", "actual send"),
                           ("patch", "PATCH response")):
            s = r[key]
            verdict = ("met" if s["p99"] < 0.05 else "**missed**") if key != "patch" else ""
            print(f"| {n} | {r['achieved']:,.0f} | {counts} | {label} | {s['p50'] * 1000:.1f} ms | {s['p99'] * 1000:.1f} ms "
                  f"| {s['p999'] * 1000:.1f} ms | {s['max'] * 1000:.1f} ms | {verdict} |")
            counts = ""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--rate", type=float, default=1000.0, help="updates per second (paced, open loop)")
    parser.add_argument("--duration", type=int, default=20, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds at the same rate (not measured)")
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--subs", default="1,100", help="comma list of subscription counts, one run (server) each")
    parser.add_argument("--max-conns", type=int, default=128, help="most client connections in flight")
    args = parser.parse_args(argv)
    print(f"== notify_latency: PATCH pm10 at {args.rate:,.0f}/s for {args.duration} s over {args.entities:,} "
          f"entities, subscriptions {args.subs}")
    results: dict = {}
    with Receiver() as receiver:
        st = receiver.self_test()
        if st:
            print(f"receiver: raw asyncio HTTP/1.1 server in its own process; capacity check with wrk (8 conns, POST "
                  f"of a notification): {st['rps']:,.0f} req/s, p99 {st['p99'] * 1000:.2f} ms")
            results["receiver_rps"] = st["rps"]
        for n in (int(x) for x in args.subs.split(",")):
            print(f"\n-- {n} subscription(s)")
            results[n] = run_one(args, receiver, n)
            results["store"] = results[n]["store"]
    print_table(results, args)
    if "receiver_rps" in results:
        print(f"\nReceiver capacity {results['receiver_rps']:,.0f} req/s alone (wrk) vs {args.rate:,.0f} "
              "notifications/s needed; receiver CPU during the runs is printed per run above.")
    return results


if __name__ == "__main__":
    main()
