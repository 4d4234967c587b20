"""The processes a benchmark run starts: start, pin, read /proc, stop — only what this run started.

Every process is started by `Processes.start…` and remembered; `Processes.stop_all()` (also run at
exit) sends SIGTERM to each by its pid, waits, and kills only those that did not stop.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def child_setup(cpus: set[int]) -> Callable[[], None]:
    """Runs in the child before exec: pin it, and have the kernel SIGTERM it should this harness die
    without stopping it (SIGKILL, a test runner's timeout), so that nothing it started outlives it."""

    def setup() -> None:
        os.sched_setaffinity(0, cpus)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def cpu_plan() -> tuple[set[int], set[int]]:
    """(CPUs for the process under test, CPUs for everything else). On one CPU, no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


def cpu_busy(cpus: set[int]) -> float:
    """Busy CPU seconds so far (everything but idle and iowait) of `cpus`, from /proc/stat."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in values]
            total += sum(v[:8]) - v[3] - v[4]
    return total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    """A small JSON call to one of this run's own loopback servers."""
    assert url.startswith("http://127.0.0.1:"), url
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - loopback
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        raw = resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    cpus: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all its threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def thread_cpu(self) -> dict[int, tuple[float, float]]:
        """(user, system) CPU seconds per thread id, from /proc/PID/task/*/stat."""
        out: dict[int, tuple[float, float]] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(task.name)] = (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
        return out

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def rss_mb(self) -> float:
        return self.status_kb("VmRSS") / 1024

    def hwm_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024

    def threads(self) -> int:
        return self.status_kb("Threads")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)  # plproxy: a second signal skips the drain
                try:
                    self.popen.wait(3)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(3)
        return self.popen.returncode


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []
        self.sut_cpus, self.other_cpus = cpu_plan()
        atexit.register(self.stop_all)

    def _popen(self, name: str, argv: Sequence[str], env: dict[str, str] | None, cpus: set[int]) -> Proc:
        log = self.log_dir / f"{name}.log"
        out = log.open("wb")
        popen = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=child_setup(cpus),  # before exec: every thread of the child inherits it
        )
        out.close()
        proc = Proc(name, popen, log, cpus=cpus)
        self.started.append(proc)
        return proc

    def start_server(
        self, name: str, module: str, args: Sequence[str], *, sut: bool = False, timeout: float = 15.0
    ) -> Proc:
        """A bench server (`python -m bench.X`) that prints "listening on URL" when ready."""
        cpus = self.sut_cpus if sut else self.other_cpus
        proc = self._popen(name, [sys.executable, "-m", module, *args], None, cpus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = proc.log.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("listening on "):
                    proc.url = line.removeprefix("listening on ").strip()
                    return proc
            if not proc.alive():
                break
            time.sleep(0.05)
        proc.stop()
        raise RuntimeError(f"{name} did not start; its log ({proc.log}):\n{proc.log.read_text()[-2000:]}")

    def start_plproxy(self, name: str, env: dict[str, str], *, timeout: float = 20.0) -> Proc:
        port = free_port()
        env = {**env, "PLPROXY_PORT": str(port), "PLPROXY_HOST": "127.0.0.1"}
        proc = self._popen(name, [sys.executable, "-m", "plproxy", "serve"], env, self.sut_cpus)
        proc.url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, proc.url + "/healthz", timeout)
        return proc

    def start_command(
        self,
        name: str,
        argv: Sequence[str],
        health_url: str,
        env: dict[str, str] | None = None,
        *,
        sut: bool = True,
        timeout: float = 60.0,
    ) -> Proc:
        proc = self._popen(name, argv, env, self.sut_cpus if sut else self.other_cpus)
        wait_healthy(proc, health_url, timeout)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def wait_healthy(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            http("GET", url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError(
        f"{proc.name} did not become healthy at {url}; its log ({proc.log}):\n"
        f"{proc.log.read_text(errors='replace')[-3000:]}"
    )


def run_pinned(argv: Sequence[str], cpus: set[int], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a short-lived tool (load generator, wrk) pinned to `cpus`; its stdout, or an error."""

    done = subprocess.run(
        list(argv),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=timeout,
        preexec_fn=child_setup(cpus),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} {argv[1:4]} failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
        )
    return done.stdout.decode()
