"""A fake Anthropic Messages API on loopback whose answers are deterministic functions of the request.

`POST /v1/messages` answers like the real API, streamed (its event sequence: `message_start` with the
input usage, `ping`, per block `content_block_start` / `content_block_delta` / `content_block_stop`,
`message_delta` with the stop reason and output usage, `message_stop`) or not. The requested model picks
the scenario:

    any other model          one text block, "echo: <last user text>"
    fake-tools               a text block, then two tool_use blocks (input streamed as input_json_delta)
    fake-thinking            a thinking block (thinking_delta, then signature_delta), then the text
    fake-error-400/401/429/500/529   that status with Anthropic's error body (429 carries retry-after)
    fake-overloaded          streamed: the message starts, one text delta, then an `error` event
                             (overloaded_error) and the stream ends
    fake-cut                 streamed: four events, then the connection is aborted

Every request needs a key, `x-api-key` or (as `anthropic` 2.x sends it) `Authorization: Bearer` (else
401), and `anthropic-version` (else 400), like the real API.
`POST /v1/messages/count_tokens` answers `{"input_tokens": N}`. Ids (`msg_…`, `toolu_…`) come from a
hash of the request without `stream`, so a streamed answer carries the ids of its non-streamed twin.
Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.loopback import LoopbackServer
from tests.fakes.openai_upstream import ReceivedRequest, StreamResult, _abort, _pieces, _words

__all__ = ["SIGNATURE", "THINKING_TEXT", "TOOL_INPUTS", "FakeAnthropic"]

THINKING_TEXT = "The user greets someone. A short echo will do."
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
TOOL_INPUTS = (
    ("get_weather", {"city": "Paris", "unit": "celsius"}),
    ("get_time", {"timezone": "Asia/Tokyo"}),
)
PRELUDE = "Let me check."

ERRORS = {
    400: ("invalid_request_error", "messages: the fake was asked to fail"),
    401: ("authentication_error", "invalid x-api-key"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


class _AnthropicError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    def response(self) -> web.Response:
        body = {"type": "error", "error": {"type": self.type, "message": self.message}}
        headers = {"retry-after": "1"} if self.status == 429 else {}
        return web.json_response(body, status=self.status, headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: {_dumps(obj)}\n\n".encode()


def _digest(body: dict[str, Any]) -> str:
    canonical = {k: v for k, v in body.items() if k != "stream"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _fragments(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


@dataclass
class _State:
    chunk_delay: float = 0.0
    received: list[ReceivedRequest] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)


STATE = web.AppKey("fake_anthropic_state", _State)


def _check(request: web.Request, body: Any) -> dict[str, Any]:
    if "x-api-key" not in request.headers and "Authorization" not in request.headers:
        raise _AnthropicError(401, "authentication_error", "x-api-key header is required")
    if "anthropic-version" not in request.headers:
        raise _AnthropicError(400, "invalid_request_error", "anthropic-version: header is required")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _AnthropicError(400, "invalid_request_error", "model: Field required")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise _AnthropicError(400, "invalid_request_error", "messages: Field required")
    return body


def _input_tokens(body: dict[str, Any]) -> int:
    system = body.get("system")
    words = _words(_text_of(system)) if system is not None else 0
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    return words + sum(_words(_text_of(m.get("content"))) + 3 for m in messages)


def _blocks(body: dict[str, Any], digest: str) -> list[tuple[dict[str, Any], list[str]]]:
    """The answer's content blocks, each with the pieces it is streamed in."""
    model = body["model"]
    user_text = next(
        (_text_of(m.get("content")) for m in reversed(body["messages"])
         if isinstance(m, dict) and m.get("role") == "user"),
        "",
    )
    blocks: list[tuple[dict[str, Any], list[str]]] = []
    if model == "fake-thinking":
        blocks.append(({"type": "thinking", "thinking": THINKING_TEXT, "signature": SIGNATURE},
                       _pieces(THINKING_TEXT)))
    if model == "fake-tools":
        blocks.append(({"type": "text", "text": PRELUDE}, _pieces(PRELUDE)))
        names = [t["name"] for t in body.get("tools") or [] if isinstance(t, dict) and "name" in t]
        for i, (default_name, tool_input) in enumerate(TOOL_INPUTS):
            block = {
                "type": "tool_use",
                "id": "toolu_01" + hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()[:22],
                "name": names[i % len(names)] if names else default_name,
                "input": tool_input,
            }
            blocks.append((block, _fragments(json.dumps(tool_input))))
        return blocks
    text = f"echo: {user_text}" if user_text else "echo:"
    blocks.append(({"type": "text", "text": text}, _pieces(text)))
    return blocks


