"""A fake OpenAI API on loopback whose answers are deterministic functions of the request.

The requested model picks the scenario:

    any other model          chat/completions/embeddings answer normally ("echo: <last user text>")
    fake-tools               chat: finish_reason "tool_calls" with two tool calls
    fake-refusal             chat: a refusal instead of content
    fake-many-chunks-N       exactly N content chunks when streamed (N words otherwise)
    fake-error-400/401/429/500   that status with an OpenAI error body (429 carries Retry-After)
    fake-hang                never answers (sleeps an hour)
    fake-cut                 streamed: two content chunks, then the connection is aborted without [DONE];
                             not streamed: half the body, then the connection is aborted
    fake-junk-sse            streamed: `JUNK_SSE`, valid chunks around malformed events (not JSON, not
                             UTF-8, wrong types, odd fields); not streamed: a 200 whose JSON is cut short
    fake-large-N             an answer of N MiB of content, written in pieces (a pause each 4 MiB):
                             one JSON body, or 64 KiB content chunks when streamed; never held whole
    fake-rejects-stream-options  chat: 400 when the body has `stream_options` (as some local servers do)
    fake-reasoning           responses: a reasoning item with a two-part summary before the message
    fake-incomplete          responses: stops after two words, status "incomplete" (max_output_tokens)
    fake-failed              responses: streamed, one delta then `response.failed`; not streamed, a 500

`POST /v1/responses` is the Responses API: the same scenarios by model (fake-tools gives function_call
items), streamed as its typed events (`event:` lines, `sequence_number`, no [DONE]) ending in
`response.completed`.

Azure OpenAI: under `/openai/`, `deployments/{deployment}/chat/completions` (and `completions`,
`embeddings`) and `responses` answer like the OpenAI paths when the query has `api-version` (else 404)
and an `api-key` or `Authorization` header arrived (else 401), both in Azure's error shape. The
deployment picks the scenario; the answer names the model `AZURE_MODEL` (no model at all for the
deployment `fake-no-model`), and chat answers carry Azure's content-filter results (a stream opens with
Azure's filter-only chunk: empty id and model, no choices). `FakeOpenAI.azure_endpoint` is what
`AZURE_OPENAI_ENDPOINT` would hold.

Ids are derived from a hash of the request body, canonicalised (keys sorted, `stream` and
`stream_options` left out), and `created` is fixed, so a direct call and the same call through a proxy
get byte-identical answers even when the proxy re-serialises the body or asks for stream usage, and a
streamed answer carries the id of its non-streamed twin.

`GET /v1/gzip` answers `GZIP_BODY`, the gzip-compressed `GZIP_JSON`, with `Content-Encoding: gzip`.
Any other path under `/v1/` answers 200 with a JSON echo of what arrived. Every request is recorded.

Standalone: `python -m tests.fakes.openai_upstream --port N [--chunk-delay S] [--answer-delay S]
[--record]` prints "listening on http://127.0.0.1:N/v1" and serves until SIGTERM, keeping nothing in
memory unless `--record`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import json
import re
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.fakes.loopback import LoopbackServer

__all__ = [
    "CREATED",
    "GZIP_BODY",
    "GZIP_JSON",
    "JUNK_JSON",
    "JUNK_SSE",
    "MODELS",
    "FakeOpenAI",
    "ReceivedRequest",
    "StreamResult",
    "create_app",
]

CREATED = 1_700_000_000
AZURE_MODEL = "gpt-4o-2024-11-20"
REASONING_SUMMARY = ("**Reading the request**\n\nThe user wants a greeting.",
                     "**Answering**\n\nKeep it short.")
SYSTEM_FINGERPRINT = "fp_fake"
EMBEDDING_DIMENSIONS = 8
HANG_SECONDS = 3600.0
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small", "fake-tools")
DEFAULT_TOOLS = (("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Asia/Tokyo"}))

GZIP_JSON = json.dumps(
    {"object": "gzip.test", "message": "this body crossed the wire gzip-compressed", "items": list(range(32))}
).encode()
# mtime=0 keeps the compressed bytes identical from run to run.
GZIP_BODY = gzip.compress(GZIP_JSON, mtime=0)

ERRORS: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "Invalid value for 'messages': the fake was asked to fail.",
        "invalid_request_error",
        "messages",
        None,
    ),
    401: (
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    ),
    429: (
        "Rate limit reached for fake-error-429 on requests per min (RPM): Limit 3, Used 3, Requested 1. "
        "Please try again in 1s.",
        "requests",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
}


@dataclass(frozen=True)
class ReceivedRequest:
    """One request exactly as it arrived; `path` is decoded, `raw_path` and `path_qs` are not."""

    method: str
    path: str
    raw_path: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StreamResult:
    """What became of one streamed answer: how many SSE events left, and how it ended."""

    path: str
    model: str
    events_sent: int = 0
    completed: bool = False
    client_gone: bool = False
    cut: bool = False


@dataclass
class _State:
    chunk_delay: float = 0.0
    answer_delay: float = 0.0
    record: bool = True
    received: list[ReceivedRequest] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)


STATE = web.AppKey("fake_openai_state", _State)


class _OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else {}
        return web.json_response(body, status=self.status, headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _bad_request(message: str, param: str | None = None) -> _OpenAIError:
    return _OpenAIError(400, message, "invalid_request_error", param, None)


# --- helpers --------------------------------------------------------------------------------------


def _digest(body: dict[str, Any]) -> str:
    canonical = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _pieces(text: str) -> list[str]:
    """Splits text into small word-sized deltas, each but the first with its leading space."""
    return re.findall(r"\s*\S+", text) or [text]


def _many_chunks(model: str) -> int | None:
    if not model.startswith("fake-many-chunks-"):
        return None
    try:
        n = int(model.removeprefix("fake-many-chunks-"))
    except ValueError:
        raise _bad_request(f"bad chunk count in model {model!r}", "model") from None
    if n < 1:
        raise _bad_request(f"bad chunk count in model {model!r}", "model")
    return n


def _answer_pieces(model: str, text: str, index: int) -> list[str]:
    n = _many_chunks(model)
    if n is not None:
        return [f"{' ' if i else ''}t{i}" for i in range(n)]
    prefix = "echo:" if index == 0 else f"echo[{index}]:"
    return _pieces(f"{prefix} {text}" if text else prefix)


def _words(text: str) -> int:
    return len(text.split())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _positive_int(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_request(f"Invalid value for '{name}': expected a positive integer.", name)
    return value


def _tool_calls(body: dict[str, Any], digest: str) -> list[dict[str, Any]]:
    names = [
        t["function"]["name"]
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
    ]
    calls = []
    for i, (default_name, args) in enumerate(DEFAULT_TOOLS):
        name = names[i % len(names)] if names else default_name
        call_id = "call_" + hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()[:24]
        calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        )
    return calls


def _fragments(s: str, size: int = 6) -> list[str]:
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


# --- scenarios ------------------------------------------------------------------------------------


async def _scenario_gate(request: web.Request, model: str) -> None:
    """Hangs or fails before any answer bytes, as the model asks."""
    if model == "fake-hang":
        await asyncio.sleep(HANG_SECONDS)
    m = re.fullmatch(r"fake-error-(\d{3})", model)
    if m and int(m.group(1)) in ERRORS:
        message, type_, param, code = ERRORS[int(m.group(1))]
        raise _OpenAIError(int(m.group(1)), message, type_, param, code)


async def _json_body(request: web.Request, deployment: str | None = None) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise _bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object.")
    if deployment is not None:
        body = {**body, "model": deployment}  # Azure: the deployment is the model, whatever the body says
    if not isinstance(body.get("model"), str):
        raise _bad_request("you must provide a model parameter", "model")
    return body


async def _send_json(request: web.Request, obj: Any, *, cut: bool) -> web.StreamResponse:
    data = json.dumps(obj, indent=2).encode()
    if not cut:
        return web.Response(body=data, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
    await resp.prepare(request)
    await resp.write(data[: len(data) // 2])
    return _abort(request, resp)


def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    # force_close stops aiohttp from reusing (or finishing) the connection; abort drops it without FIN.
    request.protocol.force_close()
    if request.transport is not None:
        request.transport.abort()
    return resp


def _answer_model(base: dict[str, Any], deployment: str | None) -> dict[str, Any]:
    """`base` with the model an Azure deployment answers with (none for `fake-no-model`)."""
    if deployment is None:
        return base
    if deployment == "fake-no-model":
        return {k: v for k, v in base.items() if k != "model"}
    return {**base, "model": AZURE_MODEL}


_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
}


async def _send_stream(
    request: web.Request,
    model: str,
    events: Iterator[bytes],
    *,
    cut_after: int | None = None,
    done: bool = True,
) -> web.StreamResponse:
    state = request.app[STATE]
    result = StreamResult(path=request.path, model=model)
    if state.record:
        state.streams.append(result)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in [*events, *([b"data: [DONE]\n\n"] if done else [])]:
        if result.events_sent and state.chunk_delay:
            await asyncio.sleep(state.chunk_delay)
        if cut_after is not None and result.events_sent == cut_after:
            result.cut = True
            return _abort(request, resp)
        if request.transport is None or request.transport.is_closing():
            result.client_gone = True
            return resp
        try:
            await resp.write(event)
        except ConnectionResetError:
            result.client_gone = True
            return resp
        result.events_sent += 1
    await resp.write_eof()
    result.completed = True
    return resp


# A stream an upstream should never send, framed by valid chunks: the text is "ok still here".
JUNK_SSE = (
    b'data: {"id":"chatcmpl-junk","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"fake-junk-sse","choices":[{"index":0,"delta":{"role":"assistant","content":"ok"},'
    b'"finish_reason":null}]}\n\n',
    b"data: {not json\n\n",
    b"data: [1, 2, 3]\n\n",
    b'data: "just a string"\n\n',
    b'event: error\ndata: {"choices": 7}\n\n',
    b"data: \xff\xfe\xfd not utf-8\n\n",
    b": a comment only\n\n",
    b'data: {"choices":[{"index":"zero","delta":{"content":5}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":null,"tool_calls":"nope"}}]}\n\n',
    b"id: \x00weird\nretry: soon\ndata: {}\n\n",
    b"a line without a colon\n\n",
    b'data: {"choices":[{"index":0,"delta":{"content":" still here"}}]}\r\n\r\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
)
JUNK_JSON = b'{"id": "chatcmpl-junk", "object": "chat.completion", "choices": [{"index": 0, "message": {"con'
_LARGE_PIECE = 256 * 1024
_LARGE_PAUSE_EVERY = 4 * 1024 * 1024


async def _junk(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    if not body.get("stream"):
        return web.Response(body=JUNK_JSON, content_type="application/json")
    return await _send_stream(request, "fake-junk-sse", iter(JUNK_SSE))


def _large_mb(model: str) -> int | None:
    if not model.startswith("fake-large-"):
        return None
    try:
        n = int(model.removeprefix("fake-large-"))
    except ValueError:
        raise _bad_request(f"bad size in model {model!r}", "model") from None
    if not 1 <= n <= 4096:
        raise _bad_request(f"bad size in model {model!r}", "model")
    return n


async def _large(request: web.Request, model: str, mebibytes: int, stream: bool) -> web.StreamResponse:
    """N MiB of content, written piece by piece: the fake never holds the answer whole either."""
    total = mebibytes * 1024 * 1024
    base = {"id": "chatcmpl-large", "created": CREATED, "model": model, "object": "chat.completion.chunk"}
    if stream:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        piece = 64 * 1024
        content = {"index": 0, "delta": {"content": "x" * piece}, "finish_reason": None}
        event = _sse({**base, "choices": [content]})
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
        tail = [_sse({**base, "choices": [finish]}), b"data: [DONE]\n\n"]
    else:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        piece = _LARGE_PIECE
        head = _dumps({**base, "object": "chat.completion"})[:-1].encode()
        head += b',"choices":[{"index":0,"message":{"role":"assistant","content":"'
        event = b"x" * piece
        tail = [b'"},"finish_reason":"stop"}]}']
    await resp.prepare(request)
    if not stream:
        await resp.write(head)
    sent = 0
    while sent < total:
        await resp.write(event)
        sent += piece
        if sent % _LARGE_PAUSE_EVERY < piece:
            await asyncio.sleep(request.app[STATE].chunk_delay or 0.002)
    for part in tail:
        await resp.write(part)
    await resp.write_eof()
    return resp


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


# --- /v1/chat -------------------------------------------------------------------------------------


async def chat_completions(request: web.Request, deployment: str | None = None) -> web.StreamResponse:
    body = await _json_body(request, deployment)
    model = body["model"]
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("Invalid value for 'messages': expected a non-empty array.", "messages")
    if model == "fake-rejects-stream-options" and "stream_options" in body:
        raise _bad_request("Unrecognized request argument supplied: stream_options", "stream_options")
    await _scenario_gate(request, model)
    if model == "fake-junk-sse":
        return await _junk(request, body)
    large = _large_mb(model)
    if large is not None:
        return await _large(request, model, large, bool(body.get("stream")))
    digest = _digest(body)
    n = _positive_int(body, "n", 1)
    user_text = next(
        (
            _text_of(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    prompt_tokens = sum(_words(_text_of(m.get("content"))) + 3 for m in messages if isinstance(m, dict))
    base = {"id": "chatcmpl-" + digest[:29], "object": "chat.completion", "created": CREATED, "model": model}
    base = _answer_model(base, deployment)
    tools = _tool_calls(body, digest) if model == "fake-tools" else None
    refusal = _pieces(REFUSAL_TEXT) if model == "fake-refusal" else None
    pieces = [_answer_pieces(model, user_text, i) for i in range(n)]
    if tools:
        completion_tokens = n * sum(len(_fragments(c["function"]["arguments"])) for c in tools)
    else:
        completion_tokens = sum(len(p) for p in (([refusal] * n) if refusal else pieces))
    usage = _usage(prompt_tokens, completion_tokens)
    finish = "tool_calls" if tools else "stop"

    if not body.get("stream"):
        choices = []
        for i in range(n):
            if tools:
                message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tools}
            elif refusal:
                message = {"role": "assistant", "content": None, "refusal": REFUSAL_TEXT}
            else:
                message = {"role": "assistant", "content": "".join(pieces[i]), "refusal": None}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
            if deployment is not None:
                choices[-1]["content_filter_results"] = _FILTER_RESULTS
        answer = {**base, "choices": choices, "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT}
        if deployment is not None:
            answer["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _FILTER_RESULTS}]
        return await _send_json(request, answer, cut=model == "fake-cut")

    with_usage = _include_usage(body)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {
            **base,
            "object": "chat.completion.chunk",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            **extra,
        }
        if with_usage:
            obj.setdefault("usage", None)
        return _sse(obj)

    def delta(i: int, d: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish_reason}

    def events() -> Iterator[bytes]:
        if deployment is not None:  # Azure opens with the prompt's filter results, in a chunk of its own
            opening: dict[str, Any] = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                       "prompt_filter_results": [{"prompt_index": 0,
                                                                  "content_filter_results": _FILTER_RESULTS}]}
            if with_usage:
                opening["usage"] = None
            yield _sse(opening)
        if tools:
            frags = [_fragments(c["function"]["arguments"]) for c in tools]
            for i in range(n):
                for k, c in enumerate(tools):
                    head = {
                        "index": k,
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": ""},
                    }
                    d = (
                        {"role": "assistant", "content": None, "tool_calls": [head]}
                        if k == 0
                        else {"tool_calls": [head]}
                    )
                    yield chunk([delta(i, d)])
                for j in range(max(len(f) for f in frags)):
                    for k, f in enumerate(frags):
                        if j < len(f):
                            yield chunk(
                                [delta(i, {"tool_calls": [{"index": k, "function": {"arguments": f[j]}}]})]
                            )
        else:
            key = "refusal" if refusal else "content"
            per_choice = [refusal] * n if refusal else pieces
            for j in range(max(len(p) for p in per_choice)):
                for i, p in enumerate(per_choice):
                    if j < len(p):
                        d = {"role": "assistant", key: p[j]} if j == 0 else {key: p[j]}
                        yield chunk([delta(i, d)])
        for i in range(n):
            yield chunk([delta(i, {}, finish)])
        if with_usage:
            yield chunk([], usage=usage)

    return await _send_stream(request, model, events(), cut_after=2 if model == "fake-cut" else None)


# --- /v1/completions ------------------------------------------------------------------------------


def _prompts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    if isinstance(value, list) and value:
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    raise _bad_request(f"Invalid value for '{name}'.", name)


async def completions(request: web.Request, deployment: str | None = None) -> web.StreamResponse:
    body = await _json_body(request, deployment)
    model = body["model"]
    prompts = _prompts(body.get("prompt"), "prompt")
    await _scenario_gate(request, model)
    digest = _digest(body)
    n = _positive_int(body, "n", 1)
    texts = [_answer_pieces(model, p, j) for p in prompts for j in range(n)]
    usage = _usage(sum(_words(p) for p in prompts), sum(len(t) for t in texts))
    base = {"id": "cmpl-" + digest[:29], "object": "text_completion", "created": CREATED, "model": model}
    base = _answer_model(base, deployment)

    if not body.get("stream"):
        choices = [
            {"text": "".join(t), "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ]
        answer = {**base, "choices": choices, "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT}
        return await _send_json(request, answer, cut=model == "fake-cut")

    with_usage = _include_usage(body)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {**base, "choices": choices, **extra}
        if with_usage:
            obj.setdefault("usage", None)
        return _sse(obj)

    def events() -> Iterator[bytes]:
        for j in range(max(len(t) for t in texts)):
            for i, t in enumerate(texts):
                if j < len(t):
                    yield chunk([{"text": t[j], "index": i, "logprobs": None, "finish_reason": None}])
        for i in range(len(texts)):
            yield chunk([{"text": "", "index": i, "logprobs": None, "finish_reason": "stop"}])
        if with_usage:
            yield chunk([], usage=usage)

    return await _send_stream(request, model, events(), cut_after=2 if model == "fake-cut" else None)


# --- /v1/responses --------------------------------------------------------------------------------


def _responses_user_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        raise _bad_request("Invalid value for 'input': expected a string or an array of items.", "input")
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [p for p in content if isinstance(p, dict) and p.get("type") == "input_text"]
                return " ".join(p.get("text", "") for p in parts)
    return ""


def _named_event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\n".encode() + _sse(obj)


def _response_object(
    body: dict[str, Any], digest: str, status: str, output: list[dict[str, Any]], usage: Any, **extra: Any
) -> dict[str, Any]:
    return {
        "id": "resp_" + digest[:48],
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
        **extra,
    }


def _response_items(body: dict[str, Any], model: str, digest: str) -> list[tuple[dict[str, Any], list[str]]]:
    """The output items of the answer, each with the pieces it is streamed in."""
    items: list[tuple[dict[str, Any], list[str]]] = []
    if model == "fake-reasoning":
        summary = [{"type": "summary_text", "text": text} for text in REASONING_SUMMARY]
        item = {"id": "rs_" + digest[:48], "type": "reasoning", "summary": summary}
        items.append((item, [p for text in REASONING_SUMMARY for p in _pieces(text)]))
    if model == "fake-tools":
        names = [t["name"] for t in body.get("tools") or [] if isinstance(t, dict) and "name" in t]
        for i, (default_name, args) in enumerate(DEFAULT_TOOLS):
            arguments = json.dumps(args)
            item = {
                "id": "fc_" + hashlib.sha256(f"{digest}:fc{i}".encode()).hexdigest()[:48],
                "type": "function_call",
                "status": "completed",
                "arguments": arguments,
                "call_id": "call_" + hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()[:24],
                "name": names[i % len(names)] if names else default_name,
            }
            items.append((item, _fragments(arguments)))
        return items
    pieces = _answer_pieces(model, _responses_user_text(body.get("input")), 0)
    if model == "fake-incomplete":
        pieces = pieces[:2]
    text = "".join(pieces)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    status = "incomplete" if model == "fake-incomplete" else "completed"
    message = {"id": "msg_" + digest[:48], "type": "message", "status": status, "content": [part],
               "role": "assistant"}
    items.append((message, pieces))
    return items


def _item_events(index: int, item: dict[str, Any], pieces: list[str]) -> Iterator[dict[str, Any]]:
    """The events that stream one output item, from `output_item.added` to `output_item.done`."""
    ref = {"item_id": item["id"], "output_index": index}
    kind = item["type"]
    if kind == "message":
        added = {**item, "status": "in_progress", "content": []}
    elif kind == "function_call":
        added = {**item, "status": "in_progress", "arguments": ""}
    else:
        added = {**item, "summary": []}
    yield {"type": "response.output_item.added", "output_index": index, "item": added}
    if kind == "message":
        part = item["content"][0]
        yield {"type": "response.content_part.added", **ref, "content_index": 0, "part": {**part, "text": ""}}
        for piece in pieces:
            yield {"type": "response.output_text.delta", **ref, "content_index": 0, "delta": piece,
                   "logprobs": []}
        yield {"type": "response.output_text.done", **ref, "content_index": 0, "text": part["text"],
               "logprobs": []}
        yield {"type": "response.content_part.done", **ref, "content_index": 0, "part": part}
    elif kind == "function_call":
        for piece in pieces:
            yield {"type": "response.function_call_arguments.delta", **ref, "delta": piece}
        yield {"type": "response.function_call_arguments.done", **ref, "arguments": item["arguments"]}
    else:
        for s, summary in enumerate(item["summary"]):
            empty = {"type": "summary_text", "text": ""}
            yield {"type": "response.reasoning_summary_part.added", **ref, "summary_index": s, "part": empty}
            for piece in _pieces(summary["text"]):
                yield {"type": "response.reasoning_summary_text.delta", **ref, "summary_index": s,
                       "delta": piece}
            yield {"type": "response.reasoning_summary_text.done", **ref, "summary_index": s,
                   "text": summary["text"]}
            yield {"type": "response.reasoning_summary_part.done", **ref, "summary_index": s, "part": summary}
    yield {"type": "response.output_item.done", "output_index": index, "item": item}


async def responses(request: web.Request, deployment: str | None = None) -> web.StreamResponse:
    body = await _json_body(request, deployment)
    model = body["model"]
    if "input" not in body:
        raise _bad_request("Missing required parameter: 'input'.", "input")
    await _scenario_gate(request, model)
    digest = _digest(body)
    if model == "fake-failed" and not body.get("stream"):
        raise _OpenAIError(500, ERRORS[500][0], "server_error", None, None)
    items = _response_items(body, model, digest)
    output = [item for item, _ in items]
    instructions = body.get("instructions")
    input_words = _words(_responses_user_text(body.get("input"))) + _words(str(instructions or ""))
    reasoning_tokens = sum(len(p) for item, p in items if item["type"] == "reasoning")
    output_tokens = sum(len(p) for _, p in items)
    usage = {
        "input_tokens": input_words + 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_words + 3 + output_tokens,
    }
    status, extra = "completed", {}
    if model == "fake-incomplete":
        status, extra = "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
    final = _answer_model(_response_object(body, digest, status, output, usage, **extra), deployment)
    if not body.get("stream"):
        return await _send_json(request, final, cut=model == "fake-cut")

    def events() -> Iterator[bytes]:
        start = _answer_model(_response_object(body, digest, "in_progress", [], None), deployment)
        sequence = [{"type": "response.created", "response": start},
                    {"type": "response.in_progress", "response": start}]
        if model == "fake-failed":
            item, pieces = items[0]
            sequence.extend(list(_item_events(0, item, pieces))[:3])
            error = {"code": "server_error", "message": "The model failed to generate a response."}
            failed = {**start, "status": "failed", "error": error}
            sequence.append({"type": "response.failed", "response": failed})
        else:
            for index, (item, pieces) in enumerate(items):
                sequence.extend(_item_events(index, item, pieces))
            terminal = "response.incomplete" if status == "incomplete" else "response.completed"
            sequence.append({"type": terminal, "response": final})
        for number, event in enumerate(sequence):
            yield _named_event({"type": event["type"], "sequence_number": number,
                                **{k: v for k, v in event.items() if k != "type"}})

    return await _send_stream(
        request, model, events(), cut_after=5 if model == "fake-cut" else None, done=False
    )


# --- others ---------------------------------------------------------------------------------------


def embedding_vector(model: str, text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The fake's embedding of `text`: multiples of 1/128 in [-1, 1), exact in float32 (so base64 agrees)."""
    raw = hashlib.shake_256(f"{model}\0{text}".encode()).digest(dimensions)
    return [(b - 128) / 128 for b in raw]


