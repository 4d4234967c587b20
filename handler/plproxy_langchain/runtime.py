"""The handler's background: one thread running its own event loop, shared by every handler of a process.

A handler's callbacks run on the caller's thread (or event loop) and must cost microseconds, so they
only hand a finished run to this loop (`call_soon_threadsafe`, a write to a local socket pair). The
loop owns every resource that waits: the local store and its exporter, or the HTTP client that talks to
a sidecar. Users' `pl_id_callback`s run on a second thread, in order, so that a slow callback (one that
calls PromptLayer itself, say) never holds up the shipping of records.

`REGISTRY` is the one piece of module state. LangChain code creates handlers freely (often one per
call, `callbacks=[PromptLayerCallbackHandler()]`), while a store file, its writer thread, an exporter and
a connection pool are per-process resources: one per destination (a data dir with a key and a
PromptLayer URL, or a sidecar URL), whatever the number of handlers. The registry holds them, lazily
started on the first record, flushed at interpreter exit, reset in a forked child, and closed by
`plproxy_langchain.shutdown()`. It holds nothing per run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # before our exit hook is registered (see _register_exit)
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, TypeVar

log = logging.getLogger("plproxy_langchain")

T = TypeVar("T")
_STOP: Final = object()
DEFAULT_EXIT_TIMEOUT: Final = 5.0


def warn_once(key: str, message: str, **fields: Any) -> None:
    """Log `message` the first time `key` is seen in this process; later occurrences go to debug."""
    REGISTRY.warn_once(key, message, **fields)


class Sink(Protocol):
    """Where finished runs go: the local store and exporter, or a sidecar. Loop-side methods are async."""

    def submit(self, item: Any) -> None: ...
    def drain(self) -> None: ...
    def followup(self, log_id: str, kind: str, body: dict[str, Any]) -> None: ...
    def log_id_of_request(self, pl_id: int) -> str | None: ...
    async def flush(self, seconds: float) -> bool: ...
    async def close(self, seconds: float) -> None: ...


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (plproxy's `fast` extra): the background's I/O and thread
    hand-offs cost about half as much CPU, which the caller's thread shares on a busy CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class CallbackRunner:
    """Runs `pl_id_callback(request_id)` calls in order on one daemon thread, started on first use."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, callback: Callable[[int], object], request_id: int) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="plproxy-langchain-callbacks", daemon=True
                )
                self._thread.start()
        self._queue.put((callback, request_id))

    def on_own_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def drain(self, timeout: float) -> bool:
        """Wait until every callback submitted so far has run (False at the timeout)."""
        if self._thread is None or self.on_own_thread():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(max(0.0, timeout))

    def stop(self, timeout: float) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(max(0.0, timeout))

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            callback: Callable[[int], object]
            request_id: int
            callback, request_id = item  # type: ignore[misc]
            try:
                callback(request_id)
            except Exception as exc:
                warn_once(
                    "pl_id_callback_failed",
                    "pl_id_callback raised; the record is in PromptLayer all the same (further failures "
                    "of pl_id_callback are logged at debug level)",
                    error_type=type(exc).__name__,
                )


class Runtime:
    """The background thread and its event loop."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.callbacks = CallbackRunner()
        self._thread = threading.Thread(target=self._main, name="plproxy-langchain", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_default_executor())

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, callback: Callable[..., object], *args: Any) -> bool:
        """Schedule `callback(*args)` on the loop from any thread; False when the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the loop and wait for it from another thread (TimeoutError after `timeout`)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(max(0.0, timeout))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(max(0.0, timeout))
        if not self._thread.is_alive():
            self.loop.close()


