"""The aiohttp application: routes, the error middleware, and every async resource in `cleanup_ctx`.

`create_app(settings, registry=...)` owns the one upstream `ClientSession`, the store and the exporter
task; they open in that order and close in reverse. Shared state lives under typed `web.AppKey`s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from plproxy import control_api, records_api
from plproxy.app_keys import EXPORTER, FORWARDER, METRICS, SESSION, SETTINGS, STATE, STORE, ServerState
from plproxy.capture import Capture
from plproxy.errors import MethodNotAllowed, NotFound, PayloadTooLarge, PlproxyError, error_response
from plproxy.exporter import Exporter
from plproxy.forwarder import Forwarder
from plproxy.metrics import Metrics
from plproxy.pl_headers import PLHeaders
from plproxy.proxy_auth import auth_middleware
from plproxy.settings import Settings
from plproxy.store import CorruptStore, Store, move_aside

log = logging.getLogger("plproxy.server")
log_call = logging.getLogger("plproxy.access")


MULTIPROCESS_DIR = web.AppKey("multiprocess_dir", str)  # "" unless run by --workers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PlproxyError as error:
        return error_response(error)
    except web.HTTPRequestEntityTooLarge:
        max_mb = request.app[SETTINGS].max_body_mb
        return error_response(
            PayloadTooLarge(f"The request body is larger than {max_mb} MiB (PLPROXY_MAX_BODY_MB).")
        )
    except web.HTTPNotFound:
        return error_response(NotFound("No such endpoint."))
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed here."))


async def healthz(request: web.Request) -> web.Response:
    # the pid tells workers apart, for operators and tests
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    store = request.app.get(STORE)
    problems = []
    if state.draining:
        problems.append("draining")
    if store is None or not store.writable():
        problems.append("store not writable")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    store = request.app.get(STORE)
    if store is not None:
        metrics.store_writable.set(1 if store.writable() else 0)
    multiprocess_dir = request.app[MULTIPROCESS_DIR]
    if multiprocess_dir:
        # every worker's files, added up: any worker answers for the whole server
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    else:
        registry = metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.call_started()
    try:
        return await request.app[FORWARDER].handle(request)
    finally:
        state.call_ended()


def create_app(
    settings: Settings, *, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
) -> web.Application:
    """The proxy app; `multiprocess_dir` is prometheus_client's directory when run by `--workers`."""
    middlewares: list[Middleware] = [error_middleware]
    if settings.proxy_tokens:
        middlewares.append(auth_middleware(settings.proxy_tokens))
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[MULTIPROCESS_DIR] = multiprocess_dir or ""
    app[METRICS] = Metrics(registry)
    app[STATE] = ServerState()
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_pipeline)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    control_api.add_routes(app.router)
    records_api.add_routes(app.router)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def count_tokens(metrics: Metrics, payload: dict[str, Any]) -> None:
    model = metrics.model_label(payload.get("model"))
    for direction, key in (("in", "input_tokens"), ("out", "output_tokens")):
        tokens = payload.get(key)
        if isinstance(tokens, int) and tokens > 0:
            metrics.token_counter(direction, model).inc(tokens)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    session = aiohttp.ClientSession(
        connector=connector,
        # No total timeout: an LLM stream may run for minutes. Silence is what is bounded.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        auto_decompress=False,  # the client receives the bytes exactly as the upstream sent them
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    app[SESSION] = session
    yield
    await session.close()


def open_store(settings: Settings, metrics: Metrics | None = None) -> Store:
    """The store; a damaged file is moved aside (kept, never deleted) and an empty store started."""

    def open_it() -> Store:
        return Store(
            settings.data_dir,
            has_default_key=settings.promptlayer_api_key is not None,
            max_bytes=settings.store_max_mb * 1024 * 1024,
            metrics=metrics,
        )

    try:
        return open_it()
    except CorruptStore as error:
        moved = move_aside(settings.store_path)
        log.error("store moved aside", extra={"fields": {"reason": str(error), "moved_to": str(moved)}})
        return open_it()


async def _pipeline(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    store = open_store(settings, metrics)
    app[STORE] = store
    exporter = Exporter(  # it owns its PromptLayer connections: closed by stop() and flush()
        store,
        base_url=str(settings.promptlayer_base_url),
        default_api_key=settings.promptlayer_api_key,
        concurrency=settings.export_concurrency,
        metrics=metrics,
    )
    app[EXPORTER] = exporter

    def submit(capture: Capture, api_key: str | None, pl: PLHeaders) -> None:
        def build() -> dict[str, Any]:
            # runs on the store's writer thread, where the tokens are first known
            payload: dict[str, Any] = {}
            try:
                payload = capture.build_payload()
                count_tokens(metrics, payload)
                return payload
            finally:
                if capture.call_log is not None:  # None: the access log is off
                    fields = dict(capture.call_log)
                    fields["input_tokens"] = payload.get("input_tokens")
                    fields["output_tokens"] = payload.get("output_tokens")
                    log_call.info("call", extra={"fields": fields})

        store.submit(
            capture.log_id,
            build,
            api_key=api_key,
            followups=control_api.header_followups(pl),
            size_hint=capture.string_bound(),
        )

    app[FORWARDER] = Forwarder(settings, app[SESSION], submit, metrics)
    exporter.start()
    yield
    if store.writable():  # a writer stuck on a full or failed disk gets its last chance in close()
        await asyncio.to_thread(store.sync)
    await exporter.stop()
    backlog = await asyncio.to_thread(store.backlog)
    if settings.promptlayer_api_key is not None or backlog > 0:
        report = await exporter.flush(settings.flush_timeout)
        log.info("flushed", extra={"fields": dataclasses.asdict(report)})
    await asyncio.to_thread(store.close)
