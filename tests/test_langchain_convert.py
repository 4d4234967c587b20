"""The pure part of the handler: a LangChain run as a plproxy record and a `/log-request` body (tables)."""

from __future__ import annotations

import enum
import uuid
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult
from pydantic import SecretStr

from plproxy_langchain.convert import (
    RunInfo,
    _message,
    build_payload,
    clean_parameters,
    model_name,
    openai_message,
    plain_json,
    provider_for,
    to_record,
    usage_of,
)
from tests.fakes.promptlayer import validate_log_request


@pytest.mark.parametrize(
    ("class_name", "ls_provider", "expected"),
    [
        ("ChatOpenAI", "openai", "openai"),
        ("AzureChatOpenAI", "azure", "openai.azure"),
        ("ChatAnthropic", "anthropic", "anthropic"),
        ("LlamaCpp", "llamacpp", "llamacpp"),
        ("ChatLlamaCpp", "llamacpp", "llamacpp"),
        ("GPT4All", None, "gpt4all"),
        ("ChatVertexAI", "google_vertexai", "vertexai"),
        ("SomethingNew", "google_genai", "google"),
        ("SomethingNew", "acme", "acme"),
        ("SomethingNew", None, "langchain"),
    ],
)
def test_provider(class_name: str, ls_provider: str | None, expected: str) -> None:
    assert provider_for(class_name, {"ls_provider": ls_provider} if ls_provider else {}) == expected


@pytest.mark.parametrize(
    ("params", "metadata", "expected"),
    [
        ({"model_name": "gpt-4o"}, {"ls_model_name": "gpt-4o-mini"}, "gpt-4o-mini"),
        ({"model": "claude-3"}, {}, "claude-3"),
        ({"model_path": "/models/gemma-3-270m-q4_k_m.gguf"}, {}, "gemma-3-270m-q4_k_m"),
        ({"model": "./models/gpt4all-model.bin"}, {}, "gpt4all-model"),
        ({"_type": "fake-list"}, {}, "fake-list"),
        ({}, {}, "unknown"),
    ],
)
def test_model_name(params: dict[str, Any], metadata: dict[str, Any], expected: str) -> None:
    assert model_name(params, metadata) == expected


class Client:
    def __repr__(self) -> str:
        return "Client(api_key='sk-leakleakleakleakleakleak')"


def test_parameters_lose_every_credential() -> None:
    params = {
        "_type": "openai-chat", "temperature": 0.2, "max_tokens": 16, "stop": ("a", "b"),
        "openai_api_key": SecretStr("sk-abcdefghijklmnopqrstuvwxyz"), "api_key": "sk-plain",
        "huggingfacehub_api_token": "hf_xxx", "default_headers": {"Authorization": "Bearer x", "X-Team": "t"},
        "client": Client(), "secret_thing": SecretStr("s"), "extra": {"token": "t", "n": 1},
    }
    assert clean_parameters(params) == {
        "temperature": 0.2, "max_tokens": 16, "stop": ["a", "b"], "default_headers": {"X-Team": "t"},
        "client": "<Client>", "extra": {"n": 1},
    }


class Colour(enum.Enum):
    RED = "red"
    NESTED = ("a", 1)


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


class ChatWithFallback(ChatGeneration):
    """A chat generation subclass: its message is found like ChatGeneration's."""


class WithProperty(Generation):
    @property
    def message(self) -> AIMessage:
        return AIMessage("from a property")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None), (True, True), (3, 3), (2.5, 2.5), ("s", "s"),
        (Tag("t"), "t"), (Level.HIGH, 3), (Colour.RED, "red"), (Colour.NESTED, ["a", 1]),
        ({1: "one", "api_key": "x", "ok": SecretStr("s"), "n": {"token": "t", "m": [1, (2, 3)]}},
         {"1": "one", "n": {"m": [1, [2, 3]]}}),
        ([SecretStr("s"), "kept", {"password": "p"}], ["kept", {}]),
        (frozenset({"only"}), ["only"]), ({"x"}, ["x"]),
        (Client(), "<Client>"), (int, "<type>"),
        (AIMessage("hi"), AIMessage("hi").model_dump()),
    ],
)
def test_plain_json(value: Any, expected: Any) -> None:
    assert plain_json(value) == expected


