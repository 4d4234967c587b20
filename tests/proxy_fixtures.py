"""Fixtures that run plproxy itself on loopback, in-process or as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from plproxy.app_keys import STORE
from plproxy.server import create_app
from plproxy.settings import Settings
from plproxy.store import Store

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningProxy:
    url: str  # http://127.0.0.1:PORT
    app: web.Application
    settings: Settings
    registry: CollectorRegistry

    @property
    def base_url(self) -> str:
        """What a client sets as OPENAI_BASE_URL."""
        return f"{self.url}/v1"

    @property
    def store(self) -> Store:
        return self.app[STORE]


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def proxy_env(tmp_path: Path, fake_openai: Any, promptlayer: Any) -> dict[str, str]:
    """The environment of a proxy wired to the fake upstream and the PromptLayer stand-in."""
    return {
        "HOME": str(tmp_path),
        "PLPROXY_UPSTREAM": fake_openai.base_url,
        "PLPROXY_DATA_DIR": str(tmp_path / "data"),
        "PROMPTLAYER_BASE_URL": promptlayer.base_url,
        "PROMPTLAYER_API_KEY": "pl_test_key",
    }


@pytest.fixture
async def start_proxy(proxy_env: dict[str, str]) -> AsyncIterator[StartProxy]:
    servers: list[TestServer] = []

    async def start(**env_overrides: str | None) -> RunningProxy:
        env = {**proxy_env, **{k: v for k, v in env_overrides.items() if v is not None}}
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
        settings = Settings.from_sources(env)
        registry = CollectorRegistry()
        app = create_app(settings, registry=registry)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return RunningProxy(f"http://127.0.0.1:{server.port}", app, settings, registry)

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for requests the official clients cannot make."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ProxyProcess:
    """`plproxy serve` as a real subprocess."""

    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    stdout_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"plproxy exited with {self.process.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"plproxy did not listen within {timeout} s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def plproxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "plproxy", *args]


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    processes: list[ProxyProcess] = []

    def spawn(env: dict[str, str], *args: str, port: int | None = None) -> ProxyProcess:
        port = port or free_port()
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "PLPROXY_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        out = tmp_path / f"plproxy-{port}-{len(processes)}.log"
        with out.open("wb") as sink:
            process = subprocess.Popen(
                plproxy_command("serve", *args), env=full_env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO
            )
        running = ProxyProcess(port, full_env, process, out, list(args))
        processes.append(running)
        running.wait_ready()
        return running

    yield spawn
    for running in processes:
        running.kill()
