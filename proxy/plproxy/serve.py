"""Running the server: listen, then on SIGTERM/SIGINT drain in-flight calls and flush the store.

The stop sequence, in order: `/readyz` answers 503 at once (the listener stays open, so probes and
late requests are still answered); in-flight calls, streams included, get up to `drain_timeout` to
finish; then the listener closes and the exporter ships what it can within `flush_timeout`; whatever
is left stays pending on disk for the next start. A second signal skips the rest of the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from plproxy import oplog
from plproxy.app_keys import STATE
from plproxy.protocol import Runner
from plproxy.server import create_app
from plproxy.settings import Settings
from plproxy.store import StoreError

log = logging.getLogger("plproxy.serve")


def serve(
    settings: Settings,
    *,
    serve_args: Sequence[str] = (),
    worker_of: int | None = None,
    multiprocess_dir: str | None = None,
) -> int:
    """Run the server. `serve_args` are the command line's own, for `--workers N` to pass on."""
    oplog.configure(settings.log_level, settings.log_format)
    if settings.workers > 1 and worker_of is None:
        from plproxy.workers import run_workers

        return run_workers(settings, serve_args)
    _return_large_blocks_to_the_os()
    main = _serve(settings, reuse_port=worker_of is not None, multiprocess_dir=multiprocess_dir)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# glibc's mallopt(M_MMAP_THRESHOLD): blocks this large are mapped apart and unmapped when freed.
_M_MMAP_THRESHOLD = -3
_LARGE_BLOCK = 1024 * 1024


def _return_large_blocks_to_the_os() -> None:
    """Give the memory of a large body back once its call is over, instead of keeping it for ever.

    glibc serves a freed block from its heap again, and raises its "allocate apart" threshold up to 32
    MiB after each large block is freed, so every copy of a 24 MiB body (read, parsed, encoded, stored,
    sent) ends up in a heap that is never trimmed; several threads, several heaps: the process keeps the
    peak of every call it ever made. A fixed 1 MiB threshold maps such blocks apart and unmaps them on
    free. Nothing happens where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK)


def _freeze_startup_objects() -> None:
    """Keep what start-up made (modules, classes, functions: ~50,000 objects) out of the cycle collector.

    Python's full collection walks every object it tracks, and the first one comes a few seconds into
    the load: measured under 100 concurrent streams, it held the event loop for 25-45 ms, which every
    chunk then waited (with this, the worst per-chunk delay fell from 18-46 ms to 5-12 ms). Frozen objects
    are never collected, so garbage is collected first; what is made later is collected as before."""
    gc.collect()
    gc.freeze()


async def _serve(settings: Settings, *, reuse_port: bool, multiprocess_dir: str | None) -> int:
    app = create_app(settings, multiprocess_dir=multiprocess_dir)
    runner = Runner(
        app,
        handler_cancellation=True,  # a client that leaves cancels its call, and so the upstream request
        shutdown_timeout=1.0,  # the drain below already waited; this only bounds stragglers
        access_log=None,
    )
    try:
        await runner.setup()
    except StoreError as error:
        print(f"plproxy: {error}", file=sys.stderr)
        return 1
    _freeze_startup_objects()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        print(f"plproxy: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        await runner.cleanup()
        return 1
    log.info(
        "listening",
        extra={
            "fields": {
                "address": f"http://{settings.host}:{settings.port}",
                "upstream": str(settings.upstream),
                "routes": [route.name for route in settings.routes],
                "data_dir": str(settings.data_dir),
                "promptlayer": "configured" if settings.promptlayer_api_key else "no key: records are kept",
            }
        },
    )
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            app[STATE].idle.set()  # a second signal: stop waiting for in-flight calls

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()

    state = app[STATE]
    state.draining = True
    log.info(
        "draining", extra={"fields": {"in_flight": state.in_flight, "deadline_s": settings.drain_timeout}}
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.idle.wait(), settings.drain_timeout)
    if state.in_flight:
        log.warning("drain deadline passed", extra={"fields": {"in_flight": state.in_flight}})
    await runner.cleanup()
    log.info("stopped")
    return 0
