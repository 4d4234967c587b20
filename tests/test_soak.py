"""Load: calls at a steady rate through a real `plproxy serve`, PromptLayer down for the first half, then
plproxy SIGKILLed while it ships the backlog, and restarted.

Every call is answered; memory stays bounded (RSS sampled from /proc all along); every record reaches
PromptLayer by the end; the duplicates the kill causes are counted and stay within the batch in flight.

The default run makes 2,000 calls (about 10 s of load), so the suite stays fast; `PLPROXY_SOAK_FULL=1`
makes it the issue's 20,000 (about 100 s): `PLPROXY_SOAK_FULL=1 .venv/bin/python -m pytest -m soak`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import aiohttp
import pytest

from plproxy.exporter import MARK_BATCH
from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.fault_helpers import RssSampler, all_exported, chat, log_ids_at, wait_until

pytestmark = pytest.mark.soak

FULL = os.environ.get("PLPROXY_SOAK_FULL") == "1"
CALLS = 20_000 if FULL else 2_000
RATE = 200  # calls a second, steady
IN_FLIGHT = 64  # calls open at once, at most (a slow proxy shows as latency, not as more connections)
EXPORT_CONCURRENCY = 8
RSS_GROWTH_BOUND_MB = 80
PROMPTLAYER_DELAY = 0.03  # seconds per export once it is back: 8 at a time, about 270 a second
LATENCY_BOUND = 2.0  # seconds, for any one call (the client shares its loop with both fakes)


async def test_steady_load_with_promptlayer_down_for_the_first_half(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    proxy = await run_plproxy(
        fake_openai,
        promptlayer,
        PLPROXY_LOG_LEVEL="info",
        PLPROXY_EXPORT_CONCURRENCY=str(EXPORT_CONCURRENCY),
    )
    await promptlayer.stop()
    log_ids: list[str | None] = [None] * CALLS
    statuses: list[int] = [0] * CALLS
    latencies: list[float] = [0.0] * CALLS
    slots = asyncio.Semaphore(IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def call(i: int) -> None:
            try:
                started = time.monotonic()
                statuses[i], log_ids[i], _ = await chat(session, proxy, canary)
                latencies[i] = time.monotonic() - started
            finally:
                slots.release()

        for _ in range(20):  # warm up: imports, pools, the store's first pages
            await chat(session, proxy, canary)
        baseline = proxy.rss_mb()
        started = time.monotonic()
        back_at = 0.0
        tasks = []
        with RssSampler(proxy.pid, interval=0.2) as rss:
            for i in range(CALLS):
                if i == CALLS // 2:
                    # back, on the same port, for the second half: a little slow, so that the backlog
                    # still drains when the load ends and the kill finds exports in flight
                    promptlayer.delay = PROMPTLAYER_DELAY
                    await promptlayer.start()
                    back_at = time.monotonic()
                delay = started + i / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                tasks.append(asyncio.create_task(call(i)))
            await asyncio.gather(*tasks)
            load_seconds = time.monotonic() - started
            at_half = max(rss.samples[: max(1, len(rss.samples) // 2)], default=0) / 1024

            async def all_stored() -> bool:
                return await proxy.metric("plproxy_records_total", outcome="stored") >= CALLS + 20

            await wait_until(all_stored, 30, "every record in the store")
            # SIGKILL while the backlog is being shipped; the restart picks up where it stopped
            await proxy.kill()
            exported_before_kill = len(log_ids_at(promptlayer))
        await proxy.start()
        seen = await all_exported(promptlayer, [i for i in log_ids if i], timeout=120 if FULL else 60)
        drained = time.monotonic() - back_at
    assert statuses == [200] * CALLS  # every call answered
    assert all(log_ids)
    growth = rss.peak_mb - baseline
    assert growth < RSS_GROWTH_BOUND_MB, f"RSS grew by {growth:.0f} MiB over {CALLS} calls"
    duplicates = sum(n - 1 for n in seen.values())
    assert exported_before_kill < CALLS  # the kill did find a backlog being shipped
    assert duplicates <= EXPORT_CONCURRENCY + MARK_BATCH, f"{duplicates} duplicates after one SIGKILL"
    assert max(latencies) < LATENCY_BOUND
    ordered = sorted(latencies)
    evidence.figure(
        "load",
        f"{CALLS:,} calls at {RATE}/s, PromptLayer down for the first half, SIGKILL while draining",
        {
            "calls": CALLS,
            "answered": statuses.count(200),
            "seconds": round(load_seconds, 1),
            "achieved_rate_per_s": round(CALLS / load_seconds),
            "latency_p50_ms": round(statistics.median(ordered) * 1000, 1),
            "latency_p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1),
            "latency_max_ms": round(ordered[-1] * 1000, 1),
            "rss_baseline_mb": round(baseline),
            "rss_peak_mb": round(rss.peak_mb),
            "rss_growth_mb": round(growth),
            "rss_peak_first_half_mb": round(at_half),
            "records_exported": len(seen),
            "records_lost": CALLS - len([i for i in log_ids if i in seen]),
            "exported_before_the_kill": exported_before_kill,
            "pending_at_the_kill": CALLS + 20 - exported_before_kill,
            "duplicates_after_sigkill": duplicates,
            "duplicate_bound": EXPORT_CONCURRENCY + MARK_BATCH,
            "all_exported_s_after_promptlayer_returned": round(drained, 1),
        },
    )
