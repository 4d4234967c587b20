"""The Responses API and Anthropic Messages mappings: tables of requests and responses against the blueprints
they must give, and properties: whatever the items and blocks hold (wrong types included), the body is valid
against PromptLayer's schema and mapping never raises."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plproxy.mapping import to_log_request
from plproxy.record import Api, LogRecord, Outcome
from tests.test_mapping import END, LOG_ID, START, assert_valid


def body_of(api: Api, request: dict[str, Any], response: dict[str, Any] | None,
            **fields: Any) -> dict[str, Any]:
    provider = "anthropic" if api is Api.ANTHROPIC_MESSAGES else "openai"
    record = LogRecord(log_id=LOG_ID, api=api, provider=provider, request=request, response=response,
                       start_time=START, end_time=END, **fields)
    body = to_log_request(record)
    assert_valid(body)
    return body


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


F_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


# --- Responses API --------------------------------------------------------------------------------

def responses(request: dict[str, Any], output: list[Any] | None = None) -> dict[str, Any]:
    response = None if output is None else {"id": "resp_1", "model": "gpt-4.1", "output": output,
                                            "usage": {"input_tokens": 3, "output_tokens": 4}}
    return body_of(Api.RESPONSES, {"model": "gpt-4.1", **request}, response)


RESPONSES_INPUTS = [
    pytest.param({"input": "hi"}, [{"role": "user", "content": [text("hi")]}], id="string input"),
    pytest.param({"input": "hi", "instructions": "Be brief."},
                 [{"role": "system", "content": [text("Be brief.")]},
                  {"role": "user", "content": [text("hi")]}],
                 id="instructions"),
    pytest.param({"input": [{"role": "user", "content": "a"},
                            {"type": "message", "role": "system",
                             "content": [{"type": "input_text", "text": "b"}]}]},
                 [{"role": "user", "content": [text("a")]}, {"role": "system", "content": [text("b")]}],
                 id="message items"),
    pytest.param({"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1", "detail": "auto"},
        {"type": "input_file", "file_id": "file-2", "filename": "a.pdf"},
        {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE", "filename": "b.pdf"},
        {"type": "input_file", "file_url": "https://x/c.pdf"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBO"},
    ]}]}, [{"role": "user", "content": [
        text("[image: file-1]"), text("[file: a.pdf (file-2)]"),
        {"type": "media", "media": {"title": "b.pdf", "type": "application/pdf",
                                    "url": "data:application/pdf;base64,JVBE", "format": "base64"}},
        text("[file: https://x/c.pdf]"),
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
    ]}], id="images and files"),
    pytest.param({"input": [
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": '{"x":1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "two"}]},
    ]}, [
        {"role": "assistant", "content": [],
         "tool_calls": [call("call_1", "f", "{}"), call("call_2", "g", '{"x":1}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": [text("one")]},
        {"role": "tool", "tool_call_id": "call_2", "content": [text("two")]},
    ], id="parallel function calls and outputs"),
    pytest.param({"input": [
        {"type": "custom_tool_call", "call_id": "call_c", "name": "grep", "input": "needle"},
        {"type": "custom_tool_call_output", "call_id": "call_c", "output": "found"},
    ]}, [
        {"role": "assistant", "content": [], "tool_calls": [call("call_c", "grep", "needle")]},
        {"role": "tool", "tool_call_id": "call_c", "content": [text("found")]},
    ], id="custom tool call"),
    pytest.param({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]},
                 [{"role": "assistant", "content": [
                     {"type": "thinking", "thinking": "[encrypted reasoning]", "id": "rs_1"}]}],
                 id="encrypted reasoning"),
    pytest.param({"input": [{"type": "item_reference", "id": "msg_9"},
                            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                            {"type": "computer_call_output", "call_id": "c", "output": {"type": "x"}}]},
                 [{"role": "user", "content": [text("[item_reference: msg_9]")]},
                  {"role": "assistant",
                   "content": [text('{"type":"web_search_call","id":"ws_1","status":"completed"}')]},
                  {"role": "user",
                   "content": [text('{"type":"computer_call_output","call_id":"c","output":{"type":"x"}}')]}],
                 id="other items as JSON"),
]


@pytest.mark.parametrize(("request_", "messages"), RESPONSES_INPUTS)
def test_responses_input(request_: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    assert responses(request_)["input"]["messages"] == messages


def test_responses_output_is_one_assistant_message() -> None:
    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Plan."}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [
            {"type": "output_text", "text": "Sure.", "annotations": []},
            {"type": "refusal", "refusal": "Not that part."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": None},
    ]
    body = responses({"input": "hi"}, output)
    assert body["output"]["messages"] == [{
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "Plan.", "id": "rs_1"}, text("Sure."),
                    text("Not that part."),
                    text('{"type":"image_generation_call","id":"ig_1","status":"completed","result":null}')],
        "tool_calls": [call("call_1", "f", "{}")],
    }]
    assert (body["input_tokens"], body["output_tokens"]) == (3, 4)


@pytest.mark.parametrize(("tools", "tool_choice", "blueprint", "parameters"), [
    pytest.param([{"type": "function", "name": "f", "parameters": {"type": "object"}}], "required",
                 {"tools": [F_TOOL],
                  "tool_choice": "required"}, {}, id="function tool"),
    pytest.param([{"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}],
                 {"type": "web_search_preview"}, {},
                 {"tools": [{"type": "web_search_preview"},
                            {"type": "file_search", "vector_store_ids": ["vs_1"]}],
                  "tool_choice": {"type": "web_search_preview"}}, id="built-in tools stay parameters"),
    pytest.param([], {"type": "function", "name": "f"},
                 {"tool_choice": {"type": "function", "function": {"name": "f"}}}, {}, id="function choice"),
])
def test_responses_tools(tools: list[Any], tool_choice: Any, blueprint: dict[str, Any],
                         parameters: dict[str, Any]) -> None:
    body = responses({"input": "hi", "tools": tools, "tool_choice": tool_choice, "store": False})
    assert {k: v for k, v in body["input"].items() if k in ("tools", "tool_choice")} == blueprint
    assert body["parameters"] == {"store": False, **parameters}


def test_responses_stored_prompt_is_kept_in_parameters() -> None:
    prompt = {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}}
    body = responses({"prompt": prompt, "input": "hi"})
    assert body["parameters"] == {"prompt": prompt}


def test_responses_without_output_or_response() -> None:
    assert responses({"input": "hi"}, [])["output"] == {"type": "chat", "messages": []}
    partial = body_of(Api.RESPONSES, {"model": "m", "input": "hi"}, None, outcome=Outcome.TIMEOUT)
    assert partial["output"] == {"type": "chat", "messages": []}


# --- Anthropic Messages ---------------------------------------------------------------------------

def anthropic(request: dict[str, Any], content: list[Any] | None = None) -> dict[str, Any]:
    response = None if content is None else {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
        "stop_reason": "end_turn", "usage": {"input_tokens": 10, "output_tokens": 2}}
    return body_of(Api.ANTHROPIC_MESSAGES, {"model": "claude-x", "max_tokens": 9, **request}, response)


def user(*content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(content)}]}


ANTHROPIC_INPUTS = [
    pytest.param({"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}],
                  "messages": [{"role": "user", "content": "hi"}]},
                 [{"role": "system", "content": [text("a")]}, {"role": "user", "content": [text("hi")]}],
                 id="system as blocks"),
    pytest.param(user({"type": "image", "source": {"type": "file", "file_id": "file_1"}},
                      {"type": "document",
                       "source": {"type": "text", "media_type": "text/plain", "data": "plain"}},
                      {"type": "document", "title": "page", "source": {"type": "url", "url": "https://x/a.pdf"}},
                      {"type": "document", "source": {"type": "content", "content": [text("inner")]}},
                      {"type": "search_result", "source": "s", "title": "t", "content": []}),
                 [{"role": "user", "content": [
                     text("[image: file_1]"), text("plain"),
                     {"type": "media", "media": {"title": "page", "type": "application/pdf",
                                                 "url": "https://x/a.pdf", "format": "url"}},
                     text("inner"),
                     text('{"type":"search_result","source":"s","title":"t","content":[]}')]}],
                 id="images, documents, others"),
    pytest.param(user({"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                       "content": [text("boom"), {"type": "image", "source": {"type": "url",
                                                                              "url": "https://x/e.png"}}]}),
                 [{"role": "tool", "tool_call_id": "toolu_1", "content": [
                     text("[tool error]"), text("boom"), {"type": "image_url", "image_url": {"url": "https://x/e.png"}}]}],
                 id="tool error with image"),
    pytest.param({"messages": [{"role": "assistant", "content": [
        {"type": "redacted_thinking", "data": "EmwK"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
        {"type": "tool_use", "id": "toolu_2", "name": "f", "input": '{"partial'},
    ]}]}, [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "[redacted thinking]", "signature": "EmwK"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}],
        "tool_calls": [call("toolu_2", "f", '{"partial')]}], id="assistant blocks"),
    pytest.param({"messages": [{"role": "user", "content": []}]}, [{"role": "user", "content": []}],
                 id="empty content"),
]


@pytest.mark.parametrize(("request_", "messages"), ANTHROPIC_INPUTS)
def test_anthropic_input(request_: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    assert anthropic(request_)["input"]["messages"] == messages


@pytest.mark.parametrize(("tools", "tool_choice", "blueprint", "parameters"), [
    pytest.param([{"name": "f", "input_schema": {"type": "object"}, "type": "custom"}], {"type": "any"},
                 {"tools": [F_TOOL],
                  "tool_choice": "required"}, {}, id="custom tool, any"),
    pytest.param([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}], {"type": "none"},
                 {"tool_choice": "none"},
                 {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
                 id="server tool stays a parameter"),
    pytest.param([], {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
                 {"tool_choice": {"type": "function", "function": {"name": "f"}}},
                 {"tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True}},
                 id="named tool, extra keys kept"),
    pytest.param([], {"type": "mystery"}, {}, {"tool_choice": {"type": "mystery"}}, id="unknown choice"),
])
def test_anthropic_tools(tools: list[Any], tool_choice: Any, blueprint: dict[str, Any],
                         parameters: dict[str, Any]) -> None:
    body = anthropic({"messages": [], "tools": tools, "tool_choice": tool_choice})
    assert {k: v for k, v in body["input"].items() if k in ("tools", "tool_choice")} == blueprint
    assert body["parameters"] == {"max_tokens": 9, **parameters}


def test_anthropic_output_and_usage() -> None:
    body = anthropic({"messages": []}, [
        {"type": "thinking", "thinking": "Plan.", "signature": "sig"},
        text("Checking."),
        {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"b": [1, 2], "a": "é"}},
    ])
    assert body["output"]["messages"] == [{
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "Plan.", "signature": "sig"}, text("Checking.")],
        "tool_calls": [call("toolu_9", "f", '{"b":[1,2],"a":"é"}')],
    }]
    assert (body["input_tokens"], body["output_tokens"], body["model"]) == (10, 2, "claude-x")
    assert "api_type" not in body


# --- properties: any shape gives a valid body -----------------------------------------------------

_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_maybe_text = st.text(max_size=12) | _junk


def _shaped(types: list[str], fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    shaped = st.fixed_dictionaries(
        {"type": st.sampled_from([*types, "mystery"]) | _junk},
        optional={name: strategy for name, strategy in fields.items()},
    )
    return shaped | _junk


_response_part = _shaped(["input_text", "output_text", "refusal", "input_image", "input_file",
                          "summary_text"],
                         {"text": _maybe_text, "refusal": _maybe_text, "image_url": _maybe_text,
                          "file_id": _maybe_text, "file_data": _maybe_text, "filename": _maybe_text,
                          "detail": _maybe_text})
_response_item = _shaped(
    ["message", "function_call", "function_call_output", "reasoning", "custom_tool_call", "item_reference",
     "web_search_call"],
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | _junk,
     "content": st.lists(_response_part, max_size=3) | _maybe_text, "call_id": _maybe_text,
     "name": _maybe_text, "arguments": _maybe_text, "input": _maybe_text,
     "output": st.lists(_response_part, max_size=2) | _maybe_text, "id": _maybe_text,
     "summary": st.lists(_response_part, max_size=2) | _junk, "encrypted_content": _maybe_text},
)
_anthropic_block = _shaped(
    ["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
     "server_tool_use"],
    {"text": _maybe_text, "source": st.fixed_dictionaries(
        {"type": st.sampled_from(["base64", "url", "text", "content", "file"]) | _junk},
        optional={"data": _maybe_text, "media_type": _maybe_text, "url": _maybe_text, "file_id": _maybe_text,
                  "content": _junk}) | _junk,
     "id": _maybe_text, "name": _maybe_text, "input": _junk, "tool_use_id": _maybe_text,
     "content": _maybe_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})),
     "is_error": _junk, "thinking": _maybe_text, "signature": _maybe_text, "data": _maybe_text,
     "title": _junk},
)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_response_item, max_size=5) | _maybe_text, output=st.lists(_response_item, max_size=4),
       instructions=_maybe_text | st.lists(_response_item, max_size=2), tools=_junk, tool_choice=_junk)
def test_responses_any_items_give_a_valid_body(items: Any, output: list[Any], instructions: Any, tools: Any,
                                               tool_choice: Any) -> None:
    body_of(Api.RESPONSES, {"model": "m", "input": items, "instructions": instructions, "tools": tools,
                            "tool_choice": tool_choice}, {"model": "m", "output": output})


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.fixed_dictionaries({
           "role": st.sampled_from(["user", "assistant"]) | _junk,
           "content": st.lists(_anthropic_block, max_size=4) | _maybe_text}), max_size=4) | _junk,
       content=st.lists(_anthropic_block, max_size=4) | _junk,
       system=_maybe_text | st.lists(_anthropic_block, max_size=2), tools=_junk, tool_choice=_junk)
def test_anthropic_any_blocks_give_a_valid_body(messages: Any, content: Any, system: Any, tools: Any,
                                                tool_choice: Any) -> None:
    body_of(Api.ANTHROPIC_MESSAGES, {"model": "m", "messages": messages, "system": system, "tools": tools,
                                     "tool_choice": tool_choice}, {"model": "m", "content": content})
