"""`POST /plproxy/records`: records made elsewhere (LangChain handlers in `PLPROXY_URL` mode) join this store.

The body is `{"log_request": {...}, "log_id"?: uuid, "followups"?: [{"kind", "body"}]}`: a `/log-request`
body as `plproxy.mapping` builds it, the id the sender gave the record (so it can ask
`GET /plproxy/logs/{log_id}` for the PromptLayer id, and send a record again without duplicating it), and
follow-ups validated like `POST /plproxy/logs/{log_id}/{kind}`. The record is stored with this sidecar's
key, like a proxied call, and exported by its exporter; the answer is 202 `{"log_id", "state"}` at once.

A sender never sends a key: a body with a credential-named field anywhere in `parameters` or `metadata`
(or a credential-shaped value there), or a top-level field `/log-request` does not have, is refused with
400, in the OpenAI error shape. A body over `PLPROXY_MAX_BODY_MB` gets 413 from the server.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

import orjson
from aiohttp import web

from plproxy.app_keys import STORE
from plproxy.control_api import VALIDATORS
from plproxy.errors import BadRequest
from plproxy.mapping import is_credential_key
from plproxy.record import new_log_id

# The fields of PromptLayer's LogRequest schema: nothing else is stored or forwarded.
LOG_REQUEST_FIELDS: Final = frozenset({
    "provider", "model", "input", "output", "request_start_time", "request_end_time", "parameters",
    "tags", "metadata", "prompt_name", "prompt_id", "prompt_version_number", "prompt_input_variables",
    "input_tokens", "output_tokens", "price", "function_name", "score", "api_type", "status",
    "error_type", "error_message",
})
REQUIRED: Final = ("provider", "model", "input", "output", "request_start_time", "request_end_time")
MAX_FOLLOWUPS: Final = 32
# The shapes `plproxy.mapping` scrubs: OpenAI, Anthropic and PromptLayer keys, bearer headers.
_CREDENTIAL_VALUE = re.compile(r"^\s*(?:[Bb]earer\s+\S|(?:sk|pl)[-_][A-Za-z0-9_-]{16,}\s*$)")
_MAX_DEPTH = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _credential_path(value: Any, path: str, depth: int = 0) -> str | None:
    """Where a credential-named key or a credential-shaped string hides in `value`, if anywhere."""
    if depth > _MAX_DEPTH:
        raise BadRequest(f"'{path}' is nested too deeply.")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            if is_credential_key(str(key)):
                return where
            found = _credential_path(item, where, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _credential_path(item, f"{path}[{index}]", depth + 1)
            if found is not None:
                return found
    elif isinstance(value, str) and _CREDENTIAL_VALUE.match(value):
        return path
    return None


def _blueprint(value: Any, name: str) -> None:
    if not isinstance(value, dict) or value.get("type") not in ("chat", "completion"):
        raise BadRequest(f"'log_request.{name}' must be a prompt blueprint: an object whose type is "
                         "\"chat\" or \"completion\".")
    items = value.get("messages") if value["type"] == "chat" else value.get("content")
    if not isinstance(items, list):
        field = "messages" if value["type"] == "chat" else "content"
        raise BadRequest(f"'log_request.{name}.{field}' must be a list.")


def validate_log_request(payload: Any) -> dict[str, Any]:
    """The `/log-request` body a sender built, checked for shape and for credentials."""
    if not isinstance(payload, dict):
        raise BadRequest("'log_request' must be a JSON object: the /log-request body of the record.")
    unknown = sorted(k for k in payload if k not in LOG_REQUEST_FIELDS)
    if unknown:
        if any(is_credential_key(k) for k in unknown):
            raise BadRequest("A record must not carry a key: this sidecar sends it with its own.")
        raise BadRequest(f"'log_request' has fields /log-request does not know: {', '.join(unknown)}.")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise BadRequest(f"'log_request' lacks {', '.join(missing)}.")
    for name in ("provider", "model"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise BadRequest(f"'log_request.{name}' must be a non-empty string.")
    _blueprint(payload["input"], "input")
    _blueprint(payload["output"], "output")
    for name in ("request_start_time", "request_end_time"):
        value = payload[name]
        if not (isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))):
            raise BadRequest(f"'log_request.{name}' must be an ISO 8601 time or epoch seconds.")
    tags = payload.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRequest("'log_request.tags' must be a list of strings.")
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadRequest("'log_request.metadata' must be an object of strings.")
    for name in ("parameters", "prompt_input_variables"):
        if name in payload and not isinstance(payload[name], dict):
            raise BadRequest(f"'log_request.{name}' must be an object.")
    for name in ("input_tokens", "output_tokens", "prompt_id", "prompt_version_number"):
        value = payload.get(name)
        if value is not None and (not _is_int(value) or value < 0):
            raise BadRequest(f"'log_request.{name}' must be a whole number from 0.")
    score = payload.get("score")
    if score is not None and (not _is_int(score) or not 0 <= score <= 100):
        raise BadRequest("'log_request.score' must be a whole number from 0 to 100.")
    if payload.get("status", "SUCCESS") not in ("SUCCESS", "WARNING", "ERROR"):
        raise BadRequest("'log_request.status' must be SUCCESS, WARNING or ERROR.")
    for name in ("parameters", "metadata", "prompt_input_variables"):
        where = _credential_path(payload.get(name), f"log_request.{name}")
        if where is not None:
            raise BadRequest(f"'{where}' looks like a credential; a record must never carry one.")
    return payload


def validate_followups(raw: Any) -> list[tuple[str, dict[str, Any]]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_FOLLOWUPS:
        raise BadRequest(f"'followups' must be a list of at most {MAX_FOLLOWUPS} objects.")
    followups = []
    for index, item in enumerate(raw):
        kind = item.get("kind") if isinstance(item, dict) else None
        body = item.get("body") if isinstance(item, dict) else None
        validator = VALIDATORS.get(kind) if isinstance(kind, str) else None
        if validator is None or not isinstance(body, dict):
            raise BadRequest(f"'followups[{index}]' must be {{\"kind\": one of {', '.join(VALIDATORS)}, "
                             "\"body\": {...}}.")
        followups.append((str(kind), validator(body)))
    return followups


def _parse_log_id(raw: Any) -> str:
    if raw is None:
        return new_log_id()
    try:
        return str(uuid.UUID(raw)) if isinstance(raw, str) else str(uuid.UUID(str(raw)))
    except ValueError:
        raise BadRequest("'log_id' must be a UUID.") from None


async def post_record(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    unknown = sorted(k for k in body if k not in ("log_request", "log_id", "followups"))
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(unknown)}; send log_request, log_id, followups.")
    log_id = _parse_log_id(body.get("log_id"))
    payload = validate_log_request(body.get("log_request"))
    followups = validate_followups(body.get("followups"))
    payload["metadata"] = {**payload.get("metadata", {}), "plproxy_log_id": log_id}
    # A sender that did not hear the answer sends the record again: the store keeps the first copy.
    request.app[STORE].submit(log_id, lambda: payload, followups=followups)
    return web.json_response({"log_id": log_id, "state": "accepted"}, status=202)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/plproxy/records", post_record)