def test_plain_json_stops_at_depth() -> None:
    deep: Any = "leaf"
    for _ in range(30):
        deep = {"k": [deep]}
    text = str(plain_json(deep))
    assert "<nested too deep>" in text
    assert "leaf" not in text


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        (Generation(text="plain"), None),
        (ChatGeneration(message=AIMessage("chat")), "chat"),
        (ChatWithFallback(message=AIMessage("sub")), "sub"),
        (WithProperty(text="p"), "from a property"),
    ],
)
def test_the_message_of_a_generation(generation: Any, expected: str | None) -> None:
    message = _message(generation)
    assert (message.content if message is not None else None) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (HumanMessage("hi"), {"role": "user", "content": "hi"}),
        (AIMessage(content=[{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "42"}]),
         {"role": "assistant", "content": [{"type": "text", "text": "42"}], "reasoning_content": "hmm"}),
        (AIMessage("x", additional_kwargs={"reasoning_content": "r"}),
         {"role": "assistant", "content": "x", "reasoning_content": "r"}),
        (AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "c1"}]),
         {"role": "assistant", "content": None,
          "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
    ],
)
def test_openai_message(message: Any, expected: dict[str, Any]) -> None:
    assert openai_message(message) == expected


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (LLMResult(generations=[[Generation(text="x")]], llm_output={
            "token_usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
         {"prompt_tokens": 5, "completion_tokens": 2}),
        (LLMResult(generations=[[ChatGeneration(message=AIMessage(
            "x", usage_metadata={"input_tokens": 4, "output_tokens": 1, "total_tokens": 5}))]]),
         {"prompt_tokens": 4, "completion_tokens": 1}),
        (LLMResult(generations=[[Generation(text="x", generation_info={"prompt_eval_count": 9,
                                                                       "eval_count": 3})]]),
         {"prompt_tokens": 9, "completion_tokens": 3}),
        (LLMResult(generations=[[Generation(text="x")]], llm_output={"token_usage": {}}), None),
        (LLMResult(generations=[[Generation(text="x")]]), None),
    ],
)
def test_usage(result: LLMResult, expected: dict[str, int] | None) -> None:
    assert usage_of(result) == expected


def run(chat: bool = True, **overrides: Any) -> RunInfo:
    fields: dict[str, Any] = {
        "chat": chat, "start_time": 1_700_000_000.0, "class_name": "ChatOpenAI" if chat else "OpenAI",
        "inputs": [[HumanMessage("hi")]] if chat else ["prompt"],
        "invocation_params": {"model": "gpt-4o", "temperature": 0}, "run_metadata": {},
        "tags": [], "parent_run_id": None,
    }
    return RunInfo(**{**fields, **overrides})


class StatusError(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@pytest.mark.parametrize(
    ("error", "status", "error_type", "message"),
    [
        (StatusError("slow down", 429), "ERROR", "PROVIDER_RATE_LIMIT", "StatusError: slow down"),
        (StatusError("Incorrect API key provided: sk-abcdefghijklmnopqrstu", 401), "ERROR",
         "PROVIDER_AUTH_ERROR", "StatusError: Incorrect API key provided: [REDACTED]"),
        (TimeoutError(), "ERROR", "PROVIDER_TIMEOUT", "TimeoutError"),
        (RuntimeError("boom"), "ERROR", "PROVIDER_ERROR", "RuntimeError: boom"),
        (GeneratorExit(), "WARNING", "PROVIDER_PARTIAL_RESPONSE", "GeneratorExit"),
    ],
)
def test_errors(error: BaseException, status: str, error_type: str, message: str) -> None:
    info = run(tokens=["partial ", "answer"])
    body = build_payload(to_record(info, run_id=uuid.uuid4(), index=0, end_time=1_700_000_001.0, error=error))
    assert validate_log_request(body) == []
    assert (body["status"], body["error_type"], body["error_message"]) == (status, error_type, message)
    # what was streamed before the failure is kept
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "partial answer"}]


def test_a_completion_record_with_two_prompts_has_one_record_each() -> None:
    info = run(chat=False, inputs=["a", "b"])
    result = LLMResult(generations=[[Generation(text="A")], [Generation(text="B")]])
    run_id = uuid.uuid4()
    first, second = (build_payload(to_record(info, run_id=run_id, index=i, end_time=1_700_000_001.0,
                                             result=result, tags=("t",), metadata={"k": {"n": 1}}))
                     for i in (0, 1))
    assert first["metadata"]["plproxy_log_id"] == str(run_id) != second["metadata"]["plproxy_log_id"]
    assert first["metadata"]["k"] == '{"n":1}'
    assert (first["input"]["content"][0]["text"], second["output"]["content"][0]["text"]) == ("a", "B")
    assert first["api_type"] == "chat-completions"  # OpenAI's legacy completions, the provider's own API
