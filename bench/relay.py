"""The reference floor: a bare aiohttp relay with one `ClientSession`, streaming answers through, no logging.

`python -m bench.relay --port N --upstream http://127.0.0.1:M/v1` prints "listening on
http://127.0.0.1:N" and serves until SIGTERM. `/v1/<rest>` goes to `<upstream>/<rest>`. It does what any
aiohttp reverse proxy must (drop hop-by-hop headers and Host, relay status, headers and body chunk by
chunk) and nothing else, under the same event loop plproxy uses (uvloop when installed), so the gap
between it and plproxy is plproxy's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_DROP_BACK = _DROP - {"content-length"}

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    tail = request.raw_path.removeprefix("/v1")
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP)
    body = await request.read()
    async with session.request(
        request.method,
        request.app[UPSTREAM] + tail,
        headers=headers,
        data=body or None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_BACK),
        )
        await response.prepare(request)
        while chunk := await upstream.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> object:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=300),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


async def _main(args: argparse.Namespace) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(_session)  # type: ignore[arg-type]
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=2048)
    await site.start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    args = parser.parse_args(argv)
    from bench.minihttp import run

    run(lambda: _main(args))


if __name__ == "__main__":
    main()
