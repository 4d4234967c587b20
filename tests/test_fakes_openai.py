"""The fake OpenAI upstream, driven by the official `openai` client and by raw aiohttp."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from tests.fakes.openai_upstream import GZIP_BODY, GZIP_JSON, MODELS, FakeOpenAI, embedding_vector

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "hello brave new world"}]


@pytest_asyncio.fixture
async def client(fake_openai: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=fake_openai.base_url, api_key="sk-fake", max_retries=0, timeout=10) as c:
        yield c


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _raw(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        return await resp.read()


def _sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"data: [DONE]\n\n")
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


# --- chat -----------------------------------------------------------------------------------------


async def test_chat_echoes_the_last_user_message(client: AsyncOpenAI, fake_openai: FakeOpenAI) -> None:
    messages = [{"role": "system", "content": "be terse"}, *USER]
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert answer.object == "chat.completion"
    assert answer.model == "gpt-4o-mini"
    assert answer.created == 1_700_000_000
    assert answer.choices[0].message.content == "echo: hello brave new world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5
    request = fake_openai.received[-1]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["Authorization"] == "Bearer sk-fake"
    assert request.json()["messages"] == messages


async def test_chat_reads_text_parts_of_list_content(client: AsyncOpenAI) -> None:
    content = [
        {"type": "text", "text": "from"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "parts"},
    ]
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )
    assert answer.choices[0].message.content == "echo: from parts"


async def test_answers_are_deterministic_functions_of_the_body(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    url = f"{fake_openai.base_url}/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": USER, "temperature": 0.5}
    first, second = await _raw(session, url, body), await _raw(session, url, body)
    assert first == second
    reordered = await _raw(session, url, dict(reversed(body.items())))
    assert reordered == first
    other = json.loads(await _raw(session, url, {**body, "temperature": 0.6}))
    assert other["id"] != json.loads(first)["id"]
    streamed = await _raw(session, url, {**body, "stream": True})
    with_usage = await _raw(session, url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    ids = {json.loads(e)["id"] for e in _sse_events(streamed + with_usage)[:-1] if e != "[DONE]"}
    assert len(ids) == 1  # asking for usage does not change the id


async def test_chat_n_gives_n_choices(client: AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) == 3


async def test_chat_stream_with_usage_behaves_like_openai(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 5
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    deltas = [c.choices[0].delta for c in chunks[:-1]]
    assert deltas[0].role == "assistant"
    text = "".join(d.content or "" for d in deltas)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    assert {c.id for c in chunks} == {whole.id}


async def test_chat_stream_without_usage_has_no_usage_key(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{fake_openai.base_url}/chat/completions", json={"model": "m", "messages": USER, "stream": True}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = _sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_chat_stream_n_keys_choices_by_index(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=USER, n=2)
    stream = await client.chat.completions.create(model="m", messages=USER, n=2, stream=True)
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


async def test_many_chunks_streams_exactly_n_content_chunks(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="fake-many-chunks-20", messages=USER, stream=True)
    chunks = [c async for c in stream]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 20
    assert chunks[-1].choices[0].finish_reason == "stop"


def _reassemble_tool_calls(chunks: list[Any]) -> list[dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = (tc.function.name if tc.function else None) or call["name"]
            call["arguments"] += (tc.function.arguments if tc.function else None) or ""
    return [calls[i] for i in sorted(calls)]


async def test_tools_stream_reassembles_to_two_tool_calls(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="fake-tools", messages=USER)
    assert whole.choices[0].finish_reason == "tool_calls"
    expected = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in whole.choices[0].message.tool_calls or []
    ]
    assert len(expected) == 2
    stream = await client.chat.completions.create(model="fake-tools", messages=USER, stream=True)
    chunks = [c async for c in stream]
    indexes = [tc.index for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert indexes != sorted(indexes), "the two calls' deltas are interleaved"
    calls = _reassemble_tool_calls(chunks)
    assert calls == expected
    assert all(c["id"].startswith("call_") for c in calls)
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"timezone": "Asia/Tokyo"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tools_take_their_names_from_the_request(client: AsyncOpenAI) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    answer = await client.chat.completions.create(model="fake-tools", messages=USER, tools=[tool])
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["lookup", "lookup"]


async def test_refusal(client: AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="fake-refusal", messages=USER)
    assert whole.choices[0].message.content is None
    assert whole.choices[0].message.refusal
    stream = await client.chat.completions.create(model="fake-refusal", messages=USER, stream=True)
    refusal = "".join([c.choices[0].delta.refusal or "" async for c in stream])
    assert refusal == whole.choices[0].message.refusal


async def test_chunk_delay_spaces_the_events(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake_openai.chunk_delay = 0.05
    started = time.monotonic()
    stream = await client.chat.completions.create(model="fake-many-chunks-5", messages=USER, stream=True)
    arrivals = [time.monotonic() async for _ in stream]
    assert arrivals[-1] - started >= 5 * 0.05
    assert arrivals[1] - arrivals[0] >= 0.04
    assert fake_openai.streams[-1].completed


async def test_answer_delay_holds_the_answer(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake_openai.answer_delay = 0.2
    started = time.monotonic()
    await client.models.list()
    assert time.monotonic() - started >= 0.2


async def test_cut_stream_aborts_after_two_content_chunks(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    lines: list[bytes] = []

    async def read_lines(resp: aiohttp.ClientResponse) -> None:
        async for line in resp.content:
            lines.append(line)

    async with session.post(
        f"{fake_openai.base_url}/chat/completions",
        json={"model": "fake-cut", "messages": USER, "stream": True},
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_lines(resp)
    events = [json.loads(line.removeprefix(b"data: ")) for line in lines if line.startswith(b"data: ")]
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["echo:", " hello"]
    assert fake_openai.streams[-1].cut
    assert not fake_openai.streams[-1].completed


async def test_cut_without_stream_sends_half_a_body(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(
            f"{fake_openai.base_url}/chat/completions", json={"model": "fake-cut", "messages": USER}
        ) as resp:
            await resp.read()


async def test_client_leaving_a_stream_is_noticed(fake_openai: FakeOpenAI) -> None:
    fake_openai.chunk_delay = 0.02
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake_openai.base_url}/chat/completions",
            json={"model": "fake-many-chunks-200", "messages": USER, "stream": True},
        ) as resp,
    ):
        await resp.content.readline()
        resp.close()
    for _ in range(100):
        if fake_openai.streams[-1].client_gone:
            break
        await asyncio.sleep(0.02)
    result = fake_openai.streams[-1]
    assert result.client_gone
    assert result.events_sent < 20


async def test_hang_never_answers_and_does_not_block_stop() -> None:
    server = FakeOpenAI()
    await server.start()
    async with AsyncOpenAI(base_url=server.base_url, api_key="sk-fake", max_retries=0, timeout=0.3) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model="fake-hang", messages=USER)
        hung = asyncio.ensure_future(c.chat.completions.create(model="fake-hang", messages=USER))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2
        with pytest.raises(openai.APIConnectionError):
            await hung


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("fake-error-400", openai.BadRequestError, 400),
        ("fake-error-401", openai.AuthenticationError, 401),
        ("fake-error-429", openai.RateLimitError, 429),
        ("fake-error-500", openai.InternalServerError, 500),
    ],
)
async def test_error_models_raise_the_matching_openai_exception(
    client: AsyncOpenAI, model: str, error: type[openai.APIStatusError], status: int
) -> None:
    for stream in (False, True):
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model=model, messages=USER, stream=stream)
        assert caught.value.status_code == status
        body = caught.value.body
        assert isinstance(body, dict)
        assert set(body) == {"message", "type", "param", "code"}
        assert (caught.value.response.headers.get("retry-after") is not None) == (status == 429)


# --- others ---------------------------------------------------------------------------------------


async def test_legacy_completions(client: AsyncOpenAI) -> None:
    one = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon a time")
    assert one.object == "text_completion"
    assert one.choices[0].text == "echo: once upon a time"
    two = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a", "b"])
    assert [c.text for c in two.choices] == ["echo: a", "echo: b"]
    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="once upon a time",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage == one.usage
    assert "".join(c.choices[0].text for c in chunks[:-1]) == one.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_embeddings_float_and_the_clients_default_base64(
    client: AsyncOpenAI, fake_openai: FakeOpenAI
) -> None:
    default = await client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert fake_openai.received[-1].json()["encoding_format"] == "base64"
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert fake_openai.received[-1].json()["encoding_format"] == "float"
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert floats.data[0].embedding == embedding_vector("text-embedding-3-small", "alpha")
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2
    sized = await client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=3)
    assert len(sized.data[0].embedding) == 3


async def test_models(client: AsyncOpenAI) -> None:
    listed = [m.id async for m in client.models.list()]
    assert listed == list(MODELS)
    model = await client.models.retrieve("gpt-4o")
    assert model.id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_gzip_body_is_sent_precompressed(fake_openai: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(f"{fake_openai.base_url}/gzip") as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()
    assert raw == GZIP_BODY
    assert gzip.decompress(raw) == GZIP_JSON


async def test_other_paths_are_echoed_and_recorded(
    fake_openai: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with session.put(
        f"{fake_openai.base_url}/files/a%2Fb?purpose=x", data=b"payload", headers={"X-Custom": "1"}
    ) as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["raw_path"] == "/v1/files/a%2Fb"
    assert echo["query"] == "purpose=x"
    assert echo["headers"]["X-Custom"] == "1"
    assert echo["body"] == "payload"
    seen = fake_openai.received[-1]
    assert (seen.method, seen.path_qs, seen.body) == ("PUT", "/v1/files/a%2Fb?purpose=x", b"payload")
    async with session.get(f"{fake_openai.origin}/elsewhere") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


async def test_create_app_serves_under_aiohttp_client(aiohttp_client: Any) -> None:
    from tests.fakes.openai_upstream import create_app

    test_client = await aiohttp_client(create_app())
    resp = await test_client.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: hello brave new world"


async def test_restart_keeps_the_port_and_the_record() -> None:
    server = FakeOpenAI()
    await server.start()
    port = server.port
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/models") as resp:
            assert resp.status == 200
        await server.stop()
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(f"{server.base_url}/models"):
                pass
        await server.start()
        try:
            assert server.port == port
            async with session.get(f"{server.base_url}/models") as resp:
                assert resp.status == 200
        finally:
            await server.stop()
    assert len(server.received) == 2


def test_standalone_process_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", "--chunk-delay", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        assert line.endswith("/v1")
        base_url = line.removeprefix("listening on ")
        client = openai.OpenAI(base_url=base_url, api_key="sk-fake", max_retries=0, timeout=5)
        with client:
            assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
