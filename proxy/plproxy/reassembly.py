"""Stream reassembly: parsed stream chunks back into the body a non-streamed call would have returned.

Each assembler follows the `StreamAssembler` protocol (`add`, `finished`, `result`), so assemblers for
other APIs (Responses, Anthropic Messages) can live in their own modules and be registered in
`ASSEMBLERS`. Assemblers only record: a chunk they cannot use (not a dict, a field of the wrong type) is
skipped, never raised on, because the stream it came from has already gone to the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeGuard

from plproxy.reassembly_anthropic import AnthropicStreamAssembler
from plproxy.reassembly_responses import ResponsesStreamAssembler
from plproxy.record import Api

__all__ = [
    "ASSEMBLERS",
    "ChatStreamAssembler",
    "CompletionStreamAssembler",
    "SnapshotAssembler",
    "StreamAssembler",
    "assembler_for",
]


class StreamAssembler(Protocol):
    """What the proxy needs from a reassembler, whatever the API."""

    def add(self, chunk: object) -> None:
        """Takes one JSON-decoded chunk of the stream; ignores what it cannot use."""

    @property
    def finished(self) -> bool:
        """True once the stream said it was complete (every choice has a finish reason, a terminal event)."""

    # An assembler may also have an `error` property: the upstream's own error reported inside a 200
    # stream (an Anthropic or Responses `error` event, `response.failed`), recorded as the call's error.

    def result(self) -> dict[str, Any]:
        """The response body reassembled so far; may be called more than once."""


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _Envelope:
    """The fields of a chunk that are the same in every chunk: id, model, created, fingerprint, usage."""

    __slots__ = ("created", "id", "model", "service_tier", "system_fingerprint", "usage")

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.service_tier: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        # First non-empty value wins: Azure opens with a filter-results chunk whose id and model are "".
        if not self.id and isinstance(value := chunk.get("id"), str):
            self.id = value
        if not self.model and isinstance(value := chunk.get("model"), str):
            self.model = value
        if self.created is None and _is_int(value := chunk.get("created")):
            self.created = value
        if not self.system_fingerprint and isinstance(value := chunk.get("system_fingerprint"), str):
            self.system_fingerprint = value
        if not self.service_tier and isinstance(value := chunk.get("service_tier"), str):
            self.service_tier = value
        if isinstance(value := chunk.get("usage"), dict):
            self.usage = value

    def body(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id or "",
            "object": obj,
            "created": self.created if self.created is not None else 0,
            "model": self.model or "",
            "choices": choices,
        }
        if self.system_fingerprint:
            body["system_fingerprint"] = self.system_fingerprint
        if self.service_tier:
            body["service_tier"] = self.service_tier
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def _choice_items(chunk: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    items = []
    for choice in choices:
        if isinstance(choice, dict):
            index = choice.get("index", 0)
            if _is_int(index):
                items.append((index, choice))
    return items


def _extend_logprobs(store: dict[str, list[Any]], logprobs: object) -> None:
    if isinstance(logprobs, dict):
        for key in ("content", "refusal"):
            if isinstance(part := logprobs.get(key), list):
                store.setdefault(key, []).extend(part)


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []

    def add(self, delta: dict[str, Any]) -> None:
        if not self.id and isinstance(value := delta.get("id"), str):
            self.id = value
        if not self.type and isinstance(value := delta.get("type"), str):
            self.type = value
        function = delta.get("function")
        if isinstance(function, dict):
            if not self.name and isinstance(value := function.get("name"), str):
                self.name = value
            if isinstance(value := function.get("arguments"), str):
                self.arguments.append(value)

    def result(self) -> dict[str, Any]:
        return {
            "id": self.id or "",
            "type": self.type or "function",
            "function": {"name": self.name or "", "arguments": "".join(self.arguments)},
        }


class _ChatChoice:
    __slots__ = ("content", "finish_reason", "function_call", "logprobs", "reasoning", "refusal", "role",
                 "tool_calls")

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call: _ToolCall | None = None
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] = {}

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        if isinstance(reason := choice.get("finish_reason"), str):
            self.finish_reason = reason
        _extend_logprobs(self.logprobs, choice.get("logprobs"))

    def _add_delta(self, delta: dict[str, Any]) -> None:
        if not self.role and isinstance(value := delta.get("role"), str):
            self.role = value
        if isinstance(value := delta.get("content"), str):
            self.content.append(value)
        if isinstance(value := delta.get("refusal"), str):
            self.refusal.append(value)
        # DeepSeek and vLLM say reasoning_content, OpenRouter says reasoning.
        for key in ("reasoning_content", "reasoning"):
            if isinstance(value := delta.get(key), str):
                self.reasoning.append(value)
        if isinstance(calls := delta.get("tool_calls"), list):
            for call in calls:
                if isinstance(call, dict):
                    self._add_tool_call(call)
        if isinstance(function_call := delta.get("function_call"), dict):
            if self.function_call is None:
                self.function_call = _ToolCall()
            self.function_call.add({"function": function_call})

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        given = call.get("index")
        if _is_int(given):
            index: int = given
        elif given is None:
            # Some OpenAI-compatible servers omit the index: a new id starts a new call.
            last = max(self.tool_calls, default=None)
            call_id = call.get("id")
            if last is None:
                index = 0
            elif call_id and self.tool_calls[last].id and call_id != self.tool_calls[last].id:
                index = last + 1
            else:
                index = last
        else:
            return
        tool_call = self.tool_calls.get(index)
        if tool_call is None:
            tool_call = _ToolCall()
            tool_call.add(call)
            if tool_call.id or tool_call.name or tool_call.arguments:  # else nothing usable: no call
                self.tool_calls[index] = tool_call
        else:
            tool_call.add(call)

    def result(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": "".join(self.content) if self.content else None,
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].result() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            call = self.function_call.result()["function"]
            message["function_call"] = call
        choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": self.finish_reason}
        if self.logprobs:
            choice["logprobs"] = self.logprobs
        return choice


class _ChoicesAssembler:
    """What chat and legacy completion streams share: an envelope, and choices keyed by index."""

    __slots__ = ("_choices", "_envelope")

    def __init__(self) -> None:
        self._envelope = _Envelope()
        self._choices: dict[int, Any] = {}

    def _new_choice(self) -> Any:
        raise NotImplementedError

    def add(self, chunk: object) -> None:
        if not isinstance(chunk, dict):
            return
        self._envelope.add(chunk)
        for index, choice in _choice_items(chunk):
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = self._new_choice()
            state.add(choice)

    @property
    def finished(self) -> bool:
        return bool(self._choices) and all(c.finish_reason is not None for c in self._choices.values())


class ChatStreamAssembler(_ChoicesAssembler):
    """Reassembles a `chat.completion.chunk` stream into a `chat.completion` body."""

    __slots__ = ()

    def _new_choice(self) -> _ChatChoice:
        return _ChatChoice()

    def result(self) -> dict[str, Any]:
        choices = [self._choices[i].result(i) for i in sorted(self._choices)]
        return self._envelope.body("chat.completion", choices)


class _TextChoice:
    __slots__ = ("finish_reason", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] = {}

    def add(self, choice: dict[str, Any]) -> None:
        if isinstance(value := choice.get("text"), str):
            self.text.append(value)
        if isinstance(reason := choice.get("finish_reason"), str):
            self.finish_reason = reason
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                if isinstance(part := logprobs.get(key), list):
                    self.logprobs.setdefault(key, []).extend(part)


class CompletionStreamAssembler(_ChoicesAssembler):
    """Reassembles a legacy `text_completion` stream into a `text_completion` body."""

    __slots__ = ()

    def _new_choice(self) -> _TextChoice:
        return _TextChoice()

    def result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            choices.append({
                "index": index,
                "text": "".join(state.text),
                "finish_reason": state.finish_reason,
                "logprobs": state.logprobs or None,
            })
        return self._envelope.body("text_completion", choices)


class SnapshotAssembler:
    """Stand-in for APIs that have no assembler of their own yet: keeps the latest whole-body snapshot.

    Responses API events carry the whole response (`response.completed` holds the final one); Anthropic's
    `message_start` carries the message without its content, updated here by `message_delta`. Dedicated
    assemblers, registered in `ASSEMBLERS`, replace this one.
    """

    __slots__ = ("_finished", "_snapshot")

    _TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "message_stop"})

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] = {}
        self._finished = False

    def add(self, chunk: object) -> None:
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if isinstance(body := chunk.get("response"), dict):
            self._snapshot = body
        elif isinstance(body := chunk.get("message"), dict):
            self._snapshot = dict(body)
        elif kind == "message_delta" and self._snapshot:
            if isinstance(delta := chunk.get("delta"), dict):
                self._snapshot.update(delta)
            if isinstance(usage := chunk.get("usage"), dict):
                before = self._snapshot.get("usage")
                self._snapshot["usage"] = {**(before if isinstance(before, dict) else {}), **usage}
        if kind in self._TERMINAL:
            self._finished = True

    @property
    def finished(self) -> bool:
        return self._finished

    def result(self) -> dict[str, Any]:
        return dict(self._snapshot)


# The assembler for each API's streams; an API missing here gets a SnapshotAssembler.
ASSEMBLERS: dict[Api, Callable[[], StreamAssembler]] = {
    Api.CHAT: ChatStreamAssembler,
    Api.COMPLETION: CompletionStreamAssembler,
    Api.RESPONSES: ResponsesStreamAssembler,
    Api.ANTHROPIC_MESSAGES: AnthropicStreamAssembler,
}


def assembler_for(api: Api) -> StreamAssembler:
    """A fresh assembler for one stream of `api`."""
    return ASSEMBLERS.get(api, SnapshotAssembler)()
