"""Server-Sent-Events framing: an incremental decoder for the proxy's hot path, and an encoder.

The decoder follows the WHATWG event-stream rules (LF, CRLF and CR line endings, `:` comments, one
optional space after the colon, a leading BOM) and is lossless: the `raw` bytes of the blocks it
returns, joined, are exactly the bytes it was fed. That lets a relay re-emit a block verbatim, or drop
one (an injected usage chunk), without re-encoding anything.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SSEDecoder", "SSEEvent", "encode_event"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A


class SSEEvent(NamedTuple):
    """One block of an event stream: the lines up to and including the blank line that ends it.

    `has_data` is False for blocks that carry no `data` field (comments and keep-alives, a lone
    `retry:`, extra blank lines): EventSource would not dispatch them, so a consumer skips them, but a
    relay still re-emits their `raw` bytes. A named tuple: the decoder makes one per event of every
    stream, and this is the cheapest immutable record Python has (a third of a frozen dataclass).
    """

    raw: bytes
    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    has_data: bool = True


class SSEDecoder:
    """Turns a byte stream, fed in chunks of any size, into `SSEEvent`s.

    A CR that ends a chunk is held until the next byte shows whether it is half of a CRLF, so a stream
    that uses bare CR line endings sees each block one chunk late; `close()` releases it.
    """

    __slots__ = ("_block_start", "_bom_done", "_buf", "_data", "_event", "_id", "_line_start", "_retry",
                 "_seen")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line_start = 0  # where the next unparsed line starts in _buf
        self._block_start = 0  # where the current block's raw bytes start in _buf
        self._bom_done = False
        self._reset_block()

    def _reset_block(self) -> None:
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._id: bytes | None = None
        self._retry: int | None = None
        self._seen = False  # any non-blank line in this block

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Adds `chunk` and returns the blocks it completed, in order."""
        if not chunk:
            return []
        buf = self._buf
        if not buf and self._bom_done and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            simple = _simple_blocks(chunk)
            if simple is not None:
                return simple
        held_cr = bool(buf) and buf[-1] == _CR
        buf += chunk
        if not self._bom_done:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []
            self._bom_done = True
            if buf.startswith(_BOM):
                self._line_start = len(_BOM)
        # Most chunks of a long line carry no terminator: skip the parse and keep accumulating.
        if not held_cr and chunk.find(b"\n") == -1 and chunk.find(b"\r") == -1:
            return []
        return self._parse(final=False)

    def close(self) -> list[SSEEvent]:
        """Ends the stream: returns the blocks still buffered, the last one possibly unterminated."""
        self._bom_done = True
        events = self._parse(final=True)
        if self._buf:
            events.append(self._make_event(bytes(self._buf)))
            self._buf.clear()
            self._line_start = self._block_start = 0
            self._reset_block()
        return events

    def _parse(self, *, final: bool) -> list[SSEEvent]:
        buf = self._buf
        end_of_buf = len(buf)
        pos = self._line_start
        events: list[SSEEvent] = []
        # bytes.splitlines splits on LF, CR and CRLF only (unlike str.splitlines), in C.
        for line in bytes(buf[pos:]).splitlines(keepends=True):
            end = pos + len(line)
            last = line[-1]
            if last == _LF:
                content = line[:-2] if len(line) > 1 and line[-2] == _CR else line[:-1]
            elif last == _CR:
                if end == end_of_buf and not final:
                    break  # might be the first half of a CRLF
                content = line[:-1]
            else:
                if not final:
                    break  # an unterminated last line
                content = line
            pos = end
            if content:
                self._field(content)
            else:
                events.append(self._make_event(bytes(buf[self._block_start:pos])))
                self._block_start = pos
                self._reset_block()
        self._line_start = pos
        if self._block_start:
            del buf[: self._block_start]
            self._line_start -= self._block_start
            self._block_start = 0
        return events

    def _field(self, line: bytes) -> None:
        self._seen = True
        if line[0] == _COLON:
            return
        colon = line.find(b":")
        if colon == -1:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._id = value
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)

    def _make_event(self, raw: bytes) -> SSEEvent:
        if not self._seen:
            return SSEEvent(raw=raw, has_data=False)
        return SSEEvent(
            raw=raw,
            data=b"\n".join(self._data).decode("utf-8", "replace"),
            event=self._event.decode("utf-8", "replace") if self._event else None,
            id=self._id.decode("utf-8", "replace") if self._id is not None else None,
            retry=self._retry,
            has_data=bool(self._data),
        )


def _simple_blocks(chunk: bytes) -> list[SSEEvent] | None:
    """The events of a chunk made only of whole `data: …` blocks with LF endings, as an LLM API sends
    nearly every chunk of a stream; None for anything else, which the general parse then handles.

    Called only between blocks (nothing buffered): each block is then a single `data` line, whose value
    is the line after `data: `, exactly what the general parse makes of it, at half its cost."""
    events: list[SSEEvent] = []
    for block in chunk[:-2].split(b"\n\n"):
        if not block.startswith(b"data: ") or b"\n" in block:
            return None
        events.append(SSEEvent(block + b"\n\n", block[6:].decode("utf-8", "replace")))
    return events


def encode_event(data: bytes | str, event: str | None = None) -> bytes:
    """Encodes one event; a line break in `data` (LF, CRLF or CR) becomes another `data:` line."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    parts = []
    if event is not None:
        if "\n" in event or "\r" in event:
            raise ValueError(f"an SSE event name cannot contain a line break: {event!r}")
        parts.append(b"event: " + event.encode("utf-8") + b"\n")
    if b"\r" in payload:
        payload = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for line in payload.split(b"\n"):
        parts.append(b"data: " + line + b"\n")
    parts.append(b"\n")
    return b"".join(parts)
