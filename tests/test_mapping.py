"""plproxy.mapping: a LogRecord into PromptLayer's /log-request body, checked against the public schema.

Two checks: `validate_log_request` (the PromptLayer stand-in's, which also accepts the SDK's epoch-float
times, as the service does) and `strict_problems`, the copied schema exactly as published, which is what
plproxy's own bodies must pass.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from plproxy.mapping import MAPPINGS, content_blocks, is_credential_key, iso_time, to_log_request
from plproxy.record import Annotations, Api, LogRecord, Outcome
from tests.fakes.promptlayer import validate_log_request

DATA = Path(__file__).parent / "data"
START = 1795593993.716818
END = 1795593994.1368182


# --- the strict schema check ---------------------------------------------------------------------

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


@functools.cache
def _strict_validator() -> jsonschema.Draft202012Validator:
    spec = json.loads((DATA / "openapi-logging.json").read_text())
    registry: Registry[Any] = Registry().with_resource(
        "urn:pl", Resource.from_contents(spec, default_specification=DRAFT202012))
    formats = jsonschema.FormatChecker()
    formats.checks("date-time")(_is_datetime)
    return jsonschema.Draft202012Validator({"$ref": "urn:pl#/components/schemas/LogRequest"},
                                           registry=registry, format_checker=formats)


def strict_problems(body: Any) -> list[str]:
    """Problems with a body under the published schema as it stands (times must be RFC 3339 strings)."""
    return [f"{'.'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
            for e in _strict_validator().iter_errors(body)]


def assert_valid(body: dict[str, Any]) -> None:
    assert validate_log_request(body) == []
    assert strict_problems(body) == []


# --- records -------------------------------------------------------------------------------------

CHAT_REQUEST = {"model": "gpt-4o-mini", "temperature": 0.2,
                "messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Say hi to Ada"}]}
CHAT_RESPONSE = {
    "id": "chatcmpl-fake123", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "system_fingerprint": "fp_fake",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "Hello, Ada!", "refusal": None}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
}


LOG_ID = "6f1c2f1e-0000-4000-8000-000000000001"


def record(api: Api = Api.CHAT, request: dict[str, Any] | None = None,
           response: dict[str, Any] | None = CHAT_RESPONSE, **fields: Any) -> LogRecord:
    return LogRecord(log_id=LOG_ID, api=api, provider=fields.pop("provider", "openai"),
                     request=CHAT_REQUEST if request is None else request, response=response,
                     start_time=START, end_time=END, **fields)


def body_of(**fields: Any) -> dict[str, Any]:
    return to_log_request(record(**fields))


def assistant(**message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **message}}]}


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": CITY}}

# Every API and outcome, each expected to give a schema-valid body.
VALID_RECORDS = [
    ("chat", record()),
    ("chat with tools and tool calls", record(
        request={"model": "gpt-4o", "tools": [TOOL], "tool_choice": "auto",
                 "messages": [{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [
                                  {"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]},
        response=assistant(content=None, tool_calls=[
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]))),
    ("chat with every content part", record(request={"model": "gpt-4o", "messages": [
        {"role": "developer", "content": "Be kind", "name": "ops"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"}},
            {"type": "file", "file": {"file_id": "file-123"}},
            {"type": "mystery", "x": 1}]},
        {"role": "function", "name": "f", "content": "1"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "function_call":
            {"name": "f", "arguments": "{}"}}]})),
    ("chat with legacy functions", record(request={"model": "gpt-3.5-turbo", "messages": [],
                                                   "functions": [{"name": "f", "parameters": {}}],
                                                   "function_call": {"name": "f"}})),
    ("chat, two choices", record(response={**CHAT_RESPONSE, "choices": [
        *CHAT_RESPONSE["choices"], {"index": 1, "finish_reason": "stop", "message": {"role": "assistant",
                                                                                     "content": "Hi!"}}]})),
    ("chat, refusal", record(response=assistant(content=None, refusal="I can't help with that."))),
    ("chat, no response", record(response=None, outcome=Outcome.TIMEOUT)),
    ("completion", record(Api.COMPLETION, {"model": "gpt-3.5-turbo-instruct", "prompt": "Once",
                                           "max_tokens": 5},
                          {"model": "gpt-3.5-turbo-instruct", "choices": [{"index": 0, "text": " upon"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 2}})),
    ("completion, token prompt", record(Api.COMPLETION, {"model": "m", "prompt": [[1, 2], [3]]}, None)),
    ("embedding", record(Api.EMBEDDING, {"model": "text-embedding-3-small", "input": ["a", "b"]},
                         {"model": "text-embedding-3-small", "object": "list",
                          "data": [{"embedding": [0.1] * 8, "index": 0},
                                   {"embedding": [0.2] * 8, "index": 1}],
                          "usage": {"prompt_tokens": 2, "total_tokens": 2}})),
    ("responses", record(Api.RESPONSES, {"model": "gpt-4.1", "input": "hi"},
                                        {"id": "resp_1", "model": "gpt-4.1", "output": [],
                                         "usage": {"input_tokens": 3, "output_tokens": 5}})),
    ("anthropic", record(Api.ANTHROPIC_MESSAGES, {"model": "claude-x", "max_tokens": 9,
                                                                 "system": "s", "messages": []},
                                        {"id": "msg_1", "model": "claude-x", "content": []},
                                        provider="anthropic")),
    ("partial", record(outcome=Outcome.PARTIAL, error_message="the client left")),
    ("upstream error", record(response={"error": {"message": "Rate limit", "code": "rate_limit_exceeded"}},
                              outcome=Outcome.UPSTREAM_ERROR, status_code=429)),
    ("annotated", record(annotations=Annotations(tags=("a", "b" * 600), metadata={"k": "v"}, prompt_name="p",
                                                 prompt_version_number=3, prompt_input_variables={"x": 1},
                                                 score=80, prompt_label="prod", group_id=7))),
]


@pytest.mark.parametrize("rec", [pytest.param(r, id=n) for n, r in VALID_RECORDS])
def test_mapped_body_is_schema_valid(rec: LogRecord) -> None:
    assert_valid(to_log_request(rec))


def test_every_api_has_a_mapping() -> None:
    assert set(MAPPINGS) == set(Api)


# --- the validators can fail ---------------------------------------------------------------------

def test_string_content_fails_validation() -> None:
    body = body_of()
    body["input"]["messages"][0]["content"] = "You are terse."
    assert validate_log_request(body) != []
    assert strict_problems(body) != []


@pytest.mark.parametrize(("field", "value"), [
    ("request_start_time", "yesterday"),
    ("request_start_time", "2026-11-25T10:05:19"),  # no offset
    ("tags", ["x" * 513]),
    ("metadata", {"n": 1}),
    ("error_type", "PROVIDER_OOPS"),
    ("score", 101),
])
def test_bad_field_fails_validation(field: str, value: Any) -> None:
    assert strict_problems({**body_of(), field: value}) != []


# --- the captured SDK body -----------------------------------------------------------------------

CAPTURE = json.loads((DATA / "captures" / "log-request-chat.json").read_text())["json"]


def test_captured_sdk_body_passes_the_stand_in() -> None:
    assert validate_log_request(CAPTURE) == []


def test_published_schema_refuses_the_sdks_epoch_float_times() -> None:
    problems = strict_problems(CAPTURE)
    assert sorted(p.split(":")[0] for p in problems) == ["request_end_time", "request_start_time"]


def test_captured_sdk_body_with_iso_times_passes_the_published_schema() -> None:
    body = {**CAPTURE, "request_start_time": iso_time(CAPTURE["request_start_time"]),
            "request_end_time": iso_time(CAPTURE["request_end_time"])}
    assert strict_problems(body) == []


@pytest.mark.parametrize("field", ["provider", "model", "input", "output", "parameters", "input_tokens",
                                   "output_tokens", "function_name", "api_type", "status"])
def test_mapping_matches_the_sdk_capture(field: str) -> None:
    assert body_of()[field] == CAPTURE[field]


def test_mapping_keeps_the_captures_times_to_the_microsecond() -> None:
    body = body_of()
    parsed = [datetime.fromisoformat(body[k]).timestamp() for k in ("request_start_time", "request_end_time")]
    assert parsed == pytest.approx([CAPTURE["request_start_time"], CAPTURE["request_end_time"]], abs=1e-6)


# --- times ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("epoch", "text"), [
    (0.0, "1970-01-01T00:00:00.000000Z"),
    (1700000000.5, "2023-11-14T22:13:20.500000Z"),
    (1700000000.123456, "2023-11-14T22:13:20.123456Z"),
])
def test_iso_time(epoch: float, text: str) -> None:
    assert iso_time(epoch) == text


def test_iso_time_rounds_as_datetime_does() -> None:
    import random

    rng = random.Random(7)
    edges = [1e9 + k / 1e6 + d for k in range(0, 3_000_000, 7919) for d in (0.0, 5e-7, -5e-7, 9.999e-7)]
    epochs = [rng.uniform(0, 4e9) for _ in range(5000)] + edges + [
        0.0, -0.0000004, -1.5, 0.9999999999, 1.9999995, 1700000000.9999996, 1700000000.0000005]
    for epoch in epochs:
        expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")
        assert iso_time(epoch) == expected.replace("+00:00", "Z"), epoch


# --- credentials ---------------------------------------------------------------------------------

CANARY = "sk-canary0123456789abcdefABCDEF"
CREDENTIAL_REQUESTS = [
    ("api_key", {"api_key": CANARY}),
    ("api-key", {"api-key": CANARY}),
    ("Authorization", {"Authorization": f"Bearer {CANARY}"}),
    ("x-api-key", {"x-api-key": CANARY}),
    ("openai_api_key", {"openai_api_key": CANARY}),
    ("client_secret", {"client_secret": CANARY}),
    ("nested in extra_body", {"extra_body": {"api_key": CANARY, "top_k": 3}}),
    ("nested in a list", {"extra": [{"token": CANARY}]}),
    ("value under an innocent name", {"user": CANARY}),
    ("bearer value", {"note": f"Bearer {CANARY}"}),
    ("unrepresentable tool", {"tools": [{"type": "custom", "name": "x", "api_key": CANARY}]}),
]


@pytest.mark.parametrize("extra", [pytest.param(e, id=n) for n, e in CREDENTIAL_REQUESTS])
@pytest.mark.parametrize("api", list(Api))
def test_no_credential_reaches_the_body(api: Api, extra: dict[str, Any]) -> None:
    rec = record(api, {**CHAT_REQUEST, "prompt": "p", "input": "i", **extra},
                 annotations=Annotations(metadata={"api_key": CANARY, "ok": "yes"}),
                 extra_metadata={"secret": CANARY})
    body = to_log_request(rec)
    assert CANARY.encode() not in orjson.dumps(body)
    assert_valid(body)


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in (k, *_keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


def test_no_key_named_like_a_credential() -> None:
    extra = {k: v for _, e in CREDENTIAL_REQUESTS for k, v in e.items()}
    body = body_of(request={**CHAT_REQUEST, **extra}, annotations=Annotations(metadata={"password": "x"}))
    assert [k for k in _keys(body) if is_credential_key(k)] == []


def test_innocent_parameters_survive_the_credential_filter() -> None:
    innocent = {"max_tokens": 5, "max_completion_tokens": 7, "top_logprobs": 2, "prompt_cache_key": "c",
                "user": "ada", "metadata": {"team": "search"}, "seed": 1}
    assert body_of(request={**CHAT_REQUEST, **innocent})["parameters"] == {"temperature": 0.2, **innocent}


@pytest.mark.parametrize(("key", "credential"), [
    ("api_key", True), ("API-Key", True), ("x-api-key", True), ("authorization", True), ("token", True),
    ("access_token", True), ("client_secret", True), ("password", True), ("aws_access_key_id", True),
    ("max_tokens", False), ("prompt_cache_key", False), ("top_p", False), ("user", False),
])
def test_is_credential_key(key: str, credential: bool) -> None:
    assert is_credential_key(key) is credential


# --- parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("api", "request_", "parameters"), [
    pytest.param(Api.CHAT, {"model": "m", "messages": [], "stream": True,
                            "stream_options": {"include_usage": True}, "tools": [TOOL], "tool_choice": "auto",
                            "functions": [{"name": "f"}],
                            "function_call": "auto", "n": 2}, {"n": 2}, id="chat excludes its template"),
    pytest.param(Api.CHAT, {"model": "m", "messages": [], "response_format": {"type": "json_object"}},
                 {"response_format": {"type": "json_object"}}, id="JSON values kept"),
    pytest.param(Api.CHAT, {"model": "m", "messages": [], "tools": [TOOL, {"type": "web_search"}]},
                 {"tools": [{"type": "web_search"}]}, id="unrepresentable tools kept in parameters"),
    pytest.param(Api.CHAT, {"model": "m", "messages": [], "tool_choice": {"type": "allowed_tools"}},
                 {"tool_choice": {"type": "allowed_tools"}}, id="unrepresentable tool_choice kept"),
    pytest.param(Api.COMPLETION, {"model": "m", "prompt": "p", "suffix": "s", "echo": False},
                 {"suffix": "s", "echo": False}, id="completion"),
    pytest.param(Api.EMBEDDING, {"model": "m", "input": "x", "dimensions": 8, "encoding_format": "float"},
                 {"dimensions": 8, "encoding_format": "float"}, id="embedding"),
])
def test_parameters(api: Api, request_: dict[str, Any], parameters: dict[str, Any]) -> None:
    assert body_of(api=api, request=request_, response=None)["parameters"] == parameters


# --- model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("request_", "response", "hint", "model"), [
    ({"model": "gpt-4o"}, {"model": "gpt-4o-2024-08-06"}, None, "gpt-4o-2024-08-06"),
    ({"model": "gpt-4o"}, None, None, "gpt-4o"),
    ({"model": "gpt-4o"}, {"model": ""}, None, "gpt-4o"),
    ({}, None, "my-deployment", "my-deployment"),
    ({}, {"error": {"message": "x"}}, None, "unknown"),
])
def test_model(request_: dict[str, Any], response: dict[str, Any] | None, hint: str | None,
               model: str) -> None:
    assert body_of(request=request_, response=response, model_hint=hint)["model"] == model


# --- chat blueprints -----------------------------------------------------------------------------

def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


PDF = "data:application/pdf;base64,JVBE"


@pytest.mark.parametrize(("content", "blocks"), [
    pytest.param("hi", [text("hi")], id="string"),
    pytest.param(None, [], id="null"),
    pytest.param([], [], id="no parts"),
    pytest.param([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], [text("a"), text("b")],
                 id="text"),
    pytest.param([{"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}}],
                 [{"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}}],
                 id="image"),
    pytest.param([{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
                 [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}], id="image without detail"),
    pytest.param([{"type": "image_url", "image_url": "https://x/a.png"}],
                 [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
                 id="image url as a string"),
    pytest.param([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}}],
                 [{"type": "media", "media": {"title": "input_audio", "type": "audio/mp3",
                                              "url": "data:audio/mp3;base64,UklGRg==", "format": "base64"}}],
                 id="audio"),
    pytest.param([{"type": "file", "file": {"file_data": PDF, "filename": "a.pdf"}}],
                 [{"type": "media", "media": {"title": "a.pdf", "type": "application/pdf", "url": PDF,
                                              "format": "base64"}}],
                 id="inline file"),
    pytest.param([{"type": "file", "file": {"file_id": "file-1", "filename": "a.pdf"}}],
                 [text("[file: a.pdf (file-1)]")], id="file by id"),
    pytest.param([{"type": "refusal", "refusal": "no"}], [text("no")], id="refusal part"),
    pytest.param(["bare"], [text("bare")], id="bare string part"),
    pytest.param([{"type": "mystery", "v": 1}], [text('{"type":"mystery","v":1}')],
                 id="unknown part as JSON"),
])
def test_content_blocks(content: Any, blocks: list[dict[str, Any]]) -> None:
    assert content_blocks(content) == blocks


def input_messages(*messages: Any) -> list[dict[str, Any]]:
    body = body_of(request={"model": "m", "messages": list(messages)})
    result: list[dict[str, Any]] = body["input"]["messages"]
    return result


@pytest.mark.parametrize(("message", "mapped"), [
    pytest.param({"role": "system", "content": "s"}, {"role": "system", "content": [text("s")]}, id="system"),
    pytest.param({"role": "developer", "content": "d"}, {"role": "developer", "content": [text("d")]},
                 id="developer"),
    pytest.param({"role": "user", "content": "u", "name": "ada"}, {"role": "user", "content": [text("u")],
                                                                   "name": "ada"}, id="name kept"),
    pytest.param({"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                 {"role": "tool", "content": [text("18C")], "tool_call_id": "call_1"}, id="tool"),
    pytest.param({"role": "tool", "content": "18C"},
                 {"role": "tool", "content": [text("18C")], "tool_call_id": ""},
                 id="tool without id"),
    pytest.param({"role": "function", "name": "f", "content": "1"},
                 {"role": "function", "content": [text("1")], "name": "f"}, id="function"),
    pytest.param({"role": "function", "content": "1"},
                 {"role": "function", "content": [text("1")], "name": ""},
                 id="function without name"),
    pytest.param({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "assistant", "content": [], "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        id="assistant tool calls"),
    pytest.param({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                 {"role": "assistant", "content": [], "function_call": {"name": "f", "arguments": "{}"}},
                 id="assistant function_call"),
    pytest.param({"role": "assistant", "content": "x", "reasoning_content": "hmm"},
                 {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}, text("x")]},
                 id="reasoning becomes thinking"),
    pytest.param({"role": "ipython", "content": "x"}, {"role": "user", "content": [text("x")]},
                 id="unknown role"),
    pytest.param({"role": ["user"], "content": "x"}, {"role": "user", "content": [text("x")]},
                 id="unhashable role"),
])
def test_chat_input_message(message: dict[str, Any], mapped: dict[str, Any]) -> None:
    assert input_messages(message) == [mapped]


def test_non_message_entries_are_skipped() -> None:
    mapped = input_messages("junk", None, {"role": "user", "content": "u"})
    assert mapped == [{"role": "user", "content": [text("u")]}]


@pytest.mark.parametrize(("request_", "template"), [
    pytest.param({"tools": [TOOL]}, {"tools": [TOOL]}, id="tools"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "x": 1}}]},
                 {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
                 id="tool fields allow-listed"),
    pytest.param({"tool_choice": "required"}, {"tool_choice": "required"}, id="tool_choice string"),
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "f"}}},
                 {"tool_choice": {"type": "function", "function": {"name": "f"}}}, id="tool_choice function"),
    pytest.param({"functions": [{"name": "f", "description": "d"}], "function_call": "auto"},
                 {"functions": [{"name": "f", "description": "d"}], "function_call": "auto"}, id="functions"),
    pytest.param({"function_call": {"name": "f"}}, {"function_call": {"name": "f"}},
                 id="function_call named"),
])
def test_chat_template(request_: dict[str, Any], template: dict[str, Any]) -> None:
    blueprint = body_of(request={"model": "m", "messages": [], **request_})["input"]
    assert blueprint == {"type": "chat", "messages": [], **template}


CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(("response", "messages"), [
    pytest.param(CHAT_RESPONSE, [{"role": "assistant", "content": [text("Hello, Ada!")]}], id="text"),
    pytest.param(None, [], id="no response"),
    pytest.param({"error": {"message": "boom"}}, [], id="error body"),
    pytest.param(assistant(content=None, refusal="I can't."),
                 [{"role": "assistant", "content": [text("I can't.")]}],
                 id="refusal"),
    pytest.param(assistant(content=None, tool_calls=[CALL]),
                 [{"role": "assistant", "content": [], "tool_calls": [CALL]}],
                 id="tool calls"),
    pytest.param(assistant(content=None, audio={"id": "a", "data": "xx", "transcript": "hello"}),
                 [{"role": "assistant", "content": [text("hello")]}], id="audio transcript"),
    pytest.param({"choices": [{"index": 1, "message": {"role": "assistant", "content": "B"}},
                              {"index": 0, "message": {"role": "assistant", "content": "A"}}]},
                 [{"role": "assistant", "content": [text("A")]},
                  {"role": "assistant", "content": [text("B")]}],
                 id="one message per choice, in index order"),
])
def test_chat_output(response: dict[str, Any] | None, messages: list[dict[str, Any]]) -> None:
    assert body_of(response=response)["output"] == {"type": "chat", "messages": messages}


# --- completion and embedding blueprints ---------------------------------------------------------

@pytest.mark.parametrize(("prompt", "content"), [
    ("Once", [text("Once")]),
    (["a", "b"], [text("a"), text("b")]),
    ([1, 2, 3], [text("[1,2,3]")]),
    ([[1, 2], [3]], [text("[[1,2],[3]]")]),
])
def test_completion_input(prompt: Any, content: list[dict[str, Any]]) -> None:
    body = body_of(api=Api.COMPLETION, request={"model": "m", "prompt": prompt}, response=None)
    assert body["input"] == {"type": "completion", "content": content}


@pytest.mark.parametrize(("response", "content"), [
    ({"choices": [{"index": 0, "text": " upon a time"}]}, [text(" upon a time")]),
    (None, []),
])
def test_completion_output(response: dict[str, Any] | None, content: list[dict[str, Any]]) -> None:
    body = body_of(api=Api.COMPLETION, request={"model": "m", "prompt": "Once"}, response=response)
    assert body["output"] == {"type": "completion", "content": content}


@pytest.mark.parametrize(("response", "summary"), [
    ({"data": [{"embedding": [0.0] * 1536}] * 3}, "[embedding: 3 vectors \u00d7 1536 dims]"),
    ({"data": [{"embedding": [0.0] * 4}]}, "[embedding: 1 vector \u00d7 4 dims]"),
    ({"data": [{"embedding": "AAAA"}]}, "[embedding: 1 vector, base64]"),
])
def test_embedding_output_is_a_summary(response: dict[str, Any], summary: str) -> None:
    body = body_of(api=Api.EMBEDDING, request={"model": "m", "input": "x"}, response=response)
    assert body["output"] == {"type": "completion", "content": [text(summary)]}


def test_embedding_input() -> None:
    body = body_of(api=Api.EMBEDDING, request={"model": "m", "input": ["a", "b"]}, response=None)
    assert body["input"] == {"type": "completion", "content": [text("a"), text("b")]}


# --- annotations ---------------------------------------------------------------------------------

def test_tags_are_truncated() -> None:
    assert body_of(annotations=Annotations(tags=("a", "x" * 600)))["tags"] == ["a", "x" * 512]


@pytest.mark.parametrize(("metadata", "extra", "expected"), [
    pytest.param({"k": "v"}, {}, {"k": "v"}, id="strings kept"),
    pytest.param({"n": 1, "o": {"a": [1]}, "b": True}, {}, {"n": "1", "o": '{"a":[1]}', "b": "true"},
                 id="non-strings JSON-encoded"),
    pytest.param({"k": "a"}, {"k": "b", "estimated": "yes"}, {"k": "b", "estimated": "yes"},
                 id="extra merged"),
    pytest.param({"plproxy_log_id": "forged"}, {}, {}, id="log id cannot be forged"),
    pytest.param({"k" * 2000: "v"}, {}, {"k" * 1024: "v"}, id="key bounded"),
    pytest.param({"k": "v" * 10_000}, {}, {"k": "v" * 4095 + "\u2026"}, id="value bounded"),
])
def test_metadata(metadata: dict[str, Any], extra: dict[str, str], expected: dict[str, str]) -> None:
    body = body_of(annotations=Annotations(metadata=metadata), extra_metadata=extra)
    assert body["metadata"] == {**expected, "plproxy_log_id": "6f1c2f1e-0000-4000-8000-000000000001"}


@pytest.mark.parametrize(("annotations", "fields"), [
    pytest.param(Annotations(), {}, id="none"),
    pytest.param(Annotations(prompt_name="greet"), {"prompt_name": "greet"}, id="name"),
    pytest.param(Annotations(prompt_name="greet", prompt_version_number=3,
                             prompt_input_variables={"name": "Ada"}),
                 {"prompt_name": "greet", "prompt_version_number": 3,
                  "prompt_input_variables": {"name": "Ada"}},
                 id="name, version, variables"),
    pytest.param(Annotations(score=0), {"score": 0}, id="score zero"),
    pytest.param(Annotations(score=100), {"score": 100}, id="score"),
    pytest.param(Annotations(score=101, prompt_version_number=0), {}, id="out of range omitted"),
])
def test_prompt_fields_and_score(annotations: Annotations, fields: dict[str, Any]) -> None:
    body = body_of(annotations=annotations)
    keys = ("prompt_name", "prompt_version_number", "prompt_input_variables", "score")
    assert {k: body[k] for k in keys if k in body} == fields


def test_follow_up_fields_are_not_in_the_body() -> None:
    body = body_of(annotations=Annotations(prompt_name="p", prompt_label="prod", group_id=7))
    assert [k for k in ("prompt_label", "label", "group_id") if k in body] == []


# --- tokens, function name, api type -------------------------------------------------------------

@pytest.mark.parametrize(("usage", "tokens"), [
    pytest.param({"prompt_tokens": 12, "completion_tokens": 4}, {"input_tokens": 12, "output_tokens": 4},
                 id="openai"),
    pytest.param({"input_tokens": 7, "output_tokens": 2}, {"input_tokens": 7, "output_tokens": 2},
                 id="responses"),
    pytest.param({"prompt_tokens": 5, "total_tokens": 5}, {"input_tokens": 5}, id="embedding"),
    pytest.param(None, {}, id="no usage"),
    pytest.param({"prompt_tokens": "12", "completion_tokens": -1}, {}, id="junk usage"),
])
def test_tokens(usage: dict[str, Any] | None, tokens: dict[str, int]) -> None:
    body = body_of(response={**CHAT_RESPONSE, "usage": usage})
    assert {k: body[k] for k in ("input_tokens", "output_tokens") if k in body} == tokens


@pytest.mark.parametrize(("api", "function_name", "api_type"), [
    (Api.CHAT, "openai.chat.completions.create", "chat-completions"),
    (Api.COMPLETION, "openai.completions.create", "chat-completions"),
    (Api.EMBEDDING, "openai.embeddings.create", "chat-completions"),
    (Api.RESPONSES, "openai.responses.create", "responses"),
    (Api.ANTHROPIC_MESSAGES, "anthropic.messages.create", None),
])
def test_function_name_and_api_type(api: Api, function_name: str, api_type: str | None) -> None:
    body = body_of(api=api)
    assert (body["function_name"], body.get("api_type")) == (function_name, api_type)


def test_function_name_override() -> None:
    assert body_of(function_name="langchain.ChatOpenAI")["function_name"] == "langchain.ChatOpenAI"


# --- status and errors ---------------------------------------------------------------------------

def openai_error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": code or "server_error", "param": None, "code": code}}


@pytest.mark.parametrize(("outcome", "status_code", "response", "status", "error_type"), [
    (Outcome.SUCCESS, 200, CHAT_RESPONSE, "SUCCESS", None),
    (Outcome.PARTIAL, 200, CHAT_RESPONSE, "WARNING", "PROVIDER_PARTIAL_RESPONSE"),
    (Outcome.UPSTREAM_ERROR, 429, openai_error("slow", "rate_limit"), "ERROR", "PROVIDER_RATE_LIMIT"),
    (Outcome.UPSTREAM_ERROR, 429, openai_error("pay", "insufficient_quota"), "ERROR", "PROVIDER_QUOTA_LIMIT"),
    (Outcome.UPSTREAM_ERROR, 401, openai_error("bad key", "invalid_api_key"), "ERROR", "PROVIDER_AUTH_ERROR"),
    (Outcome.UPSTREAM_ERROR, 403, openai_error("forbidden"), "ERROR", "PROVIDER_AUTH_ERROR"),
    (Outcome.UPSTREAM_ERROR, 500, openai_error("oops"), "ERROR", "PROVIDER_ERROR"),
    (Outcome.UPSTREAM_ERROR, 400, openai_error("bad request"), "ERROR", "PROVIDER_ERROR"),
    (Outcome.UPSTREAM_ERROR, None, None, "ERROR", "PROVIDER_ERROR"),
    (Outcome.TIMEOUT, None, None, "ERROR", "PROVIDER_TIMEOUT"),
    (Outcome.UNREACHABLE, None, None, "ERROR", "PROVIDER_ERROR"),
])
def test_status_and_error_type(outcome: Outcome, status_code: int | None, response: dict[str, Any] | None,
                               status: str, error_type: str | None) -> None:
    body = body_of(outcome=outcome, status_code=status_code, response=response)
    assert (body["status"], body.get("error_type")) == (status, error_type)


@pytest.mark.parametrize(("error_message", "response", "expected"), [
    pytest.param("mine", openai_error("theirs"), "mine", id="record's message first"),
    pytest.param(None, openai_error("theirs"), "theirs", id="upstream error.message"),
    pytest.param(None, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, "busy",
                 id="anthropic error body"),
    pytest.param(None, {"error": "plain"}, "plain", id="error as a string"),
    pytest.param("x" * 5000, None, "x" * 1024, id="truncated"),
])
def test_error_message(error_message: str | None, response: dict[str, Any] | None, expected: str) -> None:
    body = body_of(outcome=Outcome.UPSTREAM_ERROR, status_code=500, error_message=error_message,
                   response=response)
    assert body["error_message"] == expected


def test_success_has_no_error_fields() -> None:
    assert [k for k in ("error_type", "error_message") if k in body_of()] == []


def test_anthropic_rate_limit() -> None:
    response = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}
    body = body_of(api=Api.ANTHROPIC_MESSAGES, outcome=Outcome.UPSTREAM_ERROR, status_code=429,
                   response=response)
    assert body["error_type"] == "PROVIDER_RATE_LIMIT"


# --- only allow-listed fields --------------------------------------------------------------------

ALLOWED = {"provider", "model", "input", "output", "request_start_time", "request_end_time", "parameters",
           "tags", "metadata", "prompt_name", "prompt_version_number", "prompt_input_variables",
           "input_tokens", "output_tokens", "function_name", "score", "api_type", "status", "error_type",
           "error_message"}


@pytest.mark.parametrize("rec", [pytest.param(r, id=n) for n, r in VALID_RECORDS])
def test_only_allow_listed_fields(rec: LogRecord) -> None:
    assert set(to_log_request(rec)) - ALLOWED == set()


def test_mapping_does_not_change_the_record() -> None:
    rec = record(request=copy.deepcopy(VALID_RECORDS[2][1].request))
    before = copy.deepcopy(rec.request)
    to_log_request(rec)
    assert rec.request == before


# --- properties ----------------------------------------------------------------------------------

_text = st.text(max_size=40)
_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True)
_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(lambda u, d: {"type": "image_url", "image_url": {"url": u, **({"detail": d} if d else {})}},
              _text, st.sampled_from([None, "low", "high", "auto"])),
    st.builds(lambda d, f: {"type": "input_audio", "input_audio": {"data": d, "format": f}},
              _text, st.sampled_from(["wav", "mp3"])),
)
_content = st.one_of(_text, st.lists(_part, max_size=3))
_tool_call = st.builds(lambda i, n, a: {"id": i, "type": "function", "function": {"name": n, "arguments": a}},
                       _text, _name, _text)
_message = st.one_of(
    st.builds(lambda c: {"role": "system", "content": c}, _content),
    st.builds(lambda c: {"role": "developer", "content": c}, _content),
    st.builds(lambda c, n: {"role": "user", "content": c, **({"name": n} if n else {})}, _content,
              st.one_of(st.none(), _name)),
    st.builds(lambda c, calls: {"role": "assistant", "content": c,
                                **({"tool_calls": calls} if calls else {})},
              st.one_of(st.none(), _text), st.lists(_tool_call, max_size=3)),
    st.builds(lambda c, i: {"role": "tool", "content": c, "tool_call_id": i}, _content, _text),
    st.builds(lambda c, n: {"role": "function", "content": c, "name": n}, st.one_of(st.none(), _text), _name),
)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_tool = st.builds(lambda n, d: {"type": "function",
                                "function": {"name": n, "description": d, "parameters": {"type": "object"}}},
                  _name, _text)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {"model": draw(_name), "messages": draw(st.lists(_message, max_size=5))}
    names = st.sampled_from(["temperature", "top_p", "n", "seed", "stop", "user", "response_format",
                             "logit_bias"])
    request.update(draw(st.dictionaries(names, _json, max_size=4)))
    if draw(st.booleans()):
        request["tools"] = draw(st.lists(_tool, min_size=1, max_size=3))
        request["tool_choice"] = draw(st.sampled_from(["auto", "none", "required"]))
    return request


@st.composite
def chat_responses(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    choices = []
    for index in range(draw(st.integers(1, 3))):
        message: dict[str, Any] = {"role": "assistant", "content": draw(st.one_of(st.none(), _text)),
                                   "refusal": draw(st.one_of(st.none(), _text))}
        if calls := draw(st.lists(_tool_call, max_size=3)):
            message["tool_calls"] = calls
        choices.append({"index": index, "message": message,
                        "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls"]))})
    usage = {"prompt_tokens": draw(st.integers(0, 10**6)), "completion_tokens": draw(st.integers(0, 10**6))}
    return {"id": "chatcmpl-x", "object": "chat.completion", "model": draw(_name), "choices": choices,
            "usage": usage}


_annotations = st.builds(
    Annotations,
    tags=st.lists(st.text(max_size=600), max_size=3).map(tuple),
    metadata=st.dictionaries(_text, _json, max_size=3),
    prompt_name=st.one_of(st.none(), _text),
    prompt_version_number=st.one_of(st.none(), st.integers(-2, 50)),
    prompt_input_variables=st.dictionaries(_text, _json, max_size=2),
    score=st.one_of(st.none(), st.integers(-5, 105)),
)


@settings(max_examples=200, deadline=None)
@given(chat_requests(), chat_responses(), st.sampled_from(list(Outcome)),
       st.sampled_from([None, 200, 400, 401, 429, 500]), _annotations,
       st.floats(0, 4e9), st.floats(0, 100))
def test_any_chat_call_maps_to_a_valid_body(request: dict[str, Any], response: dict[str, Any] | None,
                                            outcome: Outcome, status_code: int | None,
                                            annotations: Annotations, start: float, duration: float) -> None:
    rec = LogRecord(log_id="x", api=Api.CHAT, provider="openai", request=request, response=response,
                    start_time=start, end_time=start + duration, outcome=outcome, status_code=status_code,
                    annotations=annotations)
    body = to_log_request(rec)
    assert_valid(body)
    orjson.dumps(body)  # what the exporter does with it


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Api)), st.dictionaries(_text, _json, max_size=6),
       st.one_of(st.none(), st.dictionaries(_text, _json, max_size=6)),
       st.lists(_json, max_size=4), st.one_of(st.none(), st.lists(_json, max_size=3)))
def test_junk_never_raises_and_stays_valid(api: Api, request: dict[str, Any], response: dict[str, Any] | None,
                                           messages: list[Any], choices: list[Any] | None) -> None:
    request = {**request, "messages": messages, "prompt": messages, "input": messages}
    if response is not None and choices is not None:
        response = {**response, "choices": choices, "data": choices}
    rec = LogRecord(log_id="x", api=api, provider="openai", request=request, response=response,
                    start_time=START, end_time=END)
    body = to_log_request(rec)
    assert_valid(body)
    orjson.dumps(body)
