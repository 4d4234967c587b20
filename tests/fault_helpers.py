"""Helpers for the reliability suite: `plproxy serve` as a real process, its memory, raw HTTP on loopback.

Every process started here listens on 127.0.0.1 and talks only to loopback fakes; every wait has a
deadline. A `Plproxy` keeps its log files and data dir in a directory of the session's `Evidence`, where
the secrets scan (tests/test_secrets_canary.py) reads them at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.proxy_fixtures import REPO, free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi to Ada"}]}


def rss_kb(pid: int) -> int:
    """Resident memory of a process, KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's RSS from a thread (the test's loop may be busy) every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_kb(self.pid)
            if value:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0) / 1024

    @property
    def first_mb(self) -> float:
        return (self.samples[0] if self.samples else 0) / 1024


@dataclass
class Plproxy:
    """`plproxy serve` as a real process on 127.0.0.1; restartable on the same port and data dir."""

    env: dict[str, str]
    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    log_paths: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["PLPROXY_DATA_DIR"])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        return rss_kb(self.pid) / 1024

    async def start(self, timeout: float = 20.0) -> Plproxy:
        assert not self.alive, "already running"
        self.runs += 1
        log_path = self.dir / f"plproxy-run{self.runs}.log"
        self.log_paths.append(log_path)
        with log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "plproxy", "serve"],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"plproxy exited with {self.process.returncode}:\n{self.log_text()}")
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"plproxy did not answer /healthz within {timeout} s:\n{self.log_text()}"
                    )
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush, no clean-up of any kind."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            await asyncio.to_thread(self.process.wait, 10)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (off the loop: the fakes the proxy flushes to may run on it)."""
        assert self.process is not None
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    async def get(self, path: str) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
            return response.status, await response.read()

    async def metrics(self) -> str:
        """The /metrics text; a copy is kept for the secrets scan."""
        status, body = await self.get("/metrics")
        assert status == 200
        (self.dir / f"metrics-{time.monotonic_ns()}.txt").write_bytes(body)
        return body.decode()

    async def metric(self, name: str, **labels: str) -> float:
        return metric_value(await self.metrics(), name, **labels)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    events.append(orjson.loads(line))
        return events

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class PlproxyFactory:
    """Starts `Plproxy` processes wired to the fakes, with the canary keys; cleans them all up."""

    evidence: Evidence
    canary: Canary
    label: str
    made: list[Plproxy] = field(default_factory=list)
    standins: list[PromptLayerStandIn] = field(default_factory=list)
    upstreams: list[FakeOpenAI] = field(default_factory=list)

    async def __call__(
        self,
        upstream: FakeOpenAI | str,
        promptlayer: PromptLayerStandIn | str | None = None,
        *,
        start: bool = True,
        data_dir: Path | None = None,
        **env: str,
    ) -> Plproxy:
        where = self.evidence.new_dir(self.label)
        upstream_url = upstream if isinstance(upstream, str) else upstream.base_url
        if isinstance(upstream, FakeOpenAI):
            self.upstreams.append(upstream)
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(where),
            "PYTHONUNBUFFERED": "1",
            "PLPROXY_UPSTREAM": upstream_url,
            "PLPROXY_DATA_DIR": str(data_dir or where / "data"),
            "PLPROXY_LOG_LEVEL": "debug",  # the most a log can say: the scan reads it all
            "PROMPTLAYER_API_KEY": self.canary.promptlayer_key,
            # at teardown the stand-in may already be gone: do not spend the default 5 s flushing to it
            "PLPROXY_FLUSH_TIMEOUT": "1",
        }
        if promptlayer is not None:
            full_env["PROMPTLAYER_BASE_URL"] = (
                promptlayer if isinstance(promptlayer, str) else promptlayer.base_url
            )
            if isinstance(promptlayer, PromptLayerStandIn):
                self.standins.append(promptlayer)
        port = int(env.pop("PLPROXY_PORT", 0)) or free_port()
        full_env["PLPROXY_PORT"] = str(port)
        full_env.update(env)
        proxy = Plproxy(full_env, where, port)
        self.made.append(proxy)
        if start:
            await proxy.start()
        return proxy

    async def close(self) -> None:
        for proxy in self.made:
            if proxy.alive:
                with contextlib.suppress(AssertionError, aiohttp.ClientError, OSError):
                    await proxy.metrics()
                try:
                    await proxy.stop(30)
                except subprocess.TimeoutExpired:
                    await proxy.kill()
        for standin in {id(s): s for s in self.standins}.values():
            self.evidence.keep(f"{self.label}-promptlayer", (r.body for r in standin.received))
            used = sum(
                1 for r in standin.received if r.headers.get("X-API-KEY") == self.canary.promptlayer_key
            )
            self.evidence.add("secrets", "promptlayer_calls_with_canary_key", used)
        for upstream in {id(u): u for u in self.upstreams}.values():
            bearer = f"Bearer {self.canary.provider_key}"
            used = sum(1 for r in upstream.received if r.headers.get("Authorization") == bearer)
            self.evidence.add("secrets", "upstream_calls_with_canary_key", used)
        self.evidence.add("secrets", "proxies_started", sum(p.runs for p in self.made))


