"""Stream reassembly for Anthropic Messages: its events back into the `message` a non-streamed call returns.

`message_start` carries the message without content (and the input usage); each content block opens with
`content_block_start`, grows with `content_block_delta` (`text_delta`, `input_json_delta`,
`thinking_delta`, `signature_delta`, `citations_delta`) and closes with `content_block_stop`;
`message_delta` brings the stop reason and the cumulative usage; `message_stop` ends the stream. `ping`
is a keep-alive and an `error` event the upstream giving up mid-stream. The merge follows the official
SDK's: usage counts overwrite, never add. Like every assembler it only records: what it cannot use is
skipped.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

__all__ = ["AnthropicStreamAssembler"]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _Block:
    __slots__ = ("block", "citations", "json", "signature", "text", "thinking")

    def __init__(self, block: dict[str, Any]) -> None:
        self.block = block
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.json: list[str] = []  # a tool_use block's input, as JSON text in pieces
        self.signature: str | None = None
        self.citations: list[Any] = []

    def add(self, delta: dict[str, Any]) -> None:
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(value := delta.get("text"), str):
            self.text.append(value)
        elif kind == "input_json_delta" and isinstance(value := delta.get("partial_json"), str):
            self.json.append(value)
        elif kind == "thinking_delta" and isinstance(value := delta.get("thinking"), str):
            self.thinking.append(value)
        elif kind == "signature_delta" and isinstance(value := delta.get("signature"), str):
            self.signature = value
        elif kind == "citations_delta" and (citation := delta.get("citation")) is not None:
            self.citations.append(citation)

    def result(self) -> dict[str, Any]:
        block = dict(self.block)
        kind = block.get("type")
        if self.text and kind == "text":
            block["text"] = _joined(block.get("text"), self.text)
        if self.thinking and kind == "thinking":
            block["thinking"] = _joined(block.get("thinking"), self.thinking)
        if self.signature is not None and kind == "thinking":
            block["signature"] = self.signature
        if self.citations and kind == "text":
            before = block.get("citations")
            block["citations"] = [*(before if isinstance(before, list) else []), *self.citations]
        if self.json:
            text = "".join(self.json)
            try:
                block["input"] = orjson.loads(text)
            except orjson.JSONDecodeError:
                block["input"] = text  # cut mid-way: the JSON text as far as it came
        return block


def _joined(start: object, pieces: list[str]) -> str:
    return (start if isinstance(start, str) else "") + "".join(pieces)


class AnthropicStreamAssembler:
    """Reassembles an Anthropic Messages event stream into a `message` object."""

    __slots__ = ("_blocks", "_error", "_finished", "_message", "_usage")

    def __init__(self) -> None:
        self._message: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._blocks: dict[int, _Block] = {}
        self._finished = False
        self._error: str | None = None

    @property
    def finished(self) -> bool:
        """True once `message_stop` arrived."""
        return self._finished

    @property
    def error(self) -> str | None:
        """The message of an `error` event, the upstream giving up mid-stream; None when there was none."""
        return self._error

    def add(self, chunk: object) -> None:
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if kind == "message_start":
            if isinstance(message := chunk.get("message"), dict):
                self._message = dict(message)
                if isinstance(usage := message.get("usage"), dict):
                    self._usage = dict(usage)
        elif kind == "content_block_start":
            index, block = chunk.get("index"), chunk.get("content_block")
            if _is_int(index) and isinstance(block, dict):
                self._blocks[index] = _Block(block)
        elif kind == "content_block_delta":
            index, delta = chunk.get("index"), chunk.get("delta")
            state = self._blocks.get(index) if _is_int(index) else None
            if state is not None and isinstance(delta, dict):
                state.add(delta)
        elif kind == "message_delta":
            if isinstance(delta := chunk.get("delta"), dict):
                self._message.update(delta)
            if isinstance(usage := chunk.get("usage"), dict):
                # cumulative totals: a count overwrites, an omitted or null one keeps message_start's
                self._usage.update({key: value for key, value in usage.items() if value is not None})
        elif kind == "message_stop":
            self._finished = True
        elif kind == "error":
            error = chunk.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self._error = message if isinstance(message, str) else "error event"

    def result(self) -> dict[str, Any]:
        message = {"type": "message", "role": "assistant", **self._message}
        message["content"] = [self._blocks[i].result() for i in sorted(self._blocks)]
        if self._usage:
            message["usage"] = dict(self._usage)
        return message
