"""The LangChain handler end to end: LangChain's fake models (and the real langchain-openai client against
the fake upstream) with the handler, its in-process store and exporter, against the PromptLayer stand-in,
and through a sidecar plproxy.

Sync LangChain calls that cause network I/O in the test's own loop (ChatOpenAI to the fake upstream, the
handler's flush) run through `asyncio.to_thread`, so the loop that serves the stand-in keeps running.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, FakeListChatModel, FakeListLLM, GenericFakeChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatResult, Generation, LLMResult

import plproxy_langchain
from plproxy.store import Store
from plproxy_langchain import PromptLayerCallbackHandler
from plproxy_langchain.handler import resolve_destination
from plproxy_langchain.runtime import REGISTRY
from plproxy_langchain.sinks import SidecarSpec, StoreSpec, workspace_dir
from tests.fakes.promptlayer import PromptLayerStandIn, validate_log_request

KEY = "pl_test_key_0123456789abcdef"
TAGS = ["langchain", "plproxy-test"]


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
async def env(tmp_path: Path, promptlayer: PromptLayerStandIn, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Path]:
    """The handler's environment: a fresh data dir, the stand-in and a key. Shuts the handler's
    background down at the end, before the stand-in stops."""
    data_dir = tmp_path / "data"
    monkeypatch.setenv("PLPROXY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PROMPTLAYER_API_KEY", KEY)
    monkeypatch.setenv("PROMPTLAYER_BASE_URL", promptlayer.base_url)
    monkeypatch.delenv("PLPROXY_URL", raising=False)
    yield data_dir
    assert await asyncio.to_thread(plproxy_langchain.shutdown, 10.0) in (True, False)


def chat_model(*replies: str | AIMessage) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(r) if isinstance(r, str) else r for r in replies]))


class FailingChat(BaseChatModel):
    """A chat model whose every call fails."""

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        raise ValueError("the model is on fire")

    @property
    def _llm_type(self) -> str:
        return "failing-chat"


class TokensOnlyLLM(LLM):
    """Streams its tokens through the callbacks but returns an empty text (some integrations do)."""

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        assert run_manager is not None
        for token in ("Once ", "upon ", "a time"):
            run_manager.on_llm_new_token(token)
        return ""

    @property
    def _llm_type(self) -> str:
        return "tokens-only"


def assert_valid(records: list[dict[str, Any]]) -> None:
    for record in records:
        assert validate_log_request(record) == [], record


def meta(record: dict[str, Any]) -> dict[str, str]:
    return record["metadata"]  # type: ignore[no-any-return]


def output_texts(record: dict[str, Any]) -> list[str]:
    out = record["output"]
    if out["type"] == "completion":
        return [block["text"] for block in out["content"]]
    return ["".join(b.get("text", "") for b in m["content"]) for m in out["messages"]]


# --- the calls LangChain makes ---------------------------------------------------------------------

async def test_invoke_chat_model_gives_a_schema_valid_record_with_the_tags(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append, metadata={"team": "search"})
    usage = {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}
    model = chat_model(AIMessage("hello there", usage_metadata=usage))
    answer = model.invoke([SystemMessage("be brief"), HumanMessage("hi")],
                          config={"callbacks": [handler], "tags": ["run-tag"], "metadata": {"user": "u1"}})
    assert answer.content == "hello there"
    assert await handler.aflush(10)

    [record] = promptlayer.log_requests
    assert_valid([record])
    assert record["tags"] == TAGS
    assert record["provider"] == "genericfakechatmodel"
    assert record["function_name"] == "langchain.GenericFakeChatModel"
    assert record["status"] == "SUCCESS"
    assert "api_type" not in record  # chat-completions is OpenAI's; this is not an OpenAI model
    assert [m["role"] for m in record["input"]["messages"]] == ["system", "user"]
    assert record["input"]["messages"][1]["content"] == [{"type": "text", "text": "hi"}]
    assert output_texts(record) == ["hello there"]
    assert (record["input_tokens"], record["output_tokens"]) == (7, 2)
    run_id = answer.id.removeprefix("lc_run--")[:36]  # type: ignore[union-attr]
    assert meta(record)["_langchain_run_id"] == run_id
    assert meta(record)["plproxy_log_id"] == run_id
    assert meta(record)["_langchain_parent_run_id"] == "None"
    assert orjson.loads(meta(record)["_langchain_tags"]) == ["run-tag"]
    assert meta(record)["team"] == "search"
    assert meta(record)["user"] == "u1"
    assert ids == promptlayer.accepted_ids


async def test_ainvoke_records_without_blocking_the_loop(env: Path, promptlayer: PromptLayerStandIn) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(TAGS, ids.append)
    answer = await chat_model("async hello").ainvoke("hi", config={"callbacks": [handler]})
    assert answer.content == "async hello"
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    assert record["tags"] == TAGS
    assert output_texts(record) == ["async hello"]
    assert ids == promptlayer.accepted_ids


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_streams_are_recorded_whole(env: Path, promptlayer: PromptLayerStandIn, mode: str) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    model = chat_model("the whole streamed answer")
    config: Any = {"callbacks": [handler]}
    if mode == "stream":
        chunks = [c.content for c in model.stream("go", config=config)]
    else:
        chunks = [c.content async for c in model.astream("go", config=config)]
    assert len(chunks) > 3
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    assert output_texts(record) == ["the whole streamed answer"]
    assert record["tags"] == TAGS


async def test_llm_stream_records_the_text(env: Path, promptlayer: PromptLayerStandIn) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    llm = FakeListLLM(responses=["streamed completion"])
    assert "".join(llm.stream("p", config={"callbacks": [handler]})) == "streamed completion"
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert output_texts(record) == ["streamed completion"]


async def test_batch_and_abatch_give_one_record_per_prompt(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append)
    chat = FakeListChatModel(responses=["one", "two", "three"])
    llm = FakeListLLM(responses=["x", "y"])
    config: Any = {"callbacks": [handler]}
    assert [m.content for m in chat.batch(["a", "b", "c"], config=config)] == ["one", "two", "three"]
    assert await llm.abatch(["p", "q"], config=config) == ["x", "y"]
    assert await handler.aflush(10)
    records = promptlayer.log_requests
    assert len(records) == 5
    assert_valid(records)
    assert all(r["tags"] == TAGS for r in records)
    chats = [r for r in records if r["input"]["type"] == "chat"]
    completions = [r for r in records if r["input"]["type"] == "completion"]
    assert sorted(output_texts(r)[0] for r in chats) == ["one", "three", "two"]
    assert sorted(r["input"]["content"][0]["text"] for r in completions) == ["p", "q"]
    assert sorted(output_texts(r)[0] for r in completions) == ["x", "y"]
    assert {r["function_name"] for r in completions} == {"langchain.FakeListLLM"}
    assert len({meta(r)["_langchain_run_id"] for r in records}) == 5
    assert sorted(ids) == promptlayer.accepted_ids


async def test_llm_invoke_is_a_completion_record(env: Path, promptlayer: PromptLayerStandIn) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=["llm"])
    llm = FakeListLLM(responses=["a completion"])
    assert llm.invoke("Once upon a time, ", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    prompt = [{"type": "text", "text": "Once upon a time, "}]
    assert record["input"] == {"type": "completion", "content": prompt}
    assert record["output"]["content"] == [{"type": "text", "text": "a completion"}]
    assert record["provider"] == "fakelist"
    assert record["model"] == "fake-list"
    assert record["parameters"]["responses"] == ["a completion"]


async def test_the_promptlayer_key_in_a_run_never_reaches_a_body(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    """A run may hold the key the handler exports with (pasted in a prompt, echoed in an answer, in a
    model's parameters): the body PromptLayer receives, and the stored copy, hold `[REDACTED]`."""
    handler = PromptLayerCallbackHandler(pl_tags=["llm"])
    llm = FakeListLLM(responses=[f"the key is {KEY}"])
    assert llm.invoke(f"Remember {KEY} for me", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    text = orjson.dumps(record).decode()
    assert KEY not in text
    assert record["input"]["content"] == [{"type": "text", "text": "Remember [REDACTED] for me"}]
    assert record["output"]["content"] == [{"type": "text", "text": "the key is [REDACTED]"}]
    assert record["parameters"]["responses"] == ["the key is [REDACTED]"]
    stored = b"".join(path.read_bytes() for path in env.rglob("plproxy.db*"))
    assert KEY.encode() not in stored


async def test_a_failing_model_gives_an_error_record_and_its_own_exception(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    with pytest.raises(ValueError, match="the model is on fire"):
        FailingChat().invoke("hi", config={"callbacks": [handler]})
    with pytest.raises(ValueError, match="the model is on fire"):
        await FailingChat().ainvoke("hi", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    records = promptlayer.log_requests
    assert len(records) == 2
    assert_valid(records)
    for record in records:
        assert record["status"] == "ERROR"
        assert record["error_type"] == "PROVIDER_ERROR"
        assert record["error_message"] == "ValueError: the model is on fire"
        assert record["output"] == {"type": "chat", "messages": []}
    assert not handler._runs


async def test_tool_and_function_messages_and_tool_calls_are_recorded(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    calls = [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]
    reply = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "call_2"}])
    conversation = [
        HumanMessage(content=[{"type": "text", "text": "what is this?"},
                              {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}]),
        AIMessage("", tool_calls=calls),
        ToolMessage('{"temp": 21}', tool_call_id="call_1"),
        FunctionMessage("42", name="answer"),
    ]
    chat_model(reply).invoke(conversation, config={"callbacks": [handler]})
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    messages = record["input"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "function"]
    assert messages[0]["content"][1] == {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}
    assert messages[1]["tool_calls"] == [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert messages[1]["content"] == []
    assert messages[2]["tool_call_id"] == "call_1"
    assert messages[3]["name"] == "answer"
    [out] = record["output"]["messages"]
    assert out["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q": "x"}'}


async def test_streamed_tokens_make_the_record_when_the_final_result_lacks_them(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    assert TokensOnlyLLM().invoke("tell me", config={"callbacks": [handler]}) == ""
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert output_texts(record) == ["Once upon a time"]


async def test_n_generations_are_one_record_with_every_choice(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    # What an LLM with n=2 reports: one prompt, two generations. One record, one pl_id_callback call.
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append)
    run_id = uuid.uuid4()
    handler.on_llm_start({"id": ["langchain", "llms", "openai", "OpenAI"]}, ["Say hi"], run_id=run_id,
                         invocation_params={"model_name": "gpt-3.5-turbo-instruct", "n": 2,
                                            "openai_api_key": "sk-abcdefghijklmnopqrstuvwx"})
    handler.on_llm_end(LLMResult(generations=[[Generation(text="hi"), Generation(text="hello")]],
                                 llm_output={"token_usage": {"prompt_tokens": 2, "completion_tokens": 3}}),
                       run_id=run_id)
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    assert output_texts(record) == ["hi", "hello"]
    assert record["provider"] == "openai"
    assert record["api_type"] == "chat-completions"
    assert record["model"] == "gpt-3.5-turbo-instruct"
    assert record["parameters"] == {"model_name": "gpt-3.5-turbo-instruct", "n": 2}
    assert (record["input_tokens"], record["output_tokens"]) == (2, 3)
    assert ids == promptlayer.accepted_ids
    assert len(ids) == 1


async def test_chat_openai_against_the_fake_upstream(
    env: Path, promptlayer: PromptLayerStandIn, fake_openai: Any
) -> None:
    import httpx
    from langchain_openai import ChatOpenAI

    handler = PromptLayerCallbackHandler(pl_tags=["chatopenai"])
    secret = "sk-test-abcdefghijklmnopqrstuvwxyz0123"
    async with httpx.AsyncClient() as aclient:
        with httpx.Client() as client:
            common: Any = {"api_key": secret, "base_url": fake_openai.base_url, "http_client": client,
                           "http_async_client": aclient}
            chat = ChatOpenAI(model="gpt-4o-mini", temperature=0, callbacks=[handler], **common)
            answer = await asyncio.to_thread(chat.invoke, [HumanMessage("What comes after 1,2,3 ?")])
            tools = ChatOpenAI(model="fake-tools", **common)
            called = await tools.ainvoke("weather?", config={"callbacks": [handler]})
            failing = ChatOpenAI(model="fake-error-429", max_retries=0, **common)
            with pytest.raises(Exception, match=r"429|rate") as raised:
                await failing.ainvoke("hi", config={"callbacks": [handler]})
    assert "RateLimitError" in type(raised.value).__name__
    assert await handler.aflush(10)
    records = promptlayer.log_requests
    assert len(records) == 3
    assert_valid(records)
    assert all(secret not in orjson.dumps(r).decode() for r in records)
    by_model = {r["model"]: r for r in records}
    plain, tool_call, error = by_model["gpt-4o-mini"], by_model["fake-tools"], by_model["fake-error-429"]
    assert plain["provider"] == "openai"
    assert plain["function_name"] == "langchain.ChatOpenAI"
    assert output_texts(plain) == [answer.content]
    assert plain["input_tokens"] > 0
    assert plain["output_tokens"] > 0
    assert plain["parameters"]["temperature"] == 0
    assert len(tool_call["output"]["messages"][0]["tool_calls"]) == len(called.tool_calls) == 2
    assert error["status"] == "ERROR"
    assert error["error_type"] == "PROVIDER_RATE_LIMIT"


# --- PromptLayer's ids and the follow-ups ----------------------------------------------------------

async def test_follow_ups_by_promptlayer_id_by_run_id_and_by_message_id(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append)
    first = chat_model("one").invoke("a", config={"callbacks": [handler]})
    second = chat_model("two").invoke("b", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    assert len(ids) == 2
    by_log_id = {meta(r)["plproxy_log_id"]: pl_id
                 for r, pl_id in zip(promptlayer.log_requests, ids, strict=True)}
    assert handler.track_score(ids[0], 100)
    assert handler.track_metadata(ids[0], {"foo": "bar", "n": 3})
    assert handler.track_prompt(first.id, "example", {"product": "toasters"}, version=1)  # type: ignore[arg-type]
    second_run = uuid.UUID(second.id.removeprefix("lc_run--")[:36])  # type: ignore[union-attr]
    assert handler.track_group(second_run, 7)
    assert handler.track_score(str(second_run), 10, name="accuracy")
    assert not handler.track_score(999_999, 50)  # an id this process never saw
    with pytest.raises(ValueError, match="0 to 100"):
        handler.track_score(ids[0], 101)
    assert await handler.aflush(10)
    first_pl = by_log_id[first.id.removeprefix("lc_run--")[:36]]  # type: ignore[union-attr]
    second_pl = by_log_id[str(second_run)]
    assert promptlayer.followups("track-score") == [
        {"request_id": first_pl, "score": 100},
        {"request_id": second_pl, "score": 10, "name": "accuracy"},
    ]
    assert promptlayer.followups("track-metadata") == [
        {"request_id": first_pl, "metadata": {"foo": "bar", "n": "3"}}
    ]
    assert promptlayer.followups("track-prompt") == [
        {"request_id": first_pl, "prompt_name": "example", "prompt_input_variables": {"product": "toasters"},
         "version": 1}
    ]
    assert promptlayer.followups("track-group") == [{"request_id": second_pl, "group_id": 7}]


async def test_pl_id_callback_runs_inside_the_seed_example(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    # The seed's pattern: score, metadata and prompt from inside pl_id_callback.
    handler: PromptLayerCallbackHandler

    def pl_id_callback(request_id: int) -> None:
        handler.track_score(request_id, 100)
        handler.track_metadata(request_id, {"foo": "bar"})
        handler.track_prompt(request_id, "example", {"product": "toasters"}, version=1)

    handler = PromptLayerCallbackHandler(pl_id_callback=pl_id_callback)
    FakeListLLM(responses=["toast"]).invoke("toasters", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    assert await handler.aflush(10)  # the follow-ups queued by the callback
    [pl_id] = promptlayer.accepted_ids
    assert promptlayer.followups("track-score") == [{"request_id": pl_id, "score": 100}]
    assert len(promptlayer.followups("track-metadata")) == len(promptlayer.followups("track-prompt")) == 1


async def test_a_failing_pl_id_callback_is_logged_once_and_changes_nothing(
    env: Path, promptlayer: PromptLayerStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    REGISTRY._warned.discard("pl_id_callback_failed")
    calls: list[int] = []

    def bad(request_id: int) -> None:
        calls.append(request_id)
        raise RuntimeError("user bug")

    handler = PromptLayerCallbackHandler(pl_id_callback=bad)
    with caplog.at_level(logging.DEBUG, logger="plproxy_langchain"):
        for _ in range(3):
            chat_model("x").invoke("a", config={"callbacks": [handler]})
        assert await handler.aflush(10)
    assert len(calls) == 3
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "pl_id_callback" in r.getMessage()]
    assert len(warnings) == 1


# --- the host never waits, never breaks ------------------------------------------------------------

async def test_invoke_does_not_wait_for_a_slow_promptlayer(
    env: Path, promptlayer: PromptLayerStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    promptlayer.delay = 0.5
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=lambda _id: None)
    model = FakeListChatModel(responses=["fast"])
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        model.invoke("hi", config={"callbacks": [handler]})
        timings.append(time.perf_counter() - start)
    bare = []
    for _ in range(20):
        start = time.perf_counter()
        model.invoke("hi")
        bare.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\n[handler latency] invoke with the handler, PromptLayer at 500 ms: first "
              f"{timings[0] * 1000:.2f} ms, median {sorted(timings)[10] * 1000:.2f} ms, max "
              f"{max(timings) * 1000:.2f} ms; without the handler: median {sorted(bare)[10] * 1000:.2f} ms")
    assert max(timings) < 0.25
    assert await handler.aflush(15)
    assert len(promptlayer.log_requests) == 20
    found = REGISTRY.existing(handler._destination)
    assert found is not None
    assert found[1].waiting == 0


async def test_promptlayer_down_then_back(env: Path, promptlayer: PromptLayerStandIn) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append)
    await promptlayer.stop()
    model = FakeListChatModel(responses=["while down"])
    for _ in range(3):
        assert model.invoke("hi", config={"callbacks": [handler]}).content == "while down"
    assert not await handler.aflush(1.0)  # nothing can be sent: flush says so, by its deadline
    await promptlayer.start()
    assert await handler.aflush(15)
    assert len(promptlayer.log_requests) == 3
    assert sorted(ids) == promptlayer.accepted_ids


async def test_handler_callbacks_never_raise(env: Path, promptlayer: PromptLayerStandIn) -> None:
    handler = PromptLayerCallbackHandler()
    run_id = uuid.uuid4()
    # unknown runs, odd inputs and results: nothing reaches the caller
    handler.on_llm_end(object(), run_id=uuid.uuid4())
    handler.on_llm_new_token("x", run_id=uuid.uuid4())
    handler.on_chat_model_start(None, [[HumanMessage("hi")]], run_id=run_id)  # type: ignore[arg-type]
    handler.on_llm_end(object(), run_id=run_id)  # a result that is not an LLMResult
    handler.on_llm_start({}, None, run_id=uuid.uuid4())  # type: ignore[arg-type]
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert record["function_name"] == "langchain.unknown"
    assert not handler._runs


def test_community_positional_order_is_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLPROXY_DATA_DIR", str(tmp_path))
    handler = PromptLayerCallbackHandler(print, ["tag"])  # the community handler's (pl_id_callback, pl_tags)
    assert handler.pl_tags == ["tag"]
    assert handler.pl_id_callback is print
    with pytest.raises(TypeError):
        PromptLayerCallbackHandler(pl_tags="not-a-list")


def test_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"PLPROXY_DATA_DIR": "/data", "PROMPTLAYER_API_KEY": KEY}
    assert resolve_destination(None, None, None, env) == StoreSpec("/data", KEY, "https://api.promptlayer.com")
    other = resolve_destination("pl_other", None, None, env)
    assert isinstance(other, StoreSpec)
    assert other.data_dir == workspace_dir("/data", "pl_other", "https://api.promptlayer.com")
    assert other.data_dir.startswith("/data/workspaces/")
    assert "pl_other" not in other.data_dir
    assert resolve_destination(None, None, "http://tok@127.0.0.1:8788/v1/", env) == SidecarSpec(
        "http://127.0.0.1:8788", "tok"
    )
    assert resolve_destination(None, None, None, {**env, "PLPROXY_URL": "http://127.0.0.1:9"}) == SidecarSpec(
        "http://127.0.0.1:9", None
    )
    assert "tok" not in repr(SidecarSpec("http://127.0.0.1:1", "tok"))
    assert KEY not in repr(
        resolve_destination(None, None, None, env)
    )
    with pytest.raises(ValueError, match="proxy_url"):
        resolve_destination(None, None, "ftp://x", env)


# --- without a key, through a sidecar --------------------------------------------------------------

async def test_no_key_keeps_records_in_the_local_store_with_one_warning(
    env: Path, promptlayer: PromptLayerStandIn, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("PROMPTLAYER_API_KEY")
    REGISTRY._warned.discard("records_kept")
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=lambda _id: None)
    with caplog.at_level(logging.WARNING, logger="plproxy_langchain"):
        for _ in range(3):
            FakeListLLM(responses=["kept"]).invoke("p", config={"callbacks": [handler]})
        assert await handler.aflush(10)
        FakeListLLM(responses=["kept"]).invoke("p", config={"callbacks": [PromptLayerCallbackHandler()]})
        assert await handler.aflush(10)
    assert [r.getMessage() for r in caplog.records].count(next(
        r.getMessage() for r in caplog.records if "kept in the local store" in r.getMessage())) == 1
    await asyncio.to_thread(plproxy_langchain.shutdown, 5)
    store = Store(env, has_default_key=False)
    try:
        assert store.counts()["kept"] == 4
        assert sorted(s.tags for s in store.recent(4)) == [(), tuple(TAGS), tuple(TAGS), tuple(TAGS)]
    finally:
        store.close()
    assert promptlayer.received == []


async def test_through_a_sidecar(env: Path, promptlayer: PromptLayerStandIn, proxy: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTLAYER_API_KEY")  # the sidecar's key does the work
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append, proxy_url=proxy.url)
    model = chat_model("via the sidecar", "second")
    answer = await asyncio.to_thread(model.invoke, "hi", config={"callbacks": [handler]})
    await model.ainvoke("again", config={"callbacks": [handler]})
    assert await handler.aflush(15)
    records = promptlayer.log_requests
    assert len(records) == 2
    assert_valid(records)
    assert sorted(ids) == promptlayer.accepted_ids
    run_id = answer.id.removeprefix("lc_run--")[:36]  # type: ignore[union-attr]
    assert run_id in {meta(r)["plproxy_log_id"] for r in records}
    assert promptlayer.api_keys_seen == {"pl_test_key"}  # the sidecar's own key
    status = await asyncio.to_thread(proxy.store.get, run_id)
    assert status.state == "exported"
    # follow-ups go through the sidecar too
    assert handler.track_score(ids[0], 77)
    assert await handler.aflush(10)
    await promptlayer.wait_for_received(3)
    for _ in range(100):
        if promptlayer.followups("track-score"):
            break
        await asyncio.sleep(0.05)
    assert promptlayer.followups("track-score") == [{"request_id": ids[0], "score": 77}]


async def test_sidecar_down_then_up(env: Path, promptlayer: PromptLayerStandIn, start_proxy: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.proxy_fixtures import free_port

    port = free_port()
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, proxy_url=f"http://127.0.0.1:{port}")
    FakeListLLM(responses=["queued"]).invoke("p", config={"callbacks": [handler]})
    assert not await handler.aflush(0.5)
    from aiohttp.test_utils import TestServer
    from prometheus_client import CollectorRegistry

    from plproxy.server import create_app
    from plproxy.settings import Settings

    settings = Settings.from_sources({"PLPROXY_DATA_DIR": str(env / "sidecar"), "PROMPTLAYER_API_KEY": "pl_x",
                                      "PROMPTLAYER_BASE_URL": promptlayer.base_url})
    server = TestServer(create_app(settings, registry=CollectorRegistry()), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        assert await handler.aflush(15)
        await promptlayer.wait_for_log_requests(1, timeout=10)
    finally:
        await asyncio.to_thread(plproxy_langchain.shutdown, 5)
        await server.close()


# --- no state left behind --------------------------------------------------------------------------

async def settled_memory(handler: PromptLayerCallbackHandler) -> int:
    """Bytes allocated by plproxy_langchain's code and still alive once everything is stored.

    Flushed twice: the store's writer holds on to its last batch until the next one arrives, and the
    second flush's barrier makes that last batch an empty one."""
    assert await handler.aflush(60)
    assert await handler.aflush(60)
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    return sum(s.size for s in snapshot.filter_traces(
        [tracemalloc.Filter(True, "*plproxy_langchain*")]).statistics("filename"))


async def test_ten_thousand_runs_leave_no_state_behind(
    env: Path, promptlayer: PromptLayerStandIn, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PROMPTLAYER_API_KEY")  # kept in the store: this is about the handler's memory
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=lambda _id: None)
    llm = FakeListLLM(responses=["r"])
    chat = FakeListChatModel(responses=["c"])
    config: Any = {"callbacks": [handler]}

    def run(n: int) -> None:
        for i in range(n):
            (llm if i % 2 else chat).invoke("p", config=config)

    tracemalloc.start()
    try:
        await asyncio.to_thread(run, 1_000)  # LangChain's and the store's caches warm up
        before = await settled_memory(handler)
        started = time.perf_counter()
        await asyncio.to_thread(run, 10_000)
        elapsed = time.perf_counter() - started
        after = await settled_memory(handler)
    finally:
        tracemalloc.stop()
    with capsys.disabled():
        print(f"\n[handler memory] 10,000 runs in {elapsed:.1f} s (tracemalloc on); memory allocated by "
              f"plproxy_langchain code and still held: {before / 1024:.1f} KiB after 1,000 runs, "
              f"{after / 1024:.1f} KiB after 11,000")
    assert handler._runs == {}
    found = REGISTRY.existing(handler._destination)
    assert found is not None
    assert found[1].waiting == 0  # type: ignore[attr-defined]
    assert after - before < 64 * 1024  # 7 bytes kept per run would already be 64 KiB


@pytest.fixture
def no_stray_threads() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name == "plproxy-langchain"]


async def test_shutdown_stops_the_background_thread(env: Path, promptlayer: PromptLayerStandIn,
                                                    no_stray_threads: None) -> None:
    handler = PromptLayerCallbackHandler()
    FakeListLLM(responses=["r"]).invoke("p", config={"callbacks": [handler]})
    assert await asyncio.to_thread(plproxy_langchain.shutdown, 10)
    assert len(promptlayer.log_requests) == 1


async def test_a_sidecar_with_a_token_and_a_large_image_prompt(
    env: Path, promptlayer: PromptLayerStandIn, start_proxy: Any
) -> None:
    token = "sidecar-token-0123456789"
    proxy = await start_proxy(PLPROXY_AUTH_TOKENS=token)
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, proxy_url=proxy.url.replace("://", f"://{token}@"))
    # 900 kB: under the 1 MiB above which aiohttp warns that a bytes body blocks the loop, which the
    # sidecar's exporter (data=bytes) would meet in PromptLayer's direction
    image = "data:image/png;base64," + "A" * 900_000
    prompt = HumanMessage(content=[{"type": "text", "text": "describe"},
                                   {"type": "image_url", "image_url": {"url": image}}])
    await chat_model("a picture").ainvoke([prompt], config={"callbacks": [handler]})
    assert await handler.aflush(15)
    [record] = await promptlayer.wait_for_log_requests(1, timeout=10)
    assert record["input"]["messages"][0]["content"][1]["image_url"]["url"] == image


async def test_an_abandoned_stream_is_a_partial_record(env: Path, promptlayer: PromptLayerStandIn) -> None:
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    stream = chat_model("one two three four five").stream("go", config={"callbacks": [handler]})
    first = [next(stream).content, next(stream).content]
    stream.close()  # the caller stops reading, as `break` does once the generator is collected
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests
    assert_valid([record])
    assert (record["status"], record["error_type"]) == ("WARNING", "PROVIDER_PARTIAL_RESPONSE")
    assert output_texts(record) == ["".join(str(c) for c in first)]
    assert not handler._runs


EXIT_SCRIPT = """
from langchain_core.language_models import FakeListLLM
from plproxy_langchain import PromptLayerCallbackHandler

handler = PromptLayerCallbackHandler(pl_tags=["at-exit"],
                                     pl_id_callback=lambda i: print("pl id", i, flush=True))
print(FakeListLLM(responses=["bye"]).invoke("p", config={"callbacks": [handler]}), flush=True)
"""


async def test_records_are_flushed_at_interpreter_exit(env: Path, promptlayer: PromptLayerStandIn) -> None:
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXIT_SCRIPT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    [record] = promptlayer.log_requests
    assert record["tags"] == ["at-exit"]
    assert output.decode().splitlines() == ["bye", f"pl id {promptlayer.accepted_ids[0]}"]


async def test_a_chain_gives_one_record_whose_parent_is_the_chain_run(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    import copy

    from langchain_core.prompts import ChatPromptTemplate

    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    assert copy.deepcopy(handler) is handler
    prompt = ChatPromptTemplate.from_messages([("system", "You name {thing}s."), ("human", "{q}")])
    chain = prompt | chat_model("Toasty")
    chain_run = uuid.uuid4()
    answer = await chain.ainvoke({"thing": "company", "q": "toasters?"},
                                 config={"callbacks": [handler], "run_id": chain_run})
    assert answer.content == "Toasty"
    assert await handler.aflush(10)
    [record] = promptlayer.log_requests  # the chain and the prompt template are not model calls
    assert meta(record)["_langchain_parent_run_id"] == str(chain_run)
    assert record["input"]["messages"][0]["content"] == [{"type": "text", "text": "You name companys."}]


# --- hand-off: runs reach the loop in batches ------------------------------------------------------

async def test_a_burst_from_several_threads_all_arrives_and_flush_waits_for_it(
    env: Path, promptlayer: PromptLayerStandIn
) -> None:
    ids: list[int] = []
    handler = PromptLayerCallbackHandler(pl_tags=TAGS, pl_id_callback=ids.append)
    llm = FakeListLLM(responses=["r"])
    threads, per_thread = 4, 60
    scores: list[bool] = []

    def burst(n: int) -> None:
        for i in range(n):
            run_id = uuid.uuid4()
            llm.invoke(f"p{i}", config={"callbacks": [handler], "run_id": run_id})
            if i % 20 == 0:  # a follow-up by run id, queued right behind its record
                scores.append(handler.track_score(run_id, 42))

    def burst_then_flush() -> bool:
        workers = [threading.Thread(target=burst, args=(per_thread,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return handler.flush(30)  # no sleep first: flush itself takes what the loop has not yet

    assert await asyncio.to_thread(burst_then_flush)
    records = promptlayer.log_requests
    assert len(records) == threads * per_thread
    assert len({meta(r)["_langchain_run_id"] for r in records}) == threads * per_thread
    assert sorted(ids) == promptlayer.accepted_ids
    assert scores == [True] * (threads * per_thread // 20)
    assert len(promptlayer.followups("track-score")) == len(scores)


async def test_flush_right_after_submitting_takes_the_queued_runs(
    env: Path, promptlayer: PromptLayerStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMPTLAYER_API_KEY")  # kept in the store: counted there, nothing to wait for
    handler = PromptLayerCallbackHandler(pl_tags=TAGS)
    llm = FakeListLLM(responses=["r"])
    llm.invoke("warm", config={"callbacks": [handler]})
    assert await handler.aflush(10)
    found = REGISTRY.existing(handler._destination)
    assert found is not None
    runtime, sink = found
    # Hold the loop so that the runs pile up in the inbox, woken once, and are not taken yet.
    release = threading.Event()
    runtime.call_soon(release.wait, 10)
    for _ in range(100):
        llm.invoke("p", config={"callbacks": [handler]})
    assert len(sink._inbox) == 100  # type: ignore[attr-defined]
    flushed = asyncio.create_task(handler.aflush(10))
    release.set()
    assert await flushed
    assert len(sink._inbox) == 0  # type: ignore[attr-defined]
    await asyncio.to_thread(plproxy_langchain.shutdown, 5)
    store = Store(env, has_default_key=False)
    try:
        assert store.counts()["kept"] == 101
    finally:
        store.close()


BURST_EXIT_SCRIPT = """
import os, sys
from langchain_core.language_models import FakeListLLM
import plproxy_langchain
from plproxy_langchain import PromptLayerCallbackHandler

handler = PromptLayerCallbackHandler(pl_tags=[sys.argv[1]])
llm = FakeListLLM(responses=["bye"])
for _ in range(100):
    llm.invoke("p", config={"callbacks": [handler]})
if sys.argv[1] == "fork":
    plproxy_langchain.shutdown()  # as the docs ask before os.fork()
    pid = os.fork()
    for _ in range(100):  # parent and child each: the child starts its own background
        llm.invoke("p", config={"callbacks": [handler]})
    if pid:
        assert os.waitpid(pid, 0)[1] == 0
print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["exit", "fork"])
async def test_a_burst_just_before_exit_or_fork_is_all_recorded(
    env: Path, promptlayer: PromptLayerStandIn, mode: str
) -> None:
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BURST_EXIT_SCRIPT, mode, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    expected = 100 if mode == "exit" else 300
    records = promptlayer.log_requests
    assert len(records) == expected, output.decode()
    assert len({meta(r)["_langchain_run_id"] for r in records}) == expected


def test_the_background_loop_is_uvloops_when_installed_else_asyncios(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    import uvloop

    from plproxy_langchain.runtime import _new_loop

    loop = _new_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as without the `fast` extra: the import fails
    loop = _new_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()
