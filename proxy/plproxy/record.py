"""The record of one LLM call, as the proxy and the LangChain handler hand it to the pipeline.

A `LogRecord` holds what crossed the wire in the provider's own shape (the request body the client
sent, the response body it received or the stream reassembled into that body), plus timing, outcome
and the annotations from `X-PL-*` headers. It never holds a credential: request headers are not part
of it at all. `plproxy.mapping` turns it into PromptLayer's `/log-request` body.
"""

from __future__ import annotations

import enum
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class Api(enum.StrEnum):
    """Which provider API a call used, recognised from its path (never from a host name)."""

    CHAT = "chat"  # /chat/completions
    COMPLETION = "completion"  # legacy /completions
    EMBEDDING = "embedding"  # /embeddings
    RESPONSES = "responses"  # /responses
    ANTHROPIC_MESSAGES = "anthropic_messages"  # /v1/messages


class Outcome(enum.StrEnum):
    """How the call ended, from the client's point of view."""

    SUCCESS = "success"  # a complete 2xx answer
    PARTIAL = "partial"  # a stream that stopped before its end (client left, upstream cut)
    UPSTREAM_ERROR = "upstream_error"  # the upstream answered 4xx/5xx; `status_code` says which
    TIMEOUT = "timeout"  # no answer within the read timeout
    UNREACHABLE = "unreachable"  # connection refused, reset before any byte, DNS failure


@dataclass(frozen=True, slots=True, kw_only=True)
class Annotations:
    """What the caller asked to attach to the record (from `X-PL-*` headers or the handler)."""

    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    prompt_name: str | None = None
    prompt_version_number: int | None = None
    prompt_label: str | None = None
    prompt_input_variables: dict[str, Any] = field(default_factory=dict)
    score: int | None = None
    group_id: int | None = None


def new_log_id() -> str:
    return str(uuid.uuid4())


class LogIds:
    """Log ids for the proxy's calls: time-ordered UUIDs (version 7, RFC 9562: 48 bits of Unix
    milliseconds, then 74 random bits), drawn from a buffer of `os.urandom` bytes (one `getrandom` call
    per 256 ids instead of one per id).

    Time order is for the store: the log id is its primary key, and a B-tree takes keys that arrive in
    order at its right edge, where random (version 4) keys land all over an index that outgrows memory
    (measured at a 50,000-record store: 23 µs per stored record with random ids, 14 with these). The
    ids are as hard to guess as random ones within a millisecond, and say nothing the record's own
    times do not. Not shared across processes: each worker makes its own after it starts."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool = os.urandom(10 * self._BATCH)
            at = 0
        self._at = at + 10
        raw = bytearray((time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF).to_bytes(6, "big"))
        raw += self._pool[at : at + 10]
        raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True, kw_only=True)
class LogRecord:
    """One request/response pair. Built when the call completes, failed, or was abandoned."""

    log_id: str
    api: Api
    provider: str  # "openai", "openai.azure", "anthropic", or a LangChain model's family
    request: dict[str, Any]  # the JSON body the client sent (an allow-list is applied when mapping)
    response: dict[str, Any] | None  # the JSON body received, or a stream reassembled into one
    start_time: float  # epoch seconds, sub-second precision
    end_time: float  # epoch seconds; after the last byte the client received
    outcome: Outcome = Outcome.SUCCESS
    status_code: int | None = None  # the upstream's HTTP status, None when it never answered
    error_message: str | None = None  # the upstream's own message, or what went wrong
    stream: bool = False
    model_hint: str | None = None  # e.g. an Azure deployment name, used when the response names no model
    function_name: str | None = None  # overrides the per-API default (the handler sets its own)
    annotations: Annotations = field(default_factory=Annotations)
    extra_metadata: dict[str, str] = field(default_factory=dict)  # plproxy's own (log id, estimates, …)