async def embeddings(request: web.Request, deployment: str | None = None) -> web.StreamResponse:
    body = await _json_body(request, deployment)
    model = body["model"]
    inputs = _prompts(body.get("input"), "input")
    await _scenario_gate(request, model)
    dims = _positive_int(body, "dimensions", EMBEDDING_DIMENSIONS)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad_request(
            "Invalid value for 'encoding_format': expected 'float' or 'base64'.", "encoding_format"
        )
    data = []
    for i, text in enumerate(inputs):
        vector: Any = embedding_vector(model, text, dims)
        if fmt == "base64":
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(max(1, _words(t)) for t in inputs)
    answer = _answer_model({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, deployment)
    return web.json_response(answer, dumps=_dumps)


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "fake"}


async def list_models(request: web.Request) -> web.StreamResponse:
    return web.json_response({"object": "list", "data": [_model(m) for m in MODELS]}, dumps=_dumps)


async def get_model(request: web.Request, model_id: str) -> web.StreamResponse:
    if model_id not in MODELS and not model_id.startswith("fake-"):
        raise _OpenAIError(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return web.json_response(_model(model_id), dumps=_dumps)


async def gzip_body(request: web.Request) -> web.StreamResponse:
    return web.Response(
        body=GZIP_BODY, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )


async def echo(request: web.Request) -> web.StreamResponse:
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.rel_url.raw_path,
            "query": request.query_string,
            "headers": headers,
            "body": (await request.read()).decode("utf-8", "replace"),
        },
        dumps=_dumps,
    )


