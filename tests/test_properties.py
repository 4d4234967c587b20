"""Properties, with hypothesis, of what hostile input reaches first, and of the record path as a whole.

- `X-PL-*` parsing never raises, never echoes a value into a warning, never lets CR/LF into one, keeps its
  limits, and gives only text that can be encoded (so the record can always be built);
- routing never yields a URL whose origin differs from its route's, nor a path outside the route's base;
- any split of a stream's bytes into chunks gives the same record, through the relay's own SSE decoder and
  capture (the existing SSE and reassembly properties check the parts; this checks them joined);
- any valid completion or embedding call maps to a schema-valid `/log-request` body (chat calls and junk
  are covered in tests/test_mapping.py).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from plproxy.apis import CallKind
from plproxy.capture import Capture
from plproxy.errors import BadRequest, NotFound
from plproxy.json_bytes import dumps
from plproxy.mapping import to_log_request
from plproxy.pl_headers import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_VALUE_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    parse_pl_headers,
)
from plproxy.record import Annotations, Api, LogRecord, Outcome
from plproxy.routing import resolve
from plproxy.settings import Route
from plproxy.sse import SSEDecoder, encode_event
from tests.fakes.promptlayer import validate_log_request

SENTINEL = "\u00a7Q\u00a7"  # in every generated value: a warning that holds it echoed the value

# --- X-PL-* headers -----------------------------------------------------------------------------------

_KNOWN = [
    "X-PL-Tags",
    "X-PL-Metadata",
    "X-PL-Prompt-Name",
    "X-PL-Prompt-Version",
    "X-PL-Prompt-Label",
    "X-PL-Prompt-Input-Variables",
    "X-PL-Score",
    "X-PL-Group-Id",
    "X-PL-Log",
    "X-PL-Api-Key",
]
# header names are HTTP tokens (the parser refuses anything else); values are anything the parser lets
# through, and text with lone surrogates is what aiohttp makes of bytes that are not UTF-8
_name = st.one_of(
    st.sampled_from(_KNOWN),
    st.sampled_from(_KNOWN).map(str.lower),
    st.from_regex(r"X-PL-[A-Za-z0-9!#$%&'*+.^_`|~-]{0,20}", fullmatch=True),
    st.sampled_from(["Authorization", "Content-Type", "X-Other"]),
)
_raw = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=4),
    st.lists(st.text(max_size=12), max_size=8).map(", ".join),
    st.lists(st.text(max_size=12), max_size=8).map(lambda items: json.dumps(items)),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4).map(json.dumps),
    st.integers(-(10**20), 10**20).map(str),
)


@st.composite
def _value(draw: st.DrawFn) -> str:
    raw = draw(_raw)
    at = draw(st.integers(0, len(raw)))
    return raw[:at] + SENTINEL + raw[at:]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_name, st.one_of(_value(), _raw)), max_size=12))
def test_header_parsing_never_raises_never_echoes_and_keeps_its_limits(
    headers: list[tuple[str, str]],
) -> None:
    parsed = parse_pl_headers(headers)
    for warning in parsed.warnings:
        assert "\r" not in warning
        assert "\n" not in warning
        assert SENTINEL not in warning
        warning.encode("latin-1")  # a valid header value
    notes = parsed.annotations
    assert len(notes.tags) <= MAX_TAGS
    assert all(0 < len(tag) <= MAX_TAG_CHARS for tag in notes.tags)
    assert all(
        len(k) <= MAX_METADATA_KEY_CHARS and len(v) <= MAX_METADATA_VALUE_CHARS
        for k, v in notes.metadata.items()
    )
    assert notes.score is None or 0 <= notes.score <= 100
    key = parsed.api_key
    assert key is None or (key.isascii() and key.isprintable() and " " not in key and len(key) <= 256)
    # whatever came in, the record can be built and encoded
    record = LogRecord(
        log_id="x",
        api=Api.CHAT,
        provider="openai",
        request={},
        response=None,
        start_time=0.0,
        end_time=1.0,
        annotations=notes,
    )
    orjson.dumps(to_log_request(record))


# --- routing ------------------------------------------------------------------------------------------

ROUTES = (
    Route("v1", URL("http://127.0.0.1:9/v1")),
    Route("azure", URL("https://example.openai.azure.com/openai")),
    Route("root", URL("http://127.0.0.1:10")),
)
_segment = st.one_of(
    st.sampled_from(
        ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2e", "", "v1", "azure", "root", "%2F", "..%2f"]
    ),
    st.sampled_from(["http:", "127.0.0.1:1", "@evil", "evil.example", "%00", "\\..", ";..", "?x=..", "#.."]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=6),
)
_target = st.one_of(
    st.lists(_segment, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.tuples(
        st.sampled_from(["http://", "https://", "//", ""]),
        st.text(max_size=12),
        st.lists(_segment, max_size=6),
    ).map(lambda t: f"{t[0]}{t[1]}/{'/'.join(t[2])}"),
)


@settings(max_examples=500)
@given(_target)
def test_routing_never_leaves_the_route(target: str) -> None:
    try:
        resolved = resolve(target, ROUTES)
    except (BadRequest, NotFound):
        return
    url = resolved.url
    base = resolved.route.url
    assert url.origin() == base.origin()
    assert url.raw_path.startswith(base.raw_path.rstrip("/") + "/") or url.raw_path == base.raw_path
    below = url.raw_path[len(base.raw_path.rstrip("/")) :]
    for segment in below.split("/"):
        assert segment.replace("%2e", ".").replace("%2E", ".") not in ("..", ".")


# --- the relay's stream path, joined: any chunking, the same record --------------------------------


def _chunk(api: Api, **fields: Any) -> dict[str, Any]:
    base = {"id": "x-1", "created": 1700000000, "model": "gpt-4o-mini"}
    if api is Api.CHAT:
        return {**base, "object": "chat.completion.chunk", **fields}
    return {**base, "object": "text_completion", **fields}


@st.composite
def _stream(draw: st.DrawFn) -> tuple[Api, bytes]:
    api = draw(st.sampled_from([Api.CHAT, Api.COMPLETION]))
    pieces = draw(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=8))
    events = []
    for n, piece in enumerate(pieces):
        if api is Api.CHAT:
            delta = {"role": "assistant", "content": piece} if n == 0 else {"content": piece}
            events.append(_chunk(api, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
        else:
            events.append(_chunk(api, choices=[{"index": 0, "text": piece, "finish_reason": None}]))
    finish = (
        {"index": 0, "delta": {}, "finish_reason": "stop"}
        if api is Api.CHAT
        else {"index": 0, "text": "", "finish_reason": "stop"}
    )
    events.append(_chunk(api, choices=[finish]))
    events.append(_chunk(api, choices=[], usage={"prompt_tokens": 3, "completion_tokens": len(pieces)}))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    wire = b"".join(encode_event(json.dumps(e)).replace(b"\n", newline.encode()) for e in events)
    if draw(st.booleans()):
        wire = b": keep-alive\n\n" + wire
    return api, wire + b"data: [DONE]" + newline.encode() * 2


def _record_of(api: Api, chunks: list[bytes]) -> dict[str, Any]:
    """What the forwarder's pass-through relay does with a stream: decode, keep the events, build."""
    capture = Capture(
        log_id="x",
        kind=CallKind(api, "openai"),
        annotations=Annotations(),
        request_body=b'{"model": "gpt-4o-mini", "stream": true}',
        start_time=1.0,
        end_time=2.0,
        status_code=200,
        is_stream=True,
    )
    decoder = SSEDecoder()
    for event in [e for chunk in chunks for e in decoder.feed(chunk)] + decoder.close():
        if event.data == "[DONE]":
            capture.stream_done = True
        elif event.data:
            capture.add_event(event.data, len(event.raw))
    return capture.build_payload()


