"""plproxy.sse: the incremental event-stream decoder and the encoder, as tables of cases."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plproxy.sse import SSEDecoder, SSEEvent, encode_event


def decode(stream: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(stream) + decoder.close()


def decode_chunks(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def params(table: list[tuple[Any, ...]], *columns: int) -> list[Any]:
    """pytest params from a table whose first column is the case's name."""
    return [pytest.param(*(row[c] for c in columns), id=row[0]) for row in table]


def fields(events: list[SSEEvent]) -> list[tuple[str | None, str, str | None, int | None, bool]]:
    return [(e.event, e.data, e.id, e.retry, e.has_data) for e in events]


# (name, stream, [(event, data, id, retry, has_data), ...])
DECODE_CASES = [
    ("lf", b"data: a\n\n", [(None, "a", None, None, True)]),
    ("crlf", b"data: a\r\n\r\n", [(None, "a", None, None, True)]),
    ("cr", b"data: a\r\r", [(None, "a", None, None, True)]),
    ("mixed endings", b"data: a\r\ndata: b\rdata: c\n\n", [(None, "a\nb\nc", None, None, True)]),
    ("data lines joined", b"data: a\ndata: b\n\n", [(None, "a\nb", None, None, True)]),
    ("no space after colon", b"data:a\n\n", [(None, "a", None, None, True)]),
    ("only one space removed", b"data:  a\n\n", [(None, " a", None, None, True)]),
    ("colon in value kept", b'data: {"a": 1}\n\n', [(None, '{"a": 1}', None, None, True)]),
    ("field without colon", b"data\n\n", [(None, "", None, None, True)]),
    ("empty data field", b"data:\n\n", [(None, "", None, None, True)]),
    ("event name", b"event: ping\ndata: x\n\n", [("ping", "x", None, None, True)]),
    ("empty event name is default", b"event:\ndata: x\n\n", [(None, "x", None, None, True)]),
    ("id", b"id: 42\ndata: x\n\n", [(None, "x", "42", None, True)]),
    ("id with NUL ignored", b"id: 4\x002\ndata: x\n\n", [(None, "x", None, None, True)]),
    ("retry", b"retry: 3000\ndata: x\n\n", [(None, "x", None, 3000, True)]),
    ("retry not digits ignored", b"retry: 3s\ndata: x\n\n", [(None, "x", None, None, True)]),
    ("unknown field ignored", b"foo: bar\ndata: x\n\n", [(None, "x", None, None, True)]),
    ("comment in event", b": keep-alive\ndata: x\n\n", [(None, "x", None, None, True)]),
    ("comment-only block", b": keep-alive\n\n", [(None, "", None, None, False)]),
    ("event without data", b"event: x\n\n", [("x", "", None, None, False)]),
    ("extra blank line", b"data: a\n\n\ndata: b\n\n",
     [(None, "a", None, None, True), (None, "", None, None, False), (None, "b", None, None, True)]),
    ("leading BOM stripped", b"\xef\xbb\xbfdata: a\n\n", [(None, "a", None, None, True)]),
    ("BOM only at the start", b"data: a\n\n\xef\xbb\xbfdata: b\n\n",
     [(None, "a", None, None, True), (None, "", None, None, False)]),
    ("unterminated last event flushed", b"data: a\n\ndata: [DONE]",
     [(None, "a", None, None, True), (None, "[DONE]", None, None, True)]),
    ("unterminated last line of a block", b"data: a\n", [(None, "a", None, None, True)]),
    ("utf-8", "data: héllo ✓\n\n".encode(), [(None, "héllo ✓", None, None, True)]),
    ("invalid utf-8 replaced", b"data: \xff\n\n", [(None, "\ufffd", None, None, True)]),
    ("two events", b"data: 1\n\ndata: 2\n\n", [(None, "1", None, None, True), (None, "2", None, None, True)]),
    ("empty stream", b"", []),
]


@pytest.mark.parametrize(("stream", "expected"), params(DECODE_CASES, 1, 2))
def test_decodes(stream: bytes, expected: list[tuple[str | None, str, str | None, int | None, bool]]) -> None:
    assert fields(decode(stream)) == expected


@pytest.mark.parametrize("stream", params(DECODE_CASES, 1))
def test_raw_bytes_join_back_into_the_stream(stream: bytes) -> None:
    assert b"".join(e.raw for e in decode(stream)) == stream


@pytest.mark.parametrize("stream", params(DECODE_CASES, 1))
def test_every_two_chunk_split_gives_the_same_events(stream: bytes) -> None:
    whole = decode(stream)
    for cut in range(1, len(stream)):
        assert decode_chunks([stream[:cut], stream[cut:]]) == whole, cut


@pytest.mark.parametrize("stream", params(DECODE_CASES, 1))
def test_byte_by_byte_gives_the_same_events(stream: bytes) -> None:
    assert decode_chunks([stream[i : i + 1] for i in range(len(stream))]) == decode(stream)


RAW_CASES = [
    ("lf", b"data: a\n\ndata: b\n\n", [b"data: a\n\n", b"data: b\n\n"]),
    ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]),
    ("comment kept in raw", b": hi\ndata: a\n\n", [b": hi\ndata: a\n\n"]),
    ("BOM kept in raw", b"\xef\xbb\xbfdata: a\n\n", [b"\xef\xbb\xbfdata: a\n\n"]),
]


@pytest.mark.parametrize(("stream", "raws"), params(RAW_CASES, 1, 2))
def test_raw_is_the_block_with_its_blank_line(stream: bytes, raws: list[bytes]) -> None:
    assert [e.raw for e in decode(stream)] == raws


def test_event_is_returned_by_the_feed_that_completes_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert fields(decoder.feed(b"\n")) == [(None, "a", None, None, True)]


