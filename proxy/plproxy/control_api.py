"""plproxy's own `/plproxy/…` endpoints: a record's state, and follow-ups sent once its PromptLayer id exists.

Follow-ups are validated here, stored beside their record, and answered at once with 202; the exporter
sends them to PromptLayer's `/rest/track-*` after the record itself has been accepted there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, TypeGuard

import orjson
from aiohttp import web

from plproxy.app_keys import EXPORTER, STORE
from plproxy.errors import BadRequest, NotFound
from plproxy.pl_headers import PLHeaders

FOLLOWUP_KINDS = ("score", "metadata", "prompt", "group")


def header_followups(pl: PLHeaders) -> list[tuple[str, dict[str, Any]]]:
    """Follow-ups that `X-PL-*` headers ask for and `/log-request` has no field for."""
    notes = pl.annotations
    followups: list[tuple[str, dict[str, Any]]] = []
    if notes.prompt_name and notes.prompt_label:
        body: dict[str, Any] = {"prompt_name": notes.prompt_name, "label": notes.prompt_label}
        if notes.prompt_input_variables:
            body["prompt_input_variables"] = notes.prompt_input_variables
        followups.append(("prompt", body))
    if notes.group_id is not None:
        followups.append(("group", {"group_id": notes.group_id}))
    return followups


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_score(body: dict[str, Any]) -> dict[str, Any]:
    score, name = body.get("score"), body.get("name")
    if not _is_int(score) or not 0 <= score <= 100:
        raise BadRequest("'score' must be a whole number from 0 to 100.")
    if name is not None and not isinstance(name, str):
        raise BadRequest("'name' must be a string.")
    return {"score": score, **({"name": name} if name is not None else {})}


def validate_metadata(body: dict[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not metadata:
        raise BadRequest("'metadata' must be a non-empty JSON object.")
    return {
        "metadata": {
            str(key): value if isinstance(value, str) else orjson.dumps(value).decode()
            for key, value in metadata.items()
        }
    }


def validate_prompt(body: dict[str, Any]) -> dict[str, Any]:
    name, variables = body.get("prompt_name"), body.get("prompt_input_variables")
    version, label = body.get("version"), body.get("label")
    if not isinstance(name, str) or not name:
        raise BadRequest("'prompt_name' must be a non-empty string.")
    if variables is not None and not isinstance(variables, dict):
        raise BadRequest("'prompt_input_variables' must be a JSON object.")
    if version is not None and label is not None:
        raise BadRequest("Give 'version' or 'label', not both.")
    if version is not None and (not _is_int(version) or version < 1):
        raise BadRequest("'version' must be a whole number from 1.")
    if label is not None and (not isinstance(label, str) or not label):
        raise BadRequest("'label' must be a non-empty string.")
    out: dict[str, Any] = {"prompt_name": name}
    if variables is not None:
        out["prompt_input_variables"] = variables
    if version is not None:
        out["version"] = version
    if label is not None:
        out["label"] = label
    return out


def validate_group(body: dict[str, Any]) -> dict[str, Any]:
    group_id = body.get("group_id")
    if not _is_int(group_id) or group_id < 1:
        raise BadRequest("'group_id' must be a whole number from 1.")
    return {"group_id": group_id}


VALIDATORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "score": validate_score,
    "metadata": validate_metadata,
    "prompt": validate_prompt,
    "group": validate_group,
}


def _log_id(request: web.Request) -> str:
    raw = request.match_info["log_id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise BadRequest("The log id must be a UUID, as X-PL-Log-Id gives it.") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


async def _find(request: web.Request, log_id: str) -> Any:
    """The record's status; a record still in the writer's queue is waited for (≤ ~100 ms)."""
    store = request.app[STORE]
    status = await asyncio.to_thread(store.get, log_id)
    if status is None:
        await asyncio.to_thread(store.sync, 1.0)
        status = await asyncio.to_thread(store.get, log_id)
    if status is None:
        raise NotFound(f"No record with log id {log_id}.")
    return status


async def get_log(request: web.Request) -> web.Response:
    status = await _find(request, _log_id(request))
    return web.json_response(
        {
            "log_id": status.log_id,
            "state": status.state,
            "promptlayer_request_id": status.promptlayer_request_id,
            "error": status.error,
        },
        dumps=lambda obj: orjson.dumps(obj).decode(),
    )


async def post_followup(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    validator = VALIDATORS.get(kind)
    if validator is None:
        raise NotFound(f"Unknown follow-up {kind!r}; use one of {', '.join(FOLLOWUP_KINDS)}.")
    log_id = _log_id(request)
    body = validator(await _json_body(request))
    await _find(request, log_id)
    request.app[STORE].add_followup(log_id, kind, body)
    request.app[EXPORTER].wake()
    return web.json_response({"log_id": log_id, "followup": kind, "state": "accepted"}, status=202)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/plproxy/logs/{log_id}", get_log)
    router.add_post("/plproxy/logs/{log_id}/{kind}", post_followup)
