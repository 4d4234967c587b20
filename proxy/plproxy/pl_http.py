"""A lean HTTP/1.1 client for the exporter: JSON POSTs to one origin over a pool of keep-alive connections.

aiohttp's client spends ~70 µs of event-loop CPU on each call (request and response objects, timers,
payload sizing, header multidicts); the exporter makes one call per record, so that was most of what
logging cost. This client does exactly the exporter's job: the request is one `bytes` made from a head
built once per path and once per key, the answer is parsed from the bytes the protocol receives, and
one timer per call covers the whole exchange, connect included.

Limits, on purpose: one origin; no HTTP proxy and no environment settings (the aiohttp session it
replaces had `trust_env=False` too); redirects are answers, not followed; no compression
(`Accept-Encoding: identity`); no pipelining (one request in flight per connection); answers above
`MAX_ANSWER_BYTES` are refused.

Errors form one tree:

    PromptLayerHTTPError
     ├── RequestTimeout        no complete answer within the timeout (connect included)
     ├── ConnectionFailed      cannot connect, or the connection broke before the answer was complete
     │    └── BadAnswer        what came back is not an HTTP/1.x answer (or is too large)
     └── InvalidHeaderValue    the API key cannot travel in a header (control characters, not latin-1)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections import deque
from typing import NamedTuple, cast
from urllib.parse import unquote, urlsplit

from plproxy import __version__

MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a 201 may echo a linked prompt version, yet never comes close
IDLE_SECONDS = 15.0  # an idle connection older than this is closed rather than reused (servers drop them)
_MAX_HEAD = 64 * 1024
_JOIN_MAX = 256 * 1024  # bodies up to this go out with the head in one write; larger ones are not copied
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PATH = re.compile(r"/[!-~]*")

_HEAD, _LENGTH, _CHUNKED, _TO_CLOSE = range(4)
_SIZE_LINE, _CHUNK_END, _TRAILERS = -1, -2, -3  # chunked states (a positive value: bytes left of a chunk)


class PromptLayerHTTPError(Exception):
    """The root of this client's errors."""


class RequestTimeout(PromptLayerHTTPError):
    """No complete answer within the timeout."""


class ConnectionFailed(PromptLayerHTTPError):
    """Cannot connect, or the connection broke before the answer was complete."""


class BadAnswer(ConnectionFailed):
    """What came back is not a valid HTTP/1.x answer, or is larger than `MAX_ANSWER_BYTES`."""


class InvalidHeaderValue(PromptLayerHTTPError):
    """The API key cannot be sent as a header value. The message never holds the key."""


class _ClosedUnanswered(ConnectionFailed):
    """The connection closed before any byte of the answer: on a reused one, the server dropped it idle."""


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "
    body: bytes