def test_crlf_stream_is_not_held_back() -> None:
    assert fields(SSEDecoder().feed(b"data: a\r\n\r\n")) == [(None, "a", None, None, True)]


def test_cr_split_from_its_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == []
    events = decoder.feed(b"\ndata: b\r\n\r\n")
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_trailing_cr_is_released_by_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []
    assert fields(decoder.close()) == [(None, "a", None, None, True)]


def test_split_bom_is_still_stripped() -> None:
    assert fields(decode_chunks([b"\xef", b"\xbb", b"\xbfdata: a\n\n"])) == [(None, "a", None, None, True)]


def test_close_twice_returns_nothing_the_second_time() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a")
    assert len(decoder.close()) == 1
    assert decoder.close() == []


def test_long_line_in_many_chunks() -> None:
    decoder = SSEDecoder()
    payload = b"x" * 100_000
    events: list[SSEEvent] = []
    for i in range(0, len(payload), 7):
        events += decoder.feed((b"data: " if i == 0 else b"") + payload[i : i + 7])
    events += decoder.feed(b"\n\n")
    assert [e.data for e in events] == [payload.decode()]


ENCODE_CASES = [
    ("str", ("hi", None), b"data: hi\n\n"),
    ("bytes", (b'{"a":1}', None), b'data: {"a":1}\n\n'),
    ("event", ("hi", "ping"), b"event: ping\ndata: hi\n\n"),
    ("multi-line", ("a\nb", None), b"data: a\ndata: b\n\n"),
    ("crlf becomes lines", ("a\r\nb\rc", None), b"data: a\ndata: b\ndata: c\n\n"),
    ("trailing newline kept", ("a\n", None), b"data: a\ndata: \n\n"),
    ("empty", ("", None), b"data: \n\n"),
    ("utf-8", ("✓", None), "data: ✓\n\n".encode()),
]


@pytest.mark.parametrize(("args", "expected"), params(ENCODE_CASES, 1, 2))
def test_encodes(args: tuple[str | bytes, str | None], expected: bytes) -> None:
    assert encode_event(*args) == expected


@pytest.mark.parametrize("name", ["a\nb", "a\rb"])
def test_encode_refuses_a_line_break_in_the_event_name(name: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_event("x", name)


# --- properties ----------------------------------------------------------------------------------

_field_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
                      max_size=20)
_line = st.one_of(
    st.builds(lambda v: b"data: " + v.encode(), _field_text),
    st.builds(lambda v: b"data:" + v.encode(), _field_text),
    st.builds(lambda v: b"event: " + v.encode(), _field_text),
    st.builds(lambda v: b"id: " + v.encode(), _field_text),
    st.builds(lambda v: b": " + v.encode(), _field_text),
    st.builds(lambda v: b"retry: " + str(v).encode(), st.integers(0, 10**6)),
)
_newline = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        for line in draw(st.lists(_line, max_size=4)):
            parts += [line, draw(_newline)]
        parts.append(draw(_newline))
    if draw(st.booleans()):
        parts.append(draw(_line))  # an unterminated tail
    return b"".join(parts)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.data())
def test_any_split_gives_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = data.draw(splits(stream))
    assert decode_chunks(chunks) == decode(stream)


@given(streams())
def test_decoding_is_lossless(stream: bytes) -> None:
    assert b"".join(e.raw for e in decode(stream)) == stream


@given(st.text(st.characters(blacklist_categories=("Cs",))),
       st.one_of(st.none(), _field_text.filter(bool)))
def test_encode_then_decode_round_trips(text: str, event: str | None) -> None:
    (decoded,) = decode(encode_event(text, event))
    assert (decoded.data, decoded.event) == (text.replace("\r\n", "\n").replace("\r", "\n"), event)


@st.composite
def block_aligned_chunks(draw: st.DrawFn) -> list[bytes]:
    """A stream cut only between blocks, as LLM APIs send it: most chunks then take the decoder's fast
    path for whole `data: …` blocks, some (other fields, CRLF, several lines) the general parse."""
    blocks: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            blocks.append(b"data: " + draw(_field_text).encode() + b"\n\n")
        else:
            newline = draw(_newline)
            lines = draw(st.lists(_line, min_size=1, max_size=3))
            blocks.append(b"".join(line + newline for line in lines) + draw(_newline))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(blocks)), max_size=len(blocks)))))
    bounds = [0, *cuts, len(blocks)]
    return [b"".join(blocks[a:b]) for a, b in itertools.pairwise(bounds) if a < b]


@given(block_aligned_chunks())
def test_chunks_cut_between_blocks_give_the_same_events_as_byte_by_byte(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)
    assert decode_chunks(chunks) == decode_chunks([bytes([b]) for b in stream])


def test_whole_data_blocks_after_the_first_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a":1}\n\n') == [SSEEvent(raw=b'data: {"a":1}\n\n', data='{"a":1}')]
    two = b'data: {"b":2}\n\ndata: caf\xc3\xa9\n\n'
    assert decoder.feed(two) == [
        SSEEvent(raw=b'data: {"b":2}\n\n', data='{"b":2}'),
        SSEEvent(raw=b"data: caf\xc3\xa9\n\n", data="café"),
    ]
    # not whole `data: ` blocks: the general parse, same rules as ever
    assert decoder.feed(b"data:x\n\nevent: e\ndata: y\n\n") == [
        SSEEvent(raw=b"data:x\n\n", data="x"),
        SSEEvent(raw=b"event: e\ndata: y\n\n", data="y", event="e"),
    ]
    assert decoder.feed(b"data: 1\ndata: 2\n\n") == [SSEEvent(raw=b"data: 1\ndata: 2\n\n", data="1\n2")]
    assert decoder.close() == []
