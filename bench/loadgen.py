"""Load generators, each run in a process of its own; one JSON line of results on stdout.

    python -m bench.loadgen open    --url URL --rate R --duration S [--warmup S] [--header 'K: V']...
    python -m bench.loadgen streams --url URL --concurrency C --duration S [--per-conn N]
    python -m bench.loadgen closed  --url URL --concurrency C --duration S

`open` is an open-loop generator that does not hide queueing (no coordinated omission): call i is
*scheduled* at t0 + i/R whatever happened to earlier calls, sent on a free keep-alive connection (a
new one is opened when none is free), and its latency is measured from its scheduled time, so a
server that stalls is charged for every call that should have been sent meanwhile. Each answer's
`X-Bench-Hold-Us` (the fake upstream's deliberate wait) is subtracted to give `net` latency, which
removes the upstream's timer jitter from comparisons; `lateness` (sent - scheduled) shows the
generator's own punctuality, common to every target.

`streams` keeps C streaming calls in flight (C connections, each calling back to back) and measures
time to first byte, total time, and per event the delay between the upstream writing it (the
`t=<ns>;` stamp in its text) and its arrival here.

`closed` is the fallback for maximum throughput when wrk is missing: C connections calling back to back.

Raw asyncio protocols (bench/minihttp.py) keep the generator's own CPU cost to a few µs per call.
Every loop is bounded by its duration plus `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from bench.minihttp import Response, run

_STAMP = re.compile(rb"t=(\d{16,20});")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build_request(url: str, body: bytes, headers: list[str]) -> tuple[bytes, str, int]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"loadgen: only loopback targets are allowed, not {host}")
    port = parts.port or 80
    lines = [
        f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    if not any(h.lower().startswith("authorization:") for h in headers):
        lines.insert(4, "Authorization: Bearer sk-bench-not-a-real-key")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, host, port


class Conn(asyncio.Protocol):
    __slots__ = ("closed", "done", "resp", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.done: Callable[[Conn, Response, int, str | None], None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        now = time.perf_counter_ns()
        try:
            complete = resp.feed(data, now)
        except Exception as exc:
            self._finish(now, f"parse: {exc!r}")
            if self.transport is not None:
                self.transport.close()
            return
        if complete:
            self._finish(now, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            self._finish(time.perf_counter_ns(), "connection closed")

    def _finish(self, now: int, error: str | None) -> None:
        resp, done = self.resp, self.done
        self.resp = self.done = None
        if resp is not None and done is not None:
            done(self, resp, now, error)

    def send(
        self, request: bytes, resp: Response, done: Callable[[Conn, Response, int, str | None], None]
    ) -> None:
        self.resp = resp
        self.done = done
        assert self.transport is not None
        try:
            self.transport.write(request)
        except RuntimeError:  # the server closed this keep-alive connection before we noticed
            self.closed = True
            self._finish(time.perf_counter_ns(), "connection closed")

    def reusable(self, resp: Response) -> bool:
        return not self.closed and resp.headers.get(b"connection", b"").lower() != b"close"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Conn, host, port)
    return proto


def summary(values_ns: list[int] | list[float]) -> dict[str, Any]:
    """Percentiles in µs, and a 201-point quantile curve for charts."""
    if not values_ns:
        return {"n": 0}
    v = sorted(values_ns)
    n = len(v)

    def q(p: float) -> float:
        return round(v[min(n - 1, max(0, round(p * (n - 1))))] / 1000, 1)

    return {
        "n": n,
        "mean": round(sum(v) / n / 1000, 1),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round(v[-1] / 1000, 1),
        "min": round(v[0] / 1000, 1),
        "curve": [q(i / 200) for i in range(201)],
    }


# ---- open loop ----------------------------------------------------------------------------------------


async def open_loop(a: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request, host, port = build_request(a.url, a.body.encode(), a.header)
    idle: list[Conn] = [await connect(host, port) for _ in range(a.connections)]
    opened = len(idle)
    warm_n = int(a.rate * a.warmup)
    total = warm_n + int(a.rate * a.duration)
    wall_offset = time.time_ns() - time.perf_counter_ns()
    latency: list[int] = []
    net: list[int] = []
    lateness: list[int] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    done_bins: Counter[int] = Counter()
    held_us: list[int] = []
    ok_total = 0  # 2xx answers, warm-up included: the records a logging proxy should produce
    outstanding = 0
    all_sent = False
    finished = asyncio.Event()

    def make_done(i: int, sched: int, sent: int) -> Callable[[Conn, Response, int, str | None], None]:
        def done(conn: Conn, resp: Response, now: int, error: str | None) -> None:
            nonlocal outstanding, ok_total
            outstanding -= 1
            if error is None and 200 <= resp.status < 300:
                ok_total += 1
            if error is None and conn.reusable(resp):
                idle.append(conn)
            else:
                conn.close()
            if i >= warm_n:
                if error is not None:
                    errors[error] += 1
                else:
                    statuses[str(resp.status)] += 1
                    # from its scheduled time (a late send is charged to the target, as it should be),
                    # except that uvloop's millisecond timers may wake the scheduler up to 1 ms early:
                    # a call sent before its time is measured from when it was sent
                    lat = now - min(sched, sent)
                    latency.append(lat)
                    lateness.append(sent - sched)
                    hold = resp.headers.get(b"x-bench-hold-us")
                    if hold is not None:
                        held_us.append(int(hold))
                        net.append(lat - int(hold) * 1000)
            if error is None and 200 <= resp.status < 300:  # warm-up included: records are made for it too
                done_bins[(now + wall_offset) // 100_000_000] += 1
            if all_sent and outstanding == 0:
                finished.set()

        return done

    async def connect_and_send(i: int, sched: int) -> None:
        nonlocal opened, outstanding
        try:
            conn = await connect(host, port)
        except OSError as exc:
            outstanding -= 1
            if i >= warm_n:
                errors[f"connect: {exc.strerror or exc!r}"] += 1
            if all_sent and outstanding == 0:
                finished.set()
            return
        opened += 1
        conn.send(request, Response(), make_done(i, sched, time.perf_counter_ns()))

    interval = 1e9 / a.rate
    t0 = time.perf_counter_ns() + 20_000_000
    wall_start = t0 + wall_offset
    pending_tasks: set[asyncio.Task[None]] = set()
    for i in range(total):
        sched = t0 + int(i * interval)
        wait = sched - time.perf_counter_ns()
        if wait > 0:
            await asyncio.sleep(wait / 1e9)
        outstanding += 1
        while idle and (idle[-1].closed or idle[-1].transport is None or idle[-1].transport.is_closing()):
            idle.pop()
        if idle:
            idle.pop().send(request, Response(), make_done(i, sched, time.perf_counter_ns()))
        else:
            task = loop.create_task(connect_and_send(i, sched))
            pending_tasks.add(task)
            task.add_done_callback(pending_tasks.discard)
    all_sent = True
    if outstanding:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), a.timeout)
    timeouts = max(outstanding, 0)
    for task in pending_tasks:
        task.cancel()
    for conn in idle:
        conn.close()
    measured = total - warm_n
    return {
        "mode": "open",
        "url": a.url,
        "rate": a.rate,
        "duration": a.duration,
        "scheduled": measured,
        "completed": len(latency),
        "ok_total": ok_total,
        "timeouts": timeouts,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "connections_opened": opened,
        "latency_us": summary(latency),
        "net_us": summary(net) if len(net) == len(latency) else None,
        "lateness_us": summary(lateness),
        "upstream_hold_us": summary([h * 1000 for h in held_us]),
        "wall_start_s": wall_start / 1e9,
        "wall_measure_start_s": (wall_start + int(warm_n * interval)) / 1e9,
        "done_bins": {str(k): v for k, v in sorted(done_bins.items())},
    }


# ---- streams ------------------------------------------------------------------------------------------


async def streams(a: argparse.Namespace) -> dict[str, Any]:
    request, host, port = build_request(a.url, a.body.encode(), a.header)
    deadline = time.perf_counter() + a.duration
    hard_deadline = deadline + a.timeout
    ttfb: list[int] = []
    first_event: list[int] = []
    total: list[int] = []
    chunk_delay: list[int] = []
    events_per_stream: list[int] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    in_flight = 0
    max_in_flight = 0
    max_in_flight_at = 0.0
    loop = asyncio.get_running_loop()

    async def one(conn: Conn, measured: bool) -> Conn | None:
        nonlocal in_flight, max_in_flight, max_in_flight_at
        stamps: list[tuple[int, int]] = []  # (stamp ns, arrival ns), wall clock
        carry = bytearray()

        def on_body(piece: bytes, _now: int) -> None:
            arrived = time.time_ns()
            carry.extend(piece)
            last = 0
            for m in _STAMP.finditer(carry):
                stamps.append((int(m.group(1)), arrived))
                last = m.end()
            if last:
                del carry[:last]
            elif len(carry) > 4096:
                del carry[:-64]

        resp = Response(on_body=on_body)
        fut: asyncio.Future[tuple[int, str | None]] = loop.create_future()

        def done(_c: Conn, _r: Response, now: int, error: str | None) -> None:
            if not fut.done():
                fut.set_result((now, error))

        sent = time.perf_counter_ns()
        sent_wall = time.time_ns()
        conn.send(request, resp, done)
        in_flight += 1
        if in_flight > max_in_flight:
            max_in_flight, max_in_flight_at = in_flight, time.time()
        try:
            now, error = await asyncio.wait_for(fut, max(0.1, hard_deadline - time.perf_counter()))
        except TimeoutError:
            errors["timeout"] += measured
            conn.close()
            return None
        finally:
            in_flight -= 1
        if error is not None:
            errors[error] += measured
            return None
        if measured:
            statuses[str(resp.status)] += 1
            ttfb.append(resp.first_byte_ns - sent)
            total.append(now - sent)
            if stamps:
                first_event.append(stamps[0][1] - sent_wall)
            chunk_delay.extend(arrived - stamp for stamp, arrived in stamps)
            events_per_stream.append(len(stamps))
        return conn if conn.reusable(resp) else None

    async def worker(k: int) -> None:
        await asyncio.sleep(a.stagger * k / max(1, a.concurrency))
        conn: Conn | None = None
        done = 0
        while time.perf_counter() < deadline and (a.per_conn == 0 or done < a.per_conn):
            if conn is None:
                try:
                    conn = await connect(host, port)
                except OSError as exc:
                    errors[f"connect: {exc.strerror or exc!r}"] += 1
                    await asyncio.sleep(0.05)
                    continue
            measured = done > 0 or not a.warm_first
            conn = await one(conn, measured)
            done += 1
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker(k) for k in range(a.concurrency)))
    return {
        "mode": "streams",
        "url": a.url,
        "concurrency": a.concurrency,
        "streams": len(total),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "max_in_flight": max_in_flight,
        "max_in_flight_at": max_in_flight_at,
        "ttfb_us": summary(ttfb),
        "first_event_us": summary(first_event),
        "total_us": summary(total),
        "chunk_delay_us": summary(chunk_delay),
        "events_per_stream": summary([e * 1000 for e in events_per_stream]),
    }


# ---- closed loop ----------------------------------------------------------------------------------------


async def closed_loop(a: argparse.Namespace) -> dict[str, Any]:
    request, host, port = build_request(a.url, a.body.encode(), a.header)
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + a.warmup
    deadline = start + a.duration
    count = 0
    errors: Counter[str] = Counter()
    latency: list[int] = []

    async def worker() -> None:
        nonlocal count
        conn: Conn | None = await connect(host, port)
        while time.perf_counter() < deadline:
            if conn is None:
                conn = await connect(host, port)
            fut: asyncio.Future[tuple[Response, int, str | None]] = loop.create_future()
            sent = time.perf_counter_ns()
            conn.send(request, Response(), lambda _c, r, n, e, f=fut: f.done() or f.set_result((r, n, e)))
            try:
                resp, now, error = await asyncio.wait_for(fut, a.timeout)
            except TimeoutError:
                errors["timeout"] += 1
                conn.close()
                conn = None
                continue
            if time.perf_counter() >= start:
                if error is None and 200 <= resp.status < 300:
                    count += 1
                    latency.append(now - sent)
                else:
                    errors[error or str(resp.status)] += 1
            if error is not None or not conn.reusable(resp):
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    return {
        "mode": "closed",
        "url": a.url,
        "concurrency": a.concurrency,
        "calls": count,
        "calls_per_s": round(count / a.duration, 1),
        "errors": dict(errors),
        "latency_us": summary(latency),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("open", "streams", "closed"))
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--body", default='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
    )
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--rate", type=float, default=200.0, help="open: calls per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    parser.add_argument("--connections", type=int, default=64, help="open: connections opened up front")
    parser.add_argument("--concurrency", type=int, default=100, help="streams/closed: connections")
    parser.add_argument(
        "--per-conn", type=int, default=0, help="streams: calls per connection (0: until the end)"
    )
    parser.add_argument(
        "--stagger", type=float, default=0.2, help="streams: seconds over which workers start"
    )
    parser.add_argument(
        "--no-warm-first",
        dest="warm_first",
        action="store_false",
        help="streams: measure each connection's first stream too",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds past the end before giving up")
    a = parser.parse_args(argv)
    raise_fd_limit()
    result: dict[str, Any] = {}

    async def go() -> None:
        mode = {"open": open_loop, "streams": streams, "closed": closed_loop}[a.mode]
        result.update(await mode(a))

    run(go)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
