"""A minimal HTTP/1.1 server protocol and response parser on raw asyncio, for the benchmark's own processes.

The fake upstream, the PromptLayer stand-in and the load generator must cost as little CPU as possible:
on a two-core machine they share a core, and every microsecond they spend is noise in what is measured.
aiohttp costs ~100 µs per request on each side; these protocols cost a few µs. They speak just enough
HTTP/1.1 for aiohttp's client and server, wrk, httpx and requests: keep-alive, Content-Length and chunked
bodies, no pipelining of requests whose answer is delayed (no client used here pipelines).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

_REASONS = {
    200: b"OK",
    201: b"Created",
    400: b"Bad Request",
    404: b"Not Found",
    500: b"Internal Server Error",
}


class Request:
    __slots__ = ("body", "headers", "method", "path", "received_ns")

    def __init__(
        self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, received_ns: int
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.received_ns = received_ns


Handler = Callable[["ServerProtocol", Request], None]


class _Incomplete(Exception):
    pass


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int]:
    """Decode a chunked body starting at `start`; returns (body, end offset) or raises _Incomplete."""
    parts: list[bytes] = []
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        size = int(bytes(buf[pos:eol]).split(b";")[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailers, up to the empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    raise _Incomplete
                line_empty = eol == pos
                pos = eol + 2
                if line_empty:
                    return b"".join(parts), pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


class ServerProtocol(asyncio.Protocol):
    """Parses requests and hands each to `handler(protocol, request)`, which answers through `respond`
    or `start_chunked`/`chunk`/`end_chunked`, at once or later (from a loop callback)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).split(b"\r\n")
            try:
                method, path, _version = head[0].decode("latin-1").split(" ", 2)
            except ValueError:
                self.respond(400, b"bad request line\n", close=True)
                return
            headers: dict[bytes, bytes] = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                try:
                    body, stop = _dechunk(self.buf, start)
                except _Incomplete:
                    return
            else:
                length = int(headers.get(b"content-length", b"0") or 0)
                stop = start + length
                if len(self.buf) < stop:
                    return
                body = bytes(self.buf[start:stop])
            del self.buf[:stop]
            if headers.get(b"connection", b"").lower() == b"close":
                self.close_after = True
            self.handler(self, Request(method, path, headers, body, time.perf_counter_ns()))

    # ---- answering -------------------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> None:
        if self.closed or self.transport is None:
            return
        lines = [
            b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status")),
            b"Content-Type: " + content_type,
            b"Content-Length: %d" % len(body),
        ]
        if headers:
            lines.extend(name + b": " + value for name, value in headers)
        close = close or self.close_after
        if close:
            lines.append(b"Connection: close")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        if close:
            self.transport.close()

    def start_chunked(
        self,
        status: int,
        content_type: bytes,
        first: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.closed or self.transport is None:
            return
        lines = [
            b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status")),
            b"Content-Type: " + content_type,
            b"Transfer-Encoding: chunked",
            b"Cache-Control: no-cache",
        ]
        if headers:
            lines.extend(name + b": " + value for name, value in headers)
        out = b"\r\n".join(lines) + b"\r\n\r\n"
        if first:
            out += b"%x\r\n%s\r\n" % (len(first), first)
        self.transport.write(out)

    def chunk(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self, last: bytes = b"") -> None:
        if self.closed or self.transport is None:
            return
        out = b"%x\r\n%s\r\n" % (len(last), last) if last else b""
        self.transport.write(out + b"0\r\n\r\n")
        if self.close_after:
            self.transport.close()


async def serve(handler: Handler, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: ServerProtocol(handler), "127.0.0.1", port, backlog=4096, reuse_address=True
    )


def run(main: Callable[[], Any]) -> None:
    """Run `main()` under uvloop when it is installed (it is, with plproxy's `fast` extra)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


# ---- the client side: one response, parsed incrementally --------------------------------------------


class Response:
    """Feed it bytes; `feed` returns True once the whole response has arrived.

    `on_body(piece, now_ns)` (optional) sees every body piece as it arrives, for per-chunk timing.
    """

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_length",
        "_state",
        "body",
        "first_byte_ns",
        "headers",
        "keep_body",
        "on_body",
        "status",
    )

    def __init__(
        self, *, keep_body: bool = False, on_body: Callable[[bytes, int], None] | None = None
    ) -> None:
        self._buf = bytearray()
        self._state = 0  # 0 head, 1 length body, 2 chunk size, 3 chunk data, 4 chunk CRLF, 5 trailers, 6 done
        self._length = 0
        self._chunk_left = 0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.first_byte_ns = 0
        self.keep_body = keep_body
        self.body = bytearray()
        self.on_body = on_body

    def _body(self, piece: bytes, now_ns: int) -> None:
        if self.keep_body:
            self.body += piece
        if self.on_body is not None:
            self.on_body(piece, now_ns)

    def feed(self, data: bytes, now_ns: int) -> bool:
        if not self.first_byte_ns:
            self.first_byte_ns = now_ns
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return False
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split(b" ", 2)[1])
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    self.headers[name.strip().lower()] = value.strip()
                if b"chunked" in self.headers.get(b"transfer-encoding", b"").lower():
                    self._state = 2
                elif b"content-length" in self.headers:
                    self._length = int(self.headers[b"content-length"])
                    self._state = 1
                else:
                    raise ValueError("a response without a length cannot be told apart from the next one")
            elif state == 1:
                take = min(self._length, len(buf))
                if take:
                    self._body(bytes(buf[:take]), now_ns)
                    del buf[:take]
                    self._length -= take
                if self._length == 0:
                    self._state = 6
                    return True
                return False
            elif state == 2:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(buf[:eol]).split(b";")[0].strip() or b"0", 16)
                del buf[: eol + 2]
                self._chunk_left = size
                self._state = 3 if size else 5
            elif state == 3:
                take = min(self._chunk_left, len(buf))
                if not take:
                    return False
                self._body(bytes(buf[:take]), now_ns)
                del buf[:take]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._state = 4
            elif state == 4:
                if len(buf) < 2:
                    return False
                del buf[:2]
                self._state = 2
            elif state == 5:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                empty = eol == 0
                del buf[: eol + 2]
                if empty:
                    self._state = 6
                    return True
            else:
                return True
