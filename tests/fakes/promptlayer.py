"""A PromptLayer stand-in on loopback that answers /log-request and /rest/track-* like the real service.

Bodies are validated against the copied public schema (tests/data/openapi-logging.json) with
`jsonschema`, Draft 2020-12 (the dialect of OpenAPI 3.1), format checking on. Two adjustments make the
schema say what the service really accepts, and both are widenings, never relaxations of content rules:

- `request_start_time` / `request_end_time` are `string` + `date-time` in the schema, but the official SDK
  sends epoch seconds as floats and the service (pydantic `datetime`) accepts them: numbers are allowed.
- `"nullable": true` is an OpenAPI 3.0 keyword left in this 3.1 document (`TrackPromptRequest.label`);
  JSON Schema ignores it, the service accepts null, and the SDK sends `"label": null`: null is allowed.

The schema's `discriminator` objects (ignored by JSON Schema itself) are applied the way the service's
pydantic models apply them: the tag (`role`, `type`) must be present and known, and it alone picks the
branch of the `oneOf`.

Plain-string message `content` needs no extra rule: every message schema types `content` as an array of
blocks (or, for assistant/function/placeholder messages, array or null), so the schema itself rejects
`"content": "hi"`, which is what makes the dashboard show "Malformed Request".

Standalone: `python -m tests.fakes.promptlayer --port N [--delay S] [--keep]` prints "listening on
http://127.0.0.1:N" and serves until SIGTERM; it validates every body but keeps only counts unless
`--keep`, and on SIGTERM prints one JSON summary line:
`{"received": {path: n}, "accepted": {path: n}, "invalid": n}`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
from aiohttp import web
from jsonschema.exceptions import ValidationError, best_match
from multidict import CIMultiDict
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.fakes.loopback import LoopbackServer

__all__ = [
    "FOLLOWUP_PATHS",
    "InvalidBody",
    "PromptLayerStandIn",
    "Received",
    "load_spec",
    "validate_followup",
    "validate_log_request",
]

SPEC_PATH = Path(__file__).resolve().parent.parent / "data" / "openapi-logging.json"
SPEC_URI = "urn:plproxy-tests:openapi-logging"
FOLLOWUP_PATHS = ("/rest/track-score", "/rest/track-metadata", "/rest/track-prompt", "/rest/track-group")
FIRST_ID = 1000
INVALID_KEYS = frozenset({"pl_invalid"})


# --- schema ---------------------------------------------------------------------------------------


def _widen_nullable(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for value in node.values():
            _widen_nullable(value)
    elif isinstance(node, list):
        for value in node:
            _widen_nullable(value)


@functools.cache
def _spec() -> dict[str, Any]:
    spec = json.loads(SPEC_PATH.read_text())
    _widen_nullable(spec)
    props = spec["components"]["schemas"]["LogRequest"]["properties"]
    for name in ("request_start_time", "request_end_time"):
        props[name] = {
            "anyOf": [props[name], {"type": "number", "minimum": 0}],
            "title": props[name]["title"],
        }
    return spec


def load_spec() -> dict[str, Any]:
    """A copy of the schema as the stand-in applies it (with the two widenings of the module docstring)."""
    return copy.deepcopy(_spec())


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _is_datetime(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    if not _RFC3339.fullmatch(instance):
        return False
    try:
        datetime.fromisoformat(instance.upper().replace(" ", "T"))
    except ValueError:
        return False
    return True


# jsonschema checks "date-time" only when the optional rfc3339-validator is installed; this check does
# not depend on that. RFC 3339 wants an offset, so a naive time is refused.
_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("date-time")(_is_datetime)


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


# The service parses these unions as pydantic discriminated unions: the tag must be present and known,
# and it alone picks the branch. Validating only that branch is faithful, names the real problem, and
# is several times faster than trying all twenty content-block schemas.
def _discriminator(validator: Any, disc: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object") or not isinstance(disc, dict):
        return
    name, mapping = disc["propertyName"], disc.get("mapping") or {}
    if name not in instance:
        yield ValidationError(f"{name!r} is required to tell which schema applies (one of {sorted(mapping)})")
    elif mapping and instance[name] not in mapping:
        yield ValidationError(f"{name} {instance[name]!r} is not one of {sorted(mapping)}")


_ONE_OF = jsonschema.Draft202012Validator.VALIDATORS["oneOf"]


def _one_of(validator: Any, one_of: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    disc = schema.get("discriminator")
    if isinstance(disc, dict) and validator.is_type(instance, "object"):
        target = (disc.get("mapping") or {}).get(instance.get(disc["propertyName"]))
        if target is None:
            return  # the discriminator keyword reports a missing or unknown tag
        for index, branch in enumerate(one_of):
            if branch.get("$ref") == target:
                yield from validator.descend(instance, branch, schema_path=index)
                return
    yield from _ONE_OF(validator, one_of, instance, schema)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"discriminator": _discriminator, "oneOf": _one_of}
)


@functools.cache
def _validator(path: str) -> Any:
    if path == "/log-request":
        pointer = "components/schemas/LogRequest"
    elif path in FOLLOWUP_PATHS:
        pointer = _pointer("paths", path, "post", "requestBody", "content", "application/json", "schema")
    else:
        raise ValueError(f"no request schema for {path!r}; known: /log-request, {', '.join(FOLLOWUP_PATHS)}")
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(_spec(), default_specification=DRAFT202012)
    )
    return _Validator({"$ref": f"{SPEC_URI}#/{pointer}"}, registry=registry, format_checker=_FORMATS)


def _leaves(error: ValidationError) -> Iterator[ValidationError]:
    """The error worth showing for a failed anyOf/oneOf: the branch whose type fits the instance."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        yield error
        return
    fitting = [e for e in error.context if e.validator != "type"]
    best = best_match(fitting or error.context)
    if best is not None:
        yield from _leaves(best)


