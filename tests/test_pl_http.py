"""pl_http, the exporter's HTTP/1.1 client, against real servers on loopback: aiohttp apps for what a
correct server does, raw asyncio servers for what a broken or hostile one does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import trustme
from aiohttp import web

from plproxy.pl_http import (
    MAX_ANSWER_BYTES,
    BadAnswer,
    ConnectionFailed,
    InvalidHeaderValue,
    PromptLayerHTTP,
    RequestTimeout,
)

KEY = "pl_test_key_0123456789abcdef"
BODY = b'{"provider": "openai", "model": "gpt-4o-mini"}'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio server on 127.0.0.1 running `handler` per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(match[1])) if match else b""
        self.requests.append(body)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[Callable[..., PromptLayerHTTP]]:
    made: list[PromptLayerHTTP] = []

    def make(base_url: str, **kwargs: Any) -> PromptLayerHTTP:
        kwargs.setdefault("timeout", 2.0)
        client = PromptLayerHTTP(base_url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    await asyncio.sleep(0)  # let the transports finish closing


def echo_app(peers: set[Any] | None = None) -> web.Application:
    """Answers 201 with the request's path, key, size and hash; records each connection's peer."""

    async def handle(request: web.Request) -> web.Response:
        if peers is not None:
            peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.read()
        return web.json_response(
            {
                "id": 1,
                "path": request.path,
                "key": request.headers.get("X-API-KEY"),
                "content_type": request.headers.get("Content-Type"),
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            },
            status=201,
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    return app


async def start_app(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner


@pytest_asyncio.fixture
async def app_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> str:
        runner = await start_app(app, ssl_context)
        runners.append(runner)
        scheme = "https" if ssl_context else "http"
        return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


# ---- a correct server ------------------------------------------------------------------------------------


async def test_posts_json_with_the_key_and_reuses_one_connection(app_server, clients) -> None:  # type: ignore[no-untyped-def]
    peers: set[Any] = set()
    base = await app_server(echo_app(peers))
    client = clients(base + "/")
    for _ in range(20):
        answer = await client.post("/log-request", BODY, KEY)
        assert answer.status == 201
    assert len(peers) == 1
    assert json.loads((await client.post("/log-request", BODY, f" {KEY}\t")).body)["key"] == KEY
    echoed = json.loads(answer.body)
    assert echoed["path"] == "/log-request"
    assert echoed["key"] == KEY
    assert echoed["content_type"] == "application/json"
    assert echoed["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert answer.headers["content-type"].startswith("application/json")


async def test_concurrent_calls_use_one_connection_each_then_reuse_them(app_server, clients) -> None:  # type: ignore[no-untyped-def]
    peers: set[Any] = set()
    base = await app_server(echo_app(peers))
    client = clients(base, max_idle=4)
    answers = await asyncio.gather(*(client.post("/log-request", BODY, KEY) for _ in range(4)))
    assert [a.status for a in answers] == [201] * 4
    assert len(peers) == 4
    for _ in range(3):
        await asyncio.gather(*(client.post("/log-request", BODY, KEY) for _ in range(4)))
    assert len(peers) == 4  # no new connection


async def test_a_path_in_the_base_url_prefixes_every_call(app_server, clients) -> None:  # type: ignore[no-untyped-def]
    base = await app_server(echo_app())
    answer = await clients(base + "/api/v2/").post("/rest/track-score", BODY, KEY)
    assert b'"path": "/api/v2/rest/track-score"' in answer.body


async def test_chunked_answer(app_server, clients) -> None:  # type: ignore[no-untyped-def]
    peers: set[Any] = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        await request.read()
        response = web.StreamResponse(status=429, headers={"Retry-After": "7"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"success": false, ', b'"message": "', b"x" * 100_000, b'"}'):
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/log-request", handle)
    client = clients(await app_server(app))
    for _ in range(2):
        answer = await client.post("/log-request", BODY, KEY)
        assert answer.status == 429
        assert answer.headers["retry-after"] == "7"
        assert answer.body == b'{"success": false, "message": "' + b"x" * 100_000 + b'"}'
    assert len(peers) == 1  # a complete chunked answer leaves the connection reusable


async def test_connection_close_answer_is_read_and_not_reused(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\n{"id": 5}')
        await writer.drain()

    server = await raw_server(handler)
    client = clients(server.url)
    for _ in range(2):
        answer = await client.post("/log-request", BODY, KEY)
        assert (answer.status, answer.body) == (200, b'{"id": 5}')
    assert server.connections == 2


async def test_answer_without_length_is_read_to_the_close(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.0 201 Created\r\nContent-Type: application/json\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'{"id": ')
        await writer.drain()
        writer.write(b"77}")

    server = await raw_server(handler)
    client = clients(server.url)
    answer = await client.post("/log-request", BODY, KEY)
    assert (answer.status, answer.body) == (201, b'{"id": 77}')
    answer = await client.post("/log-request", BODY, KEY)
    assert server.connections == 2


async def test_interim_answers_and_no_content(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\nx-a: 2\r\n\r\n")

    server = await raw_server(handler)
    client = clients(server.url)
    for _ in range(2):
        answer = await client.post("/log-request", BODY, KEY)
        assert (answer.status, answer.body, answer.headers["x-a"]) == (204, b"", "1, 2")
    assert server.connections == 1


async def test_large_body_arrives_intact(app_server, clients) -> None:  # type: ignore[no-untyped-def]
    base = await app_server(echo_app())
    body = b'{"blob": "' + bytes(range(97, 123)) * (5 * 1024 * 1024 // 26) + b'"}'
    answer = await clients(base).post("/log-request", body, KEY)
    assert answer.status == 201
    echoed = json.loads(answer.body)
    assert (echoed["size"], echoed["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


# ---- keep-alive races --------------------------------------------------------------------------------


async def test_a_reused_connection_the_server_dropped_is_retried_once_on_a_new_one(  # type: ignore[no-untyped-def]
    raw_server, clients
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # answers one request per connection, then closes it when the next one arrives: the server
        # decided to drop the idle connection just as the client sent on it
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\n{"id": 1}')
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        dropped.append(1)

    dropped: list[int] = []
    server = await raw_server(handler)
    client = clients(server.url)
    for _ in range(3):
        answer = await client.post("/log-request", BODY, KEY)
        assert answer.status == 201
    assert server.connections == 3  # each later call: the previous connection, dropped, then a new one
    assert len(dropped) == 2
    assert server.requests == [BODY] * 3  # each answered call's body arrived in full exactly once


async def test_an_idle_connection_closed_by_the_server_is_not_used(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\n{"id": 1}')
        await writer.drain()  # then the handler returns: the connection is closed while idle

    server = await raw_server(handler)
    client = clients(server.url)
    await client.post("/log-request", BODY, KEY)
    await asyncio.sleep(0.1)
    assert (await client.post("/log-request", BODY, KEY)).status == 201
    assert server.connections == 2
    assert server.requests == [BODY] * 2


async def test_a_fresh_connection_closed_without_answer_is_an_error(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    server = await raw_server(handler)
    with pytest.raises(ConnectionFailed, match="before any answer"):
        await clients(server.url).post("/log-request", BODY, KEY)
    assert server.connections == 1


async def test_a_connection_cut_mid_answer_is_an_error(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 201 Created\r\nContent-Length: 64\r\n\r\n{"id": ')
        await writer.drain()

    server = await raw_server(handler)
    with pytest.raises(ConnectionFailed, match="mid-answer"):
        await clients(server.url).post("/log-request", BODY, KEY)


# ---- failures ----------------------------------------------------------------------------------------


async def test_a_stalled_server_times_out_and_the_connection_is_closed(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            await reader.read()  # never answers; returns at the client's close
            closed.set()
        else:
            writer.write(b'HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\n{"id": 2}')
            await writer.drain()
            await reader.read()

    server = await raw_server(handler)
    client = clients(server.url, timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout, match=r"within 0\.3s"):
        await client.post("/log-request", BODY, KEY)
    assert 0.25 < loop.time() - started < 1.5
    await asyncio.wait_for(closed.wait(), 2)
    assert (await client.post("/log-request", BODY, KEY)).body == b'{"id": 2}'
    assert server.connections == 2


async def test_connect_and_tls_handshake_are_within_the_timeout(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, then never answers the TLS handshake

    server = await raw_server(handler)
    client = clients(f"https://127.0.0.1:{server.port}", timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout):
        await client.post("/log-request", BODY, KEY)
    assert loop.time() - started < 1.5


async def test_connection_refused(clients) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionFailed, match=f"cannot connect to http://127.0.0.1:{port}"):
        await clients(f"http://127.0.0.1:{port}").post("/log-request", BODY, KEY)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 2O1 Created\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 201Created\r\n\r\n", "status line"),
        (b"HTTP/1.1 201 Created\r\nno colon here\r\n\r\n", "not an HTTP header line"),
        (b"HTTP/1.1 201 Created\r\n folded: x\r\n\r\n", "not an HTTP header line"),
        (b"HTTP/1.1 201 Created\r\nX: a\nb\r\n\r\n", "bare CR or LF"),
        (b"HTTP/1.1 201 Created\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 201 Created\r\nContent-Length: 1, 2\r\n\r\nx", "invalid Content-Length"),
        (b"HTTP/1.1 201 Created\r\nContent-Length: 99999999999\r\n\r\n", "larger than"),
        (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "longer than"),
        (b"HTTP/1.1 201 Created\r\n" + b"X-Pad: " + b"p" * 70_000, "larger than 64 KiB"),
    ],
)
async def test_garbage_answers_are_refused(raw_server, clients, answer: bytes, why: str) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    server = await raw_server(handler)
    with pytest.raises(BadAnswer, match=why):
        await clients(server.url).post("/log-request", BODY, KEY)


async def test_an_answer_above_the_cap_is_refused_without_a_length(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(MAX_ANSWER_BYTES // len(chunk) + 2):
            writer.write(chunk)
            await writer.drain()

    server = await raw_server(handler)
    with pytest.raises(BadAnswer, match="larger than"):
        await clients(server.url).post("/log-request", BODY, KEY)


@pytest.mark.parametrize("key", ["pl_key\r\nX-Injected: 1", "pl_key\n", "pl_\x00key", "pl_kéy_€", " \t", ""])
async def test_a_key_that_is_no_header_value_is_refused_before_anything_is_sent(  # type: ignore[no-untyped-def]
    raw_server, clients, key: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    server = await raw_server(handler)
    with pytest.raises(InvalidHeaderValue) as caught:
        await clients(server.url).post("/log-request", BODY, key)
    assert str(caught.value) == "the API key is not a valid HTTP header value"
    await asyncio.sleep(0.05)
    assert server.connections == 0


async def test_close_is_idempotent_and_fails_calls_in_flight(raw_server, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()

    server = await raw_server(handler)
    client = clients(server.url)
    call = asyncio.ensure_future(client.post("/log-request", BODY, KEY))
    while not server.requests:
        await asyncio.sleep(0.01)
    client.close()
    client.close()
    with pytest.raises(ConnectionFailed, match="closed"):
        await call


# ---- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_https_with_a_trusted_self_signed_certificate(app_server, clients, ca) -> None:  # type: ignore[no-untyped-def]
    peers: set[Any] = set()
    base = await app_server(echo_app(peers), server_context(ca))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    client = clients(base, ssl_context=trusting)
    for _ in range(3):
        answer = await client.post("/log-request", BODY, KEY)
        assert answer.status == 201
        assert b'"key": "' + KEY.encode() + b'"' in answer.body
    assert len(peers) == 1


async def test_https_refuses_an_untrusted_certificate(app_server, clients, ca) -> None:  # type: ignore[no-untyped-def]
    base = await app_server(echo_app(), server_context(ca))
    with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await clients(base).post("/log-request", BODY, KEY)


def test_base_url_must_be_http() -> None:
    for url in ("ftp://127.0.0.1/", "127.0.0.1:8000", "http:///x"):
        with pytest.raises(ValueError, match="http"):
            PromptLayerHTTP(url)