def _block_events(index: int, block: dict[str, Any], pieces: list[str]) -> Iterator[dict[str, Any]]:
    kind = block["type"]
    if kind == "text":
        yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
        for piece in pieces:
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "text_delta", "text": piece}}
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        yield {"type": "content_block_start", "index": index, "content_block": start}
        for piece in pieces:
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "thinking_delta", "thinking": piece}}
        yield {"type": "content_block_delta", "index": index,
               "delta": {"type": "signature_delta", "signature": block["signature"]}}
    else:
        start = {**block, "input": {}}
        yield {"type": "content_block_start", "index": index, "content_block": start}
        for piece in pieces:
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "input_json_delta", "partial_json": piece}}
    yield {"type": "content_block_stop", "index": index}


async def _stream(request: web.Request, model: str, events: list[dict[str, Any]],
                  cut_after: int | None) -> web.StreamResponse:
    state = request.app[STATE]
    result = StreamResult(path=request.path, model=model)
    state.streams.append(result)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in events:
        if result.events_sent and state.chunk_delay:
            await asyncio.sleep(state.chunk_delay)
        if cut_after is not None and result.events_sent == cut_after:
            result.cut = True
            return _abort(request, resp)
        try:
            await resp.write(_event(event))
        except ConnectionResetError:
            result.client_gone = True
            return resp
        result.events_sent += 1
    await resp.write_eof()
    result.completed = True
    return resp


async def messages(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    model = body["model"]
    m = re.fullmatch(r"fake-error-(\d{3})", model)
    if m and int(m.group(1)) in ERRORS:
        type_, message = ERRORS[int(m.group(1))]
        raise _AnthropicError(int(m.group(1)), type_, message)
    digest = _digest(body)
    blocks = _blocks(body, digest)
    input_tokens = _input_tokens(body)
    output_tokens = sum(len(pieces) for _, pieces in blocks)
    stop_reason = "tool_use" if model == "fake-tools" else "end_turn"
    message = {
        "id": "msg_01" + digest[:22],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block for block, _ in blocks],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": output_tokens, "service_tier": "standard"},
    }
    if not body.get("stream"):
        return web.json_response(message, dumps=_dumps)

    start = {**message, "content": [], "stop_reason": None,
             "usage": {**message["usage"], "output_tokens": 1}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    if model == "fake-overloaded":
        events.extend(list(_block_events(0, *blocks[0]))[:2])
        events.append({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        return await _stream(request, model, events, None)
    for index, (block, pieces) in enumerate(blocks):
        events.extend(_block_events(index, block, pieces))
        if index == 0:
            events.append({"type": "ping"})
    events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                   "usage": {"output_tokens": output_tokens}})
    events.append({"type": "message_stop"})
    return await _stream(request, model, events, 4 if model == "fake-cut" else None)


async def count_tokens(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"input_tokens": _input_tokens(body)}, dumps=_dumps)


async def dispatch(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    request.app[STATE].received.append(
        ReceivedRequest(method=request.method, path=request.path, raw_path=request.rel_url.raw_path,
                        path_qs=request.rel_url.raw_path_qs, headers=request.headers.copy(), body=raw)
    )
    handlers = {"/v1/messages": messages, "/v1/messages/count_tokens": count_tokens}
    handler = handlers.get(request.rel_url.raw_path) if request.method == "POST" else None
    try:
        if handler is None:
            raise _AnthropicError(404, "not_found_error", f"Not Found: {request.method} {request.path}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _AnthropicError(400, "invalid_request_error", "The body is not valid JSON.") from None
        return await handler(request, _check(request, body))
    except _AnthropicError as error:
        return error.response()


class FakeAnthropic(LoopbackServer):
    """The fake served on 127.0.0.1; `base_url` is what ANTHROPIC_BASE_URL (or a plproxy route) holds."""

    def __init__(self, *, chunk_delay: float = 0.0) -> None:
        super().__init__()
        self._state = _State(chunk_delay=chunk_delay)

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeAnthropic has no port until start() has run")
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[ReceivedRequest]:
        return self._state.received

    @property
    def streams(self) -> list[StreamResult]:
        return self._state.streams

    def make_app(self) -> web.Application:
        app = web.Application()
        app[STATE] = self._state
        app.router.add_route("*", "/{tail:.*}", dispatch)
        return app
