"""The PromptLayer mapping: a `LogRecord` into the body of `POST /log-request`.

The body is built from an explicit allow-list of fields; the request's own keys reach it only through
`parameters`, after a deny-list of credential-like names and values. Each API has its own way of
turning the request and response into prompt blueprints, registered in `MAPPINGS`; adding the
Responses API or Anthropic Messages means adding an entry, not touching the chat code.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from plproxy.record import Api, LogRecord, Outcome

__all__ = [
    "MAPPINGS",
    "ApiMapping",
    "chat_message",
    "content_blocks",
    "credential_values",
    "is_credential_key",
    "iso_time",
    "redact_secrets",
    "to_log_request",
]

Blueprint = dict[str, Any]

TAG_MAX = 512
METADATA_KEY_MAX = 1024
METADATA_VALUE_MAX = 4096  # PromptLayer documents no limit; keep one record's metadata readable
ERROR_MESSAGE_MAX = 1024

# Request keys that are never model parameters: the prompt itself, streaming plumbing, what an API's
# blueprint carries in its template.
_NOT_PARAMETERS = frozenset({"model", "messages", "prompt", "input", "stream", "stream_options"})

# Normalised (lower case, no "-", "_" or space) request or metadata keys that name a credential.
_CREDENTIAL_WORDS = ("apikey", "secret", "password", "passwd", "authorization", "credential",
                     "privatekey", "accesstoken", "refreshtoken", "sessiontoken", "idtoken",
                     "bearer", "cookie", "accesskey", "apitoken", "authtoken")
_CREDENTIAL_KEYS = frozenset({"key", "token", "auth"})
# Values that look like a key whatever the name they hide under: OpenAI, Anthropic, PromptLayer keys,
# bearer headers.
_CREDENTIAL_VALUE = re.compile(r"^\s*(?:[Bb]earer\s+\S|(?:sk|pl)[-_][A-Za-z0-9_-]{16,}\s*$)")
_KEY_NORMALISE = str.maketrans("", "", "-_ ")

_ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})
_STATUS = {
    Outcome.SUCCESS: "SUCCESS",
    Outcome.PARTIAL: "WARNING",
    Outcome.UPSTREAM_ERROR: "ERROR",
    Outcome.TIMEOUT: "ERROR",
    Outcome.UNREACHABLE: "ERROR",
}
_DEFAULT_ERROR_MESSAGE = {
    Outcome.PARTIAL: "the stream ended before the upstream finished it",
    Outcome.TIMEOUT: "the upstream did not answer within the read timeout",
    Outcome.UNREACHABLE: "the upstream could not be reached",
}


@functools.lru_cache(maxsize=4096)  # the same few names come back in every record
def is_credential_key(key: str) -> bool:
    """True when a key's name says it holds a credential (`api_key`, `X-Api-Key`, `client_secret`, …)."""
    norm = key.lower().translate(_KEY_NORMALISE)
    return norm in _CREDENTIAL_KEYS or any(word in norm for word in _CREDENTIAL_WORDS)


def _looks_like_credential(value: object) -> bool:
    return isinstance(value, str) and _CREDENTIAL_VALUE.match(value) is not None


REDACTED = "[REDACTED]"
# Shorter header values are placeholders ("EMPTY", "ollama"), not keys; replacing them everywhere would
# mangle ordinary text.
MIN_SECRET_CHARS = 12


def credential_values(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The secrets a request carries in its headers: the values of credential-named headers
    (`Authorization`, `api-key`, `x-api-key`, …), the token alone for `<scheme> <token>`."""
    found: list[str] = []
    for name, value in headers:
        if is_credential_key(name):
            value = value.strip()
            scheme, space, token = value.partition(" ")
            secret = token.strip() if space else scheme
            if len(secret) >= MIN_SECRET_CHARS:
                found.append(secret)
    return tuple(dict.fromkeys(found))


def redact_secrets(value: Any, secrets: Iterable[str]) -> Any:
    """A JSON value with every occurrence of each secret replaced, in strings and keys at any depth.

    The allow-list keeps credentials out of a record's fields, but not out of the text it carries: an
    upstream may quote the key it refused in its error message, or reflect request headers in its answer.
    """
    secrets = tuple(secrets)
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {redact_secrets(k, secrets): redact_secrets(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v, secrets) for v in value]
    return value


def _scrub(value: Any) -> Any:
    """A copy of a JSON value without credential-like keys or values, at any depth."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()
                if not (isinstance(k, str) and is_credential_key(k)) and not _looks_like_credential(v)}
    if isinstance(value, list):
        return [_scrub(v) for v in value if not _looks_like_credential(v)]
    return _json_safe(value)


