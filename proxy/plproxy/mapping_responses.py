"""The PromptLayer mapping of OpenAI Responses API calls: input and output items into chat blueprints.

`instructions` become a system message; `input` (a string or a list of items) becomes messages: message
items with `input_text` / `input_image` / `input_file` parts, `function_call` items as assistant tool
calls keyed by their `call_id`, `function_call_output` items as tool messages, reasoning items as
`thinking` blocks. The output items become one assistant message the same way. Function tools go to
the blueprint's `tools`; built-in tools (web search, file search, …) stay in `parameters`. Registered
in `plproxy.mapping.MAPPINGS` when that module is imported. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plproxy.mapping import MAPPINGS, ApiMapping, Blueprint, content_blocks, place_tools
from plproxy.mapping import _json_text as json_text
from plproxy.mapping import _scrub as scrub
from plproxy.mapping import _text as text_block
from plproxy.record import Api

__all__ = ["input_messages", "output_message", "responses_blueprints"]

_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})


def _part(part: object) -> dict[str, Any]:
    """One Responses content part as a PromptLayer block."""
    if not isinstance(part, dict):
        return content_blocks([part])[0]
    kind = part.get("type")
    if kind in ("input_text", "output_text", "summary_text", "reasoning_text") and isinstance(
        text := part.get("text"), str
    ):
        return text_block(text)
    if kind == "refusal" and isinstance(refusal := part.get("refusal"), str):
        return text_block(refusal)
    if kind == "input_image":
        url = part.get("image_url")
        if isinstance(url, str):
            image: dict[str, Any] = {"url": url}
            if isinstance(detail := part.get("detail"), str):
                image["detail"] = detail
            return {"type": "image_url", "image_url": image}
        file_id = part.get("file_id")
        return text_block(f"[image: {file_id}]" if isinstance(file_id, str) else "[image]")
    if kind == "input_file":
        file = {key: part[key] for key in ("file_data", "file_id", "filename")
                if isinstance(part.get(key), str)}
        if file:
            return content_blocks([{"type": "file", "file": file}])[0]
        url = part.get("file_url")
        return text_block(f"[file: {url}]" if isinstance(url, str) else "[file]")
    return content_blocks([part])[0]


def _blocks(content: object) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [text_block(content)]
    if isinstance(content, list):
        return [_part(part) for part in content]
    return [text_block(json_text(content))]


def _tool_call(item: Mapping[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else item.get("id")
    name = item.get("name")
    arguments = item.get(arguments_key, "")
    return {
        "id": call_id if isinstance(call_id, str) else "",
        "type": "function",
        "function": {
            "name": name if isinstance(name, str) else "",
            "arguments": arguments if isinstance(arguments, str) else json_text(arguments),
        },
    }


def _thinking_blocks(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A reasoning item's summary (or, when it has none, its reasoning text) as `thinking` blocks."""
    blocks = []
    for key in ("summary", "content"):
        parts = item.get(key)
        if isinstance(parts, list):
            for part in parts:
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    blocks.append({"type": "thinking", "thinking": text})
        if blocks:
            break
    if not blocks and isinstance(item.get("encrypted_content"), str):
        blocks.append({"type": "thinking", "thinking": "[encrypted reasoning]"})
    if blocks and isinstance(item_id := item.get("id"), str):
        for block in blocks:
            block["id"] = item_id
    return blocks


