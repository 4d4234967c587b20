"""Where finished runs go, on the background loop: the local store and exporter, or a plproxy sidecar.

`StoreSink` is plproxy's own pipeline in-process: `Store.submit` (the writer thread builds the body and
commits it) and an `Exporter` task that ships it, whose `on_exported` hook delivers the PromptLayer id
to `pl_id_callback`. Follow-ups go through `Store.add_followup`, exactly like the proxy's.

`SidecarSink` sends each record, in order, to a running plproxy's `POST /plproxy/records` and lets its
store and key do the rest; it learns the PromptLayer id by polling `GET /plproxy/logs/{log_id}` (only
for records whose handler has a `pl_id_callback`). What the sidecar has not accepted yet waits in memory
(at most `MAX_OUTBOX` items) and is retried with backoff while the sidecar is unreachable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

from plproxy.exporter import Exporter
from plproxy.store import Store
from plproxy_langchain.runtime import Runtime, warn_once

MAX_OUTBOX: Final = 10_000  # sidecar mode: records and follow-ups waiting to be accepted
MAX_KNOWN_IDS: Final = 10_000  # PromptLayer id → log id, for track_*(request_id): the most recent ones
MAX_WAITING: Final = 100_000  # records whose pl_id_callback has not run yet
_SWEEP_EVERY = 2.0  # store mode: seconds between checks for ids exported by another process
_SWEEP_AFTER = 5.0
_SWEEP_BATCH = 200
_POLL_EVERY = 0.5  # sidecar mode: seconds between polls of the records awaiting their id
_POLL_BATCH = 32
_POLL_GIVE_UP = 120  # polls of an id the sidecar does not know before giving up on it
_MAX_BACKOFF = 30.0
REDACTED: Final = b"[REDACTED]"


@dataclass(frozen=True, slots=True)
class StoreSpec:
    data_dir: str
    api_key: str | None = field(repr=False)
    base_url: str


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    url: str  # the sidecar's root, e.g. http://127.0.0.1:8788
    token: str | None = field(repr=False)  # PLPROXY_AUTH_TOKENS of a sidecar that requires one


@dataclass(slots=True)
class Outgoing:
    """One record on its way: the body is built by `build()` off the caller's thread."""

    log_id: str
    build: Callable[[], dict[str, Any]]
    callback: Callable[[int], object] | None = None
    followups: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def workspace_dir(data_dir: str, api_key: str | None, base_url: str) -> str:
    """A data dir of its own for a key/URL other than the environment's, so a store file never mixes
    records of two PromptLayer workspaces (an exporter sends what it claims with its own key)."""
    digest = hashlib.sha256(f"{base_url}\0{api_key or ''}".encode()).hexdigest()[:12]
    return str(Path(data_dir) / "workspaces" / digest)


def make_sink(runtime: Runtime, spec: Any) -> Any:
    if isinstance(spec, SidecarSpec):
        return SidecarSink(runtime, spec)
    return StoreSink(runtime, spec)


class _KnownIds:
    """PromptLayer request id → log id, bounded; written on the loop, read from any thread."""

    def __init__(self) -> None:
        self._ids: collections.OrderedDict[int, str] = collections.OrderedDict()

    def add(self, pl_id: int, log_id: str) -> None:
        self._ids[pl_id] = log_id
        while len(self._ids) > MAX_KNOWN_IDS:
            self._ids.popitem(last=False)

    def get(self, pl_id: int) -> str | None:
        try:
            return self._ids.get(pl_id)
        except RuntimeError:  # resized by the loop meanwhile; the GIL makes this rare
            return None

    def __len__(self) -> int:
        return len(self._ids)


