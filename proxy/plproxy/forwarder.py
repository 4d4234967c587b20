"""The proxy handler: relays one call to its configured upstream and hands a capture of it to the store.

Response bytes go back to the client as they arrive (streams event by event, never buffered whole);
a copy is kept only for calls that are recorded. The client never waits for the record: it is built
and written by the store's writer thread after the response is complete.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter
from yarl import URL

from plproxy import json_bytes
from plproxy.apis import CallKind, classify
from plproxy.capture import Capture
from plproxy.errors import (
    BadRequest,
    PayloadTooLarge,
    PlproxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from plproxy.mapping import credential_values
from plproxy.metrics import Metrics
from plproxy.pl_headers import PLHeaders, is_pl_header, parse_pl_headers
from plproxy.record import Api, LogIds, Outcome
from plproxy.routing import Target, resolve
from plproxy.settings import Settings
from plproxy.sse import SSEDecoder, encode_event
from plproxy.stream_usage import UsageInjection

log = logging.getLogger("plproxy.access")

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
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
    }
)
# Set anew for the upstream by the client library, or handled by plproxy's own server.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
# What plproxy can decode for the record; a recorded call asks the upstream for no other encoding.
_DECODABLE_ENCODINGS = "gzip, deflate"
# How much of a 400/422 answer to an injected request is read to see whether it refuses stream_options.
_REJECTION_PEEK_BYTES = 64 * 1024

SubmitCapture = Callable[[Capture, str | None, PLHeaders], None]


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_request_headers(headers: CIMultiDictProxy[str], *, recorded: bool) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, `Host`, and every `X-PL-*` header."""
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _NOT_FORWARDED or lowered in named or is_pl_header(lowered):
            continue
        out.add(name, value)
    if recorded and "Accept-Encoding" in out:
        out["Accept-Encoding"] = _DECODABLE_ENCODINGS
    return out


def client_response_headers(headers: CIMultiDictProxy[str], *, rewritten: bool) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in named:
            continue
        if rewritten and lowered == "content-length":
            continue
        out.add(name, value)
    return out


def _request_payload(body: bytes) -> bytes | io.BytesIO | None:
    """The body for aiohttp's client. Above 1 MiB a file-like object is streamed in chunks instead of
    written in one call (aiohttp warns that one large write can hold the event loop)."""
    if not body:
        return None
    return io.BytesIO(body) if len(body) > 1024 * 1024 else body


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        submit: SubmitCapture,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._routes = settings.all_routes
        self._session = session
        self._submit = submit
        self._metrics = metrics
        self._log_ids = LogIds()
        # Per-call work that depends only on the request target or the route, done once: clients send
        # the same few paths over and over. Bounded: a client sending endless distinct paths only
        # empties the cache now and then.
        self._targets: dict[str, _Resolved] = {}
        self._route_metrics: dict[str, _RouteMetrics] = {}
        # Routes whose upstream refused `stream_options` (some local servers reject unknown fields):
        # their streams are forwarded untouched from then on.
        self._refuses_stream_options: set[str] = set()

    def refuses_stream_options(self, route: str) -> bool:
        return route in self._refuses_stream_options

    def note_stream_options_refused(self, route: str, status: int) -> None:
        if route not in self._refuses_stream_options:
            self._refuses_stream_options.add(route)
            log.warning("stream_usage_refused", extra={"fields": {"route": route, "status": status}})

    def _resolve(self, raw_target: str) -> _Resolved:
        resolved = self._targets.get(raw_target)
        if resolved is None:
            target = resolve(raw_target, self._routes)  # refusals raise: they are never cached
            resolved = _Resolved(target, target.url, classify("POST", target))
            if len(raw_target) <= _CACHED_TARGET_MAX_CHARS:  # long targets (query strings) are rare
                if len(self._targets) >= _TARGET_CACHE_SIZE:
                    self._targets.clear()
                self._targets[raw_target] = resolved
        return resolved

    def route_metrics(self, route: str) -> _RouteMetrics:
        found = self._route_metrics.get(route)
        if found is None:
            found = self._route_metrics[route] = _RouteMetrics(self._metrics, route)
        return found

    def new_log_id(self) -> str:
        return self._log_ids.next()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than {self._settings.max_body_mb} MiB (PLPROXY_MAX_BODY_MB)."
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.time()
        perf_start = time.perf_counter()
        resolved = self._resolve(request.raw_path)
        pl = parse_pl_headers(request.headers.items())
        # classify() recognises only POSTs: the cached kind is the POST's
        kind = resolved.post_kind if request.method == "POST" else None
        recorded = kind is not None and pl.log_enabled
        declared = request.content_length
        if declared is not None and declared > self._settings.max_body_bytes:
            # at once: reading up to the limit only to refuse it costs time and memory
            raise self._too_large()
        try:
            # a client that stalls mid-upload must not hold its handler for ever
            async with asyncio.timeout(self._settings.read_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self._settings.read_timeout:g} s "
                "(PLPROXY_READ_TIMEOUT)."
            ) from None
        call = _Call(self, request, resolved, pl, kind if recorded else None, body, started, perf_start)
        return await call.run()


