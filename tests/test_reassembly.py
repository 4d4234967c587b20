"""plproxy.reassembly: streamed chunks back into the body a non-streamed call returns."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plproxy.reassembly import (
    ChatStreamAssembler,
    CompletionStreamAssembler,
    SnapshotAssembler,
    StreamAssembler,
    assembler_for,
)
from plproxy.reassembly_anthropic import AnthropicStreamAssembler
from plproxy.reassembly_responses import ResponsesStreamAssembler
from plproxy.record import Api
from plproxy.sse import SSEDecoder, encode_event

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1"}


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": list(choices), **extra}


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish_reason, "logprobs": None}


def tool_delta(index: int, call_id: str | None = None, name: str | None = None,
               arguments: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        call |= {"id": call_id, "type": "function"}
        call["function"]["name"] = name
    return call


def assemble(chunks: list[Any], assembler: StreamAssembler | None = None) -> dict[str, Any]:
    assembler = assembler or ChatStreamAssembler()
    for c in chunks:
        assembler.add(c)
    return assembler.result()


def completion(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
                            "model": "gpt-4o-mini", "choices": list(choices), "system_fingerprint": "fp_1"}
    if usage is not None:
        body["usage"] = usage
    return body


def answer(content: str | None, finish_reason: str | None = "stop", index: int = 0,
           **message: Any) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content, **message},
            "finish_reason": finish_reason}


USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}

TEXT_STREAM = [
    chunk(delta(role="assistant", content="", refusal=None)),
    chunk(delta(content="Hello")),
    chunk(delta(content=", Ada")),
    chunk(delta(content="!")),
    chunk(delta(finish_reason="stop")),
]

THREE_TOOL_CALLS = [
    chunk(delta(role="assistant", content=None, tool_calls=[tool_delta(0, "call_a", "get_weather")])),
    chunk(delta(tool_calls=[tool_delta(1, "call_b", "get_time")])),
    chunk(delta(tool_calls=[tool_delta(0, arguments='{"city"')])),
    chunk(delta(tool_calls=[tool_delta(2, "call_c", "get_news", '{"topic":')])),
    chunk(delta(tool_calls=[tool_delta(1, arguments='{"tz": "CET"}')])),
    chunk(delta(tool_calls=[tool_delta(0, arguments=': "Paris"}')])),
    chunk(delta(tool_calls=[tool_delta(2, arguments=' "ai"}')])),
    chunk(delta(finish_reason="tool_calls")),
]


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CHAT_CASES = [
    ("text", TEXT_STREAM, completion(answer("Hello, Ada!"))),
    ("three interleaved tool calls", THREE_TOOL_CALLS, completion(answer(None, "tool_calls", tool_calls=[
        call("call_a", "get_weather", '{"city": "Paris"}'),
        call("call_b", "get_time", '{"tz": "CET"}'),
        call("call_c", "get_news", '{"topic": "ai"}'),
    ]))),
    ("include_usage", [*TEXT_STREAM, chunk(usage=USAGE)], completion(answer("Hello, Ada!"), usage=USAGE)),
    ("usage on a chunk with choices", [*TEXT_STREAM[:-1], chunk(delta(finish_reason="stop"), usage=USAGE)],
     completion(answer("Hello, Ada!"), usage=USAGE)),
    ("null usage ignored", [*TEXT_STREAM, chunk(usage=None)], completion(answer("Hello, Ada!"))),
    ("refusal", [chunk(delta(role="assistant", refusal="I can")), chunk(delta(refusal="not.")),
                 chunk(delta(finish_reason="stop"))],
     completion(answer(None, refusal="I cannot."))),
    ("legacy function_call", [
        chunk(delta(role="assistant", function_call={"name": "f", "arguments": ""})),
        chunk(delta(function_call={"arguments": '{"a"'})),
        chunk(delta(function_call={"arguments": ": 1}"})),
        chunk(delta(finish_reason="function_call")),
    ], completion(answer(None, "function_call", function_call={"name": "f", "arguments": '{"a": 1}'}))),
    ("two choices interleaved", [
        chunk(delta(0, role="assistant", content="A"), delta(1, role="assistant", content="B")),
        chunk(delta(1, content="b")),
        chunk(delta(0, content="a")),
        chunk(delta(1, finish_reason="length")),
        chunk(delta(0, finish_reason="stop")),
    ], completion(answer("Aa"), answer("Bb", "length", index=1))),
    ("choices sorted by index", [chunk(delta(1, content="B", finish_reason="stop")),
                                 chunk(delta(0, content="A", finish_reason="stop"))],
     completion(answer("A"), answer("B", index=1))),
    ("last non-null finish_reason kept", [*TEXT_STREAM, chunk(delta(finish_reason=None))],
     completion(answer("Hello, Ada!"))),
    ("reasoning_content", [chunk(delta(role="assistant", reasoning_content="Think")),
                           chunk(delta(reasoning_content="ing.")), chunk(delta(content="42")),
                           chunk(delta(finish_reason="stop"))],
     completion(answer("42", reasoning_content="Thinking."))),
    ("no finish_reason", TEXT_STREAM[:2], completion(answer("Hello", None))),
    ("tool call without index", [
        chunk(delta(role="assistant", tool_calls=[{"id": "c1", "type": "function",
                                                   "function": {"name": "f", "arguments": "{}"}}])),
        chunk(delta(tool_calls=[{"id": "c2", "type": "function",
                                 "function": {"name": "g", "arguments": "{"}}])),
        chunk(delta(tool_calls=[{"function": {"arguments": "}"}}])),
        chunk(delta(finish_reason="tool_calls")),
    ], completion(answer(None, "tool_calls", tool_calls=[call("c1", "f", "{}"), call("c2", "g", "{}")]))),
]


@pytest.mark.parametrize(("chunks", "expected"), [pytest.param(c, e, id=n) for n, c, e in CHAT_CASES])
def test_chat_reassembles(chunks: list[Any], expected: dict[str, Any]) -> None:
    assert assemble(chunks) == expected


def test_envelope_fields_come_from_any_chunk() -> None:
    # Azure opens with a content-filter chunk whose id and model are empty.
    azure_first = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                   "prompt_filter_results": []}
    result = assemble([azure_first, *TEXT_STREAM])
    envelope = (result["id"], result["model"], result["system_fingerprint"])
    assert envelope == ("chatcmpl-1", "gpt-4o-mini", "fp_1")


def test_logprobs_are_concatenated() -> None:
    first = {**delta(content="a"), "logprobs": {"content": [{"token": "a", "logprob": -0.1}]}}
    second = {**delta(content="b", finish_reason="stop"),
              "logprobs": {"content": [{"token": "b", "logprob": -0.2}]}}
    choice = assemble([chunk(first), chunk(second)])["choices"][0]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["a", "b"]


JUNK = [
    ("not a dict", ["data", 1, None, ["choices"]]),
    ("choices not a list", [{"choices": "x"}, {"choices": None}]),
    ("choice not a dict", [{"choices": ["x", 3]}]),
    ("index not an int", [{"choices": [{"index": "0", "delta": {"content": "X"}}]},
                          {"choices": [{"index": True, "delta": {"content": "X"}}]}]),
    ("delta not a dict", [{"choices": [{"index": 0, "delta": "X"}]}]),
    ("wrong field types", [{"id": 1, "model": ["m"], "created": "now", "usage": "lots",
                            "choices": [{"index": 0, "finish_reason": 7,
                                         "delta": {"content": 5, "refusal": {}, "role": 1,
                                                   "tool_calls": "x", "function_call": []}}]}]),
    ("tool call junk", [{"choices": [{"index": 0, "delta": {"tool_calls": [
        "x", {"index": "a"}, {"index": 0, "function": "f"}, {"index": 0, "function": {"arguments": 3}}]}}]}]),
]


@pytest.mark.parametrize("junk", [pytest.param(j, id=n) for n, j in JUNK])
def test_junk_chunks_change_nothing(junk: list[Any]) -> None:
    assert assemble([*TEXT_STREAM[:2], *junk, *TEXT_STREAM[2:]]) == assemble(TEXT_STREAM)


@pytest.mark.parametrize(("chunks", "finished"), [
    pytest.param([], False, id="nothing"),
    pytest.param([chunk(usage=USAGE)], False, id="usage only"),
    pytest.param(TEXT_STREAM[:-1], False, id="before finish_reason"),
    pytest.param(TEXT_STREAM, True, id="after finish_reason"),
    pytest.param([chunk(delta(0, content="a", finish_reason="stop"), delta(1, content="b"))], False,
                 id="one of two choices finished"),
])
def test_chat_finished(chunks: list[Any], finished: bool) -> None:
    assembler = ChatStreamAssembler()
    for c in chunks:
        assembler.add(c)
    assert assembler.finished is finished


def test_result_can_be_read_twice_and_more_added() -> None:
    assembler = ChatStreamAssembler()
    for c in TEXT_STREAM[:2]:
        assembler.add(c)
    assert assembler.result() == assembler.result()
    for c in TEXT_STREAM[2:]:
        assembler.add(c)
    assert assembler.result()["choices"][0]["message"]["content"] == "Hello, Ada!"


# --- legacy completions --------------------------------------------------------------------------

TEXT_HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000,
             "model": "gpt-3.5-turbo-instruct"}


def text_chunk(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {**TEXT_HEAD,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def text_body(*texts: tuple[str, str | None], usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
               for i, (t, f) in enumerate(texts)]
    body: dict[str, Any] = {**TEXT_HEAD, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


COMPLETION_CASES = [
    ("text", [text_chunk(0, "Once"), text_chunk(0, " upon"), text_chunk(0, "", "length")],
     text_body(("Once upon", "length"))),
    ("two choices",
     [text_chunk(0, "a"), text_chunk(1, "b"), text_chunk(1, "B", "stop"), text_chunk(0, "A", "stop")],
     text_body(("aA", "stop"), ("bB", "stop"))),
    ("usage", [text_chunk(0, "x", "stop"), {"id": "cmpl-1", "choices": [], "usage": USAGE}],
     text_body(("x", "stop"), usage=USAGE)),
    ("junk ignored",
     [text_chunk(0, "x"), "junk", {"choices": [{"index": 0, "text": 5}]}, text_chunk(0, "", "stop")],
     text_body(("x", "stop"))),
]


@pytest.mark.parametrize(("chunks", "expected"), [pytest.param(c, e, id=n) for n, c, e in COMPLETION_CASES])
def test_completion_reassembles(chunks: list[Any], expected: dict[str, Any]) -> None:
    assert assemble(chunks, CompletionStreamAssembler()) == expected


def test_completion_finished_after_every_finish_reason() -> None:
    assembler = CompletionStreamAssembler()
    assembler.add(text_chunk(0, "x"))
    before = assembler.finished
    assembler.add(text_chunk(0, "", "stop"))
    assert (before, assembler.finished) == (False, True)


# --- the registry, and the snapshot stand-in for APIs without an assembler ---

@pytest.mark.parametrize(("api", "kind"), [
    (Api.CHAT, ChatStreamAssembler),
    (Api.COMPLETION, CompletionStreamAssembler),
    (Api.RESPONSES, ResponsesStreamAssembler),
    (Api.ANTHROPIC_MESSAGES, AnthropicStreamAssembler),
])
def test_assembler_for(api: Api, kind: type) -> None:
    assert type(assembler_for(api)) is kind


def test_assembler_for_gives_a_fresh_one_each_time() -> None:
    assert assembler_for(Api.CHAT) is not assembler_for(Api.CHAT)


def test_snapshot_keeps_the_completed_response() -> None:
    final = {"id": "resp_1", "status": "completed", "output": [{"type": "message"}]}
    assembler = SnapshotAssembler()
    for event in [{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
                  {"type": "response.output_text.delta", "delta": "hi"},
                  {"type": "response.completed", "response": final}]:
        assembler.add(event)
    assert (assembler.result(), assembler.finished) == (final, True)


def test_snapshot_applies_anthropic_message_delta() -> None:
    assembler = SnapshotAssembler()
    for event in [{"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 3}},
                  {"type": "message_stop"}]:
        assembler.add(event)
    assert assembler.result() == {"id": "msg_1", "stop_reason": "end_turn",
                                  "usage": {"input_tokens": 5, "output_tokens": 3}}
    assert assembler.finished


# --- from the wire -------------------------------------------------------------------------------

def test_sse_bytes_split_anywhere_reassemble_the_same() -> None:
    wire = b"".join(encode_event(json.dumps(c)) for c in [*THREE_TOOL_CALLS, chunk(usage=USAGE)])
    wire += b"data: [DONE]\n\n"

    def through(chunks: list[bytes]) -> dict[str, Any]:
        decoder, assembler = SSEDecoder(), ChatStreamAssembler()
        events = [e for c in chunks for e in decoder.feed(c)] + decoder.close()
        for event in events:
            if event.has_data and event.data != "[DONE]":
                assembler.add(json.loads(event.data))
        return assembler.result()

    whole = through([wire])
    assert whole["usage"] == USAGE
    for cut in range(1, len(wire), 3):
        assert through([wire[:cut], wire[cut:]]) == whole, cut


# --- property: any chunking of a generated answer reassembles to it ------------------------------

_text = st.text(max_size=30)


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    choices = []
    for index in range(draw(st.integers(1, 3))):
        content = draw(st.one_of(st.none(), _text.filter(bool)))
        message: dict[str, Any] = {"role": "assistant", "content": content}
        calls = [call(f"call_{index}_{i}", draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)), draw(_text))
                 for i in range(draw(st.integers(0, 3)))]
        if calls:
            message["tool_calls"] = calls
        finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
        choices.append({"index": index, "message": message, "finish_reason": finish})
    usage = draw(st.one_of(st.none(), st.just(USAGE)))
    return completion(*choices, usage=usage)


def _pieces(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def streams_of(draw: st.DrawFn, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks a server could send for `body`: pieces of every string, choices interleaved at random."""
    per_choice: list[list[dict[str, Any]]] = []
    for choice in body["choices"]:
        index, message = choice["index"], choice["message"]
        deltas = [delta(index, role="assistant")]
        if message["content"] is not None:
            deltas += [delta(index, content=p) for p in _pieces(draw, message["content"])]
        for i, tc in enumerate(message.get("tool_calls", [])):
            first, *rest = _pieces(draw, tc["function"]["arguments"])
            deltas.append(delta(index, tool_calls=[tool_delta(i, tc["id"], tc["function"]["name"], first)]))
            deltas += [delta(index, tool_calls=[tool_delta(i, arguments=p)]) for p in rest]
        deltas.append(delta(index, finish_reason=choice["finish_reason"]))
        per_choice.append(deltas)
    chunks = []
    while any(per_choice):
        queue = draw(st.sampled_from([q for q in per_choice if q]))
        chunks.append(chunk(queue.pop(0)))
    if "usage" in body:
        chunks.append(chunk(usage=body["usage"]))
    return chunks


@given(st.data())
def test_any_chunking_reassembles_to_the_answer(data: st.DataObject) -> None:
    body = data.draw(answers())
    chunks = data.draw(streams_of(body))
    assembler = ChatStreamAssembler()
    for c in chunks:
        assembler.add(c)
    assert (assembler.result(), assembler.finished) == (body, True)
