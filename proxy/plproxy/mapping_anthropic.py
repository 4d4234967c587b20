"""The PromptLayer mapping of Anthropic Messages calls: `system`, messages and content blocks into chat
blueprints.

`system` becomes a system message. Content blocks map to PromptLayer blocks (`text`, `image` as
`image_url` with a data URL, `document` as `media`, `thinking` with its signature, `server_tool_use`);
`tool_use` blocks become the assistant message's `tool_calls` with their `toolu_…` id and the input as a
JSON string; each `tool_result` block becomes a tool message with `tool_call_id`. Custom tools go to the
blueprint's `tools` (their `input_schema` as `parameters`); Anthropic's server tools stay in
`parameters`. Registered in `plproxy.mapping.MAPPINGS` when that module is imported. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plproxy.mapping import MAPPINGS, ApiMapping, Blueprint, place_tools
from plproxy.mapping import _json_text as json_text
from plproxy.mapping import _scrub as scrub
from plproxy.mapping import _text as text_block
from plproxy.record import Api

__all__ = ["anthropic_blueprints", "message_blocks"]

# Anthropic's tool_choice types, as the chat template's.
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}


def _source_url(source: Mapping[str, Any]) -> tuple[str | None, str]:
    """A media source as (url, format): a data URL for base64 data, the URL itself for a URL source."""
    media_type = source.get("media_type") if isinstance(source.get("media_type"), str) else None
    kind = source.get("type")
    if kind == "base64" and isinstance(data := source.get("data"), str):
        return f"data:{media_type or 'application/octet-stream'};base64,{data}", "base64"
    if kind == "url" and isinstance(url := source.get("url"), str):
        return url, "url"
    return None, "neither"


def _image(block: Mapping[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict):
        url, _ = _source_url(source)
        if url is not None:
            return {"type": "image_url", "image_url": {"url": url}}
        if isinstance(file_id := source.get("file_id"), str):
            return text_block(f"[image: {file_id}]")
    return text_block("[image]")


def _document(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    source = block.get("source")
    title = block.get("title") if isinstance(block.get("title"), str) else "document"
    if not isinstance(source, dict):
        return [text_block(f"[document: {title}]")]
    if source.get("type") == "text" and isinstance(data := source.get("data"), str):
        return [text_block(data)]
    if source.get("type") == "content":
        return _blocks(source.get("content"))
    url, fmt = _source_url(source)
    if url is not None:
        media_type = source.get("media_type")
        media_type = media_type if isinstance(media_type, str) else "application/pdf"
        return [{"type": "media", "media": {"title": title, "type": media_type, "url": url, "format": fmt}}]
    file_id = source.get("file_id")
    return [text_block(f"[document: {file_id if isinstance(file_id, str) else title}]")]


def _thinking(block: Mapping[str, Any]) -> dict[str, Any]:
    if block.get("type") == "redacted_thinking":
        out: dict[str, Any] = {"type": "thinking", "thinking": "[redacted thinking]"}
        if isinstance(data := block.get("data"), str):
            out["signature"] = data
        return out
    thinking = block.get("thinking")
    out = {"type": "thinking", "thinking": thinking if isinstance(thinking, str) else ""}
    if isinstance(signature := block.get("signature"), str) and signature:
        out["signature"] = signature
    return out


def _block(block: object) -> list[dict[str, Any]]:
    """One content block (not tool_use or tool_result) as PromptLayer blocks."""
    if isinstance(block, str):
        return [text_block(block)]
    if not isinstance(block, dict):
        return [text_block(json_text(block))]
    kind = block.get("type")
    if kind == "text" and isinstance(text := block.get("text"), str):
        return [text_block(text)]
    if kind == "image":
        return [_image(block)]
    if kind == "document":
        return _document(block)
    if kind in ("thinking", "redacted_thinking"):
        return [_thinking(block)]
    if kind == "server_tool_use" and isinstance(block.get("id"), str) and isinstance(block.get("name"), str):
        server_input = block.get("input")
        return [{"type": "server_tool_use", "id": block["id"], "name": block["name"],
                 "input": scrub(server_input) if isinstance(server_input, dict) else {}}]
    return [text_block(json_text(scrub(block)))]


def _blocks(content: object) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [text_block(content)]
    if isinstance(content, list):
        return [out for block in content for out in _block(block)]
    return [text_block(json_text(content))]


def _tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
    return {
        "id": call_id if isinstance(call_id, str) else "",
        "type": "function",
        "function": {
            "name": name if isinstance(name, str) else "",
            # a cut stream leaves the JSON text as far as it came: keep it as it is
            "arguments": tool_input if isinstance(tool_input, str) else json_text(tool_input),
        },
    }


def message_blocks(role: str, content: object) -> list[dict[str, Any]]:
    """One Anthropic message as PromptLayer messages: the message itself, and a tool message per
    `tool_result` block (in the order they came)."""
    if not isinstance(content, list):
        return [{"role": role, "content": _blocks(content)}]
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result" and isinstance(block, dict):
            tool_use_id = block.get("tool_use_id")
            blocks = _blocks(block.get("content"))
            if block.get("is_error") is True:
                blocks.insert(0, text_block("[tool error]"))
            out.append({"role": "tool", "content": blocks,
                        "tool_call_id": tool_use_id if isinstance(tool_use_id, str) else ""})
            current = None
            continue
        if current is None:
            current = {"role": role, "content": []}
            out.append(current)
        if kind == "tool_use" and isinstance(block, dict):
            current.setdefault("tool_calls", []).append(_tool_call(block))
        else:
            current["content"].extend(_block(block))
    return out or [{"role": role, "content": []}]


def _messages(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _blocks(system)})
    items = request.get("messages")
    if isinstance(items, list):
        for message in items:
            if isinstance(message, dict):
                role = "assistant" if message.get("role") == "assistant" else "user"
                messages.extend(message_blocks(role, message.get("content")))
    return messages


def _custom_tool(tool: Any) -> dict[str, Any] | None:
    """A custom tool has an input_schema (and no type, or "custom"); server tools a versioned type: None."""
    if not (isinstance(tool, dict) and isinstance(tool.get("name"), str)
            and isinstance(tool.get("input_schema"), dict) and tool.get("type", "custom") == "custom"):
        return None
    function: dict[str, Any] = {"name": tool["name"], "parameters": scrub(tool["input_schema"])}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return function


def _tools(request: Mapping[str, Any], blueprint: Blueprint, leftovers: dict[str, Any]) -> None:
    place_tools(request.get("tools"), _custom_tool, blueprint, leftovers)
    tool_choice = request.get("tool_choice")
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if isinstance(kind, str) and kind in _TOOL_CHOICE:
            blueprint["tool_choice"] = _TOOL_CHOICE[kind]
        elif kind == "tool" and isinstance(tool_choice.get("name"), str):
            blueprint["tool_choice"] = {"type": "function", "function": {"name": tool_choice["name"]}}
        if set(tool_choice) - {"type", "name"} or "tool_choice" not in blueprint:
            leftovers["tool_choice"] = tool_choice  # disable_parallel_tool_use and the like: kept as sent
    elif tool_choice is not None:
        leftovers["tool_choice"] = tool_choice


def anthropic_blueprints(request: Mapping[str, Any], response: Mapping[str, Any] | None,
                         leftovers: dict[str, Any]) -> tuple[Blueprint, Blueprint]:
    template: Blueprint = {"type": "chat", "messages": _messages(request)}
    _tools(request, template, leftovers)
    output: list[dict[str, Any]] = []
    content = response.get("content") if response is not None else None
    if isinstance(content, list):
        output = message_blocks("assistant", content)
    return template, {"type": "chat", "messages": output}


MAPPINGS[Api.ANTHROPIC_MESSAGES] = ApiMapping(
    anthropic_blueprints, "anthropic.messages.create", None, frozenset({"tools", "tool_choice", "system"}),
)