def _problems(path: str, body: Any) -> list[ValidationError]:
    return [leaf for e in _validator(path).iter_errors(body) for leaf in _leaves(e)]


def _message(error: ValidationError, limit: int = 300) -> str:
    # jsonschema quotes the whole offending value; a 2000-character prompt would drown the point.
    return error.message if len(error.message) <= limit else error.message[: limit - 1] + "…"


def _describe(error: ValidationError) -> str:
    loc = ".".join(map(str, error.absolute_path)) or "<body>"
    return f"{loc}: {_message(error)}"


def validate_log_request(body: Any) -> list[str]:
    """Problems with a /log-request body as the stand-in sees them ("loc: message"); empty when valid."""
    return [_describe(e) for e in _problems("/log-request", body)]


def validate_followup(path: str, body: Any) -> list[str]:
    """Problems with a /rest/track-* body (path like "/rest/track-score"); empty when valid."""
    return [_describe(e) for e in _problems(path, body)]


def _detail(error: ValidationError) -> dict[str, Any]:
    kind = {"required": "missing", "type": "type_error", "enum": "enum", "const": "literal_error"}
    return {
        "loc": ["body", *error.absolute_path],
        "msg": _message(error),
        "type": kind.get(str(error.validator), f"value_error.{error.validator}"),
    }


