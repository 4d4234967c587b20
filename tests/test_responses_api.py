"""The OpenAI Responses API through plproxy: the official `openai` client gets exactly what the fake upstream
gives, streamed (typed events, no [DONE]) or not, and each call is recorded with `api_type: "responses"`,
`function_name: "openai.responses.create"`, its input and output items as chat blueprints (text, images,
function calls by `call_id` and their outputs, reasoning summaries as `thinking` blocks) and the usage of
`response.completed`. The PromptLayer stand-in fails the test on any record outside the schema.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.openai_upstream import REASONING_SUMMARY, FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import PROVIDER_KEY, client, record_for, sse_events
from tests.proxy_fixtures import RunningProxy

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": False},
    {"type": "function", "name": "get_time",
     "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}},
]


async def create(base_url: str, **kwargs: Any) -> tuple[str | None, dict[str, Any]]:
    """One non-streamed call: (its X-PL-Log-Id, the response as the client parsed it)."""
    async with client(base_url) as c:
        raw = await c.responses.with_raw_response.create(**kwargs)
        return raw.headers.get("X-PL-Log-Id"), raw.parse().model_dump(exclude_unset=True)


async def stream(base_url: str, **kwargs: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """One streamed call: (its X-PL-Log-Id, every event as the client parsed it)."""
    async with client(base_url) as c:
        raw = await c.responses.with_raw_response.create(stream=True, **kwargs)
        events = [event.model_dump(exclude_unset=True) async for event in raw.parse()]
        return raw.headers.get("X-PL-Log-Id"), events


def text_of(body: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for m in body["output"]["messages"] for b in m["content"])


async def test_response_is_relayed_and_recorded(
    proxy: RunningProxy, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn
) -> None:
    request = {"model": "gpt-4.1", "instructions": "You are terse.", "input": "Say hi to Ada",
               "temperature": 0.2, "max_output_tokens": 50}
    _, direct = await create(fake_openai.base_url, **request)
    log_id, proxied = await create(proxy.base_url, **request)
    assert proxied == direct
    assert fake_openai.received[-1].path_qs == "/v1/responses"
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert (body["provider"], body["model"], body["api_type"], body["function_name"]) == (
        "openai", "gpt-4.1", "responses", "openai.responses.create")
    assert body["input"] == {"type": "chat", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say hi to Ada"}]},
    ]}
    assert body["output"] == {"type": "chat", "messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "echo: Say hi to Ada"}]}]}
    assert (body["input_tokens"], body["output_tokens"]) == (
        direct["usage"]["input_tokens"], direct["usage"]["output_tokens"])
    assert body["parameters"] == {"temperature": 0.2, "max_output_tokens": 50}
    assert body["status"] == "SUCCESS"
    assert PROVIDER_KEY not in json.dumps(body)


@pytest.mark.parametrize("model", ["gpt-4.1", "fake-tools", "fake-reasoning"])
async def test_stream_is_relayed_event_for_event_and_recorded_like_the_response(
    proxy: RunningProxy, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn, model: str
) -> None:
    request: dict[str, Any] = {"model": model, "input": "Say hi to Ada", "tools": TOOLS}
    _, direct = await stream(fake_openai.base_url, **request)
    log_id, events = await stream(proxy.base_url, **request)
    assert events == direct
    assert events[-1]["type"] == "response.completed"
    assert log_id is not None
    streamed = await record_for(promptlayer, log_id)
    unstreamed_id, response = await create(proxy.base_url, **request)
    assert unstreamed_id is not None
    unstreamed = await record_for(promptlayer, unstreamed_id)
    for key in ("input", "output", "input_tokens", "output_tokens", "model", "status", "api_type"):
        assert streamed[key] == unstreamed[key], key
    assert streamed["output_tokens"] == response["usage"]["output_tokens"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_function_calls_keep_their_call_ids(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, streamed: bool
) -> None:
    request = {"model": "fake-tools", "input": "Weather in Paris?", "tools": TOOLS,
               "tool_choice": {"type": "function", "name": "get_weather"}}
    if streamed:
        log_id, events = await stream(proxy.base_url, **request)
        response = events[-1]["response"]
    else:
        log_id, response = await create(proxy.base_url, **request)
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    assert len(calls) == 2
    assert body["output"]["messages"] == [{"role": "assistant", "content": [], "tool_calls": [
        {"id": call["call_id"], "type": "function",
         "function": {"name": call["name"], "arguments": call["arguments"]}} for call in calls]}]
    assert body["output"]["messages"][0]["tool_calls"][0]["id"].startswith("call_")
    assert body["input"]["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": TOOLS[0]["parameters"], "strict": False}},
        {"type": "function", "function": {"name": "get_time", "parameters": TOOLS[1]["parameters"]}},
    ]
    assert body["input"]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "tools" not in body["parameters"]


async def test_input_items_map_to_messages(proxy: RunningProxy, promptlayer: PromptLayerStandIn) -> None:
    items: list[dict[str, Any]] = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is in this picture, and the weather?"},
            {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"},
        ]},
        {"type": "reasoning", "id": "rs_1",
         "summary": [{"type": "summary_text", "text": "Need the weather."}]},
        {"type": "function_call", "call_id": "call_A", "name": "get_weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_A", "output": "18C"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Un chat. 18C."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Merci"}]},
    ]
    log_id, _ = await create(proxy.base_url, model="gpt-4.1", input=items,
                             tools=[*TOOLS, {"type": "web_search"}])
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["input"]["messages"] == [
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture, and the weather?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        ]},
        {"role": "assistant",
         "content": [{"type": "thinking", "thinking": "Need the weather.", "id": "rs_1"}],
         "tool_calls": [{"id": "call_A", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_A", "content": [{"type": "text", "text": "18C"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Un chat. 18C."}]},
        {"role": "user", "content": [{"type": "text", "text": "Merci"}]},
    ]
    assert body["parameters"]["tools"] == [{"type": "web_search"}]  # a built-in tool: kept as sent
    assert text_of(body) == "echo: Merci"


@pytest.mark.parametrize("streamed", [False, True])
async def test_reasoning_summaries_are_thinking_blocks(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, streamed: bool
) -> None:
    request = {"model": "fake-reasoning", "input": "Say hi",
               "reasoning": {"effort": "low", "summary": "auto"}}
    if streamed:
        log_id, _ = await stream(proxy.base_url, **request)
    else:
        log_id, _ = await create(proxy.base_url, **request)
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    [message] = body["output"]["messages"]
    thinking = [b for b in message["content"] if b["type"] == "thinking"]
    assert [b["thinking"] for b in thinking] == list(REASONING_SUMMARY)
    assert message["content"][-1] == {"type": "text", "text": "echo: Say hi"}
    assert body["parameters"]["reasoning"] == {"effort": "low", "summary": "auto"}


async def test_incomplete_response_is_recorded_with_what_came(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    log_id, events = await stream(proxy.base_url, model="fake-incomplete", input="one two three four")
    assert events[-1]["type"] == "response.incomplete"
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "SUCCESS"  # the upstream ended it as it said (max_output_tokens), like "length"
    assert text_of(body) == "echo: one"


async def test_failed_response_is_an_error_with_the_upstreams_message(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    log_id, events = await stream(proxy.base_url, model="fake-failed", input="Say hi")
    assert events[-1]["type"] == "response.failed"
    assert log_id is not None
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_ERROR")
    assert body["error_message"] == "The model failed to generate a response."


async def test_cut_stream_is_partial(proxy: RunningProxy, promptlayer: PromptLayerStandIn,
                                     http: aiohttp.ClientSession) -> None:
    payload = {"model": "fake-cut", "input": "Say hi to Ada", "stream": True}
    async with http.post(f"{proxy.base_url}/responses", json=payload) as response:
        log_id = response.headers["X-PL-Log-Id"]
        received = b""
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    events = sse_events(received)
    assert [e["type"] for e in events][-1] == "response.output_text.delta"
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("WARNING", "PROVIDER_PARTIAL_RESPONSE")
    assert text_of(body) == "echo:"  # the one delta that arrived


async def test_upstream_error_is_recorded(proxy: RunningProxy, promptlayer: PromptLayerStandIn) -> None:
    async with client(proxy.base_url) as c:
        with pytest.raises(openai.RateLimitError) as raised:
            await c.responses.create(model="fake-error-429", input="hi")
    body = await record_for(promptlayer, raised.value.response.headers["X-PL-Log-Id"])
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_RATE_LIMIT")
    assert body["api_type"] == "responses"
