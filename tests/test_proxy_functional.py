"""The proxy is invisible: real `openai` clients get through plproxy exactly what the upstream gives.

Real servers on loopback: the fake OpenAI upstream and plproxy itself (in-process, under aiohttp's test
server). Sync clients run in a thread so the proxy's event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import time
import uuid
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.fakes.openai_upstream import GZIP_BODY
from tests.proxy_fixtures import RunningProxy, StartProxy

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hi to Ada"}],
    "temperature": 0.2,
}


def sync_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="sk-test-canary-0001", max_retries=0)


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test-canary-0001", max_retries=0)


async def raw_bodies(base_url: str, call: str, **kwargs: Any) -> bytes:
    client = async_client(base_url)
    resource: Any = client
    for part in call.split("."):
        resource = getattr(resource, part)
    response = await resource.with_raw_response.create(**kwargs) if call != "models" else None
    if call == "models":
        response = await client.models.with_raw_response.list()
    await client.close()
    return bytes(response.http_response.content)


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("chat.completions", CHAT),
        ("chat.completions", {**CHAT, "model": "fake-tools", "tools": []}),
        ("completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time"}),
        ("embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}),
        ("models", {}),
    ],
)
async def test_bodies_equal_direct_calls(
    proxy: RunningProxy, fake_openai: Any, call: str, kwargs: Any
) -> None:
    kwargs = {key: value for key, value in kwargs.items() if value != []}
    direct = await raw_bodies(fake_openai.base_url, call, **kwargs)
    proxied = await raw_bodies(proxy.base_url, call, **kwargs)
    assert proxied == direct
    assert len(direct) > 20


async def test_sync_client_through_proxy(proxy: RunningProxy, fake_openai: Any) -> None:
    def run(base_url: str) -> Any:
        return sync_client(base_url).chat.completions.create(**CHAT).model_dump()

    direct = await asyncio.to_thread(run, fake_openai.base_url)
    proxied = await asyncio.to_thread(run, proxy.base_url)
    assert proxied == direct
    assert proxied["choices"][0]["message"]["content"] == "echo: Say hi to Ada"


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_chunks_equal_direct(proxy: RunningProxy, fake_openai: Any, include_usage: bool) -> None:
    async def run(base_url: str) -> list[dict[str, Any]]:
        client = async_client(base_url)
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await client.chat.completions.create(**CHAT, stream=True, **extra)
        chunks = [chunk.model_dump(exclude_unset=True) async for chunk in stream]
        await client.close()
        return chunks

    direct = await run(fake_openai.base_url)
    proxied = await run(proxy.base_url)
    assert proxied == direct
    assert len(direct) >= 3


async def test_sync_stream_through_proxy(proxy: RunningProxy) -> None:
    def run() -> str:
        stream = sync_client(proxy.base_url).chat.completions.create(**CHAT, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert await asyncio.to_thread(run) == "echo: Say hi to Ada"


async def test_events_reach_the_client_as_they_arrive(proxy: RunningProxy, fake_openai: Any) -> None:
    fake_openai.chunk_delay = 0.2
    client = async_client(proxy.base_url)
    stream = await client.chat.completions.create(**{**CHAT, "model": "fake-many-chunks-6"}, stream=True)
    arrivals: list[float] = []
    async for _chunk in stream:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            # the upstream is still producing: most of its events are not even sent yet
            assert fake_openai.streams[-1].events_sent <= 2
    await client.close()
    assert len(arrivals) >= 6
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(gap > 0.1 for gap in gaps) >= 4  # no coalescing: events keep their spacing


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("fake-error-400", openai.BadRequestError),
        ("fake-error-401", openai.AuthenticationError),
        ("fake-error-429", openai.RateLimitError),
        ("fake-error-500", openai.InternalServerError),
    ],
)
async def test_upstream_errors_pass_through(
    proxy: RunningProxy, fake_openai: Any, http: aiohttp.ClientSession, model: str, error: type[Exception]
) -> None:
    body = orjson.dumps({**CHAT, "model": model})
    async with http.post(f"{fake_openai.base_url}/chat/completions", data=body) as direct:
        direct_body, direct_status = await direct.read(), direct.status
        direct_retry = direct.headers.get("Retry-After")
    async with http.post(f"{proxy.base_url}/chat/completions", data=body) as proxied:
        assert proxied.status == direct_status
        assert await proxied.read() == direct_body
        assert proxied.headers.get("Retry-After") == direct_retry
    client = async_client(proxy.base_url)
    with pytest.raises(error):
        await client.chat.completions.create(**{**CHAT, "model": model})
    await client.close()


async def test_no_pl_header_reaches_upstream_and_authorization_does(
    proxy: RunningProxy, fake_openai: Any, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer sk-test-canary-0001",
        "X-PL-Tags": "a,b",
        "X-PL-Api-Key": "pl_other_workspace",
        "x-pl-anything": "1",
        "X-Pl-Metadata": "{}",
        "X-Custom": "kept",
    }
    async with http.post(
        f"{proxy.base_url}/anything/here?q=1", data=b'{"x": 1}', headers=headers
    ) as response:
        assert response.status == 200
    received = fake_openai.received[-1]
    assert received.path_qs == "/v1/anything/here?q=1"
    assert received.headers["Authorization"] == "Bearer sk-test-canary-0001"
    assert received.headers["X-Custom"] == "kept"
    assert not [name for name in received.headers if name.lower().startswith("x-pl-")]
    assert received.body == b'{"x": 1}'


async def test_hop_by_hop_headers_are_not_forwarded(
    proxy: RunningProxy, fake_openai: Any, http: aiohttp.ClientSession
) -> None:
    headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers"}
    async with http.get(f"{proxy.base_url}/anything", headers=headers) as response:
        assert response.status == 200
    received = fake_openai.received[-1].headers
    for name in ("X-Hop", "Keep-Alive", "TE"):
        assert name not in received
    assert received["Host"] == fake_openai.origin.split("://")[1]


async def test_compressed_answers_reach_the_client_byte_for_byte(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{proxy.base_url}/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == GZIP_BODY
    assert gzip.decompress(GZIP_BODY)


async def test_log_id_and_warnings(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    headers = {"X-PL-Score": "high", "X-PL-Tags": "ok"}
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=headers) as response:
        assert response.status == 200
        uuid.UUID(response.headers["X-PL-Log-Id"])
        assert response.headers.getall("X-PL-Warning") == [
            "X-PL-Score: is not a whole number from 0 to 100; ignored"
        ]
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
        assert "X-PL-Warning" not in response.headers


async def test_unrecorded_calls_are_relayed_without_log_id(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{proxy.base_url}/chat/completions", json=CHAT, headers={"X-PL-Log": "off"}
    ) as response:
        assert response.status == 200
        assert "X-PL-Log-Id" not in response.headers


def assert_openai_error(body: bytes, code: str) -> None:
    error = orjson.loads(body)["error"]
    assert error["code"] == code
    assert set(error) >= {"message", "type", "code"}
    assert "Traceback" not in error["message"]


async def test_upstream_unreachable_is_502(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    from tests.proxy_fixtures import free_port

    proxy = await start_proxy(PLPROXY_UPSTREAM=f"http://127.0.0.1:{free_port()}/v1")
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
        assert response.status == 502
        assert_openai_error(await response.read(), "upstream_unreachable")
        uuid.UUID(response.headers["X-PL-Log-Id"])


async def test_upstream_silent_before_headers_is_504(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PLPROXY_READ_TIMEOUT="0.5")
    async with http.post(
        f"{proxy.base_url}/chat/completions", json={**CHAT, "model": "fake-hang"}
    ) as response:
        assert response.status == 504
        assert_openai_error(await response.read(), "upstream_timeout")


async def test_body_over_the_limit_is_413(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(PLPROXY_MAX_BODY_MB="1")
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]})
    async with http.post(f"{proxy.base_url}/chat/completions", data=io.BytesIO(big)) as response:
        assert response.status == 413
        assert_openai_error(await response.read(), "request_too_large")
    near = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (900 * 1024)}]})
    async with http.post(f"{proxy.base_url}/chat/completions", data=near) as response:
        assert response.status == 200  # a large image-sized prompt under the limit goes through


async def test_paths_outside_the_mounts_are_404(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{proxy.url}/v2/models") as response:
        assert response.status == 404
        assert_openai_error(await response.read(), "not_found")


async def test_health_and_readiness(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{proxy.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{proxy.url}/readyz") as response:
        assert response.status == 200
    from plproxy.app_keys import STATE

    proxy.app[STATE].draining = True
    async with http.get(f"{proxy.url}/readyz") as response:
        assert response.status == 503
        assert "draining" in (await response.json())["problems"]


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


@pytest.mark.parametrize(
    ("target", "host", "expected_status", "expected_path"),
    [
        ("/v1/../x", "127.0.0.1", 400, None),
        ("/v1/%2e%2e/%2e%2e/x", "127.0.0.1", 400, None),
        ("/v1/a/%2E%2E/anything", "127.0.0.1", 200, "/v1/anything"),
        ("http://127.0.0.2:{port}/v1/anything", "127.0.0.2", 200, "/v1/anything"),
        ("http://127.0.0.3/v1/anything?x=1", "evil.example", 200, "/v1/anything?x=1"),
        ("/v1/anything", "127.0.0.9:1", 200, "/v1/anything"),
    ],
)
async def test_path_tricks_reach_only_the_configured_upstream(
    proxy: RunningProxy,
    fake_openai: Any,
    target: str,
    host: str,
    expected_status: int,
    expected_path: str | None,
) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    before = len(fake_openai.received)
    target = target.format(port=port)
    answer = await raw_request(
        port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    status = int(answer.split(b" ", 2)[1])
    assert status == expected_status
    arrived = fake_openai.received[before:]
    if expected_path is None:
        assert arrived == []
    else:
        assert [request.path_qs for request in arrived] == [expected_path]
        assert arrived[0].headers["Host"] == fake_openai.origin.split("://")[1]


async def test_client_leaving_cancels_the_upstream_stream(proxy: RunningProxy, fake_openai: Any) -> None:
    fake_openai.chunk_delay = 0.05
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.base_url}/chat/completions",
            json={**CHAT, "model": "fake-many-chunks-200", "stream": True},
        )
        await response.content.readline()
        response.close()  # the client goes away mid-stream
    for _ in range(100):
        if fake_openai.streams and fake_openai.streams[-1].client_gone:
            break
        await asyncio.sleep(0.05)
    result = fake_openai.streams[-1]
    assert result.client_gone
    assert result.events_sent < 100  # stopped long before the 200 events it would have sent