@settings(max_examples=200)
@given(st.data())
def test_any_chunking_of_a_stream_gives_the_same_record(data: st.DataObject) -> None:
    api, wire = data.draw(_stream())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=16)))
    chunks = [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)])]
    whole = _record_of(api, [wire])
    assert whole["status"] == "SUCCESS"
    assert _record_of(api, chunks) == whole
    assert _record_of(api, [wire[i : i + 1] for i in range(len(wire))]) == whole


# --- mapping: valid completion and embedding calls -------------------------------------------------

_text = st.text(max_size=40)
_prompt = st.one_of(
    _text, st.lists(_text, min_size=1, max_size=3), st.lists(st.integers(0, 50000), min_size=1, max_size=5)
)


@st.composite
def _completion_call(draw: st.DrawFn) -> tuple[Api, dict[str, Any], dict[str, Any] | None]:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": draw(_prompt)}
    request.update(
        draw(
            st.dictionaries(
                st.sampled_from(["temperature", "max_tokens", "n", "stop", "echo"]),
                st.one_of(st.integers(0, 5), st.floats(0, 2), _text, st.booleans()),
                max_size=3,
            )
        )
    )
    response = draw(
        st.one_of(
            st.none(),
            st.builds(
                lambda texts, finish: {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": "gpt-3.5-turbo-instruct",
                    "choices": [
                        {"index": i, "text": t, "logprobs": None, "finish_reason": finish}
                        for i, t in enumerate(texts)
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                },
                st.lists(_text, min_size=1, max_size=3),
                st.sampled_from(["stop", "length"]),
            ),
        )
    )
    return Api.COMPLETION, request, response


@st.composite
def _embedding_call(draw: st.DrawFn) -> tuple[Api, dict[str, Any], dict[str, Any] | None]:
    request: dict[str, Any] = {"model": "text-embedding-3-small", "input": draw(_prompt)}
    if draw(st.booleans()):
        request["encoding_format"] = draw(st.sampled_from(["float", "base64"]))
    if draw(st.booleans()):
        request["dimensions"] = draw(st.integers(1, 8))
    response = draw(
        st.one_of(
            st.none(),
            st.builds(
                lambda n: {
                    "object": "list",
                    "model": "text-embedding-3-small",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.5, -0.25]} for i in range(n)
                    ],
                    "usage": {"prompt_tokens": n, "total_tokens": n},
                },
                st.integers(1, 3),
            ),
        )
    )
    return Api.EMBEDDING, request, response


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(_completion_call(), _embedding_call()),
    st.sampled_from(list(Outcome)),
    st.sampled_from([None, 200, 400, 429, 500]),
)
def test_any_valid_completion_or_embedding_call_maps_to_a_valid_body(
    call: tuple[Api, dict[str, Any], dict[str, Any] | None], outcome: Outcome, status: int | None
) -> None:
    api, request, response = call
    record = LogRecord(
        log_id="x",
        api=api,
        provider="openai",
        request=request,
        response=response,
        start_time=1.0,
        end_time=2.0,
        outcome=outcome,
        status_code=status,
    )
    body = to_log_request(record)
    assert validate_log_request(body) == []
    assert orjson.loads(dumps(body)) == body


