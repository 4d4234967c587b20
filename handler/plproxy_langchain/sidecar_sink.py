"""A running plproxy stores and exports for us: records go to its `POST /plproxy/records`.

Records and follow-ups are sent in order by one task. What the sidecar has not accepted yet waits in
memory (at most `MAX_OUTBOX` items) and is retried with backoff while the sidecar is unreachable; what it
refuses for good (400, 413) is dropped with one warning. The PromptLayer id is learnt by polling
`GET /plproxy/logs/{log_id}`, only for records whose handler has a `pl_id_callback`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from plproxy_langchain.runtime import Runtime, warn_once
from plproxy_langchain.sinks import Outgoing, SidecarSpec, SinkBase

MAX_OUTBOX: Final = 10_000  # records and follow-ups waiting to be accepted
_POLL_EVERY = 0.5  # seconds between polls of the records awaiting their id
_POLL_BATCH = 32
_POLL_GIVE_UP = 120  # polls of an id the sidecar does not know before giving up on it
_MAX_BACKOFF = 30.0


@dataclass(slots=True)
class _Send:
    log_id: str
    item: Outgoing | None = None  # a record
    payload: dict[str, Any] | None = None
    kind: str | None = None  # a follow-up
    body: dict[str, Any] | None = None
    attempts: int = 0


class SidecarSink(SinkBase):
    """A running plproxy that stores and exports for us."""

    def __init__(self, runtime: Runtime, spec: SidecarSpec) -> None:
        super().__init__(runtime)
        self.spec = spec
        self._outbox: collections.deque[_Send] = collections.deque()
        self._unsent: dict[str, _Send] = {}  # records in the outbox, by log id (to attach follow-ups)
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._busy = False
        self._flushing = 0
        self._down = False

    def _accept(self, item: Outgoing) -> None:
        send = _Send(item.log_id, item=item)
        self._enqueue(send)
        self._unsent[item.log_id] = send

    def _accept_followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None:
        unsent = self._unsent.get(log_id)
        if unsent is not None and unsent.item is not None:
            unsent.item.followups.append((kind, body))  # rides with its record
        else:
            self._enqueue(_Send(log_id, kind=kind, body=body))

    def _enqueue(self, send: _Send) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            dropped = self._outbox.popleft()
            self._unsent.pop(dropped.log_id, None)
            warn_once("outbox_full", "the sidecar has not accepted records for a while; the oldest waiting "
                      "ones are dropped", limit=MAX_OUTBOX)
        self._outbox.append(send)
        self._ensure_open()
        if self._wake is not None:
            self._wake.set()

    async def _open(self) -> None:
        assert self._opened is not None
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, connect=5),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # the sidecar is next to us: never through an HTTP proxy from the environment
        )
        self._spawn(self._send_loop())
        self._spawn(self._poll_loop())
        self._opened.set_result(True)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.spec.token:
            headers["X-PL-Proxy-Auth"] = self.spec.token
        return headers

    async def _send_loop(self) -> None:
        assert self._wake is not None
        backoff = 0.25
        while True:
            if not self._outbox:
                self._busy = False
                self._wake.clear()
                await self._wake.wait()
                continue
            self._busy = True
            send = self._outbox[0]
            verdict = await self._send(send)
            if verdict == "retry":
                send.attempts += 1
                self._wake.clear()
                with contextlib.suppress(TimeoutError):  # a flush cuts the wait short
                    async with asyncio.timeout(backoff if not self._flushing else 0.05):
                        await self._wake.wait()
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = 0.25
            if self._outbox and self._outbox[0] is send:
                self._outbox.popleft()
            if send.item is not None:
                self._unsent.pop(send.log_id, None)

    async def _send(self, send: _Send) -> str:
        """One POST: "ok", "retry" (sidecar unreachable or busy) or "drop" (it refused for good)."""
        assert self._session is not None
        if send.item is not None:
            if send.payload is None:
                try:
                    send.payload = send.item.build()
                except Exception as exc:
                    warn_once("build_failed", "a LangChain run could not be turned into a record; dropped",
                              error_type=type(exc).__name__)
                    return "drop"
            body: dict[str, Any] = {
                "log_id": send.log_id,
                "log_request": send.payload,
                "followups": [{"kind": k, "body": b} for k, b in send.item.followups],
            }
            url = f"{self.spec.url}/plproxy/records"
        else:
            body = send.body or {}
            url = f"{self.spec.url}/plproxy/logs/{send.log_id}/{send.kind}"
        try:
            # BytesIO: aiohttp writes a large bytes body in one go on the loop (image prompts), and says so
            data = io.BytesIO(orjson.dumps(body))
            async with self._session.post(url, data=data, headers=self._headers()) as resp:
                status = resp.status
                text = (await resp.read())[:300].decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if not self._down:
                self._down = True
                warn_once("sidecar_unreachable", "the plproxy sidecar cannot be reached; records wait in "
                          "memory and are retried", url=self.spec.url, error_type=type(exc).__name__)
            return "retry"
        self._down = False
        if 200 <= status < 300:
            if send.item is not None and send.item.callback is not None:
                self._wait_for_id(send.log_id, send.item.callback)
            return "ok"
        if status == 429 or status >= 500 or (status == 404 and send.item is None and send.attempts < 5):
            return "retry"  # a follow-up may arrive before its record is committed there
        warn_once(f"sidecar_refused_{status}", "the plproxy sidecar refused a record; it is dropped",
                  status=status, answer=text)
        return "drop"

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(_POLL_EVERY if not self._flushing else 0.05)
            if not self._waiting or self._session is None:
                continue
            batch = list(self._waiting.items())[:_POLL_BATCH]
            await asyncio.gather(*(self._poll(log_id, entry) for log_id, entry in batch))

    async def _poll(self, log_id: str, entry: list[Any]) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{self.spec.url}/plproxy/logs/{log_id}", headers=self._headers()
            ) as resp:
                status = resp.status
                data = await resp.json(loads=orjson.loads, content_type=None) if status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return
        if log_id not in self._waiting:
            return
        state = data.get("state") if isinstance(data, dict) else None
        pl_id = data.get("promptlayer_request_id") if isinstance(data, dict) else None
        if state == "exported" and isinstance(pl_id, int):
            self._deliver(log_id, pl_id)
        elif state == "kept":
            del self._waiting[log_id]
            warn_once("sidecar_keeps", "the plproxy sidecar has no PromptLayer key: it keeps records, and "
                      "pl_id_callback is not called")
        elif state == "failed":
            del self._waiting[log_id]
        else:
            entry[2] += 1
            if status == 404 and entry[2] > _POLL_GIVE_UP:
                del self._waiting[log_id]
            else:
                self._waiting.move_to_end(log_id)

    async def flush(self, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, seconds)
        if not await self._wait_opened(end):
            return False
        self._flushing += 1
        try:
            while loop.time() < end:
                if self._wake is not None and self._outbox:
                    self._wake.set()
                if not self._outbox and not self._busy and not self._waiting:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            self._flushing -= 1

    async def close(self, seconds: float) -> None:
        await self._cancel_tasks()
        if self._session is not None:
            await self._session.close()
        if self._outbox:
            warn_once("sidecar_unsent", "records the sidecar had not accepted are lost at shutdown",
                      count=len(self._outbox))