class PromptLayerHTTP:
    """POSTs JSON to `base_url` + path. No I/O before the first `post`; `close()` drops every connection
    (a later `post` opens new ones)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        max_idle: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`timeout`: seconds for a whole call, connect included. `max_idle`: idle connections kept for
        reuse. `ssl_context`: for https, else `ssl.create_default_context()` (the system's CAs)."""
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self._tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._tls else 80)
        self._ssl_context = ssl_context
        self.timeout = timeout
        self._max_idle = max_idle
        self._prefix = url.path.rstrip("/")
        authority = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            authority += f":{url.port}"
        self.origin = f"{url.scheme}://{authority}"
        common = f"Host: {authority}\r\nUser-Agent: plproxy/{__version__}\r\n"
        common += "Content-Type: application/json\r\nAccept: application/json\r\n"
        common += "Accept-Encoding: identity\r\n"
        if url.username is not None:
            basic = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            common += f"Authorization: Basic {base64.b64encode(basic).decode()}\r\n"
        self._common = common.encode("latin-1")
        self._starts: dict[str, bytes] = {}
        self._key_lines: dict[str, bytes] = {}
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()

    async def post(self, path: str, body: bytes, api_key: str) -> Answer:
        """POST `body` to the base URL's path + `path` with `X-API-KEY: api_key`; the answer, whatever
        its status. Raises a `PromptLayerHTTPError`."""
        request = b"".join(
            (
                self._starts.get(path) or self._start(path),
                self._key_lines.get(api_key) or self._key_line(api_key),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body if len(body) <= _JOIN_MAX else b"",
            )
        )
        tail = body if len(body) > _JOIN_MAX else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        conn = self._take_idle(loop)
        if conn is not None:
            try:
                return await self._exchange(conn, request, tail, deadline)
            except _ClosedUnanswered:
                pass  # the server closed it while it was idle: once more, on a fresh connection
        conn = await self._connect(loop, deadline)
        return await self._exchange(conn, request, tail, deadline)

    def close(self) -> None:
        """Close every connection; calls in flight fail with `ConnectionFailed`. Idempotent."""
        self._idle.clear()
        for conn in list(self._open):
            if conn.busy:
                conn.fail(ConnectionFailed("the client was closed"))
            else:
                conn.shut()
        self._open.clear()

    # ---- internals -------------------------------------------------------------------------------

    def _start(self, path: str) -> bytes:
        if not _PATH.fullmatch(path):
            raise ValueError(f"not a request path: {path!r}")
        start = f"POST {self._prefix}{path} HTTP/1.1\r\n".encode() + self._common
        self._starts[path] = start
        return start

    def _key_line(self, api_key: str) -> bytes:
        value = api_key.strip(" \t")  # as a server would read it
        if not value or _BAD_VALUE.search(value):
            raise InvalidHeaderValue("the API key is not a valid HTTP header value")
        try:
            line = b"X-API-KEY: " + value.encode("latin-1") + b"\r\n"
        except UnicodeEncodeError:
            raise InvalidHeaderValue("the API key is not a valid HTTP header value") from None
        if len(self._key_lines) >= 256:  # keys are few; a flood of them must not grow this forever
            self._key_lines.clear()
        self._key_lines[api_key] = line
        return line

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been dropped
            if not conn.lost and loop.time() - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.shut()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        context: ssl.SSLContext | None = None
        if self._tls:
            if self._ssl_context is None:  # loading the system's CAs takes milliseconds: once, when needed
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=context,
                    server_hostname=self._host if context is not None else None,
                )
        except TimeoutError:
            raise RequestTimeout(f"no answer from {self.origin} within {self.timeout}s") from None
        except OSError as exc:  # refused, unreachable, name unknown, TLS handshake or certificate
            raise ConnectionFailed(f"cannot connect to {self.origin}: {exc}") from exc
        self._open.add(conn)
        return conn

    async def _exchange(
        self, conn: _Connection, request: bytes, tail: bytes | None, deadline: float
    ) -> Answer:
        waiter = conn.begin()
        timer = conn.loop.call_at(deadline, conn.time_out)
        try:
            conn.transport.write(request)
            if tail is not None:
                conn.transport.write(tail)
            answer = await waiter
        except BaseException:
            conn.shut(abort=True)  # timed out, broken or cancelled: where the exchange stands is unknown
            raise
        finally:
            timer.cancel()
        if conn.reusable and len(self._idle) < self._max_idle:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.shut()
        return answer

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):  # it was busy, or idle and already taken
            self._idle.remove(conn)


