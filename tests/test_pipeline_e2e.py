"""Every call is recorded in PromptLayer, faithfully: the official `openai` client through plproxy to the fake
upstream, and the record it produces at the PromptLayer stand-in (which fails the test on any body that
does not validate against the published schema).

Real servers on loopback, plproxy in-process. Nothing is mocked.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import (
    chat_text,
    client,
    eventually,
    log_status,
    pl_id_of,
    record_for,
    sse_events,
    wait_state,
)
from tests.proxy_fixtures import RunningProxy, StartProxy

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi to Ada"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
        },
    },
]


def assert_common(body: dict[str, Any], log_id: str, *, function_name: str, model: str) -> None:
    assert body["provider"] == "openai"
    assert body["model"] == model
    assert body["function_name"] == function_name
    assert body["api_type"] == "chat-completions"
    assert body["metadata"]["plproxy_log_id"] == log_id
    assert body["request_start_time"] < body["request_end_time"]  # ISO-8601 UTC, same format: sortable
    for key in ("model", "messages", "prompt", "input", "stream", "stream_options"):
        assert key not in body["parameters"]


# --- 1. one record per call, for each API, valid and complete -----------------------------------------


async def test_chat_record_goes_pending_then_exported(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    promptlayer.stall_until_released()  # the record cannot leave yet: its state must say pending
    openai_client = client(proxy.base_url)
    raw = await openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, temperature=0.2, max_tokens=50, seed=7
    )
    completion = raw.parse()
    await openai_client.close()
    log_id = raw.headers["X-PL-Log-Id"]
    uuid.UUID(log_id)

    status, state = await log_status(http, proxy.url, log_id)
    assert status == 200
    assert state == {"log_id": log_id, "state": "pending", "promptlayer_request_id": None, "error": None}

    promptlayer.release()
    body = await record_for(promptlayer, log_id)
    exported = await wait_state(http, proxy.url, log_id, "exported")
    assert exported["promptlayer_request_id"] == pl_id_of(promptlayer, log_id)
    assert exported["error"] is None

    assert_common(body, log_id, function_name="openai.chat.completions.create", model="gpt-4o-mini")
    assert body["status"] == "SUCCESS"
    assert "error_type" not in body
    assert body["input"] == {
        "type": "chat",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": [{"type": "text", "text": "Say hi to Ada"}]},
        ],
    }
    assert body["output"] == {
        "type": "chat",
        "messages": [{"role": "assistant", "content": [{"type": "text", "text": "echo: Say hi to Ada"}]}],
    }
    assert completion.choices[0].message.content == "echo: Say hi to Ada"
    assert body["parameters"] == {"temperature": 0.2, "max_tokens": 50, "seed": 7}
    assert completion.usage is not None
    assert body["input_tokens"] == completion.usage.prompt_tokens
    assert body["output_tokens"] == completion.usage.completion_tokens
    assert len(promptlayer.log_requests) == 1


async def test_legacy_completion_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    openai_client = client(proxy.base_url)
    raw = await openai_client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time", temperature=0.9, max_tokens=16
    )
    completion = raw.parse()
    await openai_client.close()
    log_id = raw.headers["X-PL-Log-Id"]
    body = await record_for(promptlayer, log_id)
    assert_common(body, log_id, function_name="openai.completions.create", model="gpt-3.5-turbo-instruct")
    assert body["status"] == "SUCCESS"
    assert body["input"] == {"type": "completion", "content": [{"type": "text", "text": "Once upon a time"}]}
    assert body["output"] == {
        "type": "completion",
        "content": [{"type": "text", "text": completion.choices[0].text}],
    }
    assert completion.choices[0].text == "echo: Once upon a time"
    assert body["parameters"] == {"temperature": 0.9, "max_tokens": 16}
    assert completion.usage is not None
    assert (body["input_tokens"], body["output_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    exported = await wait_state(http, proxy.url, log_id, "exported")
    assert exported["promptlayer_request_id"] == pl_id_of(promptlayer, log_id)


async def test_embedding_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    openai_client = client(proxy.base_url)
    raw = await openai_client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first text", "second"], dimensions=8
    )
    result = raw.parse()
    await openai_client.close()
    log_id = raw.headers["X-PL-Log-Id"]
    body = await record_for(promptlayer, log_id)
    assert_common(body, log_id, function_name="openai.embeddings.create", model="text-embedding-3-small")
    assert body["status"] == "SUCCESS"
    assert body["input"] == {
        "type": "completion",
        "content": [{"type": "text", "text": "first text"}, {"type": "text", "text": "second"}],
    }
    assert body["output"]["type"] == "completion"
    # the official client asks for base64 vectors (and decodes them itself): the record says so
    assert body["output"]["content"] == [{"type": "text", "text": "[embedding: 2 vectors, base64]"}]
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
    assert body["parameters"] == {"dimensions": 8, "encoding_format": "base64"}
    assert body["input_tokens"] == result.usage.prompt_tokens
    assert "output_tokens" not in body
    exported = await wait_state(http, proxy.url, log_id, "exported")
    assert exported["promptlayer_request_id"] == pl_id_of(promptlayer, log_id)


# --- 2. streams: the record holds exactly what the client received ------------------------------------


async def stream_with_official_client(base_url: str, **kwargs: Any) -> tuple[str, list[Any]]:
    openai_client = client(base_url)
    raw = await openai_client.chat.completions.with_raw_response.create(stream=True, **kwargs)
    chunks = [chunk async for chunk in raw.parse()]
    await openai_client.close()
    return raw.headers["X-PL-Log-Id"], chunks


async def test_streamed_text_record(proxy: RunningProxy, promptlayer: PromptLayerStandIn) -> None:
    log_id, chunks = await stream_with_official_client(
        proxy.base_url, model="fake-many-chunks-12", messages=MESSAGES, temperature=0.5
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"t{i}" for i in range(12))
    assert all(c.usage is None for c in chunks)  # nothing injected reached the client

    body = await record_for(promptlayer, log_id)
    assert_common(body, log_id, function_name="openai.chat.completions.create", model="fake-many-chunks-12")
    assert body["status"] == "SUCCESS"
    assert chat_text(body) == text
    assert body["output"]["messages"][0]["role"] == "assistant"
    assert body["parameters"] == {"temperature": 0.5}
    assert body["input_tokens"] > 0
    assert body["output_tokens"] == 12  # the upstream's usage, asked for by plproxy on the client's behalf


async def test_streamed_interleaved_tool_calls_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    log_id, chunks = await stream_with_official_client(
        proxy.base_url, model="fake-tools", messages=MESSAGES, tools=TOOLS, tool_choice="auto"
    )
    # what the client received, reassembled by the client's own rules
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                if delta.function is not None:
                    call["name"] = call["name"] or delta.function.name
                    call["arguments"] += delta.function.arguments or ""
    assert len(calls) == 2
    # the fake interleaves the fragments of the two calls: neither arrives in one piece
    indexes = [d.index for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []]
    assert indexes != sorted(indexes)

    body = await record_for(promptlayer, log_id)
    assert body["status"] == "SUCCESS"
    message = body["output"]["messages"][0]
    assert message["role"] == "assistant"
    assert message["content"] == []
    recorded = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in message["tool_calls"]
    ]
    assert recorded == [calls[0], calls[1]]
    assert [json.loads(c["arguments"]) for c in recorded] == [{"city": "Paris"}, {"timezone": "Asia/Tokyo"}]
    assert all(c["id"].startswith("call_") for c in recorded)
    assert [t["function"]["name"] for t in body["input"]["tools"]] == ["get_weather", "get_time"]
    assert body["input"]["tool_choice"] == "auto"
    assert "tools" not in body["parameters"]
    assert body["output_tokens"] > 0


async def test_stream_with_usage_asked_by_the_client(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    log_id, chunks = await stream_with_official_client(
        proxy.base_url, model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
    )
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    body = await record_for(promptlayer, log_id)
    assert chat_text(body) == text == "echo: Say hi to Ada"
    assert (body["input_tokens"], body["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert "stream_options" not in body["parameters"]


async def test_streamed_legacy_completion_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    openai_client = client(proxy.base_url)
    raw = await openai_client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time", stream=True, temperature=0.3
    )
    chunks = [chunk async for chunk in raw.parse()]
    await openai_client.close()
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == "echo: Once upon a time"
    assert all(chunk.usage is None for chunk in chunks)
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert body["status"] == "SUCCESS"
    assert body["function_name"] == "openai.completions.create"
    assert body["output"] == {"type": "completion", "content": [{"type": "text", "text": text}]}
    assert body["parameters"] == {"temperature": 0.3}
    assert body["output_tokens"] == 5


async def raw_stream(
    http: aiohttp.ClientSession, url: str, request: dict[str, Any]
) -> tuple[str | None, bytes]:
    async with http.post(f"{url}/chat/completions", data=orjson.dumps(request)) as response:
        assert response.status == 200
        return response.headers.get("X-PL-Log-Id"), await response.read()


async def test_stream_usage_injected_and_hidden_from_the_client(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, fake_openai: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    request = {"model": "fake-many-chunks-5", "messages": MESSAGES, "stream": True}
    _, direct = await raw_stream(http, fake_openai.base_url, request)
    log_id, proxied = await raw_stream(http, proxy.base_url, request)
    assert log_id is not None
    assert sse_events(proxied) == sse_events(direct)  # not one usage field, not one extra chunk
    assert all("usage" not in e for e in sse_events(proxied) if isinstance(e, dict))
    sent_upstream = fake_openai.received[-1].json()
    assert sent_upstream["stream_options"] == {"include_usage": True}

    _, with_usage = await raw_stream(
        http, fake_openai.base_url, {**request, "stream_options": {"include_usage": True}}
    )
    usage = sse_events(with_usage)[-2]["usage"]
    body = await record_for(promptlayer, log_id)
    assert (body["input_tokens"], body["output_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert chat_text(body) == "t0 t1 t2 t3 t4"


async def test_stream_usage_off_forwards_the_body_untouched(
    start_proxy: StartProxy,
    promptlayer: PromptLayerStandIn,
    fake_openai: FakeOpenAI,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(PLPROXY_STREAM_USAGE="off")
    sent = (
        b'{"model": "fake-many-chunks-4", "stream": true,\n "messages": [{"role": "user", "content": "hi"}]}'
    )
    async with http.post(f"{fake_openai.base_url}/chat/completions", data=sent) as response:
        direct = await response.read()
    async with http.post(f"{proxy.base_url}/chat/completions", data=sent) as response:
        log_id = response.headers["X-PL-Log-Id"]
        proxied = await response.read()
    assert fake_openai.received[-1].body == sent  # byte for byte, spacing and all
    assert sse_events(proxied) == sse_events(direct)
    body = await record_for(promptlayer, log_id)
    assert chat_text(body) == "t0 t1 t2 t3"
    assert body["status"] == "SUCCESS"
    assert "input_tokens" not in body
    assert "output_tokens" not in body


# --- 3. annotations from headers, and follow-ups -------------------------------------------------------


async def chat_via_headers(proxy: RunningProxy, headers: dict[str, str]) -> tuple[str, Any]:
    openai_client = client(proxy.base_url)
    raw = await openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
    )
    raw.parse()
    await openai_client.close()
    return raw.headers["X-PL-Log-Id"], raw.headers


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        ("prod, team-a ,  chat", ["prod", "team-a", "chat"]),
        ('["prod", "a, b", "\\u00fcn\\u00ef"]', ["prod", "a, b", "\u00fcn\u00ef"]),
    ],
)
async def test_tags_in_both_forms(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, header: str, tags: list[str]
) -> None:
    log_id, headers = await chat_via_headers(proxy, {"X-PL-Tags": header})
    assert "X-PL-Warning" not in headers
    assert (await record_for(promptlayer, log_id))["tags"] == tags


async def test_metadata_prompt_and_score(proxy: RunningProxy, promptlayer: PromptLayerStandIn) -> None:
    log_id, headers = await chat_via_headers(
        proxy,
        {
            "X-PL-Metadata": '{"user": "ada", "n": 3, "ok": true, "nested": {"k": [1, 2]}, "none": null}',
            "X-PL-Prompt-Name": "greeter",
            "X-PL-Prompt-Version": "4",
            "X-PL-Prompt-Input-Variables": '{"name": "Ada", "count": 2}',
            "X-PL-Score": "87",
        },
    )
    assert "X-PL-Warning" not in headers
    body = await record_for(promptlayer, log_id)
    assert body["metadata"] == {
        "user": "ada",
        "n": "3",
        "ok": "true",
        "nested": '{"k":[1,2]}',
        "none": "null",
        "plproxy_log_id": log_id,
    }
    assert body["prompt_name"] == "greeter"
    assert body["prompt_version_number"] == 4
    assert body["prompt_input_variables"] == {"name": "Ada", "count": 2}
    assert body["score"] == 87
    assert promptlayer.followups("track-prompt") == []  # a version goes in the record, no follow-up


async def test_prompt_label_and_group_become_follow_ups(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    log_id, headers = await chat_via_headers(
        proxy,
        {
            "X-PL-Prompt-Name": "greeter",
            "X-PL-Prompt-Label": "prod",
            "X-PL-Prompt-Input-Variables": '{"name": "Ada"}',
            "X-PL-Group-Id": "4242",
        },
    )
    assert "X-PL-Warning" not in headers
    body = await record_for(promptlayer, log_id)
    assert body["prompt_name"] == "greeter"
    assert "prompt_version_number" not in body
    request_id = pl_id_of(promptlayer, log_id)
    prompt = await eventually(lambda: promptlayer.followups("track-prompt") or None, what="track-prompt")
    assert prompt == [
        {
            "request_id": request_id,
            "prompt_name": "greeter",
            "label": "prod",
            "prompt_input_variables": {"name": "Ada"},
        }
    ]
    group = await eventually(lambda: promptlayer.followups("track-group") or None, what="track-group")
    assert group == [{"request_id": request_id, "group_id": 4242}]


async def test_malformed_headers_warn_and_the_valid_parts_are_recorded(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, fake_openai: FakeOpenAI
) -> None:
    log_id, headers = await chat_via_headers(
        proxy,
        {
            "X-PL-Tags": "kept, also-kept",
            "X-PL-Metadata": "{not json",
            "X-PL-Score": "150",
            "X-PL-Group-Id": "group-seven",
            "X-PL-Prompt-Version": "2",  # without a name
            "X-PL-Prompt-Input-Variables": "[1, 2]",
            "X-PL-Whatever": "1",
        },
    )
    warnings = headers.get_list("X-PL-Warning")
    named = sorted(w.split(":", 1)[0] for w in warnings)
    assert named == sorted(
        [
            "X-PL-Metadata",
            "X-PL-Score",
            "X-PL-Group-Id",
            "X-PL-Prompt-Version",
            "X-PL-Prompt-Input-Variables",
            "X-PL-Whatever",
        ]
    ), warnings
    assert all("{not json" not in w for w in warnings)  # never echoes the value back
    assert not [h for h in fake_openai.received[-1].headers if h.lower().startswith("x-pl-")]
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "SUCCESS"
    assert body["tags"] == ["kept", "also-kept"]
    assert body["metadata"] == {"plproxy_log_id": log_id}
    for absent in ("score", "prompt_name", "prompt_version_number", "prompt_input_variables"):
        assert absent not in body
    await _no_followups_arrive(proxy, promptlayer)


async def _no_followups_arrive(proxy: RunningProxy, promptlayer: PromptLayerStandIn) -> None:
    # the store commits a record and its follow-ups together: once the record is exported and the
    # exporter idle, anything it had to send would have been claimed
    from plproxy.app_keys import EXPORTER

    exporter = proxy.app[EXPORTER]
    await eventually(lambda: not exporter._inflight and proxy.store.backlog() == 0, what="exporter idle")
    assert [r.path for r in promptlayer.received if r.path.startswith("/rest/")] == []


FOLLOWUPS = [
    ("score", {"score": 91, "name": "accuracy"}, "track-score", {"score": 91, "name": "accuracy"}),
    (
        "metadata",
        {"metadata": {"reviewed": True, "by": "bob"}},
        "track-metadata",
        {"metadata": {"reviewed": "true", "by": "bob"}},
    ),
    (
        "prompt",
        {"prompt_name": "greeter", "version": 3, "prompt_input_variables": {"x": "y"}},
        "track-prompt",
        {"prompt_name": "greeter", "version": 3, "prompt_input_variables": {"x": "y"}},
    ),
    ("group", {"group_id": 77}, "track-group", {"group_id": 77}),
]


async def test_follow_up_endpoints(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    promptlayer.stall_until_released()  # follow-ups are accepted before PromptLayer knows the record
    log_id, _ = await chat_via_headers(proxy, {})
    for kind, sent, _path, _expected in FOLLOWUPS:
        async with http.post(f"{proxy.url}/plproxy/logs/{log_id}/{kind}", json=sent) as response:
            assert response.status == 202, await response.text()
            assert (await response.json())["log_id"] == log_id
    promptlayer.release()
    await record_for(promptlayer, log_id)
    request_id = pl_id_of(promptlayer, log_id)
    for _kind, _sent, path, expected in FOLLOWUPS:
        arrived = await eventually(lambda path=path: promptlayer.followups(path) or None, what=path)
        assert arrived == [{"request_id": request_id, **expected}]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("score", {"score": 101}),
        ("score", {"score": "50"}),
        ("score", {"score": True}),
        ("metadata", {"metadata": []}),
        ("metadata", {}),
        ("prompt", {"version": 1}),
        ("prompt", {"prompt_name": "p", "version": 1, "label": "prod"}),
        ("group", {"group_id": "abc"}),
        ("group", {"group_id": 0}),
        ("score", [1, 2]),
        ("score", b"not json"),
    ],
)
async def test_malformed_follow_ups_are_400(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession, kind: str, body: Any
) -> None:
    log_id, _ = await chat_via_headers(proxy, {})
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(f"{proxy.url}/plproxy/logs/{log_id}/{kind}", data=data) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert set(error) >= {"message", "type", "code"}
        assert error["type"] == "invalid_request_error"
    await record_for(promptlayer, log_id)
    await _no_followups_arrive(proxy, promptlayer)


async def test_unknown_log_id_is_404(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    unknown = str(uuid.uuid4())
    async with http.get(f"{proxy.url}/plproxy/logs/{unknown}") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    async with http.post(f"{proxy.url}/plproxy/logs/{unknown}/score", json={"score": 5}) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    async with http.get(f"{proxy.url}/plproxy/logs/not-a-uuid") as response:
        assert response.status == 400
        assert "error" in await response.json()
