"""Usage on streams (`PLPROXY_STREAM_USAGE=inject`, the default), beyond the plain chat stream that
test_pipeline_e2e covers: for every shape of stream the client receives, event for event, the JSON it would
have received without injection (no `"usage": null`, no usage-only chunk) while the record has the usage;
an upstream that refuses `stream_options` gets the call again as the client sent it; an upstream that gives
no usage at all leaves the record without tokens.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import record_for, sse_events
from tests.proxy_fixtures import RunningProxy

MESSAGES = [{"role": "user", "content": "Say hi to Ada"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str | None, bytes]:
    async with http.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
        return r.status, r.headers.get("X-PL-Log-Id"), await r.read()


STREAMS = [
    pytest.param("chat/completions", {"model": "fake-many-chunks-3", "messages": MESSAGES}, id="chat"),
    pytest.param("chat/completions", {"model": "fake-tools", "messages": MESSAGES, "tools": TOOLS},
                 id="chat-tool-calls"),
    pytest.param("chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "n": 2}, id="chat-n2"),
    pytest.param("chat/completions", {"model": "fake-refusal", "messages": MESSAGES}, id="chat-refusal"),
    pytest.param("chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES,
                                      "stream_options": {"include_usage": False}}, id="chat-usage-false"),
    pytest.param("completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["Once", "Twice"]},
                 id="completions"),
]


@pytest.mark.parametrize(("path", "request_body"), STREAMS)
async def test_the_client_gets_its_own_stream_and_the_record_the_usage(
    proxy: RunningProxy, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn,
    http: aiohttp.ClientSession, path: str, request_body: dict[str, Any],
) -> None:
    request_body = {**request_body, "stream": True}
    _, _, direct = await post(http, f"{fake_openai.base_url}/{path}", request_body)
    status, log_id, proxied = await post(http, f"{proxy.base_url}/{path}", request_body)
    assert status == 200
    assert log_id is not None
    assert fake_openai.received[-1].json()["stream_options"]["include_usage"] is True
    assert sse_events(proxied) == sse_events(direct)  # event for event, the same JSON
    assert b'"usage"' not in proxied
    with_usage = {**request_body, "stream_options": {"include_usage": True}}
    _, _, asked = await post(http, f"{fake_openai.base_url}/{path}", with_usage)
    usage = sse_events(asked)[-2]["usage"]
    body = await record_for(promptlayer, log_id)
    assert body["input_tokens"] == usage["prompt_tokens"]
    assert body["output_tokens"] == usage["completion_tokens"]
    assert body["status"] == "SUCCESS"


async def test_an_upstream_that_refuses_stream_options_gets_the_call_as_sent(
    proxy: RunningProxy, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    request_body = {"model": "fake-rejects-stream-options", "messages": MESSAGES, "stream": True}
    _, _, direct = await post(http, f"{fake_openai.base_url}/chat/completions", request_body)
    before = len(fake_openai.received)
    status, log_id, proxied = await post(http, f"{proxy.base_url}/chat/completions", request_body)
    assert status == 200
    assert sse_events(proxied) == sse_events(direct)
    first, second = fake_openai.received[before:]
    assert first.json()["stream_options"] == {"include_usage": True}
    assert second.body == orjson.dumps(request_body)  # again, byte for byte as the client sent it
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "SUCCESS"
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo: Say hi to Ada"}]
    # no usage from this upstream: the record says so by leaving tokens out, and never makes them up
    assert "input_tokens" not in body
    assert "output_tokens" not in body

    # remembered for the route: the next stream goes out untouched, in one request
    before = len(fake_openai.received)
    status, _, _ = await post(http, f"{proxy.base_url}/chat/completions", {**request_body, "n": 1})
    assert status == 200
    assert [r.body for r in fake_openai.received[before:]] == [orjson.dumps({**request_body, "n": 1})]


async def test_other_errors_to_an_injected_stream_pass_through_untouched(
    proxy: RunningProxy, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    request_body = {"model": "fake-error-400", "messages": MESSAGES, "stream": True}
    _, _, direct = await post(http, f"{fake_openai.base_url}/chat/completions", request_body)
    before = len(fake_openai.received)
    status, log_id, proxied = await post(http, f"{proxy.base_url}/chat/completions", request_body)
    assert (status, proxied) == (400, direct)
    assert len(fake_openai.received) == before + 1  # not retried
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_ERROR")
    assert body["error_message"] == orjson.loads(direct)["error"]["message"]
