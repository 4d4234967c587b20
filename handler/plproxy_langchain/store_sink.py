"""plproxy's own pipeline in this process: the store (SQLite outbox) and an exporter task on our loop.

`Store.submit` queues the record; the store's writer thread builds the body (the handler's conversion
runs there, off the caller's thread) and commits it. The exporter ships it, and its `on_exported` hook
hands the PromptLayer id to the record's `pl_id_callback`. Follow-ups go through `Store.add_followup`,
exactly like the proxy's. Records another process exports from the same file (a sidecar or
`plproxy flush` sharing the data dir) are noticed by a slow sweep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from plproxy.exporter import Exporter
from plproxy.store import Store
from plproxy_langchain.runtime import Runtime, warn_once
from plproxy_langchain.sinks import Outgoing, SinkBase, StoreSpec

_SWEEP_EVERY = 2.0  # seconds between checks for ids exported by another process
_SWEEP_AFTER = 5.0  # the exporter's own hook normally comes first
_SWEEP_BATCH = 200


def _guarded(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def guarded() -> dict[str, Any]:
        try:
            return build()
        except Exception as exc:
            warn_once("build_failed", "a LangChain run could not be turned into a record; it is stored "
                      "as failed with the reason (plproxy logs shows it)", error_type=type(exc).__name__)
            raise

    return guarded


def _states(store: Store, log_ids: list[str]) -> list[Any]:
    return [store.get(log_id) for log_id in log_ids]


class StoreSink(SinkBase):
    """plproxy's store and exporter, in this process."""

    def __init__(self, runtime: Runtime, spec: StoreSpec) -> None:
        super().__init__(runtime)
        self.spec = spec
        self.store: Store | None = None
        self._exporter: Exporter | None = None
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
        key = self.spec.api_key
        # the key must never travel in a body, whatever the model's parameters held: the store replaces
        # it in the encoded body (one encoding, with its guard against long strings)
        self.store.submit(item.log_id, _guarded(item.build), followups=item.followups,
                          scrub=(key,) if key else ())
        if item.callback is not None and self.spec.api_key is not None:
            self._wait_for_id(item.log_id, item.callback)

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
            self._exporter = Exporter(store, base_url=spec.base_url,
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
        if self.store is not None:
            await asyncio.to_thread(self.store.close, max(0.5, end - loop.time()))

