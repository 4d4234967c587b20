"""Everything that is not an LLM call (models, files, batches, audio, images, moderations, …) is relayed
unchanged and not recorded: the request reaches the upstream byte for byte (multipart uploads included), the
answer reaches the client byte for byte (binary audio included), and no record, no `X-PL-Log-Id`.

The upstream here is a small loopback app whose answers depend only on what it received (method, path,
content type, body), so a direct call and a proxied one must get the very same bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fakes.promptlayer import PromptLayerStandIn
from tests.proxy_fixtures import RunningProxy, StartProxy

AUDIO = bytes(range(256)) * 64  # 16 KiB that are not UTF-8
JSONL = b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
PNG = b"\x89PNG\r\n\x1a\n" + bytes(512)


@dataclass
class Arrival:
    method: str
    path_qs: str
    content_type: str
    body: bytes


@dataclass
class Upstream:
    url: str = ""
    arrivals: list[Arrival] = field(default_factory=list)


def _digest(arrival: Arrival) -> str:
    seen = f"{arrival.method} {arrival.path_qs} {arrival.content_type}".encode() + arrival.body
    return hashlib.sha256(seen).hexdigest()[:16]


async def _answer(request: web.Request, upstream: Upstream) -> web.StreamResponse:
    arrival = Arrival(request.method, request.rel_url.raw_path_qs, request.headers.get("Content-Type", ""),
                      await request.read())
    upstream.arrivals.append(arrival)
    digest, path = _digest(arrival), request.path
    if path == "/v1/audio/speech":
        return web.Response(body=digest.encode() + AUDIO, content_type="audio/mpeg")
    if path.endswith("/content"):
        return web.Response(body=JSONL, content_type="application/octet-stream")
    if path == "/v1/audio/transcriptions":
        answer: dict[str, Any] = {"text": f"transcript {digest}"}
    elif path == "/v1/images/generations":
        image = base64.b64encode(digest.encode()).decode()
        answer = {"created": 1_700_000_000, "data": [{"b64_json": image}]}
    elif path == "/v1/files" and request.method == "POST":
        answer = {"id": f"file-{digest}", "object": "file", "bytes": len(arrival.body), "created_at": 1,
                  "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}
    else:
        answer = {"object": "echo", "method": request.method, "path": arrival.path_qs, "digest": digest}
    return web.Response(body=json.dumps(answer, indent=1).encode(), content_type="application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _answer(request, state)

    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}/v1"
    yield state
    await server.close()


@pytest.fixture
async def relay(start_proxy: StartProxy, upstream: Upstream) -> RunningProxy:
    return await start_proxy(PLPROXY_UPSTREAM=upstream.url)


BOUNDARY = "plproxy-test-boundary-1f2e3d"


def multipart(*parts: tuple[str, str | bytes, str | None, str | None]) -> tuple[bytes, str]:
    """A multipart/form-data body with a fixed boundary (so two sends are the same bytes), and its type."""
    out = b""
    for name, value, filename, content_type in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


# (method, path, what to send): a JSON body, a multipart body and its content type, or nothing
TRANSCRIPTION = multipart(("model", "whisper-1", None, None), ("file", AUDIO, "hello.wav", "audio/wav"))
TRANSLATION = multipart(("model", "whisper-1", None, None), ("file", AUDIO, "bonjour.mp3", "audio/mpeg"))
IMAGE_EDIT = multipart(("model", "gpt-image-1", None, None), ("prompt", "add a hat", None, None),
                       ("image[]", PNG, "cat.png", "image/png"))
UPLOAD = multipart(("purpose", "batch", None, None), ("file", JSONL, "batch.jsonl", "application/jsonl"))
CALLS = [
    ("GET", "/models", None),
    ("GET", "/models/gpt-4o", None),
    ("POST", "/audio/transcriptions", TRANSCRIPTION),
    ("POST", "/audio/translations", TRANSLATION),
    ("POST", "/audio/speech", {"model": "gpt-4o-mini-tts", "input": "Hello", "voice": "alloy"}),
    ("POST", "/images/generations", {"model": "gpt-image-1", "prompt": "a cat", "n": 1}),
    ("POST", "/images/edits", IMAGE_EDIT),
    ("POST", "/moderations", {"model": "omni-moderation-latest", "input": "hello"}),
    ("POST", "/files", UPLOAD),
    ("GET", "/files/file-abc/content", None),
    ("DELETE", "/files/file-abc", None),
    ("POST", "/batches", {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"}),
    ("POST", "/responses/resp_123/cancel", None),
    ("GET", "/responses/resp_123?include[]=file_search_call.results", None),
    ("POST", "/vector_stores", {"name": "docs"}),
]


async def send(http: aiohttp.ClientSession, base: str, method: str, path: str,
               payload: Any) -> tuple[int, str, bytes, dict[str, str]]:
    kwargs: dict[str, Any] = {}
    headers = {"Authorization": "Bearer sk-x"}
    if isinstance(payload, tuple):
        kwargs["data"], headers["Content-Type"] = payload
    elif payload is not None:
        kwargs["json"] = payload
    async with http.request(method, f"{base}{path}", headers=headers, **kwargs) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read(), dict(r.headers)


@pytest.mark.parametrize(("method", "path", "payload"), CALLS, ids=[f"{m} {p}" for m, p, _ in CALLS])
async def test_relayed_byte_for_byte_and_not_recorded(
    relay: RunningProxy, upstream: Upstream, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession,
    method: str, path: str, payload: Any,
) -> None:
    direct = await send(http, upstream.url, method, path, payload)
    proxied = await send(http, relay.base_url, method, path, payload)
    sent, forwarded = upstream.arrivals
    assert forwarded == sent  # the upstream got the same request, byte for byte
    # and the client got the same answer, byte for byte
    assert proxied[:3] == direct[:3]
    assert direct[0] == 200
    assert "X-PL-Log-Id" not in proxied[3]
    await asyncio.to_thread(relay.store.sync)
    assert sum(relay.store.counts().values()) == 0
    assert promptlayer.log_requests == []


async def test_official_client_calls_are_relayed_and_not_recorded(
    relay: RunningProxy, upstream: Upstream
) -> None:
    async with openai.AsyncOpenAI(base_url=relay.base_url, api_key="sk-x", max_retries=0) as client:
        raw = await client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("hello.wav", AUDIO, "audio/wav"))
        assert raw.parse().text.startswith("transcript ")
        assert "X-PL-Log-Id" not in raw.headers
        image = await client.images.generate(model="gpt-image-1", prompt="a cat")
        assert image.data is not None
        speech = await client.audio.speech.create(model="gpt-4o-mini-tts", input="Hello", voice="alloy")
        assert speech.content.endswith(AUDIO)
        uploaded = await client.files.create(file=("batch.jsonl", JSONL), purpose="batch")
        assert uploaded.bytes == len(upstream.arrivals[-1].body)
    assert AUDIO in upstream.arrivals[0].body  # the multipart upload arrived whole
    await asyncio.to_thread(relay.store.sync)
    assert sum(relay.store.counts().values()) == 0
