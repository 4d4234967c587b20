"""Stream reassembly for the OpenAI Responses API: its typed events back into the `response` object.

A Responses stream ends with `response.completed` (or `response.incomplete` / `response.failed`), whose
`response` is the whole final object: when it arrives it is the result. Until then, or when a stream is
cut before it, the object is rebuilt from the snapshot of `response.created` and the output items the
events describe (`response.output_item.added`, the text, refusal, function-argument and reasoning deltas,
`response.output_item.done`). Like every assembler it only records: an event it cannot use is skipped.
"""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = ["ResponsesStreamAssembler"]

_SNAPSHOTS = frozenset({"response.created", "response.in_progress", "response.queued"})
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _Parts:
    """The parts of one list of an item (message content, reasoning summary, reasoning text) by index.

    Text arrives in pieces and is joined only when the result is asked for, so a long answer costs
    linear time. A `.done` event carries the whole text and replaces the pieces.
    """

    __slots__ = ("parts", "pieces")

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, Any]] = {}
        self.pieces: dict[int, tuple[str, list[str]]] = {}  # index -> (the part's text key, pieces)

    def set(self, index: int, part: dict[str, Any]) -> None:
        self.parts[index] = dict(part)
        self.pieces.pop(index, None)

    def text(self, index: int, kind: str, key: str, event: dict[str, Any], whole_key: str) -> None:
        if index not in self.parts:
            self.parts[index] = {"type": kind, key: ""}
        _, pieces = self.pieces.setdefault(index, (key, []))
        if str(event.get("type", "")).endswith(".done"):
            if isinstance(whole := event.get(whole_key), str):
                pieces[:] = [whole]
        elif isinstance(delta := event.get("delta"), str):
            pieces.append(delta)

    def result(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.parts):
            part = dict(self.parts[index])
            if index in self.pieces:
                key, pieces = self.pieces[index]
                part[key] = "".join(pieces)
            out.append(part)
        return out

    def __bool__(self) -> bool:
        return bool(self.parts)


class _Item:
    """One output item being streamed: the item as added, and what its deltas carry."""

    __slots__ = ("arguments", "content", "done", "input", "item", "reasoning", "summary")

    def __init__(self, item: dict[str, Any], *, done: bool) -> None:
        self.item = item
        self.done = done  # `response.output_item.done` gave the finished item: deltas no longer apply
        self.content = _Parts()  # message parts by content_index
        self.summary = _Parts()  # reasoning summary parts by summary_index
        self.reasoning = _Parts()  # reasoning_text parts by content_index
        self.arguments: list[str] = []  # function_call arguments
        self.input: list[str] = []  # custom_tool_call input

    def add(self, kind: str, event: dict[str, Any]) -> None:
        content_index = event.get("content_index", 0)
        summary_index = event.get("summary_index", 0)
        delta = event.get("delta")
        if kind == "response.content_part.added" and _is_int(content_index):
            part = event.get("part")
            if isinstance(part, dict):
                store = self.reasoning if part.get("type") == "reasoning_text" else self.content
                store.set(content_index, part)
        elif kind.startswith("response.output_text.") and _is_int(content_index):
            if kind in ("response.output_text.delta", "response.output_text.done"):
                self.content.text(content_index, "output_text", "text", event, "text")
        elif kind in ("response.refusal.delta", "response.refusal.done") and _is_int(content_index):
            self.content.text(content_index, "refusal", "refusal", event, "refusal")
        elif kind == "response.function_call_arguments.delta" and isinstance(delta, str):
            self.arguments.append(delta)
        elif kind == "response.function_call_arguments.done":
            if isinstance(whole := event.get("arguments"), str):
                self.arguments = [whole]
        elif kind == "response.custom_tool_call_input.delta" and isinstance(delta, str):
            self.input.append(delta)
        elif kind == "response.custom_tool_call_input.done":
            if isinstance(whole := event.get("input"), str):
                self.input = [whole]
        elif kind == "response.reasoning_summary_part.added" and _is_int(summary_index):
            part = event.get("part")
            self.summary.set(summary_index, part if isinstance(part, dict) else {"type": "summary_text",
                                                                                "text": ""})
        elif kind.startswith("response.reasoning_summary_text.") and _is_int(summary_index):
            self.summary.text(summary_index, "summary_text", "text", event, "text")
        elif kind.startswith("response.reasoning_text.") and _is_int(content_index):
            self.reasoning.text(content_index, "reasoning_text", "text", event, "text")

    def result(self) -> dict[str, Any]:
        item = dict(self.item)
        if self.done:
            return item
        kind = item.get("type")
        if kind == "message" and self.content:
            item["content"] = self.content.result()
        elif kind == "function_call" and self.arguments:
            item["arguments"] = "".join(self.arguments)
        elif kind == "custom_tool_call" and self.input:
            item["input"] = "".join(self.input)
        elif kind == "reasoning":
            if self.summary:
                item["summary"] = self.summary.result()
            if self.reasoning:
                item["content"] = self.reasoning.result()
        return item


class ResponsesStreamAssembler:
    """Reassembles a Responses API event stream into a `response` object."""

    __slots__ = ("_by_id", "_error", "_final", "_items", "_snapshot")

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] = {}
        self._final: dict[str, Any] | None = None
        self._items: dict[int, _Item] = {}
        self._by_id: dict[str, int] = {}
        self._error: str | None = None

    @property
    def finished(self) -> bool:
        """True once a terminal event (`response.completed`, `.incomplete` or `.failed`) arrived."""
        return self._final is not None

    @property
    def error(self) -> str | None:
        """The upstream's own error, from an `error` event or `response.failed`; None when there was none."""
        return self._error

    def add(self, chunk: object) -> None:
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if not isinstance(kind, str):
            return
        if kind in _SNAPSHOTS or kind in _TERMINAL:
            response = chunk.get("response")
            if isinstance(response, dict):
                if kind in _TERMINAL:
                    self._final = response
                    if kind == "response.failed":
                        self._error = _error_message(response.get("error")) or "the response failed"
                else:
                    self._snapshot = response
        elif kind == "error":
            self._error = _error_message(chunk) or _error_message(chunk.get("error")) or "error event"
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self._add_item(chunk, done=kind == "response.output_item.done")
        elif (item := self._item_of(chunk)) is not None and not item.done:
            item.add(kind, chunk)

    def _add_item(self, chunk: dict[str, Any], *, done: bool) -> None:
        index, item = chunk.get("output_index"), chunk.get("item")
        if not _is_int(index) or not isinstance(item, dict):
            return
        if not done and index in self._items:
            return  # a repeated `added`: keep what has streamed in so far
        self._items[index] = _Item(item, done=done)
        if isinstance(item_id := item.get("id"), str):
            self._by_id[item_id] = index

    def _item_of(self, chunk: dict[str, Any]) -> _Item | None:
        index = chunk.get("output_index")
        if not _is_int(index):
            item_id = chunk.get("item_id")
            index = self._by_id.get(item_id) if isinstance(item_id, str) else None
        return self._items.get(index) if index is not None else None

    def result(self) -> dict[str, Any]:
        items = [self._items[i].result() for i in sorted(self._items)]
        if self._final is not None:
            final = dict(self._final)
            if items and not final.get("output"):
                final["output"] = items  # a terminal event without its output: keep what streamed
            return final
        body = dict(self._snapshot)
        body["output"] = items
        return body


def _error_message(error: object) -> str | None:
    if isinstance(error, dict) and isinstance(message := error.get("message"), str):
        return message
    return None
