"""`plproxy serve` as a real process: graceful shutdown during a stream, and several workers on one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp

from tests.proxy_fixtures import free_port, plproxy_command

CHAT = {"model": "fake-many-chunks-20", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def base_env(fake_openai: Any, tmp_path: Any) -> dict[str, str]:
    return {"PLPROXY_UPSTREAM": fake_openai.base_url, "PLPROXY_DATA_DIR": str(tmp_path / "data")}


async def test_sigterm_during_a_stream_drains_it(spawn_proxy: Any, fake_openai: Any, tmp_path: Any) -> None:
    fake_openai.chunk_delay = 0.1  # 20 chunks: about 2 s
    proxy = await asyncio.to_thread(spawn_proxy, base_env(fake_openai, tmp_path))
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{proxy.url}/v1/chat/completions", json=CHAT)
        log_id = response.headers["X-PL-Log-Id"]
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        proxy.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with session.get(f"{proxy.url}/readyz") as ready:
            assert ready.status == 503
            assert "draining" in (await ready.json())["problems"]
        rest = await response.read()  # the stream runs to its end
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert rest.count(b"data: ") >= 20
    code = await asyncio.to_thread(proxy.process.wait, 30)
    assert code == 0
    listed = subprocess.run(
        plproxy_command("logs", "--json", "--data-dir", str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [record["log_id"] for record in records] == [log_id]
    assert records[0]["state"] == "kept"
    assert records[0]["payload"]["status"] == "SUCCESS"


def metric_total(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_two_workers_share_the_port_the_store_and_the_metrics(
    spawn_proxy: Any, fake_openai: Any, tmp_path: Any
) -> None:
    proxy = await asyncio.to_thread(spawn_proxy, base_env(fake_openai, tmp_path), "--workers", "2")
    pids: set[int] = set()
    for _ in range(400):  # the second worker may still be starting: wait until both answer
        # a fresh connection each time, so the kernel spreads them over both workers
        async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/healthz") as health:
            pids.add((await health.json())["pid"])
        if len(pids) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(pids) == 2
    calls = 40
    served_by: set[int] = set()
    for _ in range(calls):
        async with aiohttp.ClientSession() as session:
            body = {**CHAT, "stream": False, "model": "gpt-4o-mini"}
            async with session.post(f"{proxy.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
            async with session.get(f"{proxy.url}/healthz") as health:  # same connection, same worker
                served_by.add((await health.json())["pid"])
    assert served_by == pids  # the calls were spread over both workers
    totals = set()
    for _ in range(6):
        async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as metrics:
            totals.add(metric_total(await metrics.text(), "plproxy_requests_total"))
    assert totals == {float(calls)}  # whichever worker answers, the sum over both
    assert proxy.stop() == 0
    listed = subprocess.run(
        plproxy_command("logs", "--json", "--limit", "1000", "--data-dir", str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(records) == calls
    assert len({record["log_id"] for record in records}) == calls


async def test_a_corrupt_store_is_moved_aside_and_a_fresh_one_started(
    spawn_proxy: Any, fake_openai: Any, tmp_path: Any
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "plproxy.db").write_bytes(b"this is not an SQLite database" * 100)
    proxy = await asyncio.to_thread(spawn_proxy, base_env(fake_openai, tmp_path))
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/readyz") as ready:
        assert ready.status == 200
    moved = list(data.glob("plproxy.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not an SQLite database")
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
    events = [line for line in lines if line["event"] == "store moved aside"]
    assert len(events) == 1
    assert events[0]["moved_to"] == str(moved[0])


async def test_one_log_line_per_call_with_tokens_and_no_bodies(
    spawn_proxy: Any, fake_openai: Any, tmp_path: Any
) -> None:
    proxy = await asyncio.to_thread(spawn_proxy, base_env(fake_openai, tmp_path))
    body = {
        **CHAT,
        "stream": False,
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "prompt-canary"}],
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/chat/completions", json=body) as response:
            log_id = response.headers["X-PL-Log-Id"]
        async with session.get(f"{proxy.url}/v1/models") as response:
            assert response.status == 200
    assert await asyncio.to_thread(proxy.stop) == 0
    lines = [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["event"] == "call"]
    assert len(calls) == 2
    recorded = next(line for line in calls if line["log_id"] == log_id)
    assert recorded["status"] == 200
    assert recorded["method"] == "POST"
    assert recorded["path"] == "/chat/completions"
    assert recorded["model"] == "gpt-4o-mini"
    assert recorded["input_tokens"] > 0
    assert recorded["output_tokens"] > 0
    assert recorded["duration_ms"] >= recorded["upstream_ms"] >= 0
    unrecorded = next(line for line in calls if line["log_id"] is None)
    assert unrecorded["path"] == "/models"
    assert "prompt-canary" not in proxy.output()


def test_serve_freezes_startup_objects_before_it_listens(tmp_path: Any) -> None:
    """The first full collection under load once held the event loop 25-45 ms: `plproxy serve` must
    take what start-up made out of the collector's reach before the first call can arrive."""
    traced = (
        "import gc, sys\n"
        "from plproxy import serve\n"
        "freeze = serve._freeze_startup_objects\n"
        "def traced():\n"
        "    freeze()\n"
        "    print('frozen', gc.get_freeze_count(), flush=True)\n"
        "serve._freeze_startup_objects = traced\n"
        "from plproxy.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PLPROXY_PORT": str(free_port()),
        "PLPROXY_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", traced], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any('"listening"' in line for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    frozen = [i for i, line in enumerate(lines) if line.startswith("frozen ")]
    listening = [i for i, line in enumerate(lines) if '"listening"' in line]
    assert frozen, lines
    assert listening, lines
    assert frozen[0] < listening[0]  # before the first call could arrive
    assert int(lines[frozen[0]].split()[1]) > 10_000  # modules, classes, functions: start-up's objects