class Registry:
    """The process's sinks by destination, and the runtime they share. See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._runtime: Runtime | None = None
        self._sinks: dict[Any, Sink] = {}
        self._warned: set[str] = set()
        self._exit_hook = False
        self._exiting = False

    # ---- the caller's side (cheap, never blocks on I/O) ---------------------------------------------

    def sink(self, spec: Any, factory: Callable[[Runtime, Any], Sink]) -> Sink | None:
        """The sink for `spec`, created (not opened: that happens on the loop) on first use."""
        sink = self._sinks.get(spec) if self._pid == os.getpid() else None
        if sink is not None:
            return sink
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's threads do not exist here
                self._pid, self._runtime, self._sinks = os.getpid(), None, {}
            if self._exiting:
                return None
            sink = self._sinks.get(spec)
            if sink is None:
                if self._runtime is None:
                    self._runtime = Runtime()
                    self._register_exit()
                sink = factory(self._runtime, spec)
                self._sinks[spec] = sink
            return sink

    def existing(self, spec: Any) -> tuple[Runtime, Sink] | None:
        with self._lock:
            sink = self._sinks.get(spec) if self._pid == os.getpid() else None
            runtime = self._runtime
        return None if sink is None or runtime is None else (runtime, sink)

    def warn_once(self, key: str, message: str, **fields: Any) -> None:
        if key in self._warned:
            log.debug(message, extra={"fields": {"event": key, **fields}})
            return
        self._warned.add(key)
        log.warning(message, extra={"fields": {"event": key, **fields}})

    # ---- blocking operations (flush, shutdown) ------------------------------------------------------

    def flush(self, spec: Any, timeout: float) -> bool:
        """Ship what `spec`'s sink holds, and run the pl_id callbacks that follow, within `timeout`."""
        found = self.existing(spec)
        if found is None:
            return True
        runtime, sink = found
        if runtime.on_loop_thread():
            warn_once("flush_on_loop", "flush() was called from plproxy_langchain's own thread; ignored")
            return False
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            ok = runtime.run(_flush(sink, max(0.0, deadline - time.monotonic())), timeout + 0.5)
        except (TimeoutError, RuntimeError):
            ok = False
        return runtime.callbacks.drain(deadline - time.monotonic()) and ok

    def shutdown(self, timeout: float = DEFAULT_EXIT_TIMEOUT) -> bool:
        """Flush and close every sink, then stop the thread. A later record starts them again."""
        with self._lock:
            runtime, sinks = self._runtime, list(self._sinks.values())
            if self._pid != os.getpid():
                runtime, sinks = None, []
            self._runtime, self._sinks = None, {}
        if runtime is None:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            ok = runtime.run(_close_all(sinks, timeout), timeout + 1.0)
        except (TimeoutError, RuntimeError):
            ok = False
        ok = runtime.callbacks.drain(deadline - time.monotonic()) and ok
        runtime.callbacks.stop(max(0.1, deadline - time.monotonic()))
        runtime.stop(max(0.5, deadline - time.monotonic()))
        return ok

    def _at_exit(self) -> None:
        raw = os.environ.get("PLPROXY_FLUSH_TIMEOUT", "")
        try:
            timeout = float(raw) if raw.strip() else DEFAULT_EXIT_TIMEOUT
        except ValueError:
            timeout = DEFAULT_EXIT_TIMEOUT
        with self._lock:
            self._exiting = True
        try:
            self.shutdown(timeout)
        except Exception:
            log.exception("plproxy_langchain could not flush its records at exit; they stay in the store")

    def _register_exit(self) -> None:
        # threading's own exit hooks run before `atexit` ones, and one of them (concurrent.futures')
        # forbids new executor work: a flush from a plain atexit hook could not use asyncio.to_thread.
        # Hooks registered later run earlier, and concurrent.futures.thread is imported above.
        if self._exit_hook:
            return
        self._exit_hook = True
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(self._at_exit)
                return
            except RuntimeError:  # the interpreter is already shutting down
                pass
        import atexit

        atexit.register(self._at_exit)


async def _flush(sink: Sink, seconds: float) -> bool:
    sink.drain()  # what callers handed over before the flush, even if its wake-up is still queued
    return await sink.flush(seconds)


async def _close_all(sinks: list[Sink], seconds: float) -> bool:
    async def one(sink: Sink) -> bool:
        start = time.monotonic()
        try:
            ok = await _flush(sink, seconds)
        except Exception:
            log.exception("plproxy_langchain_flush_failed")
            ok = False
        try:
            await sink.close(max(0.5, seconds - (time.monotonic() - start)))
        except Exception:
            log.exception("plproxy_langchain_close_failed")
            ok = False
        return ok

    results = await asyncio.gather(*(one(s) for s in sinks))
    return all(results)


REGISTRY: Final = Registry()