class _SinkBase:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._known = _KnownIds()
        # log id → pl_id_callback, for records whose id is not known yet (loop thread only)
        self._waiting: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
        self._opened: asyncio.Future[bool] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # caller's side
    def submit(self, item: Outgoing) -> None:
        if not self._runtime.call_soon(self._accept, item):
            warn_once("runtime_closed", "plproxy_langchain's background thread has stopped; a record is lost")

    def followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None:
        if not self._runtime.call_soon(self._accept_followup, log_id, kind, body):
            warn_once("runtime_closed", "plproxy_langchain's background thread has stopped; a record is lost")

    def log_id_for(self, pl_id: int) -> str | None:
        return self._known.get(pl_id)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # loop side
    def _accept(self, item: Outgoing) -> None:
        raise NotImplementedError

    def _accept_followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def _wait_for_id(self, log_id: str, callback: Callable[[int], object]) -> None:
        self._waiting[log_id] = [callback, time.monotonic(), 0]
        if len(self._waiting) > MAX_WAITING:
            self._waiting.popitem(last=False)
            warn_once("too_many_waiting", "too many records await their PromptLayer id; the oldest "
                      "pl_id_callback calls are dropped")

    def _deliver(self, log_id: str, pl_id: int) -> None:
        self._known.add(pl_id, log_id)
        entry = self._waiting.pop(log_id, None)
        if entry is not None:
            self._runtime.callbacks.submit(entry[0], pl_id)

    def _ensure_open(self) -> asyncio.Future[bool]:
        if self._opened is None:
            self._opened = self._runtime.loop.create_future()
            self._spawn(self._open())
        return self._opened

    async def _open(self) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Any) -> None:
        task = self._runtime.loop.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            warn_once("task_crashed", "a plproxy_langchain background task stopped",
                      error_type=type(exc).__name__, error=str(exc)[:300])

    async def _wait_opened(self, end: float) -> bool:
        opened = self._ensure_open()
        try:
            async with asyncio.timeout_at(end):
                return await asyncio.shield(opened)
        except TimeoutError:
            return False

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class StoreSink(_SinkBase):
    """plproxy's store and exporter, in this process."""

    def __init__(self, runtime: Runtime, spec: StoreSpec) -> None:
        super().__init__(runtime)
        self.spec = spec
        self.store: Store | None = None
        self._exporter: Exporter | None = None
        self._session: aiohttp.ClientSession | None = None
        self._backlog: list[Any] = []  # what arrived while the store was opening
        self._broken = False

    def _accept(self, item: Outgoing) -> None:
        if self.store is not None:
            self._submit(item)
        elif self._broken:
            warn_once("store_unusable_drop", "the local store could not be opened; records are dropped")
        else:
            self._backlog.append(item)
            self._ensure_open()

    def _accept_followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.add_followup(log_id, kind, body)
            if self._exporter is not None:
                self._exporter.wake()
        elif not self._broken:
            self._backlog.append((log_id, kind, body))
            self._ensure_open()

    def _submit(self, item: Outgoing) -> None:
        assert self.store is not None
        self.store.submit(item.log_id, self._guarded(item.build), followups=item.followups)
        if item.callback is not None and self.spec.api_key is not None:
            self._wait_for_id(item.log_id, item.callback)

    def _guarded(self, build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        key = self.spec.api_key

        def guarded() -> dict[str, Any]:
            try:
                payload = build()
            except Exception as exc:
                warn_once("build_failed", "a LangChain run could not be turned into a record; it is stored "
                          "as failed with the reason (plproxy logs shows it)", error_type=type(exc).__name__)
                raise
            if key:  # the key must never travel in a body, whatever the model's parameters held
                data = orjson.dumps(payload)
                if key.encode() in data:
                    payload = orjson.loads(data.replace(key.encode(), REDACTED))
            return payload

        return guarded

    async def _open(self) -> None:
        assert self._opened is not None
        spec = self.spec
        try:
            store = await asyncio.to_thread(Store, spec.data_dir, has_default_key=spec.api_key is not None)
        except Exception as exc:
            self._broken = True
            self._backlog.clear()
            warn_once("store_unusable", "plproxy_langchain cannot open its local store; records are dropped",
                      data_dir=spec.data_dir, error=str(exc)[:300])
            self._opened.set_result(False)
            return
        self.store = store
        if spec.api_key is None:
            warn_once("records_kept", "no PromptLayer API key and no sidecar (PROMPTLAYER_API_KEY, "
                      "PLPROXY_URL): records are kept in the local store; `plproxy logs` shows them",
                      data_dir=spec.data_dir)
        else:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
            self._exporter = Exporter(store, self._session, base_url=spec.base_url,
                                      default_api_key=spec.api_key, on_exported=self._deliver)
            self._spawn(self._exporter.run())
            self._spawn(self._sweep())
        backlog, self._backlog = self._backlog, []
        for entry in backlog:
            if isinstance(entry, Outgoing):
                self._submit(entry)
            else:
                self._accept_followup(*entry)
        self._opened.set_result(True)

    async def _sweep(self) -> None:
        """Deliver ids of records another process exported (a sidecar or `plproxy flush` on this file)."""
        while True:
            await asyncio.sleep(_SWEEP_EVERY)
            now = time.monotonic()
            due = [log_id for log_id, entry in self._waiting.items() if now - entry[1] > _SWEEP_AFTER]
            if not due or self.store is None:
                continue
            due = due[:_SWEEP_BATCH]
            states = await asyncio.to_thread(_states, self.store, due)
            for log_id, status in zip(due, states, strict=True):
                entry = self._waiting.get(log_id)
                if entry is None:
                    continue
                if status is not None and status.state == "exported" and status.promptlayer_request_id:
                    self._deliver(log_id, status.promptlayer_request_id)
                elif (status is not None and status.state in ("failed", "kept")) or (
                    status is None and now - entry[1] > 60
                ):
                    del self._waiting[log_id]
                else:
                    self._waiting.move_to_end(log_id)

    async def flush(self, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, seconds)
        if not await self._wait_opened(end) or self.store is None:
            return False
        store = self.store
        committed = await asyncio.to_thread(store.sync, max(0.0, end - loop.time()))
        if self._exporter is None:
            return committed
        report = await self._exporter.flush(max(0.0, end - loop.time()))
        return committed and not report.deadline_reached and report.still_pending == 0

    async def close(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, seconds)
        if self._exporter is not None:
            await self._exporter.stop()
        await self._cancel_tasks()
        if self._session is not None:
            await self._session.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close, max(0.5, end - loop.time()))


def _states(store: Store, log_ids: list[str]) -> list[Any]:
    return [store.get(log_id) for log_id in log_ids]


@dataclass(slots=True)
class _Send:
    log_id: str
    item: Outgoing | None = None  # a record
    payload: dict[str, Any] | None = None
    kind: str | None = None  # a follow-up
    body: dict[str, Any] | None = None
    attempts: int = 0


class SidecarSink(_SinkBase):
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