class _Connection(asyncio.Protocol):
    """One connection: writes a request, parses its answer into the current waiter."""

    transport: asyncio.Transport

    def __init__(self, client: PromptLayerHTTP) -> None:
        self.loop = asyncio.get_running_loop()
        self._client = client
        self.lost = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Answer] | None = None
        self._buf = bytearray()
        self._body = bytearray()
        self._got = False
        self._state = _HEAD
        self._left = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._keep_alive = False

    @property
    def busy(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    @property
    def reusable(self) -> bool:
        return self._keep_alive and not self._buf and not self.lost and not self.transport.is_closing()

    def begin(self) -> asyncio.Future[Answer]:
        if self.lost or self.transport.is_closing():
            raise _ClosedUnanswered("the connection closed before any answer")
        self._buf.clear()
        self._got = False
        self._state = _HEAD
        self._keep_alive = False
        self._waiter = waiter = self.loop.create_future()
        return waiter

    def time_out(self) -> None:
        client = self._client
        self.fail(RequestTimeout(f"no answer from {client.origin} within {client.timeout}s"))

    def shut(self, *, abort: bool = False) -> None:
        """Close the connection; abort it (no flush, no TLS close_notify) when `abort` or over TLS: a
        close_notify exchange could outlive the caller's loop, and every answer read was complete."""
        if not self.lost:
            if abort or self._client._tls:
                self.transport.abort()
            else:
                self.transport.close()

    # ---- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, yet is one

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # a server speaking out of turn: nothing it says here can be trusted
            self.transport.abort()
            return
        self._got = True
        self._buf += data
        try:
            self._parse()
        except BadAnswer as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        return False  # close: an answer read to the end of the connection completes in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._client._forget(self)
        if not self.busy:
            return
        if self._state == _TO_CLOSE and exc is None:
            self._finish(bytes(self._buf))
        elif self._got:
            self.fail(ConnectionFailed(f"the connection broke in mid-answer: {exc or 'closed'}"))
        else:
            self.fail(_ClosedUnanswered(f"the connection closed before any answer: {exc or 'closed'}"))

    # ---- parsing ---------------------------------------------------------------------------------

    def fail(self, exc: PromptLayerHTTPError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.shut(abort=True)

    def _finish(self, body: bytes) -> None:
        assert self._waiter is not None
        self._waiter.set_result(Answer(self._status, self._headers, body))

    def _parse(self) -> None:
        buf = self._buf
        while self._state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise BadAnswer("the answer's head is larger than 64 KiB")
                return
            head = buf[:end].decode("latin-1")
            del buf[: end + 4]
            self._head(head)
        if self._state == _LENGTH:
            if len(buf) < self._left:
                return
            if len(buf) > self._left:  # more than announced: what follows belongs to no request
                self._keep_alive = False
                del buf[self._left :]
            body = bytes(buf)
            buf.clear()
            self._finish(body)
        elif self._state == _CHUNKED:
            if self._chunks(buf):
                self._finish(bytes(self._body))
        elif len(buf) > MAX_ANSWER_BYTES:  # read to the end of the connection
            raise BadAnswer(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
            raise BadAnswer("the answer's head has a bare CR or LF")
        line = lines[0]
        code = line[9:12]
        if not (line.startswith(("HTTP/1.1 ", "HTTP/1.0 ")) and code.isascii() and code.isdigit()):
            raise BadAnswer(f"not an HTTP/1.x answer: {line[:40]!r}")
        if len(line) > 12 and line[12] != " ":
            raise BadAnswer(f"not an HTTP/1.x status line: {line[:40]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[0] in " \t" or name[-1] in " \t":
                raise BadAnswer(f"not an HTTP header line: {line[:40]!r}")
            name = name.lower()
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = int(code)
        if 100 <= status < 200:  # interim (100 Continue and the like): the answer follows
            return
        self._status, self._headers = status, headers
        self._keep_alive = lines[0][7] == "1" and "close" not in headers.get("connection", "").lower()
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if encoding is not None:  # it overrides a Content-Length, but such an answer ends the connection
            chunked = encoding.lower().rsplit(",", 1)[-1].strip() == "chunked"
            if length is not None or not chunked:
                self._keep_alive = False
            if chunked:
                self._state, self._left = _CHUNKED, _SIZE_LINE
                self._body = bytearray()
            else:  # not chunked last: the body runs to the end of the connection
                self._state = _TO_CLOSE
        elif length is not None:
            if not (length.isdigit() and length.isascii()):  # repeated, it must repeat one value
                values = {v.strip() for v in length.split(",")}
                length = values.pop()
                if values or not (length.isdigit() and length.isascii()):
                    raise BadAnswer(f"invalid Content-Length: {headers['content-length'][:40]!r}")
            self._left = int(length)
            if self._left > MAX_ANSWER_BYTES:
                raise BadAnswer(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
            self._state = _LENGTH
        elif status in (204, 304):
            self._state, self._left = _LENGTH, 0
        else:
            self._keep_alive = False
            self._state = _TO_CLOSE

    def _chunks(self, buf: bytearray) -> bool:
        """Consume chunked framing from `buf` into the body; True once the last chunk and trailers came."""
        while True:
            left = self._left
            if left > 0:
                take = buf[:left]
                del buf[:left]
                self._body += take
                self._left = left - len(take)
                if self._left:
                    return False
                self._left = _CHUNK_END
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise BadAnswer("a chunk size or trailer line is larger than 64 KiB")
                return False
            line = bytes(buf[:end])
            del buf[: end + 2]
            if left == _CHUNK_END:
                if line:
                    raise BadAnswer("a chunk is longer than its announced size")
                self._left = _SIZE_LINE
            elif left == _SIZE_LINE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _CHUNK_SIZE.fullmatch(size):
                    raise BadAnswer(f"invalid chunk size: {line[:40]!r}")
                self._left = int(size, 16) or _TRAILERS
                if len(self._body) + int(size, 16) > MAX_ANSWER_BYTES:
                    raise BadAnswer(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
            elif not line:  # the empty line that ends the trailers
                return True