class _Messages:
    """Builds chat messages from items, keeping a model turn (reasoning, text, calls) in one message."""

    def __init__(self, *, model_side: bool = False) -> None:
        self.messages: list[dict[str, Any]] = []
        self.model_side = model_side  # every item is the model's (an output): unknown ones too

    def _assistant(self) -> dict[str, Any]:
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": []}
            self.messages.append(last)
        return last

    def add(self, item: object) -> None:
        if isinstance(item, str):
            self.messages.append({"role": "user", "content": [text_block(item)]})
            return
        if not isinstance(item, dict):
            return
        kind = item.get("type", "message")
        if kind == "message" or (kind is None and "role" in item):
            role = item.get("role")
            role = role if isinstance(role, str) and role in _MESSAGE_ROLES else "user"
            blocks = _blocks(item.get("content"))
            if role == "assistant":
                self._assistant()["content"].extend(blocks)
            else:
                self.messages.append({"role": role, "content": blocks})
        elif kind in ("function_call", "custom_tool_call"):
            call = _tool_call(item, "arguments" if kind == "function_call" else "input")
            self._assistant().setdefault("tool_calls", []).append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            call_id = item.get("call_id")
            self.messages.append({
                "role": "tool",
                "content": _blocks(output),
                "tool_call_id": call_id if isinstance(call_id, str) else "",
            })
        elif kind == "reasoning":
            self._assistant()["content"].extend(_thinking_blocks(item))
        elif kind == "item_reference":
            item_id = item.get("id")
            self.messages.append({"role": "user", "content": [text_block(f"[item_reference: {item_id}]")]})
        else:
            # built-in tool calls and their outputs (web_search_call, computer_call_output, …): as JSON
            role = "assistant" if self.model_side or str(kind).endswith("_call") else "user"
            block = text_block(json_text(scrub(item)))
            if role == "assistant":
                self._assistant()["content"].append(block)
            else:
                self.messages.append({"role": role, "content": [block]})


def input_messages(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's `instructions` and `input` as PromptLayer chat messages."""
    builder = _Messages()
    instructions = request.get("instructions")
    if isinstance(instructions, str):
        builder.messages.append({"role": "system", "content": [text_block(instructions)]})
    elif isinstance(instructions, list):
        for item in instructions:
            builder.add(item)
    items = request.get("input")
    if isinstance(items, str):
        builder.add(items)
    elif isinstance(items, list):
        for item in items:
            builder.add(item)
    return builder.messages


def output_message(response: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A response's output items as one assistant message (none when there is no output)."""
    output = response.get("output") if response is not None else None
    if not isinstance(output, list) or not output:
        return []
    builder = _Messages(model_side=True)
    for item in output:
        if isinstance(item, dict):
            builder.add({**item, "role": "assistant"} if item.get("type") == "message" else item)
    return builder.messages


def _function_tool(tool: Any) -> dict[str, Any] | None:
    """A Responses function tool (flat: name, parameters, … beside `type`); None for built-in tools."""
    if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("name"), str)):
        return None
    function: dict[str, Any] = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("parameters"), dict):
        function["parameters"] = scrub(tool["parameters"])
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return function


def _tools(request: Mapping[str, Any], blueprint: Blueprint, leftovers: dict[str, Any]) -> None:
    place_tools(request.get("tools"), _function_tool, blueprint, leftovers)
    tool_choice = request.get("tool_choice")
    if isinstance(tool_choice, str):
        blueprint["tool_choice"] = tool_choice
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("name"), str)):
        blueprint["tool_choice"] = {"type": "function", "function": {"name": tool_choice["name"]}}
    elif tool_choice is not None:
        leftovers["tool_choice"] = tool_choice


def responses_blueprints(request: Mapping[str, Any], response: Mapping[str, Any] | None,
                         leftovers: dict[str, Any]) -> tuple[Blueprint, Blueprint]:
    template: Blueprint = {"type": "chat", "messages": input_messages(request)}
    _tools(request, template, leftovers)
    if request.get("prompt") is not None:  # a stored prompt (`{"id": "pmpt_…", "variables": …}`), as sent
        leftovers["prompt"] = request["prompt"]
    return template, {"type": "chat", "messages": output_message(response)}


MAPPINGS[Api.RESPONSES] = ApiMapping(
    responses_blueprints, "openai.responses.create", "responses",
    frozenset({"tools", "tool_choice", "instructions"}),
)