# --- Azure OpenAI ---------------------------------------------------------------------------------

_AZURE_DEPLOYMENT_PATH = re.compile(r"/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)")
_AZURE_HANDLERS = {"chat/completions": chat_completions, "completions": completions, "embeddings": embeddings}


def _azure_error(status: int, message: str) -> web.Response:
    body = {"error": {"code": str(status), "message": message}}
    return web.json_response(body, status=status, dumps=_dumps)


async def azure(request: web.Request) -> web.StreamResponse:
    path = request.rel_url.raw_path
    if "api-version" not in request.query and not path.startswith("/openai/v1/"):
        return _azure_error(404, "Resource not found")
    if "api-key" not in request.headers and "Authorization" not in request.headers:
        return _azure_error(
            401,
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
            "valid key for an active subscription and use a correct regional API endpoint for your resource.",
        )
    match = _AZURE_DEPLOYMENT_PATH.fullmatch(path)
    if match is not None and request.method == "POST":
        return await _AZURE_HANDLERS[match.group(2)](request, match.group(1))
    if request.method == "POST" and path in ("/openai/responses", "/openai/v1/responses"):
        body = await _json_body(request)
        return await responses(request, body["model"])
    return _azure_error(404, "Resource not found")


ROUTES = {
    ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/embeddings"): embeddings,
    ("POST", "/v1/responses"): responses,
    ("GET", "/v1/models"): list_models,
    ("GET", "/v1/gzip"): gzip_body,
}


