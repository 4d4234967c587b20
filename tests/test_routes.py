"""Several upstreams from one proxy: `PLPROXY_ROUTES` mounts each at `/<name>/…` beside the default `/v1/`.

The upstream is chosen by configuration only: a path goes to the route its first segment names, below that
route's base, and nothing a client sends (an absolute-form target, `Host`, forwarding headers, dot
segments) reaches another host or leaves its mount.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import chat_text, client, record_for
from tests.proxy_fixtures import RunningProxy, StartProxy

MESSAGES = [{"role": "user", "content": "Say hi to Ada"}]


@pytest.fixture
async def local() -> Any:
    """A second fake OpenAI-compatible server, standing for a local one (llama.cpp, vLLM, Ollama)."""
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def routed(
    start_proxy: StartProxy, fake_anthropic: FakeAnthropic, local: FakeOpenAI
) -> RunningProxy:
    return await start_proxy(PLPROXY_ROUTES=f"anthropic={fake_anthropic.base_url},local={local.base_url}")


async def test_each_mount_reaches_its_upstream_and_is_recorded(
    routed: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, local: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
) -> None:
    async with client(routed.base_url) as default:
        raw = await default.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    default_id = raw.headers["X-PL-Log-Id"]
    async with client(f"{routed.url}/local") as to_local:
        raw = await to_local.chat.completions.with_raw_response.create(model="gemma-3", messages=MESSAGES)
    local_id = raw.headers["X-PL-Log-Id"]
    async with anthropic.AsyncAnthropic(base_url=f"{routed.url}/anthropic", api_key="sk-ant-x",
                                        max_retries=0) as to_anthropic:
        raw_message = await to_anthropic.messages.with_raw_response.create(
            model="claude-fake-echo", max_tokens=32, messages=MESSAGES)
    anthropic_id = raw_message.headers["X-PL-Log-Id"]

    assert [r.path_qs for r in fake_openai.received] == ["/v1/chat/completions"]
    assert [r.path_qs for r in local.received] == ["/v1/chat/completions"]
    assert [r.path_qs for r in fake_anthropic.received] == ["/v1/messages"]
    ids = {"default": default_id, "local": local_id, "anthropic": anthropic_id}
    records = {name: await record_for(promptlayer, log_id) for name, log_id in ids.items()}
    assert {name: (r["provider"], r["model"]) for name, r in records.items()} == {
        "default": ("openai", "gpt-4o-mini"),
        "local": ("openai", "gemma-3"),
        "anthropic": ("anthropic", "claude-fake-echo"),
    }
    assert chat_text(records["local"]) == "echo: Say hi to Ada"


async def test_unrecorded_paths_under_a_route_are_relayed(
    routed: RunningProxy, local: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{routed.url}/local/models?limit=2") as response:
        assert response.status == 200
        assert "X-PL-Log-Id" not in response.headers
        assert [m["id"] for m in (await response.json())["data"]][:1] == ["gpt-4o-mini"]
    assert local.received[-1].path_qs == "/v1/models?limit=2"


async def raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


@pytest.mark.parametrize(("target", "headers", "status", "reaches"), [
    # the absolute form's host is ignored: only its path counts
    ("http://127.0.0.2:1/local/models", "", 200, ("local", "/v1/models")),
    ("https://api.anthropic.com/local/models", "", 200, ("local", "/v1/models")),
    ("http://evil.example/elsewhere/models", "", 404, None),
    # Host and forwarding headers choose nothing
    ("/local/models", "X-Forwarded-Host: evil.example\r\nForwarded: host=evil.example\r\n", 200,
     ("local", "/v1/models")),
    # a path never leaves its mount, even for another configured one
    ("/local/../anthropic/v1/messages", "", 400, None),
    ("/local/%2e%2e/anthropic/v1/messages", "", 400, None),
    ("/anthropic/v1/../../local/models", "", 400, None),
    ("/local/a/../models", "", 200, ("local", "/v1/models")),
    # %2F stays encoded: never a separator that could climb
    ("/local/..%2Fv1/models", "", 200, ("local", "/v1/..%2Fv1/models")),
    # unknown mounts are not guessed
    ("/Local/models", "", 404, None),
    ("/localhost/models", "", 404, None),
])
async def test_a_client_never_picks_the_host(
    routed: RunningProxy, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, local: FakeOpenAI,
    target: str, headers: str, status: int, reaches: tuple[str, str] | None,
) -> None:
    port = int(routed.url.rsplit(":", 1)[1])
    answer = await raw_request(
        port, f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n{headers}Connection: close\r\n\r\n".encode())
    assert int(answer.split(b" ", 2)[1]) == status
    arrived = {
        "default": [r.path_qs for r in fake_openai.received],
        "local": [r.path_qs for r in local.received],
        "anthropic": [r.path_qs for r in fake_anthropic.received],
    }
    expected: dict[str, list[str]] = {"default": [], "local": [], "anthropic": []}
    if reaches is not None:
        expected[reaches[0]] = [reaches[1]]
        assert [r.headers["Host"] for r in local.received] == [local.origin.split("://")[1]]
    assert arrived == expected


async def test_unknown_mount_names_the_configured_ones(
    routed: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{routed.url}/openrouter/v1/chat/completions", json={}) as response:
        assert response.status == 404
        message = (await response.json())["error"]["message"]
    assert "/v1/, /anthropic/, /local/" in message


# --- a bare OpenAI-compatible server: what some local servers omit never breaks a record -------------

BARE_TEXT = ["Hello", ",", " Ada", "!"]


async def _bare_chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if "stream_options" in body:  # FastAPI with extra="forbid", as some servers are
        detail = [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
                   "msg": "Extra inputs are not permitted", "input": body["stream_options"]}]
        return web.json_response({"detail": detail}, status=422)
    if not body.get("stream"):  # no id, created, model, index, finish_reason or usage
        message = {"role": "assistant", "content": "".join(BARE_TEXT)}
        return web.json_response({"choices": [{"message": message}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in BARE_TEXT:
        await response.write(f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def bare() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _bare_chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/v1"
    await server.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_that_omits_ids_created_and_usage_still_gives_a_record(
    start_proxy: StartProxy, bare: str, promptlayer: PromptLayerStandIn, stream: bool
) -> None:
    """Streamed, the server also refuses the injected stream_options with a 422: plproxy sends again."""
    proxy = await start_proxy(PLPROXY_ROUTES=f"local={bare}")
    async with client(f"{proxy.url}/local") as to_local:
        raw = await to_local.chat.completions.with_raw_response.create(
            model="qwen2.5:0.5b", messages=MESSAGES, stream=stream)
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()])
        else:
            text = raw.parse().choices[0].message.content
    assert text == "Hello, Ada!"
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert chat_text(body) == text
    assert (body["model"], body["status"]) == ("qwen2.5:0.5b", "SUCCESS")  # the model asked for
    assert "input_tokens" not in body
    assert "output_tokens" not in body
