"""What the proxy keeps of one call while relaying it, and how that becomes a PromptLayer body.

The forwarder only appends bytes and parsed stream events here: decoding, decompressing, stream
reassembly and mapping happen in `build_payload`, which the store's writer thread runs, off the event
loop and after the client has its answer.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from plproxy.apis import CallKind
from plproxy.json_bytes import LARGE_STRING
from plproxy.mapping import redact_secrets, to_log_request
from plproxy.reassembly import assembler_for
from plproxy.record import Annotations, LogRecord, Outcome

# An answer larger than this is relayed in full but recorded in part: a stream's first events and its
# last few (they carry its end and its usage), or nothing of a JSON body (cut short, it would not parse).
# The record says so in `metadata.plproxy_response_truncated`. It bounds what a call holds in memory.
MAX_RECORDED_BODY_BYTES = 16 * 1024 * 1024
_TAIL_EVENTS = 8


def may_hold_secret(payload: dict[str, Any], secrets: tuple[str, ...], string_bound: int | None) -> bool:
    """False only when no string (or key) in `payload` contains any of `secrets`.

    Encoding the payload once and searching its bytes costs a third of walking every string of it
    (`redact_secrets`). It is exact for a secret JSON writes verbatim (no quote, backslash or control
    character: orjson escapes nothing else), whatever escapes the upstream's own bytes used. Large
    payloads (orjson would reserve many times their size), secrets that JSON escapes, and anything
    orjson cannot encode get the walk."""
    if string_bound is None or string_bound > LARGE_STRING:
        return True
    if any(_JSON_ESCAPED.search(secret) for secret in secrets):
        return True
    try:
        data = orjson.dumps(payload)
        needles = [secret.encode() for secret in secrets]
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return True
    return any(needle in data for needle in needles)


_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


@dataclass(slots=True, kw_only=True)
class Capture:
    log_id: str
    kind: CallKind
    annotations: Annotations
    request_body: bytes
    start_time: float
    end_time: float = 0.0
    status_code: int | None = None
    content_encoding: str = ""
    is_stream: bool = False
    body_chunks: list[bytes] = field(default_factory=list)
    body_size: int = 0
    # stream events: JSON text (from a pass-through relay) or already-parsed dicts (from a rewriting one)
    events: list[str | dict[str, Any]] = field(default_factory=list)
    events_size: int = 0
    tail: deque[str | dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_TAIL_EVENTS))
    stream_done: bool = False  # saw [DONE] or the API's own terminal event
    outcome: Outcome | None = None  # set when the forwarder knows better than the body (cut, timeout, …)
    error_message: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    call_log: dict[str, Any] | None = None  # the operational log line's fields, written with the tokens
    # the caller's credentials (from its headers) and the PromptLayer key: never in a record, even
    # where an upstream quotes them back in its answer
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def add_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size <= MAX_RECORDED_BODY_BYTES:
            self.body_chunks.append(chunk)
        elif self.body_chunks:
            self.body_chunks.clear()  # too large to record: hold none of it for the rest of the relay

    def add_event(self, event: str | dict[str, Any], size: int) -> None:
        """Keep a stream event (`size`: its bytes on the wire); past the cap only the last few are kept."""
        self.events_size += size
        if self.events_size <= MAX_RECORDED_BODY_BYTES:
            self.events.append(event)
        else:
            self.tail.append(event)

    def string_bound(self) -> int | None:
        """An upper bound on the length of any string in `build_payload()`'s result, or None when the
        answer is compressed (decoded, it may be far larger than its bytes). Every string comes from the
        bytes captured (decoding never lengthens them; re-encoding JSON with escapes at most sixfold) or
        from a header value (aiohttp caps each at 8 KiB)."""
        if self.content_encoding and self.content_encoding.lower() != "identity":
            return None
        return 6 * (len(self.request_body) + self.body_size + self.events_size) + 64 * 1024

    def build_payload(self) -> dict[str, Any]:
        payload = to_log_request(self.to_record())
        if self.secrets and may_hold_secret(payload, self.secrets, self.string_bound()):
            payload = redact_secrets(payload, self.secrets)
        return payload

    def to_record(self) -> LogRecord:
        request = _json_object(self.request_body)
        response: dict[str, Any] | None
        outcome = self.outcome
        error_message = self.error_message
        metadata = self.extra_metadata
        if self.body_size > MAX_RECORDED_BODY_BYTES:
            metadata = {
                **metadata,
                "plproxy_response_truncated": f"the answer was {self.body_size} bytes, more than the "
                f"{MAX_RECORDED_BODY_BYTES} recorded: its body is not in this record",
            }
        elif self.events_size > MAX_RECORDED_BODY_BYTES:
            metadata = {
                **metadata,
                "plproxy_response_truncated": f"the stream was {self.events_size} bytes of events, more "
                f"than the {MAX_RECORDED_BODY_BYTES} recorded: this record has its first events and its last",
            }
        if self.is_stream and self.status_code is not None and self.status_code < 400:
            assembler = assembler_for(self.kind.api)
            for event in [*self.events, *self.tail]:
                if isinstance(event, str):
                    try:
                        event = orjson.loads(event)
                    except orjson.JSONDecodeError:
                        continue
                if isinstance(event, dict):
                    assembler.add(event)
            response = assembler.result()
            # the upstream's own error inside a 200 stream (Anthropic's and the Responses API's `error`
            # event, `response.failed`): an error of the call, with the upstream's message
            stream_error = getattr(assembler, "error", None)
            if outcome is None and isinstance(stream_error, str):
                outcome = Outcome.UPSTREAM_ERROR
                error_message = error_message or stream_error
            elif outcome is None and not (self.stream_done or assembler.finished):
                outcome = Outcome.PARTIAL
                error_message = error_message or "the stream ended before its last event"
        else:
            response = self._body_json()
        if outcome is None:
            if self.status_code is not None and self.status_code >= 400:
                outcome = Outcome.UPSTREAM_ERROR
            else:
                outcome = Outcome.SUCCESS
        if outcome is Outcome.UPSTREAM_ERROR and error_message is None:
            error_message = _upstream_message(response, self.status_code)
        return LogRecord(
            log_id=self.log_id,
            api=self.kind.api,
            provider=self.kind.provider,
            request=request,
            response=response,
            start_time=self.start_time,
            end_time=self.end_time,
            outcome=outcome,
            status_code=self.status_code,
            error_message=error_message,
            stream=self.is_stream,
            model_hint=self.kind.model_hint,
            annotations=self.annotations,
            extra_metadata=metadata,
        )

    def _body_json(self) -> dict[str, Any] | None:
        if not self.body_chunks or self.body_size > MAX_RECORDED_BODY_BYTES:
            return None
        body = b"".join(self.body_chunks)
        if self.content_encoding:
            body = _decompress(body, self.content_encoding)
        return _json_object(body)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _decompress(body: bytes, encoding: str) -> bytes:
    """The decoded body for the record, or b"" when it cannot be decoded or would exceed the record cap
    (a small compressed answer can inflate a thousandfold: the copy for the record must stay bounded)."""
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return body
    if encoding in ("gzip", "x-gzip"):
        candidates: tuple[int, ...] = (31,)
    elif encoding == "deflate":
        candidates = (15, -15)  # zlib-wrapped as the RFC says, or raw as some servers send it
    else:
        return b""
    for wbits in candidates:
        decoder = zlib.decompressobj(wbits=wbits)
        try:
            decoded = decoder.decompress(body, MAX_RECORDED_BODY_BYTES + 1)
        except zlib.error:
            continue
        return b"" if len(decoded) > MAX_RECORDED_BODY_BYTES or decoder.unconsumed_tail else decoded
    return b""


def _upstream_message(response: dict[str, Any] | None, status: int | None) -> str:
    if response:
        error = response.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(response.get("message"), str):
            return str(response["message"])
    return f"upstream answered HTTP {status}"
