"""A fast fake OpenAI upstream for the benchmark: chat completions, plain and streamed, on raw asyncio.

`python -m bench.upstream --port N [--delay S] [--gap S] [--chunks N]` prints "listening on
http://127.0.0.1:N/v1" and serves until SIGTERM. The tests' fake (tests/fakes/openai_upstream.py) hashes
and re-parses every body, which costs more CPU than plproxy itself at thousands of calls a second; this
one answers from templates in a few microseconds.

- `delay`: seconds before any answer (the model's "thinking" time); 0 answers at once.
- streams (`"stream": true`): `chunks` content events `gap` seconds apart, then the finish event, the
  usage event when `stream_options.include_usage` is set (as OpenAI does), and `data: [DONE]`. Each
  content event's text is `t=<time.time_ns() when it was written>;`, so a client can tell how long each
  event took to reach it (same host, same clock).
- every answer carries `X-Bench-Hold-Us`: how long the upstream held the request on purpose (request
  parsed → answer written), so a client can subtract the upstream's timer jitter from its latencies.
- `POST /_bench/config {"delay", "gap", "chunks"}` changes the knobs; `GET /_bench/stats` counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time

from bench.minihttp import Request, ServerProtocol, run, serve

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')

_COMPLETION = (
    b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1700000000,'
    b'"model":"%s","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help '
    b'you today?","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}'
)
_CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"%s","system_fingerprint":"fp_bench","choices":['
)
_CONTENT = b'{"index":0,"delta":{%s"content":"t=%d; "},"logprobs":null,"finish_reason":null}]%s}\n\n'
_FINISH = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]%s}\n\n'
_USAGE_EVENT = b'],"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n'


class Upstream:
    def __init__(self, delay: float, gap: float, chunks: int) -> None:
        self.delay = delay
        self.gap = gap
        self.chunks = chunks
        self.requests = 0
        self.streams = 0
        self.loop = asyncio.get_running_loop()

    def handle(self, proto: ServerProtocol, req: Request) -> None:
        path = req.path
        if path.endswith("/chat/completions") and req.method == "POST":
            self.requests += 1
            found = _MODEL.search(req.body)
            model = found.group(1) if found else b"gpt-4o-mini"
            if _STREAM.search(req.body):
                self.streams += 1
                usage = _USAGE.search(req.body) is not None
                when = self.delay
                if when > 0:
                    self.loop.call_later(when, self._stream, proto, req, model, usage, 0)
                else:
                    self._stream(proto, req, model, usage, 0)
            elif self.delay > 0:
                self.loop.call_later(self.delay, self._answer, proto, req, model)
            else:
                self._answer(proto, req, model)
        elif path == "/_bench/config" and req.method == "POST":
            knobs = json.loads(req.body or b"{}")
            self.delay = float(knobs.get("delay", self.delay))
            self.gap = float(knobs.get("gap", self.gap))
            self.chunks = int(knobs.get("chunks", self.chunks))
            proto.respond(200, self._knobs())
        elif path == "/_bench/stats":
            proto.respond(200, json.dumps({"requests": self.requests, "streams": self.streams}).encode())
        elif path.endswith("/models"):
            proto.respond(
                200,
                b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":0,"owned_by":"bench"}]}',
            )
        else:
            proto.respond(
                404, b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}'
            )

    def _knobs(self) -> bytes:
        return json.dumps({"delay": self.delay, "gap": self.gap, "chunks": self.chunks}).encode()

    def _hold(self, req: Request) -> list[tuple[bytes, bytes]]:
        held = (time.perf_counter_ns() - req.received_ns) // 1000
        return [(b"X-Bench-Hold-Us", b"%d" % held)]

    def _answer(self, proto: ServerProtocol, req: Request, model: bytes) -> None:
        proto.respond(200, _COMPLETION % model, headers=self._hold(req))

    def _stream(self, proto: ServerProtocol, req: Request, model: bytes, usage: bool, index: int) -> None:
        if proto.closed:
            return
        head = _CHUNK_HEAD % model
        tail = b',"usage":null' if usage else b""
        role = b'"role":"assistant",' if index == 0 else b""
        event = head + _CONTENT % (role, time.time_ns(), tail)
        if index == 0:
            proto.start_chunked(200, b"text/event-stream; charset=utf-8", event, headers=self._hold(req))
        else:
            proto.chunk(event)
        if index + 1 < self.chunks:
            self.loop.call_later(self.gap, self._stream, proto, req, model, usage, index + 1)
            return
        last = head + _FINISH % tail
        if usage:
            last += head + _USAGE_EVENT % (self.chunks, 12 + self.chunks)
        proto.end_chunked(last + b"data: [DONE]\n\n")


async def _main(args: argparse.Namespace) -> None:
    upstream = Upstream(args.delay, args.gap, args.chunks)
    server = await serve(upstream.handle, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before any answer")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between streamed events")
    parser.add_argument("--chunks", type=int, default=20, help="content events per stream")
    args = parser.parse_args(argv)
    run(lambda: _main(args))


if __name__ == "__main__":
    main()