def _json_safe(value: Any) -> Any:
    """`value`, with integers beyond 64 bits as strings (orjson, which ships the body, refuses them)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def iso_time(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC with microseconds, the `date-time` the schema asks for."""
    # datetime.fromtimestamp's own rounding (half to even, to the microsecond); the date and time of
    # day are formatted once per second: every record has two of these
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    second = int(whole)
    cached = _last_second[0]  # one tuple, replaced whole: safe to read from any thread
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:-6])
        _last_second[0] = cached
    return f"{cached[1]}.{micros:06d}Z"


_last_second: list[tuple[int | None, str]] = [(None, "")]


def _json_text(value: object) -> str:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # integers beyond 64 bits, from a Python caller rather than a JSON body
        return json.dumps(value, default=str, ensure_ascii=False)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# --- content blocks ------------------------------------------------------------------------------

def _data_url_mime(url: str, fallback: str) -> str:
    if url.startswith("data:"):
        mime = url[5:].split(";", 1)[0].split(",", 1)[0]
        if mime:
            return mime
    return fallback


def _content_part(part: object) -> dict[str, Any]:
    if isinstance(part, str):
        return _text(part)
    if not isinstance(part, dict):
        return _text(_json_text(part))
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return _text(part["text"])
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return _text(part["refusal"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str):
            image_url: dict[str, Any] = {"url": url}
            if isinstance(image, dict) and isinstance(image.get("detail"), str):
                image_url["detail"] = image["detail"]
            return {"type": "image_url", "image_url": image_url}
    if kind == "input_audio" and isinstance(audio := part.get("input_audio"), dict):
        fmt = audio.get("format") if isinstance(audio.get("format"), str) else "wav"
        if isinstance(data := audio.get("data"), str):
            return {"type": "media", "media": {"title": "input_audio", "type": f"audio/{fmt}",
                                               "url": f"data:audio/{fmt};base64,{data}", "format": "base64"}}
        return _text(f"[input_audio: {fmt}]")
    if kind == "file" and isinstance(file := part.get("file"), dict):
        name = file.get("filename") if isinstance(file.get("filename"), str) else None
        if isinstance(data := file.get("file_data"), str):
            return {"type": "media", "media": {
                "title": name or "file", "type": _data_url_mime(data, "application/octet-stream"),
                "url": data, "format": "base64"}}
        file_id = file.get("file_id") if isinstance(file.get("file_id"), str) else None
        return _text("[file: " + " ".join(x for x in (name, file_id and f"({file_id})") if x) + "]")
    if isinstance(part.get("text"), str):
        return _text(part["text"])
    return _text(_json_text(part))


def content_blocks(content: object) -> list[dict[str, Any]]:
    """OpenAI message content (a string, a list of parts, or null) as PromptLayer content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text(content)]
    if isinstance(content, list):
        return [_content_part(part) for part in content]
    return [_text(_json_text(content))]


# --- chat ----------------------------------------------------------------------------------------

def _function_call(call: object) -> dict[str, str] | None:
    if not isinstance(call, dict):
        return None
    name = call.get("name")
    arguments = call.get("arguments", "")
    return {
        "name": name if isinstance(name, str) else "",
        "arguments": arguments if isinstance(arguments, str) else _json_text(arguments),
    }


def _tool_call(call: object) -> dict[str, Any] | None:
    if not isinstance(call, dict):
        return None
    call_id = call.get("id")
    function = _function_call(call.get("function"))
    if function is None and isinstance(custom := call.get("custom"), dict):  # custom tools: free text input
        function = _function_call({"name": custom.get("name"), "arguments": custom.get("input", "")})
    if function is None:
        return None
    return {"id": call_id if isinstance(call_id, str) else "", "type": "function", "function": function}


def chat_message(message: object) -> dict[str, Any] | None:
    """One OpenAI chat message as a PromptLayer chat message, or None when it is not a message."""
    if not isinstance(message, dict):
        return None
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:  # a list or dict role is not hashable
        role = "user"
    blocks = content_blocks(message.get("content"))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        blocks.insert(0, {"type": "thinking", "thinking": reasoning})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append(_text(refusal))
    audio = message.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
        blocks.append(_text(audio["transcript"]))
    out: dict[str, Any] = {"role": role, "content": blocks}
    name = message.get("name")
    if isinstance(name, str):
        out["name"] = name
    elif role == "function":
        out["name"] = ""  # required by the schema
    if role == "tool":
        tool_call_id = message.get("tool_call_id")
        out["tool_call_id"] = tool_call_id if isinstance(tool_call_id, str) else ""
    elif role == "assistant":
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            tool_calls = [c for c in map(_tool_call, calls) if c is not None]
            if tool_calls:
                out["tool_calls"] = tool_calls
        function_call = _function_call(message.get("function_call"))
        if function_call is not None:
            out["function_call"] = function_call
    return out


def _function(function: object) -> dict[str, Any] | None:
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    out: dict[str, Any] = {"name": function["name"]}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    if isinstance(function.get("parameters"), dict):
        out["parameters"] = _json_safe(function["parameters"])
    if isinstance(function.get("strict"), bool):
        out["strict"] = function["strict"]
    return out


def place_tools(
    tools: object,
    to_function: Callable[[Any], dict[str, Any] | None],
    blueprint: Blueprint,
    leftovers: dict[str, Any],
) -> None:
    """Tools the chat template can hold go to it as function tools (`to_function` says how, per API);
    the others (built-in, custom, server tools) go to `leftovers`, the parameters, as sent."""
    if not isinstance(tools, list):
        return
    kept, other = [], []
    for tool in tools:
        function = to_function(tool)
        if function is None:
            other.append(tool)
        else:
            kept.append({"type": "function", "function": function})
    if kept:
        blueprint["tools"] = kept
    if other:
        leftovers["tools"] = other


def _openai_function_tool(tool: Any) -> dict[str, Any] | None:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        return None
    return _function(tool.get("function"))


def _chat_template(request: Mapping[str, Any], leftovers: dict[str, Any]) -> Blueprint:
    """The chat input blueprint; what the template cannot represent goes to `leftovers` (parameters)."""
    messages = request.get("messages")
    blueprint: Blueprint = {
        "type": "chat",
        "messages": [m for m in map(chat_message, messages) if m is not None]
        if isinstance(messages, list) else [],
    }
    place_tools(request.get("tools"), _openai_function_tool, blueprint, leftovers)
    tool_choice = request.get("tool_choice")
    if isinstance(tool_choice, str):
        blueprint["tool_choice"] = tool_choice
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)
          and isinstance(tool_choice["function"].get("name"), str)):
        blueprint["tool_choice"] = {"type": "function", "function": {"name": tool_choice["function"]["name"]}}
    elif tool_choice is not None:
        leftovers["tool_choice"] = tool_choice
    functions = request.get("functions")
    if isinstance(functions, list):
        kept_functions = [f for f in map(_function, functions) if f is not None]
        if kept_functions:
            blueprint["functions"] = kept_functions
    function_call = request.get("function_call")
    if isinstance(function_call, str):
        blueprint["function_call"] = function_call
    elif isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
        blueprint["function_call"] = {"name": function_call["name"]}
    elif function_call is not None:
        leftovers["function_call"] = function_call
    return blueprint


def _choices(response: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if response is None or not isinstance(choices := response.get("choices"), list):
        return []
    valid = [c for c in choices if isinstance(c, dict)]
    return sorted(valid, key=lambda c: c["index"] if isinstance(c.get("index"), int) else 0)


def _chat_blueprints(request: Mapping[str, Any], response: Mapping[str, Any] | None,
                     leftovers: dict[str, Any]) -> tuple[Blueprint, Blueprint]:
    messages = []
    for choice in _choices(response):
        message = choice.get("message")
        if isinstance(message, dict):
            mapped = chat_message({**message, "role": "assistant"})
            if mapped is not None:
                messages.append(mapped)
    return _chat_template(request, leftovers), {"type": "chat", "messages": messages}


# --- completion and embedding --------------------------------------------------------------------

def _prompt_blocks(prompt: object) -> list[dict[str, Any]]:
    """A completion prompt or embedding input: a string, strings, or token ids (shown as JSON)."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [_text(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [_text(p) for p in prompt]
    return [_text(_json_text(prompt))]


def _completion_blueprints(request: Mapping[str, Any], response: Mapping[str, Any] | None,
                           leftovers: dict[str, Any]) -> tuple[Blueprint, Blueprint]:
    texts = [_text(c["text"]) for c in _choices(response) if isinstance(c.get("text"), str)]
    return ({"type": "completion", "content": _prompt_blocks(request.get("prompt"))},
            {"type": "completion", "content": texts})


def _embedding_summary(response: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    data = response.get("data") if response is not None else None
    if not isinstance(data, list):
        return []
    first = data[0].get("embedding") if data and isinstance(data[0], dict) else None
    count = f"{len(data)} vector{'' if len(data) == 1 else 's'}"
    if isinstance(first, list):
        return [_text(f"[embedding: {count} \u00d7 {len(first)} dims]")]
    if isinstance(first, str):
        return [_text(f"[embedding: {count}, base64]")]
    return [_text(f"[embedding: {count}]")]


def _embedding_blueprints(request: Mapping[str, Any], response: Mapping[str, Any] | None,
                          leftovers: dict[str, Any]) -> tuple[Blueprint, Blueprint]:
    return ({"type": "completion", "content": _prompt_blocks(request.get("input"))},
            {"type": "completion", "content": _embedding_summary(response)})


# --- the dispatch table --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ApiMapping:
    """How one API's calls become a record: its blueprints, its SDK function name, its api_type."""

    blueprints: Callable[[Mapping[str, Any], Mapping[str, Any] | None, dict[str, Any]],
                         tuple[Blueprint, Blueprint]]
    function_name: str
    api_type: str | None
    template_keys: frozenset[str] = frozenset()  # request keys the blueprint carries, not parameters


_CHAT_TEMPLATE_KEYS = frozenset({"tools", "tool_choice", "functions", "function_call"})

MAPPINGS: dict[Api, ApiMapping] = {
    Api.CHAT: ApiMapping(_chat_blueprints, "openai.chat.completions.create", "chat-completions",
                         _CHAT_TEMPLATE_KEYS),
    Api.COMPLETION: ApiMapping(_completion_blueprints, "openai.completions.create", "chat-completions"),
    Api.EMBEDDING: ApiMapping(_embedding_blueprints, "openai.embeddings.create", "chat-completions"),
    # Api.RESPONSES and Api.ANTHROPIC_MESSAGES: registered by their own modules, imported at the end
}


# --- the body ------------------------------------------------------------------------------------

def _model(record: LogRecord) -> str:
    for candidate in ((record.response or {}).get("model"), record.request.get("model"), record.model_hint):
        if isinstance(candidate, str) and candidate:
            return candidate
    return "unknown"


def _parameters(request: Mapping[str, Any], mapping: ApiMapping, leftovers: dict[str, Any]) -> dict[str, Any]:
    parameters = {}
    for key, value in request.items():
        if key in _NOT_PARAMETERS or key in mapping.template_keys:
            continue
        if is_credential_key(key) or _looks_like_credential(value):
            continue
        parameters[key] = _scrub(value)
    for key, value in leftovers.items():
        parameters[key] = _scrub(value)
    return parameters


def _metadata_value(value: object) -> str:
    text = value if isinstance(value, str) else _json_text(value)
    return text if len(text) <= METADATA_VALUE_MAX else text[: METADATA_VALUE_MAX - 1] + "…"


def _metadata(record: LogRecord) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for source in (record.annotations.metadata, record.extra_metadata):
        for key, value in source.items():
            key = str(key)[:METADATA_KEY_MAX]
            if not is_credential_key(key) and not _looks_like_credential(value):
                metadata[key] = _metadata_value(value)
    metadata["plproxy_log_id"] = record.log_id
    return metadata


def _tokens(response: Mapping[str, Any] | None) -> dict[str, int]:
    usage = response.get("usage") if response is not None else None
    if not isinstance(usage, dict):
        return {}
    tokens = {}
    for field, keys in (("input_tokens", ("prompt_tokens", "input_tokens")),
                        ("output_tokens", ("completion_tokens", "output_tokens"))):
        for key in keys:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                tokens[field] = value
                break
    return tokens


def _upstream_error(response: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """The upstream error body's (message, code), for OpenAI's and Anthropic's shapes and plainer ones."""
    if response is None:
        return None, None
    error = response.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code") or error.get("type")
        return (message if isinstance(message, str) else None), (code if isinstance(code, str) else None)
    if isinstance(error, str):
        return error, None
    message = response.get("message")
    return (message if isinstance(message, str) else None), None


def _error_type(record: LogRecord, code: str | None) -> str | None:
    outcome = record.outcome
    if outcome is Outcome.SUCCESS:
        return None
    if outcome is Outcome.PARTIAL:
        return "PROVIDER_PARTIAL_RESPONSE"
    if outcome is Outcome.TIMEOUT:
        return "PROVIDER_TIMEOUT"
    if outcome is Outcome.UPSTREAM_ERROR:
        if record.status_code == 429:
            return "PROVIDER_QUOTA_LIMIT" if code == "insufficient_quota" else "PROVIDER_RATE_LIMIT"
        if record.status_code in (401, 403):
            return "PROVIDER_AUTH_ERROR"
    return "PROVIDER_ERROR"


def to_log_request(record: LogRecord) -> dict[str, Any]:
    """The `/log-request` body for `record`: only allow-listed fields, never a credential."""
    mapping = MAPPINGS[record.api]
    request = record.request if isinstance(record.request, dict) else {}
    response = record.response if isinstance(record.response, dict) else None
    leftovers: dict[str, Any] = {}
    input_blueprint, output_blueprint = mapping.blueprints(request, response, leftovers)
    annotations = record.annotations

    body: dict[str, Any] = {
        "provider": record.provider,
        "model": _model(record),
        "input": input_blueprint,
        "output": output_blueprint,
        "request_start_time": iso_time(record.start_time),
        "request_end_time": iso_time(record.end_time),
        "parameters": _parameters(request, mapping, leftovers),
        "tags": [tag[:TAG_MAX] for tag in annotations.tags if isinstance(tag, str)],
        "metadata": _metadata(record),
        "function_name": record.function_name or mapping.function_name,
        "status": _STATUS[record.outcome],
    }
    if mapping.api_type is not None:
        body["api_type"] = mapping.api_type
    body.update(_tokens(response))
    if annotations.prompt_name is not None:
        body["prompt_name"] = annotations.prompt_name
    version = annotations.prompt_version_number
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        body["prompt_version_number"] = version
    if annotations.prompt_input_variables:
        body["prompt_input_variables"] = _json_safe(dict(annotations.prompt_input_variables))
    score = annotations.score
    if isinstance(score, int) and not isinstance(score, bool) and 0 <= score <= 100:
        body["score"] = score

    if record.outcome is not Outcome.SUCCESS:
        upstream_message, code = _upstream_error(response)
        body["error_type"] = _error_type(record, code)
        message = record.error_message or upstream_message or _DEFAULT_ERROR_MESSAGE.get(record.outcome)
        if message:
            body["error_message"] = message[:ERROR_MESSAGE_MAX]
    return body


# The provider mappings build on the helpers above and add themselves to MAPPINGS.
from plproxy import mapping_anthropic, mapping_responses  # noqa: E402, F401
