"""Where finished runs go, and what both destinations share: their specs, the record on its way, the
PromptLayer ids learnt so far and the `pl_id_callback`s still waiting for theirs.

The destinations themselves are `store_sink.StoreSink` (plproxy's store and exporter in this process) and
`sidecar_sink.SidecarSink` (a running plproxy). Their methods run on the background loop, except
`submit`, `followup` and `log_id_of_request`, which any thread may call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from plproxy_langchain.runtime import Runtime, warn_once

MAX_KNOWN_IDS: Final = 10_000  # PromptLayer id → log id, for track_*(request_id): the most recent ones
MAX_WAITING: Final = 100_000  # records whose pl_id_callback has not run yet


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


@dataclass(slots=True)
class _Followup:
    log_id: str
    kind: str
    body: dict[str, Any]


def workspace_dir(data_dir: str, api_key: str | None, base_url: str) -> str:
    """A data dir of its own for a key/URL other than the environment's, so a store file never mixes
    records of two PromptLayer workspaces (an exporter sends what it claims with its own key)."""
    digest = hashlib.sha256(f"{base_url}\0{api_key or ''}".encode()).hexdigest()[:12]
    return str(Path(data_dir) / "workspaces" / digest)


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


class SinkBase:
    """What both destinations share. Callers hand records and follow-ups over through `_inbox`, in
    order; the loop takes the whole inbox at once (`drain`), woken by one `call_soon_threadsafe` per
    batch rather than per record: a caller wakes the loop only when no wake-up is pending already."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._known = _KnownIds()
        # log id → pl_id_callback, for records whose id is not known yet (loop thread only)
        self._waiting: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
        self._opened: asyncio.Future[bool] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: collections.deque[Outgoing | _Followup] = collections.deque()
        self._wake_pending = False

    # caller's side
    def submit(self, item: Outgoing) -> None:
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_loop()

    def followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None:
        self._inbox.append(_Followup(log_id, kind, body))  # behind the records submitted before it
        if not self._wake_pending:
            self._wake_loop()

    def _wake_loop(self) -> None:
        # `drain` clears the flag before it takes the inbox, so an item appended while the flag was
        # still set is taken by that drain; two threads both waking the loop only costs an empty drain.
        self._wake_pending = True
        if not self._runtime.call_soon(self.drain):
            self._wake_pending = False
            lost = len(self._inbox)
            self._inbox.clear()
            warn_once("runtime_closed", "plproxy_langchain's background thread has stopped; records are lost",
                      count=lost)

    def log_id_of_request(self, pl_id: int) -> str | None:
        return self._known.get(pl_id)

    # loop side
    def drain(self) -> None:
        """Take everything callers have handed over so far (loop thread; a flush starts with it)."""
        self._wake_pending = False
        inbox = self._inbox
        for _ in range(len(inbox)):  # only what is there now: callers may append meanwhile
            entry = inbox.popleft()
            try:
                if isinstance(entry, Outgoing):
                    self._accept(entry)
                else:
                    self._accept_followup(entry.log_id, entry.kind, entry.body)
            except Exception as exc:  # one bad entry must not cost the others theirs
                warn_once("accept_failed", "plproxy_langchain could not queue a record",
                          error_type=type(exc).__name__, error=str(exc)[:300])

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