_TARGET_CACHE_SIZE = 1024
_CACHED_TARGET_MAX_CHARS = 512  # at most ~0.5 MB of keys


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A request target's upstream, its URL, and what it records when POSTed."""

    target: Target
    url: URL
    post_kind: CallKind | None


class _RouteMetrics:
    """One route's labelled metric children, looked up once (a label lookup costs ~1 µs per metric)."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self.request_duration = metrics.request_duration.labels(route)
        self.overhead = metrics.overhead.labels(route)
        self.upstream_ttfb = metrics.upstream_ttfb.labels(route)
        self._requests: dict[tuple[str, str, str], Counter] = {}

    def count_request(self, method: str, status_class: str, model: str) -> None:
        key = (method, status_class, model)
        child = self._requests.get(key)
        if child is None:
            child = self._metrics.requests.labels(self._route, method, status_class, model)
            self._requests[key] = child
        child.inc()


class _Call:
    """One relayed call; lives for the duration of the handler."""

    def __init__(
        self,
        forwarder: Forwarder,
        request: web.Request,
        resolved: _Resolved,
        pl: PLHeaders,
        kind: CallKind | None,
        body: bytes,
        started: float,
        perf_start: float,
    ) -> None:
        self.f = forwarder
        self.request = request
        self.target = resolved.target
        self.url = resolved.url
        self.pl = pl
        self.body = body
        self.client_body = body  # as the client sent it, when `body` is rewritten for usage injection
        self.perf_start = perf_start
        self.upstream_wait = 0.0
        self.model: str | None = None
        self.injection: UsageInjection | None = None
        self.capture: Capture | None = None
        if kind is not None:
            self.capture = Capture(
                log_id=forwarder.new_log_id(),
                kind=kind,
                annotations=pl.annotations,
                request_body=body,
                start_time=started,
                secrets=self._secrets(),
            )
            self._inspect_body(kind)

    def _secrets(self) -> tuple[str, ...]:
        secrets = credential_values(self.request.headers.items())
        default_key = self.f._settings.promptlayer_api_key
        return (*secrets, default_key) if default_key else secrets

    def _inspect_body(self, kind: CallKind) -> None:
        """Parse the JSON body only where something depends on it: the model label, usage injection."""
        try:
            parsed: Any = orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(parsed, dict):
            return
        model = parsed.get("model")
        self.model = model if isinstance(model, str) else kind.model_hint
        if (self.f._settings.stream_usage == "inject" and kind.api in (Api.CHAT, Api.COMPLETION)
                and not self.f.refuses_stream_options(self.target.route.name)):
            self.injection = UsageInjection.for_request(parsed)
            if self.injection is not None:
                self.body = json_bytes.dumps(self.injection.request, size_hint=len(self.body))

    @property
    def log_id(self) -> str | None:
        return self.capture.log_id if self.capture else None

    def _plproxy_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.capture is not None:
            headers["X-PL-Log-Id"] = self.capture.log_id
        return headers

    def _add_warnings(self, response: web.StreamResponse) -> None:
        for warning in self.pl.warnings:
            response.headers.add("X-PL-Warning", warning)

    async def run(self) -> web.StreamResponse:
        status = 0
        try:
            response = await self._relay()
            status = response.status
            return response
        except PlproxyError as error:
            status = error.status
            error.headers.extend(self._plproxy_headers().items())
            error.headers.extend(("X-PL-Warning", warning) for warning in self.pl.warnings)
            raise
        except asyncio.CancelledError:
            # Once the answer is being relayed, `_relay_body` has said how the call ended; before that,
            # nothing did, and the record would otherwise claim a success with an empty answer.
            self._fail(Outcome.PARTIAL, "the client left before the upstream answered")
            raise
        finally:
            self._finish(status)

    async def _relay(self) -> web.StreamResponse:
        settings = self.f._settings
        headers = upstream_request_headers(self.request.headers, recorded=self.capture is not None)
        if self.injection is not None:
            headers["Accept-Encoding"] = "identity"  # the stream is rewritten, so it must arrive plain
        sent = time.perf_counter()
        try:
            upstream = await self.f._session.request(
                self.request.method,
                self.url,
                headers=headers,
                data=_request_payload(self.body),
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self._fail(Outcome.TIMEOUT, f"the upstream sent no answer within {settings.read_timeout:g} s")
            raise UpstreamTimeout(
                f"The upstream did not answer within {settings.read_timeout:g} s (PLPROXY_READ_TIMEOUT)."
            ) from None
        except aiohttp.ClientError as exc:
            self._fail(Outcome.UNREACHABLE, f"the upstream could not be reached: {type(exc).__name__}")
            raise UpstreamUnreachable(
                f"The upstream {self.target.route.url.origin()} could not be reached ({type(exc).__name__})."
            ) from None
        answered = time.perf_counter() - sent
        self.upstream_wait += answered
        self.f.route_metrics(self.target.route.name).upstream_ttfb.observe(answered)
        prefetched = b""
        try:
            if self.injection is not None and upstream.status in (400, 422):
                prefetched = await self._peek(upstream)
                if b"stream_options" in prefetched:
                    # The upstream refused the field plproxy added, not the client's call: send the call
                    # again exactly as the client sent it (once: there is no injection the second time).
                    self.f.note_stream_options_refused(self.target.route.name, upstream.status)
                    self.injection = None
                    self.body = self.client_body
                    upstream.release()
                    return await self._relay()
            return await self._relay_body(upstream, prefetched)
        finally:
            upstream.release()

    async def _peek(self, upstream: aiohttp.ClientResponse) -> bytes:
        """Up to _REJECTION_PEEK_BYTES of the answer; the rest stays in the stream for the relay."""
        parts: list[bytes] = []
        size = 0
        waited = time.perf_counter()
        while size < _REJECTION_PEEK_BYTES:
            try:
                chunk = await upstream.content.read(_REJECTION_PEEK_BYTES - size)
            except (aiohttp.ClientError, TimeoutError):
                break  # the relay meets the same failure and records it
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        self.upstream_wait += time.perf_counter() - waited
        return b"".join(parts)

    async def _relay_body(
        self, upstream: aiohttp.ClientResponse, prefetched: bytes = b""
    ) -> web.StreamResponse:
        capture = self.capture
        content_type = upstream.headers.get("Content-Type", "")
        is_stream = content_type.startswith("text/event-stream")
        rewriting = self.injection is not None and is_stream and upstream.status < 400
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=client_response_headers(upstream.headers, rewritten=rewriting),
        )
        for name, value in self._plproxy_headers().items():
            response.headers[name] = value
        self._add_warnings(response)
        if capture is not None:
            capture.status_code = upstream.status
            capture.is_stream = is_stream
            capture.content_encoding = upstream.headers.get("Content-Encoding", "")
        await response.prepare(self.request)

        decoder = SSEDecoder() if (capture is not None and is_stream) else None
        streams = self.f._metrics.streams_in_flight
        if is_stream:
            streams.inc()
        try:
            content = upstream.content
            while True:
                if prefetched:
                    chunk, prefetched = prefetched, b""
                else:
                    waited = time.perf_counter()
                    chunk = await content.readany()
                    self.upstream_wait += time.perf_counter() - waited
                if not chunk:
                    break
                if decoder is None:
                    if capture is not None:
                        capture.add_body(chunk)
                    await response.write(chunk)
                elif rewriting:
                    out = self._rewrite_events(decoder.feed(chunk))
                    if out:
                        await response.write(out)
                else:
                    await response.write(chunk)
                    self._keep_events(decoder.feed(chunk))
            if decoder is not None:
                tail = decoder.close()
                if rewriting:
                    out = self._rewrite_events(tail)
                    if out:
                        await response.write(out)
                else:
                    self._keep_events(tail)
            await response.write_eof()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self._fail(Outcome.PARTIAL, "the upstream went silent for longer than the read timeout")
            upstream.close()
            self._cut_client()
        except aiohttp.ClientPayloadError:
            self._fail(Outcome.PARTIAL, "the upstream cut the response before its end")
            upstream.close()
            self._cut_client()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self._fail(Outcome.PARTIAL, "the client left before the response ended")
            upstream.close()
        except asyncio.CancelledError:
            self._fail(Outcome.PARTIAL, "the client left before the response ended")
            upstream.close()
            raise
        finally:
            if is_stream:
                streams.dec()
        return response

    def _keep_events(self, events: list[Any]) -> None:
        capture = self.capture
        assert capture is not None
        for event in events:
            data = event.data
            if data == "[DONE]":
                capture.stream_done = True
            elif data:
                capture.add_event(data, len(event.raw))

    def _rewrite_events(self, events: list[Any]) -> bytes:
        """Keep the injected usage for the record and strip it from what the client receives."""
        capture = self.capture
        injection = self.injection
        assert capture is not None
        assert injection is not None
        out: list[bytes] = []
        for event in events:
            data = event.data
            if data == "[DONE]":
                capture.stream_done = True
                out.append(event.raw)
                continue
            raw = event.raw
            if raw.endswith(_NULL_USAGE_EVENT_END) and data.startswith("{") and event.event is None:
                # Nearly every chunk of an injected stream: `"usage":null` is its object's last member
                # (the final `}` of valid JSON closes the top-level object), so cutting those bytes out
                # is what `client_view` does, without parsing and re-encoding the chunk.
                capture.add_event(data, len(raw))
                out.append(raw[: -len(_NULL_USAGE_EVENT_END)] + b"}\n\n")
                continue
            try:
                parsed = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                out.append(event.raw)
                continue
            capture.add_event(data, len(event.raw))  # the text: parsed again off the loop, smaller
            client_view = injection.client_view(parsed)
            if client_view is parsed:
                out.append(event.raw)  # nothing to strip: the bytes as the upstream sent them
            elif client_view is not None:
                out.append(encode_event(orjson.dumps(client_view), event.event))
        return b"".join(out)

    def _cut_client(self) -> None:
        """End the client's answer the way the upstream ended ours: cut. Ending it cleanly would send the
        last chunk of a chunked body (or keep the connection) and turn half an answer into what looks
        like a whole one. Closing, not aborting, still delivers what was already written."""
        self.request.protocol.force_close()
        if self.request.transport is not None:
            self.request.transport.close()

    def _fail(self, outcome: Outcome, message: str) -> None:
        if self.capture is not None and self.capture.outcome is None:
            self.capture.outcome = outcome
            self.capture.error_message = message

    def _finish(self, status: int) -> None:
        f = self.f
        total = time.perf_counter() - self.perf_start
        route = self.target.route.name
        status_class = (_STATUS_CLASSES.get(status // 100) or f"{status // 100}xx") if status else "none"
        metrics = f.route_metrics(route)
        metrics.count_request(self.request.method, status_class, f._metrics.model_label(self.model))
        metrics.request_duration.observe(total)
        metrics.overhead.observe(max(total - self.upstream_wait, 0.0))
        # The line is built only when the access log is on (`info`): at `warning` it would be dropped.
        fields = None
        if log.isEnabledFor(logging.INFO):
            fields = {
                "log_id": self.log_id,
                "method": self.request.method,
                "route": route,
                "path": self.target.path,
                "status": status,
                "duration_ms": round(total * 1000, 3),
                "upstream_ms": round(self.upstream_wait * 1000, 3),
                "model": self.model,
            }
        if self.capture is not None:
            # the call's log line is written with its tokens once the record is built, off the loop
            self.capture.end_time = time.time()
            self.capture.call_log = fields
            f._submit(self.capture, self.pl.api_key, self.pl)
        elif fields is not None:
            log.info("call", extra={"fields": fields})

_STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
# How an injected stream's chunk ends on the wire when the upstream added `"usage": null` to it.
_NULL_USAGE_EVENT_END = b',"usage":null}\n\n'


__all__ = ["HOP_BY_HOP", "BadRequest", "Forwarder", "client_response_headers", "upstream_request_headers"]
