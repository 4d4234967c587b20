"""The exporter: ships records from the store to PromptLayer in the background, then their follow-ups.

One `Exporter` per process runs `run()` as a task. It claims due records from the store (leases keep two
processes from sending the same record), POSTs each stored payload to `/log-request`, and marks the
record exported, failed or due again:

    2xx with an `id` (else `request_id`)           → exported; `on_exported(log_id, id)`
    429                                            → retry after `Retry-After` (seconds or HTTP date); no
                                                     new claims until then (the whole exporter pauses)
    5xx, 408, connection errors, timeouts,         → retry with exponential backoff and full jitter,
    2xx that is not JSON or names no id              capped at `max_backoff`; never given up
    other 4xx (400/401/403/404/422, …)             → failed, with PromptLayer's answer (truncated)

When PromptLayer answers again after an outage, whatever waits out a backoff is made due at once, so
the backlog goes out as fast as the concurrency allows rather than trickling out over `max_backoff`.

Follow-ups of exported records go to `/rest/track-{score,metadata,prompt,group}` with
`{"request_id": id, **body}` under the same rules. Every call carries the key in `X-API-KEY` (the
record's own key, else the default one) and never in a body; no log line or stored error holds a key.

Concurrency: at most `concurrency` calls are in flight. Records are claimed in batches of up to
`batch_size`, only when at least half the slots are free (or none is busy), and wait in a local queue
for a free slot; one that waited longer than half the lease margin is released rather than sent, so a
record is never sent after its lease (the call's timeout plus a margin) may have expired. Exported
records are marked in one transaction per short buffer (`_MARK_DELAY` or `MARK_BATCH` records); a
crash before that only means they are sent again. Exported records waiting for their mark beyond the
first `MARK_BATCH` hold their send slots, so a crash sends again at most `concurrency + MARK_BATCH`
records. Follow-ups are looked for only when some may be due: records just exported had some,
follow-ups were added lately or just went out, or `poll_interval` passed since the last look.

The store is blocking (SQLite); every store call goes through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final, Literal, TypeVar

import orjson
from prometheus_client import Counter, Histogram

from plproxy.metrics import Metrics
from plproxy.pl_http import ConnectionFailed, InvalidHeaderValue, PromptLayerHTTP, RequestTimeout
from plproxy.store import Claim, FollowupClaim, Store, redact

log = logging.getLogger(__name__)

FOLLOWUP_PATHS: Final = {
    "score": "/rest/track-score",
    "metadata": "/rest/track-metadata",
    "prompt": "/rest/track-prompt",
    "group": "/rest/track-group",
}
ERROR_MAX_CHARS: Final = 1000
_LEASE_MARGIN = 30.0  # seconds a lease outlives the call it covers
_BACKLOG_EVERY = 5.0  # seconds between refreshes of the backlog gauge
# Unavailable this long, PromptLayer's return makes the backlog due at once (a lone record that keeps
# failing while others go through never counts as an outage, so it keeps its own backoff).
_OUTAGE_SECONDS = 1.0
_MARK_DELAY = 0.01  # seconds an exported record waits to be marked with others in one transaction
# ... or until this many wait. Up to this many exported records may wait unmarked without holding a send
# slot; beyond it they hold theirs, so a crash sends again at most `concurrency + MARK_BATCH` records.
# When every unmarked record held its slot, sending stalled on each mark and a mark covered ~2 records:
# an exporter alone on one CPU spent 77-92 µs of CPU per record draining a backlog, 51-74 with the
# buffer; proxying 500 calls/s, 698 against 624 µs per call (interleaved runs, docs/benchmarks.md).
MARK_BATCH: Final = 32
_QUEUED_MAX = _LEASE_MARGIN / 2  # seconds a claimed record may wait for a slot before it is released
_FOLLOWUPS_ACTIVE = 1.0  # seconds after follow-ups were added during which every pump looks for them
# Once a claim has emptied the store, the next one waits this long for records to gather (a backlog is
# claimed without pause). Each claim, and each mark of what it sent, is a transaction and a hand-off to a
# thread: proxying 500 calls/s, one claim per commit (every 20 ms) cost ~55 µs of CPU per call more than
# one per 100 ms, and 0.1-0.2 ms of client latency at p50 (three interleaved pairs of runs). A record
# reaches PromptLayer up to this much later; it was committed long before.
_CLAIM_PACE = 0.1

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FlushReport:
    exported: int  # records exported during the flush (by this exporter)
    failed: int  # records PromptLayer refused for good during the flush
    still_pending: int | None  # pending records left in the store; None if the store did not answer in time
    deadline_reached: bool  # the flush stopped at its deadline rather than because nothing was due


@dataclass(frozen=True, slots=True)
class _Answer:
    kind: Literal["ok", "retry", "fail"]
    data: Any = None
    error: str = ""
    retry_after: float | None = None  # from a 429's Retry-After


class Exporter:
    """Background shipping of the store's records to PromptLayer. `run()` as a task, `stop()` at the end.

    The exporter owns its HTTP client (`pl_http.PromptLayerHTTP`): its connections are closed when `run()`
    ends, by `stop()`, and at the end of a `flush()` made while `run()` is not running."""

    def __init__(
        self,
        store: Store,
        *,
        base_url: str,
        default_api_key: str | None,
        batch_size: int = 50,
        concurrency: int = 8,
        max_backoff: float = 60.0,
        base_backoff: float = 0.5,
        request_timeout: float = 30.0,
        poll_interval: float = 1.0,
        max_retry_after: float = 3600.0,
        metrics: Metrics | None = None,
        on_exported: Callable[[str, int], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        self.store = store
        self._http = PromptLayerHTTP(
            base_url.rstrip("/"), timeout=request_timeout, max_idle=concurrency, ssl_context=ssl_context
        )
        self._default_key = default_api_key or None
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._max_backoff = max_backoff
        self._base_backoff = base_backoff
        self._timeout_error = f"no answer from PromptLayer within {request_timeout}s"
        self._lease_seconds = request_timeout + _LEASE_MARGIN
        self._poll_interval = poll_interval
        self._max_retry_after = max_retry_after
        self._metrics = metrics
        self._latency: dict[str, Histogram] = {}  # labelled children, by endpoint
        self._responses: dict[tuple[str, str], Counter] = {}  # ... by (endpoint, status)
        self._on_exported = on_exported

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._event = asyncio.Event()
        self._pump_lock = asyncio.Lock()
        self._inflight: set[asyncio.Task[None]] = set()
        self._held_records: set[str] = set()
        self._held_followups: set[int] = set()
        self._queued: deque[tuple[float, Claim]] = deque()  # claimed, waiting for a slot (loop time)
        self._marks: list[tuple[Claim, int]] = []  # exported, not yet marked so in the store
        self._mark_task: asyncio.Task[None] | None = None
        self._marking = 0  # records in the mark transaction now running
        self._mark_now = asyncio.Event()
        self._followups_hint = True  # follow-ups may be due now
        self._followups_gen = -1  # the store's followups_submitted when last seen
        self._followups_active_until = 0.0  # monotonic
        self._next_followups_poll = 0.0  # monotonic
        self._new_work = True  # a commit since the last claim of records (set by wake())
        self._store_drained = False  # the last claim of records got fewer than it asked for
        self._next_claim_poll = 0.0  # monotonic; retries fall due without a commit
        self._next_claim_at = 0.0  # monotonic; new work is claimed from then on (see _CLAIM_PACE)
        self._paused_until = 0.0  # loop time; after a 429 nothing new is claimed before it
        self._run_task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._healthy = True
        self._unhealthy_since = 0.0  # monotonic; when the current outage began
        self._followups_first = False
        self.exported_count = 0
        self.failed_count = 0

    # ---- public API ------------------------------------------------------------------------------

    def wake(self) -> None:
        """New work was committed: look for it now. Thread-safe (the store's writer thread calls it)."""
        self._new_work = True
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._event.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
            loop.call_soon_threadsafe(self._event.set)

    def start(self) -> asyncio.Task[None]:
        """`run()` as a task of the running loop."""
        return asyncio.get_running_loop().create_task(self.run(), name="plproxy-exporter")

    async def run(self) -> None:
        """The background loop. Returns only when cancelled (see `stop()`)."""
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("this Exporter is already running")
        self._bind_loop()
        self._stopping = False
        self._run_task = asyncio.current_task()
        self.store.add_commit_listener(self.wake)
        next_gauge = 0.0
        try:
            while not self._stopping:
                try:
                    self._event.clear()
                    claimed = await self._pump()
                    if claimed and self._free_slots():
                        continue  # there may be more due right now
                    await self._wait_event(self._idle_wait())
                    if self._metrics is not None and time.monotonic() >= next_gauge:
                        next_gauge = time.monotonic() + _BACKLOG_EVERY
                        await asyncio.to_thread(self.store.backlog)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("exporter_loop_error")
                    await asyncio.sleep(self._poll_interval)
        finally:
            self.store.remove_commit_listener(self.wake)
            self._run_task = None
            try:
                await self._abandon_inflight()
            finally:
                self._http.close()

    async def flush(self, deadline_seconds: float) -> FlushReport:
        """Send everything due before the deadline now, records submitted to the store but not yet
        committed included; return by the deadline whatever happens."""
        loop = self._bind_loop()
        end = loop.time() + max(0.0, deadline_seconds)
        wall_end = time.time() + max(0.0, deadline_seconds)
        margin = min(0.25, deadline_seconds * 0.1)  # time kept for the report itself
        exported0, failed0 = self.exported_count, self.failed_count
        deadline_reached = False
        try:
            async with asyncio.timeout_at(end - margin):
                # a record still in the writer's queue is not due yet, and the flush would end without it
                await asyncio.to_thread(self.store.sync, max(0.0, deadline_seconds - margin))
                await asyncio.to_thread(self.store.expedite, wall_end)
                self._followups_hint = True
                while True:
                    self._event.clear()
                    claimed = await self._pump(force=True)
                    if self._paused_until > loop.time():
                        if self._paused_until >= end:
                            break  # PromptLayer asked us to wait past the deadline
                        await self._wait_event(self._paused_until - loop.time())
                        continue
                    if self._inflight or self._queued or self._mark_task is not None:
                        await self._wait_event(self._poll_interval)
                        continue
                    if claimed:
                        continue
                    due = await asyncio.to_thread(self.store.next_due, require_own_key=self._needs_own_key)
                    if due is None or due > wall_end:
                        break
                    await self._wait_event(max(0.0, due - time.time()))
        except TimeoutError:
            deadline_reached = True
        still_pending: int | None = None
        try:
            async with asyncio.timeout_at(end):
                if self._run_task is None:
                    await self._abandon_inflight()
                still_pending = await asyncio.to_thread(self.store.backlog)
        except TimeoutError:
            deadline_reached = True
        finally:
            if self._run_task is None:  # nobody else will use the connections
                self._http.close()
        return FlushReport(
            exported=self.exported_count - exported0,
            failed=self.failed_count - failed0,
            still_pending=still_pending,
            deadline_reached=deadline_reached,
        )

    async def stop(self) -> None:
        """Cancel the loop and every call in flight; their records stay pending. Idempotent."""
        self._stopping = True
        task = self._run_task
        if task is not None and task is not asyncio.current_task():
            # one cancel: cancelling again would interrupt the loop's own clean-up (releasing leases);
            # `_stopping` ends the loop anyway should the cancel be lost
            task.cancel()
            await asyncio.wait([task])
        try:
            await self._abandon_inflight()
        finally:
            self._http.close()

    # ---- claiming --------------------------------------------------------------------------------

    @property
    def _needs_own_key(self) -> bool:
        return self._default_key is None

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        return loop

    def _free_slots(self) -> int:
        # records sent but not yet marked hold their slots beyond the first MARK_BATCH: after a crash, at
        # most `concurrency + MARK_BATCH` go again
        unmarked = len(self._marks) + self._marking
        return self._concurrency - len(self._inflight) - max(0, unmarked - MARK_BATCH)

    async def _pump(self, *, force: bool = False) -> int:
        """Start sending what is due, up to the free slots. Returns how many started."""
        async with self._pump_lock:
            loop = asyncio.get_running_loop()
            if self._paused_until > loop.time():
                await self._release_stale(loop.time())
                return 0
            started = await self._start_queued()
            self._followups_first = not self._followups_first  # neither kind starves the other
            kinds = ("followups", "records") if self._followups_first else ("records", "followups")
            for kind in kinds:
                free = self._free_slots()
                if free <= 0:
                    break
                if kind == "records":
                    if not self._claim_wanted(free, force):
                        continue
                    self._new_work = False
                    self._next_claim_poll = time.monotonic() + self._poll_interval
                    claims = await self._claim(
                        self.store.claim_due,
                        self._batch_size,
                        time.time(),
                        lease_seconds=self._lease_seconds,
                        require_own_key=self._needs_own_key,
                    )
                    self._store_drained = len(claims) < self._batch_size
                    if self._store_drained:
                        self._next_claim_at = time.monotonic() + _CLAIM_PACE
                    now = loop.time()
                    for claim in claims:
                        self._held_records.add(claim.log_id)
                        self._queued.append((now, claim))
                    started += await self._start_queued()
                else:
                    if not (force or self._followups_wanted()):
                        continue
                    fclaims = await self._claim(
                        self.store.claim_due_followups,
                        min(self._batch_size, free),
                        time.time(),
                        lease_seconds=self._lease_seconds,
                        require_own_key=self._needs_own_key,
                    )
                    if fclaims:
                        self._followups_hint = True  # there may be more
                    for fclaim in fclaims:
                        self._held_followups.add(fclaim.id)
                        self._spawn(self._send_followup(fclaim))
                    started += len(fclaims)
            return started

    def _claim_wanted(self, free: int, force: bool) -> bool:
        """Claim records in batches: once the local queue is empty, when half the slots are free (or none
        is busy) and records may wait in the store; for new work, once `_CLAIM_PACE` has passed since a
        claim emptied the store; else every poll interval."""
        if self._queued:
            return False
        if force:
            return True
        now = time.monotonic()
        if self._new_work or now >= self._next_claim_poll:
            return now >= self._next_claim_at
        return not self._store_drained and (not self._inflight or free * 2 >= self._concurrency)

    def _idle_wait(self) -> float:
        """Seconds to wait for an event: new work waiting out its claim pace is claimed when it ends."""
        if self._new_work:
            return min(self._poll_interval, max(0.0, self._next_claim_at - time.monotonic()))
        return self._poll_interval

    def _followups_wanted(self) -> bool:
        """Whether follow-ups may be due: look for them only then (the query costs as much as a claim)."""
        now = time.monotonic()
        gen = getattr(self.store, "followups_submitted", None)
        if gen is None or gen != self._followups_gen:
            self._followups_gen = gen if gen is not None else -1
            # added lately: committed soon, due once their record is exported
            self._followups_active_until = now + max(self._poll_interval, _FOLLOWUPS_ACTIVE)
        if self._followups_hint or now < self._followups_active_until or now >= self._next_followups_poll:
            self._followups_hint = False
            self._next_followups_poll = now + self._poll_interval
            return True
        return False

    async def _start_queued(self) -> int:
        """Send queued claims while slots are free; release those that waited too long."""
        now = asyncio.get_running_loop().time()
        started = 0
        while self._queued and self._free_slots() > 0:
            claimed_at, claim = self._queued[0]
            if now - claimed_at > _QUEUED_MAX:
                break
            self._queued.popleft()
            self._spawn(self._send_record(claim))
            started += 1
        await self._release_stale(now)
        return started

    async def _release_stale(self, now: float) -> None:
        stale: list[str] = []
        while self._queued and now - self._queued[0][0] > _QUEUED_MAX:
            stale.append(self._queued.popleft()[1].log_id)
        if stale:
            await asyncio.to_thread(self._release_quietly, stale, [])
            self._held_records.difference_update(stale)

    async def _claim(self, fn: Callable[..., list[T]], *args: Any, **kwargs: Any) -> list[T]:
        # The claim runs in a thread: if we are cancelled meanwhile, what it claimed is released
        # rather than left leased until the lease expires.
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_orphans)
            raise
        except Exception as exc:
            log.error(
                "exporter_claim_failed", extra={"fields": {"error": redact(str(exc), self._default_key)}}
            )
            return []

    def _release_orphans(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        claims = future.result()
        records = [c.log_id for c in claims if isinstance(c, Claim)]
        followups = [c.id for c in claims if isinstance(c, FollowupClaim)]
        if claims and self._loop is not None and not self._loop.is_closed():
            self._loop.run_in_executor(None, self._release_quietly, records, followups)

    def _release_quietly(self, records: list[str], followups: list[int]) -> None:
        try:
            self.store.release(records, followups)
        except Exception as exc:
            log.warning("exporter_release_failed", extra={"fields": {"error": exc}})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._event.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("exporter_send_crashed", extra={"fields": {"error_type": type(exc).__name__}})

    async def _abandon_inflight(self) -> None:
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._queued.clear()  # still held: released below
        if self._mark_task is not None:  # what was sent is marked (and reported), not sent again
            self._mark_now.set()
            await asyncio.wait([self._mark_task])
        records, followups = list(self._held_records), list(self._held_followups)
        self._held_records.clear()
        self._held_followups.clear()
        if records or followups:
            await asyncio.to_thread(self._release_quietly, records, followups)

    async def _wait_event(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives just as
        # the event is set, and the loop would then never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._event.wait()

    # ---- sending ---------------------------------------------------------------------------------

    async def _send_record(self, claim: Claim) -> None:
        key = claim.api_key or self._default_key
        answer = await self._post("log-request", "/log-request", claim.payload, key, claim.api_key)
        pl_id = _request_id(answer.data) if answer.kind == "ok" else None
        if answer.kind == "ok" and pl_id is None:
            answer = _Answer("retry", error=f"PromptLayer's answer names no id: {_snippet(answer.data)}")
        if answer.kind == "ok":
            assert pl_id is not None
            self._queue_mark(claim, pl_id)  # still held until marked
            return
        try:
            if answer.kind == "fail":
                await asyncio.to_thread(self.store.mark_failed, claim.log_id, answer.error)
                self._failed(claim.log_id, "log-request", answer.error)
            else:
                at = self._retry_at(answer, claim.attempts)
                await asyncio.to_thread(self.store.retry_later, claim.log_id, at, answer.error)
                self._retrying(claim.log_id, "log-request", answer.error, at)
        except Exception as exc:  # the store is closed or broken: the lease expires, it is sent again
            log.error(
                "exporter_store_update_failed", extra={"fields": {"log_id": claim.log_id, "error": exc}}
            )
        self._held_records.discard(claim.log_id)

    def _queue_mark(self, claim: Claim, pl_id: int) -> None:
        self._marks.append((claim, pl_id))
        # at once when its follow-ups wait for the mark, or when nothing else is in flight to share it with
        idle = len(self._inflight) <= 1 and not self._queued  # the caller's own task is in flight
        full = len(self._marks) >= MARK_BATCH
        if full or claim.has_followups or idle:
            self._mark_now.set()
        if self._mark_task is None:
            self._mark_task = asyncio.get_running_loop().create_task(self._mark_loop())

    async def _mark_loop(self) -> None:
        try:
            while self._marks:
                await self._wait_mark()
                self._mark_now.clear()
                try:
                    await self._flush_marks()
                except Exception:
                    log.exception("exporter_loop_error")
        finally:
            self._mark_task = None
            self._event.set()

    async def _wait_mark(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_MARK_DELAY):
                await self._mark_now.wait()

    async def _flush_marks(self) -> None:
        """Mark the buffered exported records in one transaction, then count and report each."""
        marks, self._marks = self._marks, []
        if not marks:
            return
        self._marking = len(marks)
        try:
            done = await asyncio.to_thread(
                self.store.mark_exported_many,
                [(claim.log_id, pl_id) for claim, pl_id in marks],
                own_key=[claim.log_id for claim, _ in marks if claim.api_key is not None],
            )
        except Exception as exc:  # the store is closed or broken: the leases expire, they are sent again
            log.error(
                "exporter_store_update_failed",
                extra={"fields": {"log_id": marks[0][0].log_id, "records": len(marks), "error": exc}},
            )
            done = [False] * len(marks)
        finally:
            self._marking = 0
            self._event.set()  # their slots are free
        recovered = False
        for (claim, pl_id), exported in zip(marks, done, strict=True):
            self._held_records.discard(claim.log_id)
            if exported:
                recovered = self._exported(claim.log_id, pl_id) or recovered
                if claim.has_followups:
                    self._followups_hint = True
        if recovered:
            await self._after_outage()

    async def _send_followup(self, claim: FollowupClaim) -> None:
        key = claim.api_key or self._default_key
        path = FOLLOWUP_PATHS[claim.kind]
        endpoint = path.removeprefix("/rest/")
        body = orjson.dumps({"request_id": claim.request_id, **claim.body})
        answer = await self._post(endpoint, path, body, key, claim.api_key)
        if answer.kind == "ok" and isinstance(answer.data, dict) and answer.data.get("success") is False:
            answer = _Answer("fail", error=f"PromptLayer refused it: {_snippet(answer.data)}")
        try:
            if answer.kind == "ok":
                await asyncio.to_thread(self.store.mark_followup_exported, claim.id)
                self._followups_hint = True  # the record's next one is due now
            elif answer.kind == "fail":
                await asyncio.to_thread(self.store.mark_followup_failed, claim.id, answer.error)
                self._followups_hint = True
                log.warning(
                    "followup_failed",
                    extra={"fields": {"log_id": claim.log_id, "kind": claim.kind, "error": answer.error}},
                )
            else:
                at = self._retry_at(answer, claim.attempts)
                await asyncio.to_thread(self.store.retry_followup_later, claim.id, at, answer.error)
                self._retrying(claim.log_id, endpoint, answer.error, at)
        except Exception as exc:
            log.error(
                "exporter_store_update_failed", extra={"fields": {"log_id": claim.log_id, "error": exc}}
            )
        self._held_followups.discard(claim.id)

    async def _post(
        self, endpoint: str, path: str, body: bytes, key: str | None, own_key: str | None
    ) -> _Answer:
        """One PromptLayer call, its answer classified. Errors never contain a key."""
        secrets = (key, own_key, self._default_key)
        if key is None:
            return _Answer("retry", error="no PromptLayer API key for this record")
        started = time.monotonic()
        status_label = "error"
        try:
            answer = await self._http.post(path, body, key)
            status = answer.status
            status_label = str(status)
            retry_after = answer.headers.get("retry-after")
            text = answer.body
        except RequestTimeout:
            status_label = "timeout"
            return _Answer("retry", error=self._timeout_error)
        except ConnectionFailed as exc:  # refused, reset, TLS, or an answer that is not HTTP
            message = redact(str(exc), *secrets)[:ERROR_MAX_CHARS]
            return _Answer("retry", error=f"cannot reach PromptLayer: {type(exc).__name__}: {message}")
        except InvalidHeaderValue:  # a key with a newline or beyond latin-1: it can never work
            return _Answer("fail", error="the API key is not a valid HTTP header value")
        finally:
            if self._metrics is not None:
                self._observe(self._metrics, endpoint, status_label, time.monotonic() - started)
        if 200 <= status < 300:
            try:
                return _Answer("ok", data=orjson.loads(text))
            except orjson.JSONDecodeError:
                answer_text = redact(text.decode("utf-8", "replace"), *secrets)
                return _Answer(
                    "retry", error=f"PromptLayer answered {status} but not JSON: {answer_text[:200]}"
                )
        answer_text = redact(text.decode("utf-8", "replace"), *secrets)
        error = f"PromptLayer answered {status}: {answer_text}"[:ERROR_MAX_CHARS]
        if status == 429:
            return _Answer("retry", error=error, retry_after=_parse_retry_after(retry_after))
        if status >= 500 or status == 408 or status < 400:
            return _Answer("retry", error=error)
        return _Answer("fail", error=error)

    def _observe(self, metrics: Metrics, endpoint: str, status: str, seconds: float) -> None:
        latency = self._latency.get(endpoint)
        if latency is None:
            latency = self._latency[endpoint] = metrics.export_latency.labels(endpoint=endpoint)
        latency.observe(seconds)
        responses = self._responses.get((endpoint, status))
        if responses is None:
            responses = metrics.promptlayer_responses.labels(endpoint=endpoint, status=status)
            self._responses[endpoint, status] = responses
        responses.inc()

    def _retry_at(self, answer: _Answer, attempts: int) -> float:
        """Epoch time of the next attempt; a Retry-After also pauses the whole exporter until then."""
        if answer.retry_after is not None:
            delay = min(answer.retry_after, self._max_retry_after)
            if self._loop is not None:
                self._paused_until = max(self._paused_until, self._loop.time() + delay)
        else:
            cap = min(self._max_backoff, self._base_backoff * 2 ** min(attempts, 32))
            delay = random.uniform(0, cap)  # noqa: S311 (jitter, not a secret)
        return time.time() + delay

    # ---- outcomes --------------------------------------------------------------------------------

    def _exported(self, log_id: str, pl_id: int) -> bool:
        """Count an export; True when it ends an outage."""
        self.exported_count += 1
        recovered = False
        if not self._healthy:
            self._healthy = True
            recovered = time.monotonic() - self._unhealthy_since >= _OUTAGE_SECONDS
            log.warning("promptlayer_available")
        if self._metrics is not None:
            self._metrics.records.labels(outcome="exported").inc()
        if self._on_exported is not None:
            try:
                self._on_exported(log_id, pl_id)
            except Exception as exc:
                log.warning(
                    "on_exported_failed",
                    extra={"fields": {"log_id": log_id, "error_type": type(exc).__name__}},
                )
        return recovered

    async def _after_outage(self) -> None:
        # Each record's backoff grew through the whole outage: without this, what waited would trickle
        # out over up to `max_backoff` seconds although PromptLayer answers again now.
        if await asyncio.to_thread(self.store.expedite, time.time() + self._max_backoff):
            self._followups_hint = self._new_work = True
            self._event.set()

    def _failed(self, log_id: str, endpoint: str, error: str) -> None:
        self.failed_count += 1
        if self._metrics is not None:
            self._metrics.records.labels(outcome="failed").inc()
        log.warning(
            "export_failed", extra={"fields": {"log_id": log_id, "endpoint": endpoint, "error": error[:300]}}
        )

    def _retrying(self, log_id: str, endpoint: str, error: str, at: float) -> None:
        if self._metrics is not None:
            self._metrics.export_retries.inc()
        if self._healthy:
            self._healthy = False  # one warning per outage; each retry is a debug line
            self._unhealthy_since = time.monotonic()
            log.warning(
                "promptlayer_unavailable", extra={"fields": {"endpoint": endpoint, "error": error[:300]}}
            )
        log.debug(
            "export_retry",
            extra={
                "fields": {
                    "log_id": log_id,
                    "endpoint": endpoint,
                    "in": round(at - time.time(), 2),
                    "error": error,
                }
            },
        )


def _request_id(data: Any) -> int | None:
    if not isinstance(data, dict):
        return None
    for name in ("id", "request_id"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _snippet(data: Any) -> str:
    return orjson.dumps(data).decode()[:200] if data is not None else "null"
