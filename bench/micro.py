"""Micro-benchmarks of the pieces of one plproxy call, to price the fixes the profile suggests.

`python -m bench.micro` prints one line per piece: µs per operation (best of 5 rounds), CPU of the whole
process where threads are involved. Run it on a quiet machine (`taskset -c 1` pins it). Each piece is
independent and reports its own error instead of stopping the others, since the code it measures moves.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

CHAT = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},'
    b'{"role":"user","content":"Say hello to the benchmark."}],"temperature":0}'
)
ANSWER = (
    b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I '
    b'help you today?","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}'
)
EVENT = (
    b'data: {"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[{"index":0,'
    b'"delta":{"content":"t=1; "},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
)
REQUEST_HEADERS = CIMultiDictProxy(
    CIMultiDict(
        {
            "Host": "127.0.0.1:8788",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": "Bearer sk-bench-not-a-real-key",
            "Content-Length": str(len(CHAT)),
            "User-Agent": "OpenAI/Python 1.50.0",
            "X-Stainless-Lang": "python",
            "X-Stainless-Package-Version": "1.50.0",
        }
    )
)
RESPONSE_HEADERS = CIMultiDictProxy(
    CIMultiDict({"Content-Type": "application/json", "Content-Length": str(len(ANSWER)), "X-Request-Id": "x"})
)


def per_op(fn: Callable[[], Any], n: int) -> float:
    """Best of 5 rounds, µs per call."""
    best = float("inf")
    for _ in range(5):
        gc.collect()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


def cpu_per_op(fn: Callable[[], Any], n: int) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) / n * 1e6


def results() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    def item(name: str, fn: Callable[[], Any]) -> None:
        try:
            out.append((name, round(fn(), 2)))
        except Exception as exc:
            out.append((name, f"error: {type(exc).__name__}: {exc}"))

    from plproxy import forwarder, pl_headers, record
    from plproxy.metrics import Metrics

    items = list(REQUEST_HEADERS.items())
    item(
        "parse_pl_headers, no X-PL header", lambda: per_op(lambda: pl_headers.parse_pl_headers(items), 20000)
    )
    off = [*items, ("X-PL-Log", "off")]
    item("parse_pl_headers, X-PL-Log: off", lambda: per_op(lambda: pl_headers.parse_pl_headers(off), 20000))
    tagged = [*items, ("X-PL-Tags", "a, b"), ("X-PL-Metadata", '{"user":"u1","n":3}')]
    item(
        "parse_pl_headers, tags + metadata",
        lambda: per_op(lambda: pl_headers.parse_pl_headers(tagged), 20000),
    )
    item(
        "upstream_request_headers",
        lambda: per_op(lambda: forwarder.upstream_request_headers(REQUEST_HEADERS, recorded=True), 20000),
    )
    item(
        "client_response_headers",
        lambda: per_op(lambda: forwarder.client_response_headers(RESPONSE_HEADERS, rewritten=False), 20000),
    )
    item("new_log_id (uuid4 + str)", lambda: per_op(record.new_log_id, 20000))
    item("LogIds.next (version 7, buffered; the proxy's)", lambda: per_op(record.LogIds().next, 20000))

    metrics = Metrics()

    def four_metrics() -> None:
        metrics.requests.labels("v1", "POST", "2xx", metrics.model_label("gpt-4o-mini")).inc()
        metrics.request_duration.labels("v1").observe(0.05)
        metrics.overhead.labels("v1").observe(0.0003)
        metrics.upstream_ttfb.labels("v1").observe(0.05)

    item("metrics per call (4 label lookups + inc/observe)", lambda: per_op(four_metrics, 20000))
    child = metrics.request_duration.labels("v1")
    item("one Histogram.observe on a cached child", lambda: per_op(lambda: child.observe(0.05), 20000))

    log = logging.getLogger("plproxy.access.micro")
    log.setLevel(logging.WARNING)

    def access_line() -> None:
        log.info(
            "call",
            extra={
                "fields": {
                    "log_id": "x",
                    "method": "POST",
                    "route": "v1",
                    "path": "/chat",
                    "status": 200,
                    "duration_ms": round(0.05123 * 1000, 3),
                    "upstream_ms": round(0.05 * 1000, 3),
                    "model": "gpt-4o-mini",
                }
            },
        )

    item("access log line at level warning (dropped)", lambda: per_op(access_line, 20000))
    item(
        "URL(...) of the upstream target",
        lambda: per_op(lambda: URL("http://127.0.0.1:9/v1/chat/completions", encoded=True), 20000),
    )

    import orjson

    from plproxy.sse import SSEDecoder, encode_event
    from plproxy.stream_usage import UsageInjection

    def sse_pass() -> None:
        SSEDecoder().feed(EVENT)

    item("SSE decode one event, a stream's first chunk", lambda: per_op(sse_pass, 20000))
    decoder = SSEDecoder()
    decoder.feed(EVENT)
    item(
        "SSE decode one event, any later chunk (whole data blocks)",
        lambda: per_op(lambda: decoder.feed(EVENT), 20000),
    )

    def sse_rewrite() -> None:
        for event in SSEDecoder().feed(EVENT):
            parsed = orjson.loads(event.data)
            view = UsageInjection.client_view(parsed)
            if view is not None:
                encode_event(orjson.dumps(view), event.event)

    item("SSE decode + usage strip by parse/re-encode, one event", lambda: per_op(sse_rewrite, 20000))
    tail = b',"usage":null}\n\n'
    item(
        "usage strip by bytes (endswith + slice), one event",
        lambda: per_op(lambda: EVENT[: -len(tail)] + b"}\n\n" if EVENT.endswith(tail) else EVENT, 20000),
    )

    item("capture.build_payload, chat completion (writer thread)", lambda: _build_payload(False))
    item("capture.build_payload, 20-event stream (writer thread)", lambda: _build_payload(True))
    item("asyncio.to_thread(noop) round trip on uvloop, process CPU", _to_thread_cpu)
    item("store: submit + commit, process CPU per record (batches of 1)", lambda: _store(1))
    item("store: submit + commit, process CPU per record (batches of 50)", lambda: _store(50))
    item("store: claim_due(8) + mark_exported each, process CPU per record", _claim_mark)
    item("exporter POST + 201 answer, aiohttp session (old), process CPU", lambda: _export_post("aiohttp"))
    item("exporter POST + 201 answer, pl_http (new), process CPU", lambda: _export_post("pl_http"))
    return out


def _capture(stream: bool) -> Any:
    from plproxy.apis import classify
    from plproxy.capture import Capture
    from plproxy.record import Annotations, new_log_id
    from plproxy.routing import Route, resolve

    target = resolve("/v1/chat/completions", (Route("v1", URL("http://127.0.0.1:9/v1")),))
    kind = classify("POST", target)
    cap = Capture(
        log_id=new_log_id(), kind=kind, annotations=Annotations(), request_body=CHAT, start_time=time.time()
    )
    cap.status_code = 200
    cap.end_time = time.time()
    if stream:
        cap.is_stream = True
        chunk = json.loads(EVENT[6:].decode())
        chunk.pop("usage")
        for _ in range(20):
            cap.events.append(json.dumps(chunk))
        cap.stream_done = True
    else:
        cap.add_body(ANSWER)
    return cap


def _build_payload(stream: bool) -> float:
    import orjson

    capture = _capture(stream)  # built once: only the body's build and encoding are timed
    return per_op(lambda: orjson.dumps(capture.build_payload()), 2000)


def _to_thread_cpu() -> float:
    import uvloop

    n = 2000

    async def main() -> None:
        for _ in range(n):
            await asyncio.to_thread(int)

    return cpu_per_op(lambda: uvloop.run(main()), n)


def _store(batch: int) -> float:
    from plproxy.store import Store

    n = 1000
    with tempfile.TemporaryDirectory() as d:
        store = Store(d, has_default_key=True)
        try:
            caps = [_capture(False) for _ in range(n)]
            t0 = time.process_time()
            for i in range(0, n, batch):
                for cap in caps[i : i + batch]:
                    store.submit(cap.log_id, cap.build_payload)
                store.sync()
            return (time.process_time() - t0) / n * 1e6
        finally:
            store.close()


def _claim_mark() -> float:
    from plproxy.store import Store

    n = 1000
    with tempfile.TemporaryDirectory() as d:
        store = Store(d, has_default_key=True)
        try:
            for _ in range(n):
                cap = _capture(False)
                store.submit(cap.log_id, cap.build_payload)
            store.sync()
            t0 = time.process_time()
            done = 0
            while done < n:
                claims = store.claim_due(8)
                if not claims:
                    break
                for i, c in enumerate(claims):
                    store.mark_exported(c.log_id, done + i + 1)
                done += len(claims)
            return (time.process_time() - t0) / max(1, done) * 1e6
        finally:
            store.close()


# A PromptLayer stand-in that costs the measured process nothing: another process answering each POST
# with a canned 201 on a keep-alive connection.
_FAST_PROMPTLAYER = r"""
import asyncio, sys
BODY = b'{"id": 1, "prompt_version": null, "status": 1}'
ANSWER = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
          b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: fast\r\n\r\n%s" % (len(BODY), BODY))
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            n = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            self.t.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def _export_post(client: str) -> float:
    """Process CPU of one exporter call (POST of a chat record, 201 answer read), one at a time on uvloop;
    the server runs in another process."""
    import subprocess

    import aiohttp
    import orjson
    import uvloop

    from plproxy.pl_http import PromptLayerHTTP

    body = orjson.dumps(_capture(False).build_payload())
    key = "pl_bench_not_a_real_key"
    n = 3000
    server = subprocess.Popen(
        [sys.executable, "-c", _FAST_PROMPTLAYER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        base = f"http://127.0.0.1:{int(server.stdout.readline())}"

        async def old() -> float:
            timeout = aiohttp.ClientTimeout(total=30)
            headers = {"X-API-KEY": key, "Content-Type": "application/json"}
            jar = aiohttp.DummyCookieJar()
            async with aiohttp.ClientSession(cookie_jar=jar, trust_env=False) as session:

                async def one() -> None:
                    url = base + "/log-request"
                    post = session.post(
                        url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                    )
                    async with post as response:
                        response.headers.get("Retry-After")
                        orjson.loads(await response.read())

                return await _cpu_rounds(one, n)

        async def new() -> float:
            http = PromptLayerHTTP(base, timeout=30)
            try:

                async def one() -> None:
                    answer = await http.post("/log-request", body, key)
                    answer.headers.get("retry-after")
                    orjson.loads(answer.body)

                return await _cpu_rounds(one, n)
            finally:
                http.close()

        return uvloop.run(old() if client == "aiohttp" else new())
    finally:
        server.communicate("")


async def _cpu_rounds(one: Callable[[], Any], n: int) -> float:
    for _ in range(200):  # warm up: connection, caches
        await one()
    best = float("inf")
    for _ in range(5):
        gc.collect()
        t0 = time.process_time()
        for _ in range(n):
            await one()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def main() -> None:
    rows = results()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value} µs" if not isinstance(value, str) else f"{name:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