# --- state ----------------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as it arrived (`json` is None when the body was not JSON) and what it got.

    `status` is None while the request is being answered and when its connection was reset (`reset`).
    """

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    at: float
    status: int | None = None
    reset: bool = False


@dataclass(frozen=True)
class InvalidBody:
    path: str
    body: Any
    errors: list[str]


@dataclass
class _Faults:
    delay: float = 0.0
    fail: list[tuple[int, str | None]] = field(default_factory=list)
    rate_limited: list[float] = field(default_factory=list)
    resets: list[bool] = field(default_factory=list)
    gate: asyncio.Event | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status, headers=headers)


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


class PromptLayerStandIn(LoopbackServer):
    """The stand-in served on 127.0.0.1; everything it saw survives `stop()`/`start()` on the same port.

    Fault knobs may be changed at any time: `delay`, `fail_next`, `rate_limit`, `reset_next`,
    `stall_until_released`/`release`; `stop()` makes it "down" (connection refused).
    """

    def __init__(self, *, port: int = 0, delay: float = 0.0, keep: bool = True) -> None:
        """`keep=False` (the standalone default) keeps only the counts, for long benchmark runs."""
        super().__init__(port=port)
        self.keep = keep
        self.received: list[Received] = []
        self.invalid_bodies: list[InvalidBody] = []
        self.expect_invalid = False
        self.unknown_prompts: set[str] = set()
        self.invalid_keys: set[str] = set(INVALID_KEYS)
        self.held = 0
        self._faults = _Faults(delay=delay)
        self._accepted: list[tuple[str, Any]] = []
        self._counts: dict[str, Counter[str]] = {"received": Counter(), "accepted": Counter()}
        self._issued: set[int] = set()
        self._next_id = FIRST_ID
        self._changed = asyncio.Condition()

    # -- addresses and lifecycle

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("PromptLayerStandIn has no port until start() has run")
        return f"http://127.0.0.1:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- what arrived

    @property
    def log_requests(self) -> list[Any]:
        """The accepted /log-request bodies, in order."""
        return [body for path, body in self._accepted if path == "/log-request"]

    def followups(self, path: str) -> list[Any]:
        """The accepted bodies for one follow-up path ("/rest/track-score" or just "track-score")."""
        if not path.startswith("/"):
            path = "/rest/" + path
        return [body for p, body in self._accepted if p == path]

    @property
    def accepted_ids(self) -> list[int]:
        """The ids handed out by /log-request, in order."""
        return sorted(self._issued)

    @property
    def api_keys_seen(self) -> set[str]:
        return {k for r in self.received if (k := r.headers.get("X-API-KEY")) is not None}

    async def wait_for_log_requests(self, n: int, timeout: float = 5.0) -> list[Any]:
        """Waits until at least n /log-request bodies were accepted; returns them all."""
        await self._wait(
            lambda: len(self.log_requests) >= n,
            timeout,
            lambda: (
                f"expected {n} accepted /log-request bodies within {timeout}s, "
                f"{len(self.log_requests)} arrived ({len(self.received)} requests in all)"
            ),
        )
        return self.log_requests

    async def wait_for_received(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Waits until at least n requests (accepted or not) arrived."""
        await self._wait(
            lambda: len(self.received) >= n,
            timeout,
            lambda: f"expected {n} requests within {timeout}s, {len(self.received)} arrived",
        )
        return self.received

    async def _wait(self, ready: Any, timeout: float, why: Any) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except TimeoutError:
                raise AssertionError(why()) from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- fault knobs

    @property
    def delay(self) -> float:
        """Seconds every request waits before it is answered."""
        return self._faults.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._faults.delay = seconds

    def fail_next(self, status: int, count: int = 1, body: str | None = None) -> None:
        """Answers the next `count` requests with `status` (and `body` verbatim if given: an HTML page...)."""
        self._faults.fail.extend([(status, body)] * count)

    def rate_limit(self, count: int = 1, retry_after: float = 1.0) -> None:
        """Answers the next `count` requests 429 with `Retry-After: retry_after`."""
        self._faults.rate_limited.extend([retry_after] * count)

    def reset_next(self, count: int = 1, *, after_accept: bool = False) -> None:
        """Aborts the next `count` connections mid-answer (after accepting the body if `after_accept`)."""
        self._faults.resets.extend([after_accept] * count)

    def stall_until_released(self) -> None:
        """Holds every request from now on (see `held`) until `release()`."""
        if self._faults.gate is None:
            self._faults.gate = asyncio.Event()

    def release(self) -> None:
        gate, self._faults.gate = self._faults.gate, None
        if gate is not None:
            gate.set()

    @property
    def stalled(self) -> bool:
        return self._faults.gate is not None

    # -- the service

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        record = Received(
            method=request.method,
            path=request.path,
            headers=CIMultiDict(request.headers),
            body=raw,
            json=parsed,
            at=time.time(),
        )
        self._counts["received"][record.path] += 1
        if self.keep:
            self.received.append(record)
        await self._notify()
        try:
            response = await self._answer(request, record)
            record.status = None if record.reset else response.status
            return response
        finally:
            await self._notify()

    async def _answer(self, request: web.Request, record: Received) -> web.StreamResponse:
        faults = self._faults
        while faults.gate is not None:
            self.held += 1
            try:
                await faults.gate.wait()
            finally:
                self.held -= 1
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.resets:
            after_accept = faults.resets.pop(0)
            if after_accept:
                await self._serve(request, record)
            record.reset = True
            return await self._reset(request)
        if faults.rate_limited:
            retry_after = faults.rate_limited.pop(0)
            value = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
            return _error(429, "Rate limit exceeded. Please retry later.", {"Retry-After": value})
        if faults.fail:
            status, body = faults.fail.pop(0)
            if body is None:
                return _error(status, f"Injected failure ({status}).")
            content_type = "text/html" if body.lstrip().startswith("<") else "text/plain"
            return web.Response(status=status, text=body, content_type=content_type)
        return await self._serve(request, record)

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=201, headers={"Content-Type": "application/json", "Content-Length": "64"}
        )
        await resp.prepare(request)
        await resp.write(b'{"id": ')
        request.protocol.force_close()
        if request.transport is not None:
            request.transport.abort()
        return resp

    async def _serve(self, request: web.Request, record: Received) -> web.Response:
        path = request.path
        if request.method != "POST" or (path != "/log-request" and path not in FOLLOWUP_PATHS):
            return _error(404, f"Not found: {request.method} {path}")
        key = request.headers.get("X-API-KEY")
        if not key:
            return _error(401, "Missing API key: send it in the X-API-KEY header.")
        if key in self.invalid_keys:
            return _error(401, "Invalid API key.")
        try:
            body = json.loads(record.body)
        except ValueError as e:
            self.invalid_bodies.append(
                InvalidBody(path, record.body.decode("utf-8", "replace"), [f"malformed JSON: {e}"])
            )
            return _error(400, f"Malformed JSON body: {e}")
        problems = _problems(path, body)
        if problems:
            self.invalid_bodies.append(InvalidBody(path, body, [_describe(e) for e in problems]))
            return web.json_response({"detail": [_detail(e) for e in problems]}, status=422)
        if path == "/log-request":
            return self._log_request(body)
        request_id = _as_id(body["request_id"])
        if request_id not in self._issued:
            return _error(400, f"Request {body['request_id']!r} not found.")
        self._accept(path, body)
        what = path.removeprefix("/rest/track-").capitalize()
        return web.json_response({"success": True, "message": f"{what} tracked successfully"})

    def _log_request(self, body: dict[str, Any]) -> web.Response:
        prompt_name = body.get("prompt_name")
        if prompt_name is not None and prompt_name in self.unknown_prompts:
            return _error(404, f"Prompt template {prompt_name!r} not found.")
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._issued.add(request_id)
        self._accept("/log-request", body)
        return web.json_response(
            {
                "id": request_id,
                "prompt_version": None,
                "status": body.get("status", "SUCCESS"),
                "error_type": body.get("error_type"),
                "error_message": body.get("error_message"),
            },
            status=201,
        )

    def _accept(self, path: str, body: Any) -> None:
        self._counts["accepted"][path] += 1
        if self.keep:
            self._accepted.append((path, body))

    def summary(self) -> dict[str, Any]:
        """Counts by path: what arrived, what was accepted, and how many bodies were invalid."""
        return {
            "received": dict(self._counts["received"]),
            "accepted": dict(self._counts["accepted"]),
            "invalid": len(self.invalid_bodies),
        }


async def _serve_forever(args: argparse.Namespace) -> None:
    standin = PromptLayerStandIn(port=args.port, delay=args.delay, keep=args.keep)
    await standin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {standin.base_url}", flush=True)
    await stop.wait()
    standin.release()
    await standin.stop()
    print(json.dumps(standin.summary(), sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.promptlayer", description="PromptLayer stand-in on 127.0.0.1"
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--keep", action="store_true", help="keep every request in memory, not just counts")
    asyncio.run(_serve_forever(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