async def dispatch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.read()
    if state.record:
        state.received.append(
            ReceivedRequest(
                method=request.method,
                path=request.path,
                raw_path=request.rel_url.raw_path,
                path_qs=request.rel_url.raw_path_qs,
                headers=CIMultiDict(request.headers),
                body=body,
            )
        )
    raw_path = request.rel_url.raw_path
    if state.answer_delay:
        await asyncio.sleep(state.answer_delay)
    try:
        handler = ROUTES.get((request.method, raw_path))
        if handler is not None:
            return await handler(request)
        if request.method == "GET" and raw_path.startswith("/v1/models/") and raw_path.count("/") == 3:
            return await get_model(request, request.path.removeprefix("/v1/models/"))
        if raw_path.startswith("/openai/"):
            return await azure(request)
        if raw_path.startswith("/v1/"):
            return await echo(request)
        raise _OpenAIError(
            404, f"Invalid URL ({request.method} {raw_path})", "invalid_request_error", None, None
        )
    except _OpenAIError as e:
        return e.response()


def _make_app(state: _State) -> web.Application:
    # 64 MiB: image prompts are far above aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def create_app(*, chunk_delay: float = 0.0, answer_delay: float = 0.0) -> web.Application:
    """The fake as an application, for `aiohttp_client` or any runner."""
    return _make_app(_State(chunk_delay=chunk_delay, answer_delay=answer_delay))