# --- calls --------------------------------------------------------------------------------------------


async def chat(
    session: aiohttp.ClientSession,
    proxy: Plproxy,
    canary: Canary,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str | None, bytes]:
    """One chat call through the proxy with the canary provider key: (status, X-PL-Log-Id, body)."""
    async with session.post(
        f"{proxy.base_url}/chat/completions",
        data=orjson.dumps(body or CHAT),
        headers={**canary.authorization, "Content-Type": "application/json", **(headers or {})},
    ) as response:
        return response.status, response.headers.get("X-PL-Log-Id"), await response.read()


def log_ids_at(promptlayer: PromptLayerStandIn) -> Counter[str]:
    """How many times each record (by its plproxy log id) was accepted at the stand-in."""
    return Counter(
        body["metadata"]["plproxy_log_id"]
        for body in promptlayer.log_requests
        if isinstance(body.get("metadata"), dict) and "plproxy_log_id" in body["metadata"]
    )


async def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls `probe` (sync or async) until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


async def all_exported(
    promptlayer: PromptLayerStandIn, log_ids: Iterable[str], timeout: float
) -> Counter[str]:
    wanted = set(log_ids)

    def probe() -> Counter[str] | None:
        seen = log_ids_at(promptlayer)
        return seen if wanted <= set(seen) else None

    try:
        return await wait_until(probe, timeout, "every record at the stand-in")  # type: ignore[no-any-return]
    except AssertionError:
        missing = wanted - set(log_ids_at(promptlayer))
        raise AssertionError(f"{len(missing)} of {len(wanted)} records never reached PromptLayer") from None


# --- raw HTTP -----------------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(port: int, data: bytes | Iterable[bytes], timeout: float = 10.0) -> RawAnswer:
    """Send bytes as they are (pieces in turn, if an iterable) and read the answer until the server closes.

    The server may answer and close before everything was sent (413, 400): what it answered counts.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pieces = [data] if isinstance(data, bytes) else data
        try:
            for piece in pieces:
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), timeout)
        except (ConnectionError, TimeoutError):
            pass
        raw = b""
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    raw += chunk
        except (ConnectionError, TimeoutError):
            pass
    finally:
        writer.close()
    return parse_answer(raw)


def parse_answer(raw: bytes) -> RawAnswer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"not an HTTP answer: {raw[:200]!r}")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    answer = RawAnswer(status, headers, body)
    if answer.header("Transfer-Encoding") == "chunked":
        answer.body = _dechunk(body)
    return answer


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def is_openai_error(answer: RawAnswer) -> bool:
    """An answer in the OpenAI error shape: JSON `{"error": {"message": str, "type": str, "code": ...}}`."""
    if not (answer.header("Content-Type") or "").startswith("application/json"):
        return False
    try:
        error = answer.json()["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and isinstance(error.get("type"), str) and "code" in error
