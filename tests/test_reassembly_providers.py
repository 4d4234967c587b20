"""Stream reassembly for the Responses API and Anthropic Messages: tables of event sequences, and properties
(any split of the deltas, any split of the SSE bytes, reassembles to the same object; the deltas alone
rebuild what the terminal event carries whole)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plproxy.reassembly_anthropic import AnthropicStreamAssembler
from plproxy.reassembly_responses import ResponsesStreamAssembler
from plproxy.sse import SSEDecoder, encode_event

Assembler = ResponsesStreamAssembler | AnthropicStreamAssembler


def assemble(events: list[Any], assembler: Assembler) -> dict[str, Any]:
    for event in events:
        assembler.add(event)
    return assembler.result()


# --- Responses API: event builders ----------------------------------------------------------------

START = {"id": "resp_1", "object": "response", "created_at": 1700000000, "status": "in_progress",
         "model": "gpt-4.1", "output": [], "usage": None}
USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}


def message(text: str, item_id: str = "msg_1", kind: str = "output_text") -> dict[str, Any]:
    key = "refusal" if kind == "refusal" else "text"
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": kind, key: text} | ({"annotations": []} if kind == "output_text" else {})]}


def function_call(arguments: str, call_id: str = "call_1", item_id: str = "fc_1") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": "completed", "arguments": arguments,
            "call_id": call_id, "name": "get_weather"}


def reasoning(*summaries: str, item_id: str = "rs_1") -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": s} for s in summaries]
    return {"id": item_id, "type": "reasoning", "summary": summary}


def item_events(index: int, item: dict[str, Any], split: list[list[str]] | None = None,
                done: bool = True) -> list[dict[str, Any]]:
    """The events streaming `item`; `split[k]` are the pieces of its k-th text (default: one piece each)."""
    ref = {"item_id": item["id"], "output_index": index}
    events: list[dict[str, Any]] = []
    kind = item["type"]
    if kind == "message":
        part = item["content"][0]
        key = "refusal" if part["type"] == "refusal" else "text"
        pieces = split[0] if split else [part[key]]
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": {**item, "status": "in_progress", "content": []}})
        events.append({"type": "response.content_part.added", **ref, "content_index": 0,
                       "part": {**part, key: ""}})
        prefix = "response.refusal" if key == "refusal" else "response.output_text"
        events += [{"type": f"{prefix}.delta", **ref, "content_index": 0, "delta": p} for p in pieces]
    elif kind == "function_call":
        pieces = split[0] if split else [item["arguments"]]
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": {**item, "status": "in_progress", "arguments": ""}})
        events += [{"type": "response.function_call_arguments.delta", **ref, "delta": p} for p in pieces]
    else:
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": {**item, "summary": []}})
        for s, summary in enumerate(item["summary"]):
            pieces = split[s] if split else [summary["text"]]
            events.append({"type": "response.reasoning_summary_part.added", **ref, "summary_index": s,
                           "part": {"type": "summary_text", "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **ref, "summary_index": s,
                        "delta": p} for p in pieces]
    if done:
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events


def response_events(output: list[dict[str, Any]], terminal: str | None = "response.completed",
                    done: bool = True) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"type": "response.created", "response": START},
                                    {"type": "response.in_progress", "response": START}]
    for index, item in enumerate(output):
        events += item_events(index, item, done=done)
    if terminal is not None:
        statuses = {"response.completed": "completed", "response.incomplete": "incomplete"}
        status = statuses.get(terminal, "failed")
        events.append({"type": terminal, "response": final(output, status)})
    return [{**e, "sequence_number": n} for n, e in enumerate(events)]


def final(output: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {**START, "status": status, "output": output, "usage": USAGE}


# --- Responses API: tables ------------------------------------------------------------------------

OUTPUTS = {
    "text": [message("Hello, Ada!")],
    "refusal": [message("I can't help with that.", kind="refusal")],
    "function calls": [function_call('{"city":"Paris"}'), function_call("{}", "call_2", "fc_2")],
    "reasoning then text": [reasoning("First.", "Second."), message("Hi")],
}


@pytest.mark.parametrize("output", list(OUTPUTS.values()), ids=list(OUTPUTS))
def test_responses_completed_is_the_result(output: list[dict[str, Any]]) -> None:
    assembler = ResponsesStreamAssembler()
    assert assemble(response_events(output), assembler) == final(output)
    assert (assembler.finished, assembler.error) == (True, None)


@pytest.mark.parametrize("output", list(OUTPUTS.values()), ids=list(OUTPUTS))
def test_responses_deltas_alone_rebuild_the_output(output: list[dict[str, Any]]) -> None:
    assembler = ResponsesStreamAssembler()
    body = assemble(response_events(output, terminal=None, done=False), assembler)
    assert not assembler.finished
    assert body["id"] == "resp_1"
    assert body["status"] == "in_progress"
    assert [_essence(i) for i in body["output"]] == [_essence(i) for i in output]


def _essence(item: dict[str, Any]) -> Any:
    """What a record keeps of an item: its kind, ids and texts."""
    kind = item["type"]
    if kind == "message":
        return kind, item["id"], [(p["type"], p.get("text", p.get("refusal"))) for p in item["content"]]
    if kind == "function_call":
        return kind, item["call_id"], item["name"], item["arguments"]
    return kind, item["id"], [s["text"] for s in item["summary"]]


def test_responses_done_events_carry_the_whole_text() -> None:
    ref = {"item_id": "msg_1", "output_index": 0}
    events = [
        {"type": "response.created", "response": START},
        {"type": "response.output_item.added", "output_index": 0, "item": {**message(""), "content": []}},
        {"type": "response.output_text.delta", **ref, "content_index": 0, "delta": "Hel"},
        {"type": "response.output_text.done", **ref, "content_index": 0, "text": "Hello"},
        {"type": "response.output_text.delta", **ref, "content_index": 1, "delta": "second part"},
    ]
    body = assemble(events, ResponsesStreamAssembler())
    assert [p["text"] for p in body["output"][0]["content"]] == ["Hello", "second part"]


def test_responses_events_found_by_item_id() -> None:
    events = [
        {"type": "response.output_item.added", "output_index": 3, "item": function_call("")},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": '{"a":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": "x",
         "delta": "1}"},
    ]
    assert assemble(events, ResponsesStreamAssembler())["output"][0]["arguments"] == '{"a":1}'


def test_responses_failed_and_error_events() -> None:
    failed = ResponsesStreamAssembler()
    error = {"code": "server_error", "message": "The model failed."}
    assemble([{"type": "response.created", "response": START},
              {"type": "response.failed", "response": {**START, "status": "failed", "error": error}}], failed)
    assert (failed.finished, failed.error) == (True, "The model failed.")

    errored = ResponsesStreamAssembler()
    assemble([{"type": "response.created", "response": START},
              {"type": "error", "code": "rate_limit_exceeded", "message": "Slow down", "param": None}],
             errored)
    assert (errored.finished, errored.error) == (False, "Slow down")

    incomplete = ResponsesStreamAssembler()
    body = assemble(response_events([message("Hi")], terminal="response.incomplete"), incomplete)
    assert (incomplete.finished, incomplete.error, body["status"]) == (True, None, "incomplete")


def test_responses_terminal_without_output_keeps_what_streamed() -> None:
    events = response_events([message("Hi")], terminal=None)
    events.append({"type": "response.completed", "response": {**START, "status": "completed", "output": []}})
    assert assemble(events, ResponsesStreamAssembler())["output"] == [message("Hi")]


@pytest.mark.parametrize("junk", [
    None, 7, "text", [], {}, {"type": 5}, {"type": "response.output_text.delta", "delta": "x"},
    {"type": "response.output_item.added", "output_index": "0", "item": {}},
    {"type": "response.output_item.added", "output_index": 0, "item": "not a dict"},
    {"type": "response.created", "response": "not a dict"},
    {"type": "response.output_text.delta", "output_index": 0, "content_index": "0", "delta": "x"},
    {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": 5},
])
def test_responses_junk_is_skipped(junk: Any) -> None:
    events = response_events([message("Hi")], terminal=None, done=False)
    with_junk = [*events[:3], junk, *events[3:]]
    assert assemble(with_junk, ResponsesStreamAssembler()) == assemble(events, ResponsesStreamAssembler())


# --- Anthropic Messages: event builders -----------------------------------------------------------

MESSAGE_START_USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3,
                       "output_tokens": 1}


def anthropic_message(*blocks: dict[str, Any], stop_reason: str = "end_turn", output_tokens: int = 7,
                      ) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": list(blocks), "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {**MESSAGE_START_USAGE, "output_tokens": output_tokens}}


def block_events(index: int, block: dict[str, Any], pieces: list[str] | None = None) -> list[dict[str, Any]]:
    kind = block["type"]
    if kind == "text":
        start, delta_kind, key = {"type": "text", "text": ""}, "text_delta", "text"
        whole = block["text"]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        delta_kind, key = "thinking_delta", "thinking"
        whole = block["thinking"]
    else:
        start, delta_kind, key = {**block, "input": {}}, "input_json_delta", "partial_json"
        whole = json.dumps(block["input"])
    events: list[dict[str, Any]] = [{"type": "content_block_start", "index": index, "content_block": start}]
    events += [{"type": "content_block_delta", "index": index, "delta": {"type": delta_kind, key: p}}
               for p in (pieces if pieces is not None else [whole])]
    if kind == "thinking":
        events.append({"type": "content_block_delta", "index": index,
                       "delta": {"type": "signature_delta", "signature": block["signature"]}})
    events.append({"type": "content_block_stop", "index": index})
    return events


def message_events(message_: dict[str, Any], splits: list[list[str]] | None = None) -> list[dict[str, Any]]:
    start = {**message_, "content": [], "stop_reason": None, "usage": MESSAGE_START_USAGE}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message_["content"]):
        events += block_events(index, block, splits[index] if splits else None)
    events.append({"type": "message_delta", "delta": {"stop_reason": message_["stop_reason"],
                                                      "stop_sequence": None},
                   "usage": {"output_tokens": message_["usage"]["output_tokens"], "input_tokens": None}})
    events.append({"type": "message_stop"})
    return events


TOOL_USE = {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}
THINKING = {"type": "thinking", "thinking": "Think.", "signature": "EqQBsig"}
MESSAGES = {
    "text": anthropic_message({"type": "text", "text": "Hello, Ada!"}),
    "tool use": anthropic_message({"type": "text", "text": "Checking."}, TOOL_USE, stop_reason="tool_use"),
    "thinking": anthropic_message(THINKING, {"type": "text", "text": "Hi"}),
    "empty tool input": anthropic_message({**TOOL_USE, "input": {}}, stop_reason="tool_use"),
}


@pytest.mark.parametrize("message_", list(MESSAGES.values()), ids=list(MESSAGES))
def test_anthropic_stream_reassembles_to_the_message(message_: dict[str, Any]) -> None:
    assembler = AnthropicStreamAssembler()
    assert assemble(message_events(message_), assembler) == message_
    assert (assembler.finished, assembler.error) == (True, None)


def test_anthropic_usage_counts_overwrite_and_keep_what_message_delta_omits() -> None:
    events = message_events(MESSAGES["text"])
    events[-2]["usage"] = {"output_tokens": 40, "cache_read_input_tokens": 5}
    usage = assemble(events, AnthropicStreamAssembler())["usage"]
    assert usage == {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5,
                     "output_tokens": 40}


def test_anthropic_cut_stream_keeps_what_arrived() -> None:
    message_ = MESSAGES["tool use"]
    events = message_events(message_, splits=[["Check", "ing."], ['{"ci', 'ty": "Pa', 'ris"}']])
    cut = events[: events.index({"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": 'ty": "Pa'}}) + 1]
    assembler = AnthropicStreamAssembler()
    body = assemble(cut, assembler)
    assert not assembler.finished
    assert body["content"] == [{"type": "text", "text": "Checking."},
                               {**TOOL_USE, "input": '{"city": "Pa'}]  # the JSON text as far as it came
    assert body["stop_reason"] is None
    assert body["usage"] == MESSAGE_START_USAGE


def test_anthropic_error_event_and_citations() -> None:
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0, "start_char_index": 0,
                "end_char_index": 1}
    events = [{"type": "message_start", "message": {**MESSAGES["text"], "content": []}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0,
               "delta": {"type": "citations_delta", "citation": citation}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
              {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    assembler = AnthropicStreamAssembler()
    body = assemble(events, assembler)
    assert body["content"] == [{"type": "text", "text": "x", "citations": [citation]}]
    assert (assembler.finished, assembler.error) == (False, "Overloaded")


def test_anthropic_without_message_start() -> None:
    events = block_events(0, {"type": "text", "text": "late"})
    assert assemble(events, AnthropicStreamAssembler()) == {
        "type": "message", "role": "assistant", "content": [{"type": "text", "text": "late"}]}


@pytest.mark.parametrize("junk", [
    None, 3, [], {},
    {"type": "content_block_delta", "index": 9, "delta": {"type": "text_delta", "text": "x"}},
    {"type": "content_block_delta", "index": 0, "delta": "x"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
    {"type": "content_block_start", "index": "1", "content_block": {"type": "text"}},
    {"type": "message_delta", "delta": None, "usage": None}, {"type": "ping"},
])
def test_anthropic_junk_is_skipped(junk: Any) -> None:
    events = message_events(MESSAGES["text"])
    with_junk = [*events[:3], junk, *events[3:]]
    assert assemble(with_junk, AnthropicStreamAssembler()) == MESSAGES["text"]


# --- properties -----------------------------------------------------------------------------------

_text = st.text(max_size=40)


def _split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=5)))
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


@st.composite
def responses_streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(an output, the events streaming it with its texts split at random, without done or completed)."""
    output: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["message", "function_call", "reasoning"]))
        if kind == "message":
            output.append(message(draw(_text), f"msg_{index}"))
        elif kind == "function_call":
            output.append(function_call(draw(_text), f"call_{index}", f"fc_{index}"))
        else:
            output.append(reasoning(*draw(st.lists(_text, min_size=1, max_size=3)), item_id=f"rs_{index}"))
    events: list[dict[str, Any]] = [{"type": "response.created", "response": START}]
    for index, item in enumerate(output):
        texts = ([item["content"][0]["text"]] if item["type"] == "message"
                 else [item["arguments"]] if item["type"] == "function_call"
                 else [s["text"] for s in item["summary"]])
        events += item_events(index, item, [_split(draw, t) for t in texts], done=False)
    return output, events


