"""Anthropic Messages through a route: the official `anthropic` client gets through plproxy exactly what the
fake Anthropic upstream gives, and each call is recorded (provider `anthropic`, `anthropic.messages.create`),
streamed or not, with text, tool_use, tool_result and thinking blocks and the usage. Keys pass through and
never reach a record. The PromptLayer stand-in fails the test on any record outside the schema.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from tests.fakes.anthropic_upstream import SIGNATURE, THINKING_TEXT, FakeAnthropic
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import record_for, sse_events
from tests.proxy_fixtures import RunningProxy, StartProxy

CANARY = "sk-ant-test-canary-7f3e"
# Not a real model name: a real one reaches the client's deprecation list some day and warns.
MODEL = "claude-fake-echo"
SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Say hi to Ada"}]
TOOLS = [
    {"name": "get_weather", "description": "Weather in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}}},
]


@pytest.fixture
async def routed(start_proxy: StartProxy, fake_anthropic: FakeAnthropic) -> RunningProxy:
    return await start_proxy(PLPROXY_ROUTES=f"anthropic={fake_anthropic.base_url}")


def client(base_url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=CANARY, max_retries=0)


async def create(base_url: str, **kwargs: Any) -> tuple[str | None, dict[str, Any]]:
    """One non-streamed call: (its X-PL-Log-Id, the message as the client parsed it)."""
    async with client(base_url) as c:
        raw = await c.messages.with_raw_response.create(max_tokens=64, **kwargs)
        return raw.headers.get("X-PL-Log-Id"), (await raw.parse()).model_dump(exclude_unset=True)


async def stream(base_url: str, **kwargs: Any) -> tuple[str | None, list[dict[str, Any]], dict[str, Any]]:
    """One streamed call: (its X-PL-Log-Id, every event, the message the SDK accumulated from them)."""
    async with client(base_url) as c:
        raw = await c.messages.with_raw_response.create(max_tokens=64, stream=True, **kwargs)
        events = [event.model_dump(exclude_unset=True) async for event in await raw.parse()]
    async with client(base_url) as c, c.messages.stream(max_tokens=64, **kwargs) as accumulating:
        message = (await accumulating.get_final_message()).model_dump(exclude_unset=True)
    return raw.headers.get("X-PL-Log-Id"), events, message


def assert_anthropic(body: dict[str, Any], model: str) -> None:
    assert body["provider"] == "anthropic"
    assert body["function_name"] == "anthropic.messages.create"
    assert body["model"] == model
    assert "api_type" not in body
    assert body["parameters"] == {"max_tokens": 64}
    assert CANARY not in json.dumps(body)


async def test_message_is_relayed_and_recorded(
    routed: RunningProxy, fake_anthropic: FakeAnthropic, promptlayer: PromptLayerStandIn
) -> None:
    _, direct = await create(fake_anthropic.base_url, model=MODEL, system=SYSTEM,
                             messages=MESSAGES)
    log_id, proxied = await create(f"{routed.url}/anthropic", model=MODEL, system=SYSTEM,
                                   messages=MESSAGES)
    assert proxied == direct
    assert fake_anthropic.received[-1].path_qs == "/v1/messages"
    assert fake_anthropic.received[-1].headers["Authorization"] == f"Bearer {CANARY}"
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert_anthropic(body, MODEL)
    assert body["input"] == {"type": "chat", "messages": [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "text", "text": "Say hi to Ada"}]},
    ]}
    assert body["output"] == {"type": "chat", "messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "echo: Say hi to Ada"}]},
    ]}
    assert (body["input_tokens"], body["output_tokens"]) == (
        direct["usage"]["input_tokens"], direct["usage"]["output_tokens"])
    assert body["status"] == "SUCCESS"


async def test_stream_is_relayed_event_for_event_and_recorded_like_the_message(
    routed: RunningProxy, fake_anthropic: FakeAnthropic, promptlayer: PromptLayerStandIn
) -> None:
    request = {"model": MODEL, "system": SYSTEM, "messages": MESSAGES}
    _, direct_events, _ = await stream(fake_anthropic.base_url, **request)
    log_id, events, message = await stream(f"{routed.url}/anthropic", **request)
    assert events == direct_events
    assert log_id is not None
    streamed = await record_for(promptlayer, log_id)
    unstreamed_id, _ = await create(f"{routed.url}/anthropic", **request)
    assert unstreamed_id is not None
    unstreamed = await record_for(promptlayer, unstreamed_id)
    for key in ("input", "output", "input_tokens", "output_tokens", "model", "provider", "status"):
        assert streamed[key] == unstreamed[key], key
    assert streamed["output_tokens"] == message["usage"]["output_tokens"]  # from message_delta
    assert streamed["input_tokens"] == message["usage"]["input_tokens"]  # from message_start


@pytest.mark.parametrize("streamed", [False, True])
async def test_tool_use_becomes_tool_calls_with_the_toolu_ids(
    routed: RunningProxy, promptlayer: PromptLayerStandIn, streamed: bool
) -> None:
    request = {"model": "fake-tools", "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": TOOLS, "tool_choice": {"type": "auto"}}
    if streamed:
        log_id, _, message = await stream(f"{routed.url}/anthropic", **request)
    else:
        log_id, message = await create(f"{routed.url}/anthropic", **request)
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    uses = [block for block in message["content"] if block["type"] == "tool_use"]
    assert [u["id"][:6] for u in uses] == ["toolu_", "toolu_"]
    assert body["output"]["messages"] == [{
        "role": "assistant",
        "content": [{"type": "text", "text": "Let me check."}],
        "tool_calls": [
            {"id": u["id"], "type": "function",
             "function": {"name": u["name"], "arguments": orjson.dumps(u["input"]).decode()}}
            for u in uses
        ],
    }]
    assert json.loads(body["output"]["messages"][0]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Paris", "unit": "celsius"}
    assert body["input"]["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": TOOLS[0]["input_schema"]}},
        {"type": "function", "function": {"name": "get_time", "parameters": TOOLS[1]["input_schema"]}},
    ]
    assert body["input"]["tool_choice"] == "auto"
    assert "tools" not in body["parameters"]


async def test_tool_results_become_tool_messages(
    routed: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    call = {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C and sunny"},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    log_id, _ = await create(f"{routed.url}/anthropic", model=MODEL, messages=messages,
                             tools=TOOLS)
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["input"]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": [
            {"id": "toolu_01A", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": [{"type": "text", "text": "18C and sunny"}]},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo: And tomorrow?"}]


@pytest.mark.parametrize("streamed", [False, True])
async def test_thinking_is_a_thinking_block_with_its_signature(
    routed: RunningProxy, promptlayer: PromptLayerStandIn, streamed: bool
) -> None:
    request = {"model": "fake-thinking", "messages": MESSAGES,
               "thinking": {"type": "enabled", "budget_tokens": 1024}}
    if streamed:
        log_id, _, _ = await stream(f"{routed.url}/anthropic", **request)
    else:
        log_id, _ = await create(f"{routed.url}/anthropic", **request)
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["output"]["messages"] == [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": THINKING_TEXT, "signature": SIGNATURE},
        {"type": "text", "text": "echo: Say hi to Ada"},
    ]}]
    assert body["parameters"]["thinking"] == {"type": "enabled", "budget_tokens": 1024}


async def test_images_and_documents_are_recorded_as_media(
    routed: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "document", "title": "spec.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
        {"type": "text", "text": "What are these?"},
    ]
    log_id, _ = await create(f"{routed.url}/anthropic", model=MODEL,
                             messages=[{"role": "user", "content": content}])
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["input"]["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "media", "media": {"title": "spec.pdf", "type": "application/pdf",
                                    "url": "data:application/pdf;base64,JVBERi0x", "format": "base64"}},
        {"type": "text", "text": "What are these?"},
    ]


async def test_x_api_key_reaches_the_upstream_and_never_the_record(
    routed: RunningProxy, fake_anthropic: FakeAnthropic, promptlayer: PromptLayerStandIn,
    http: aiohttp.ClientSession,
) -> None:
    headers = {"x-api-key": CANARY, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    payload = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": True}
    async with http.post(f"{routed.url}/anthropic/v1/messages", json=payload, headers=headers) as response:
        assert response.status == 200
        log_id = response.headers["X-PL-Log-Id"]
        events = sse_events(await response.read())
    assert events[-1] == {"type": "message_stop"}
    assert events.count({"type": "ping"}) == 2  # keep-alives reach the client (the SDK skips them)
    received = fake_anthropic.received[-1]
    assert received.headers["x-api-key"] == CANARY
    assert received.headers["anthropic-version"] == "2023-06-01"
    body = await record_for(promptlayer, log_id)
    assert CANARY not in json.dumps(body)
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo: Say hi to Ada"}]


@pytest.mark.parametrize(("model", "error", "error_type"), [
    ("fake-error-429", anthropic.RateLimitError, "PROVIDER_RATE_LIMIT"),
    ("fake-error-401", anthropic.AuthenticationError, "PROVIDER_AUTH_ERROR"),
    ("fake-error-529", anthropic.APIStatusError, "PROVIDER_ERROR"),
])
async def test_upstream_errors_pass_through_and_are_recorded(
    routed: RunningProxy, promptlayer: PromptLayerStandIn, model: str, error: type[Exception],
    error_type: str,
) -> None:
    async with client(f"{routed.url}/anthropic") as c:
        with pytest.raises(error) as raised:
            await c.messages.create(model=model, max_tokens=64, messages=MESSAGES)
    assert isinstance(raised.value, anthropic.APIStatusError)
    log_id = raised.value.response.headers["X-PL-Log-Id"]
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("ERROR", error_type)
    assert body["error_message"] == raised.value.body["error"]["message"]  # type: ignore[index]


async def test_an_error_event_mid_stream_is_recorded_as_the_calls_error(
    routed: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    async with client(f"{routed.url}/anthropic") as c:
        raw = await c.messages.with_raw_response.create(
            model="fake-overloaded", max_tokens=64, messages=MESSAGES, stream=True)
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async for _ in await raw.parse():
                pass
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_ERROR")
    assert body["error_message"] == "Overloaded"
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo:"}]  # what arrived


async def test_a_cut_stream_is_recorded_as_partial(routed: RunningProxy, promptlayer: PromptLayerStandIn,
                                                   http: aiohttp.ClientSession) -> None:
    headers = {"x-api-key": CANARY, "anthropic-version": "2023-06-01"}
    payload = {"model": "fake-cut", "max_tokens": 64, "messages": MESSAGES, "stream": True}
    async with http.post(f"{routed.url}/anthropic/v1/messages", json=payload, headers=headers) as response:
        log_id = response.headers["X-PL-Log-Id"]
        with contextlib.suppress(aiohttp.ClientPayloadError):  # plproxy may end its stream cleanly or not
            await response.read()
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("WARNING", "PROVIDER_PARTIAL_RESPONSE")
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo:"}]


async def test_count_tokens_is_relayed_and_not_recorded(
    routed: RunningProxy, fake_anthropic: FakeAnthropic
) -> None:
    async with client(f"{routed.url}/anthropic") as c:
        raw = await c.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
    assert (await raw.parse()).input_tokens == 7
    assert "X-PL-Log-Id" not in raw.headers
    assert fake_anthropic.received[-1].path_qs == "/v1/messages/count_tokens"
