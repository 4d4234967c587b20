"""A fast PromptLayer stand-in for the benchmark: answers like PromptLayer, counts, validates nothing.

`python -m bench.standin --port N [--delay S]` prints "listening on http://127.0.0.1:N" and serves until
SIGTERM. The tests' stand-in validates every body against the OpenAPI schema, which is right for tests
and far too slow to sit beside a proxy doing thousands of calls a second on a shared core.

- `POST /log-request` → 201 `{"id": n, ...}`; `POST /rest/track-*` (and any other POST, e.g. the older
  `/rest/track-request` some clients use) → 200 `{"success": true, "request_id": n}`.
- `delay`: seconds before every answer (a slow PromptLayer).
- `GET /_bench/stats` → `{"by_path": {...}, "log_requests": n, "bins": {"<unix time x 10>": n}}`: arrivals
  of /log-request per 100 ms, so the harness can draw records exported over time.
- `POST /_bench/config {"delay": S}` changes the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter

from bench.minihttp import Request, ServerProtocol, run, serve

_MAX_BINS = 200_000


class StandIn:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.next_id = 1
        self.by_path: Counter[str] = Counter()
        self.bins: Counter[int] = Counter()
        self.bytes = 0
        self.missing_key = 0
        self.loop = asyncio.get_running_loop()

    def handle(self, proto: ServerProtocol, req: Request) -> None:
        if req.path == "/_bench/stats":
            stats = {
                "by_path": dict(self.by_path),
                "log_requests": self.by_path["/log-request"],
                "bytes": self.bytes,
                "missing_key": self.missing_key,
                "bins": {str(k): v for k, v in self.bins.items()},
            }
            proto.respond(200, json.dumps(stats).encode())
            return
        if req.path == "/_bench/config":
            self.delay = float(json.loads(req.body or b"{}").get("delay", self.delay))
            proto.respond(200, json.dumps({"delay": self.delay}).encode())
            return
        if req.method != "POST":
            proto.respond(404, b'{"detail":"not found"}')
            return
        path = req.path.split("?", 1)[0]
        self.by_path[path] += 1
        self.bytes += len(req.body)
        if b"x-api-key" not in req.headers and b"api_key" not in req.body:
            self.missing_key += 1
        if path == "/log-request" and len(self.bins) < _MAX_BINS:
            self.bins[int(time.time() * 10)] += 1
        request_id, self.next_id = self.next_id, self.next_id + 1
        if self.delay > 0:
            self.loop.call_later(self.delay, self._answer, proto, path, request_id)
        else:
            self._answer(proto, path, request_id)

    @staticmethod
    def _answer(proto: ServerProtocol, path: str, request_id: int) -> None:
        if path == "/log-request":
            body = (
                b'{"id":%d,"prompt_version":null,"status":"SUCCESS","error_type":null,"error_message":null}'
            )
            proto.respond(201, body % request_id)
        else:
            proto.respond(200, b'{"success":true,"request_id":%d,"message":"tracked"}' % request_id)


async def _main(args: argparse.Namespace) -> None:
    standin = StandIn(args.delay)
    server = await serve(standin.handle, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args(argv)
    run(lambda: _main(args))


if __name__ == "__main__":
    main()