@st.composite
def anthropic_streams(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    blocks: list[dict[str, Any]] = []
    splits: list[list[str]] = []
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["text", "thinking", "tool_use"]))
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": draw(_text)}
            whole = block["text"]
        elif kind == "thinking":
            block = {"type": "thinking", "thinking": draw(_text), "signature": draw(_text)}
            whole = block["thinking"]
        else:
            values = st.one_of(_text, st.integers(), st.booleans())
            tool_input = draw(st.dictionaries(st.text(max_size=8), values, max_size=3))
            block = {"type": "tool_use", "id": f"toolu_{index}", "name": "f", "input": tool_input}
            whole = json.dumps(tool_input)
        blocks.append(block)
        splits.append(_split(draw, whole))
    message_ = anthropic_message(*blocks, output_tokens=draw(st.integers(0, 10_000)))
    return message_, message_events(message_, splits)


@settings(max_examples=150, deadline=None)
@given(responses_streams())
def test_responses_any_split_of_the_deltas_rebuilds_the_output(
    stream: tuple[list[dict[str, Any]], list[dict[str, Any]]]
) -> None:
    output, events = stream
    body = assemble(events, ResponsesStreamAssembler())
    assert [_essence(i) for i in body["output"]] == [_essence(i) for i in output]


@settings(max_examples=150, deadline=None)
@given(anthropic_streams())
def test_anthropic_any_split_of_the_deltas_rebuilds_the_message(
    stream: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    message_, events = stream
    assert assemble(events, AnthropicStreamAssembler()) == message_


def _through_sse(events: list[dict[str, Any]], cuts: list[int], assembler: Assembler) -> dict[str, Any]:
    wire = b"".join(encode_event(json.dumps(e), e.get("type") if isinstance(e.get("type"), str) else None)
                    for e in events)
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    decoder = SSEDecoder()
    decoded = [e for a, b in itertools.pairwise(bounds) for e in decoder.feed(wire[a:b])] + decoder.close()
    return assemble([json.loads(e.data) for e in decoded if e.has_data], assembler)


@settings(max_examples=100, deadline=None)
@given(responses_streams(), st.lists(st.integers(0, 10**6), max_size=8))
def test_responses_any_split_of_the_bytes_reassembles_the_same(
    stream: tuple[list[dict[str, Any]], list[dict[str, Any]]], cuts: list[int]
) -> None:
    output, events = stream
    events = [*events, {"type": "response.completed", "response": final(output)}]
    whole = assemble(events, ResponsesStreamAssembler())
    assert whole == final(output)
    assert _through_sse(events, cuts, ResponsesStreamAssembler()) == whole


@settings(max_examples=100, deadline=None)
@given(anthropic_streams(), st.lists(st.integers(0, 10**6), max_size=8))
def test_anthropic_any_split_of_the_bytes_reassembles_the_same(
    stream: tuple[dict[str, Any], list[dict[str, Any]]], cuts: list[int]
) -> None:
    message_, events = stream
    assert _through_sse(events, cuts, AnthropicStreamAssembler()) == message_