class FakeOpenAI(LoopbackServer):
    """The fake served on 127.0.0.1; `port=0` picks a free port, kept across `stop()`/`start()`."""

    def __init__(
        self, *, chunk_delay: float = 0.0, answer_delay: float = 0.0, port: int = 0, record: bool = True
    ) -> None:
        """`record=False` (the standalone default) keeps nothing in memory, for long benchmark runs."""
        super().__init__(port=port)
        self._state = _State(chunk_delay=chunk_delay, answer_delay=answer_delay, record=record)

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, what OPENAI_BASE_URL (or plproxy's upstream) should hold."""
        return f"{self.origin}/v1"

    @property
    def azure_endpoint(self) -> str:
        """What AZURE_OPENAI_ENDPOINT would hold: the resource, below which Azure serves `/openai/…`."""
        return self.origin

    @property
    def origin(self) -> str:
        if not self.port:
            raise RuntimeError("FakeOpenAI has no port until start() has run")
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[ReceivedRequest]:
        return self._state.received

    @property
    def streams(self) -> list[StreamResult]:
        return self._state.streams

    @property
    def chunk_delay(self) -> float:
        return self._state.chunk_delay

    @chunk_delay.setter
    def chunk_delay(self, value: float) -> None:
        self._state.chunk_delay = value

    @property
    def answer_delay(self) -> float:
        return self._state.answer_delay

    @answer_delay.setter
    def answer_delay(self, value: float) -> None:
        self._state.answer_delay = value

    def make_app(self) -> web.Application:
        return _make_app(self._state)


async def _serve(args: argparse.Namespace) -> None:
    server = FakeOpenAI(
        chunk_delay=args.chunk_delay, answer_delay=args.answer_delay, port=args.port, record=args.record
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {server.base_url}", flush=True)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.openai_upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--answer-delay", type=float, default=0.0, help="seconds before any answer")
    parser.add_argument("--record", action="store_true", help="keep every request in memory")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