# --- json_bytes: the same JSON as orjson, whichever encoder runs ------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(_json)
def test_json_bytes_decodes_to_what_orjson_would(value: Any) -> None:
    assert orjson.loads(dumps(value)) == orjson.loads(orjson.dumps(value))
    big = {"x": value, "image": "A" * (1024 * 1024 + 1)}  # takes the standard library's path
    assert orjson.loads(dumps(big)) == orjson.loads(orjson.dumps(big))


def test_json_bytes_encodes_nesting_orjson_refuses() -> None:
    deep = json.loads('{"a":' * 300 + "1" + "}" * 300)
    with pytest.raises(TypeError):
        orjson.dumps(deep)
    assert json.loads(dumps(deep)) == deep


def _longest_string(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max([0, *(max(len(str(k)), _longest_string(v)) for k, v in value.items())])
    if isinstance(value, list | tuple):
        return max([0, *(_longest_string(v) for v in value)])
    return 0


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    prompt=st.text(max_size=200),
    answer=st.text(max_size=200),
    arguments=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
    tags=st.lists(
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20), max_size=3
    ),
)
def test_a_records_strings_are_never_longer_than_its_captures_bound(
    prompt: str, answer: str, arguments: dict[str, str], tags: list[str]
) -> None:
    # The store encodes a record without searching it for a long string when `string_bound()` says
    # none can be longer than json_bytes.LARGE_STRING: the bound must hold for every string in it.
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": answer,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": json.dumps(arguments)},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    capture = Capture(
        log_id="x",
        kind=CallKind(Api.CHAT, "openai"),
        annotations=Annotations(tags=tuple(tags)),
        request_body=orjson.dumps(request),
        start_time=1.0,
        end_time=2.0,
        status_code=200,
    )
    capture.add_body(orjson.dumps(response))
    bound = capture.string_bound()
    assert bound is not None
    assert _longest_string(capture.build_payload()) <= bound


def test_a_compressed_answer_has_no_string_bound() -> None:
    capture = Capture(
        log_id="x",
        kind=CallKind(Api.CHAT, "openai"),
        annotations=Annotations(),
        request_body=b"{}",
        start_time=1.0,
        content_encoding="gzip",
    )
    assert capture.string_bound() is None  # decoded, it may be far larger than its bytes


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=10), _json_values, max_size=5),
    secrets=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
    plant=st.booleans(),
)
def test_the_secret_search_by_bytes_never_misses_what_the_walk_would_redact(
    payload: dict[str, Any], secrets: list[str], plant: bool
) -> None:
    # The writer skips redact_secrets' walk when may_hold_secret says no secret is in the payload: that
    # must never be said of a payload the walk would change.
    from plproxy.capture import may_hold_secret
    from plproxy.mapping import redact_secrets

    if plant:  # a secret somewhere inside a string, with text around it
        payload = {**payload, "planted": {"deep": [f"before {secrets[0]} after"]}}
    redacted = redact_secrets(payload, secrets)
    if redacted != payload:
        assert may_hold_secret(payload, tuple(secrets), 1000)
    assert may_hold_secret(payload, tuple(secrets), None)  # no bound: always the walk
    assert may_hold_secret(payload, tuple(secrets), 2 * 1024 * 1024)  # large: always the walk


def test_a_record_without_the_callers_credential_skips_the_walk_and_one_with_it_is_redacted() -> None:
    from plproxy.capture import may_hold_secret

    key = "sk-live-0123456789abcdefghijkl"

    def capture(answer_text: str) -> Capture:
        c = Capture(
            log_id="x",
            kind=CallKind(Api.CHAT, "openai"),
            annotations=Annotations(),
            request_body=orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            start_time=1.0,
            end_time=2.0,
            status_code=200,
            secrets=(key,),
        )
        message = {"role": "assistant", "content": answer_text}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        c.add_body(orjson.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [choice]}))
        return c

    clean = capture("hello")
    assert not may_hold_secret(to_log_request(clean.to_record()), (key,), clean.string_bound())
    leaky = capture(f"your key {key} was refused")
    assert may_hold_secret(to_log_request(leaky.to_record()), (key,), leaky.string_bound())
    assert key.encode() not in orjson.dumps(leaky.build_payload())
    assert b"[REDACTED]" in orjson.dumps(leaky.build_payload())
