"""`--workers N`: N processes serving one port (SO_REUSEPORT), sharing one store, one set of metrics.

The parent only supervises: it starts each worker as `plproxy serve … --workers 1 --worker-of <pid>` in
a fresh interpreter (so `PROMETHEUS_MULTIPROC_DIR` is set before prometheus_client is imported there),
forwards SIGTERM/SIGINT to them, restarts one that dies, and exits 0 once all stopped cleanly. Each
worker runs its own store writer and exporter on the same SQLite file; leases keep them from sending a
record twice. Metrics are written to per-process files that every worker's `/metrics` adds up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from plproxy.settings import Settings

log = logging.getLogger("plproxy.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that dies this soon after starting, this many times in a row, stops the whole server.
_CRASH_WINDOW_S = 2.0
_CRASH_LIMIT = 5


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.quick_crashes = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.started = time.monotonic()
        return subprocess.Popen(self.argv, env=self.env)  # noqa: S603 - our own interpreter and arguments

    def restart(self) -> None:
        self.quick_crashes = (
            self.quick_crashes + 1 if time.monotonic() - self.started < _CRASH_WINDOW_S else 0
        )
        self.process = self._start()


def run_workers(settings: Settings, serve_args: Sequence[str]) -> int:
    from prometheus_client import multiprocess

    metrics_dir = Path(tempfile.mkdtemp(prefix="plproxy-metrics-"))
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    argv = [
        sys.executable,
        "-m",
        "plproxy",
        "serve",
        *serve_args,
        "--workers",
        "1",
        "--worker-of",
        str(os.getpid()),
    ]
    stopping = False
    failed = False

    def signal_all(signum: int) -> None:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        signal_all(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [_Worker(index, argv, env) for index in range(settings.workers)]
    log.info("workers started", extra={"fields": {"workers": settings.workers, "port": settings.port}})
    try:
        while any(worker.process.poll() is None for worker in workers) or not (stopping or failed):
            for worker in workers if not (stopping or failed) else ():
                code = worker.process.poll()
                if code is None:
                    continue
                multiprocess.mark_process_dead(worker.process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                never_started = code == 1 and time.monotonic() - worker.started < _CRASH_WINDOW_S
                if (never_started and worker.quick_crashes == 0) or worker.quick_crashes >= _CRASH_LIMIT:
                    # it could not start (the port is taken, say) or keeps crashing: stop them all
                    log.error("worker cannot run", extra={"fields": {"worker": worker.index, "exit": code}})
                    failed = True
                    signal_all(signal.SIGTERM)
                    break
                log.warning(
                    "worker died; restarting", extra={"fields": {"worker": worker.index, "exit": code}}
                )
                worker.restart()
            time.sleep(0.1)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # a worker still starting when the signal came had no handler yet: it died of the signal itself
    forwarded = {-signal.SIGTERM, -signal.SIGINT}
    codes = [worker.process.returncode for worker in workers]
    codes = [0 if stopping and code in forwarded else code for code in codes]
    log.info("workers stopped", extra={"fields": {"exit_codes": codes}})
    return 1 if failed or any(codes) else 0
