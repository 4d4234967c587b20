"""Helpers for the end-to-end pipeline tests: find the record of a call at the stand-in, poll a state.

Everything here polls with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import openai
import orjson

from tests.fakes.promptlayer import PromptLayerStandIn

T = TypeVar("T")

PROVIDER_KEY = "sk-test-e2e-0001"


def client(base_url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=PROVIDER_KEY, max_retries=0, **kwargs)


async def eventually(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None], timeout: float = 15.0, what: str = ""
) -> T:
    """Polls `probe` (sync or async) until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result is not None and result is not False:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what or probe} (last: {last!r})")
        await asyncio.sleep(0.02)


def records_for(promptlayer: PromptLayerStandIn, log_id: str) -> list[dict[str, Any]]:
    return [body for body in promptlayer.log_requests if body["metadata"].get("plproxy_log_id") == log_id]


async def record_for(promptlayer: PromptLayerStandIn, log_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The /log-request body the stand-in accepted for `log_id` (waits for it)."""
    found = await eventually(lambda: records_for(promptlayer, log_id) or None, timeout, f"record {log_id}")
    return found[0]


def pl_id_of(promptlayer: PromptLayerStandIn, log_id: str) -> int:
    """The id the stand-in answered for `log_id`'s record (ids are handed out in acceptance order)."""
    for body, issued in zip(promptlayer.log_requests, promptlayer.accepted_ids, strict=True):
        if body["metadata"].get("plproxy_log_id") == log_id:
            return issued
    raise AssertionError(f"no record for {log_id}")


async def log_status(http: aiohttp.ClientSession, proxy_url: str, log_id: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{proxy_url}/plproxy/logs/{log_id}") as response:
        return response.status, orjson.loads(await response.read())


async def wait_state(
    http: aiohttp.ClientSession, proxy_url: str, log_id: str, state: str, timeout: float = 15.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status, body = await log_status(http, proxy_url, log_id)
        return body if status == 200 and body["state"] == state else None

    return await eventually(probe, timeout, f"{log_id} {state}")


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ([DONE] kept as the string)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if not data:
            continue
        payload = b"\n".join(data)
        events.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return events


def chat_text(body: dict[str, Any]) -> str:
    """The text of the first output message of a chat record."""
    message = body["output"]["messages"][0]
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")
