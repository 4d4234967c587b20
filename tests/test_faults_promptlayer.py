"""PromptLayer misbehaving, seen from a real `plproxy serve`: down, erroring, rate-limiting, stalling,
resetting, answering HTML. Whatever it does, every call is answered at once, and every record reaches it
in the end.

The stand-in runs on loopback in the test's loop; "minutes" of outage are scaled down to seconds, with the
same shape (the exporter backs off, then drains the backlog once PromptLayer answers again). Figures go to
docs/reliability.md through `evidence`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.fault_helpers import Plproxy, all_exported, chat, log_ids_at, metric_value, wait_until

DOWN_SECONDS = 3.0  # PromptLayer's outage ("minutes", scaled down)
STALL_SECONDS = 10.0  # PromptLayer holding every request, as the issue puts it
CALL_EVERY = 0.05  # a steady 20 calls a second during the faults
LATENCY_BOUND = 1.0  # no call waits on PromptLayer: each is answered well within this
HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>502 Bad Gateway</h1><p>cloudflare</p></body></html>"
)


async def steady_calls(
    session: aiohttp.ClientSession, proxy: Plproxy, canary: Canary, seconds: float
) -> tuple[list[str], list[float]]:
    """Calls at a steady rate for `seconds`: their log ids and latencies; every one must succeed."""
    log_ids: list[str] = []
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        status, log_id, _ = await chat(session, proxy, canary)
        latencies.append(time.monotonic() - started)
        assert status == 200
        assert log_id is not None
        log_ids.append(log_id)
        await asyncio.sleep(max(0.0, CALL_EVERY - (time.monotonic() - started)))
    return log_ids, latencies


def record_fault(evidence: Evidence, name: str, calls: int, seen: dict[str, int], **extra: Any) -> None:
    duplicates = sum(n - 1 for n in seen.values())
    evidence.figure(
        "faults",
        name,
        {"calls": calls, "records_lost": calls - len(seen), "duplicates": duplicates, **extra},
    )


async def test_promptlayer_down_for_a_while(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    proxy = await run_plproxy(fake_openai, promptlayer)
    await promptlayer.stop()  # connection refused from now on
    async with aiohttp.ClientSession() as session:
        log_ids, latencies = await steady_calls(session, proxy, canary, DOWN_SECONDS)
        status, _ = await proxy.get("/readyz")
        assert status == 200  # PromptLayer's outage is not plproxy's: it stays ready and keeps records
        metrics = await proxy.metrics()
        assert metric_value(metrics, "plproxy_export_retries_total") > 0
        assert metric_value(metrics, "plproxy_promptlayer_responses_total", status="error") > 0
        assert metric_value(metrics, "plproxy_records_total", outcome="stored") == len(log_ids)
        back = time.monotonic()
        await promptlayer.start()  # the same port
        seen = await all_exported(promptlayer, log_ids, timeout=30)
        drained = time.monotonic() - back
    assert max(latencies) < LATENCY_BOUND
    assert set(seen.values()) == {1}  # nothing was accepted while it was down: no duplicate
    assert len(proxy.events_named("promptlayer_unavailable")) == 1  # one warning per outage
    await wait_until(lambda: proxy.events_named("promptlayer_available"), 5, "the all-clear in the log")
    record_fault(
        evidence,
        f"PromptLayer down {DOWN_SECONDS:g} s",
        len(log_ids),
        seen,
        max_call_latency_ms=round(max(latencies) * 1000),
        drained_after_recovery_s=round(drained, 2),
    )


async def test_promptlayer_500_storm(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    storm = 60
    promptlayer.fail_next(500, storm)
    proxy = await run_plproxy(fake_openai, promptlayer)
    async with aiohttp.ClientSession() as session:
        log_ids, latencies = await steady_calls(session, proxy, canary, 1.5)
        seen = await all_exported(promptlayer, log_ids, timeout=30)
    answered_500 = sum(1 for r in promptlayer.received if r.status == 500)
    assert answered_500 == storm
    assert set(seen.values()) == {1}
    assert max(latencies) < LATENCY_BOUND
    assert metric_value(await proxy.metrics(), "plproxy_promptlayer_responses_total", status="500") == storm
    record_fault(evidence, f"PromptLayer 500 storm ({storm} answers)", len(log_ids), seen)


async def test_promptlayer_429_retry_after_pauses_every_export(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    retry_after = 2.0
    proxy = await run_plproxy(fake_openai, promptlayer)
    promptlayer.rate_limit(1, retry_after=retry_after)
    async with aiohttp.ClientSession() as session:
        _, first, _ = await chat(session, proxy, canary)
        limited = await wait_until(
            lambda: next((r for r in promptlayer.received if r.status == 429), None), 5, "the 429"
        )
        await asyncio.sleep(0.3)
        later, _ = await steady_calls(session, proxy, canary, 0.5)  # made during the pause
        assert first is not None
        log_ids = [first, *later]
        seen = await all_exported(promptlayer, log_ids, timeout=15)
    after = [r for r in promptlayer.received if r.at > limited.at]
    assert after, "nothing was sent after the 429"
    waited = min(r.at for r in after) - limited.at
    assert waited >= retry_after - 0.1  # nothing at all was sent during the pause: not even new records
    assert set(seen.values()) == {1}
    record_fault(
        evidence,
        f"PromptLayer 429, Retry-After {retry_after:g} s",
        len(log_ids),
        seen,
        paused_s=round(waited, 2),
    )


async def test_promptlayer_stalling_holds_no_call(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    concurrency = 4
    proxy = await run_plproxy(fake_openai, promptlayer, PLPROXY_EXPORT_CONCURRENCY=str(concurrency))
    promptlayer.stall_until_released()
    async with aiohttp.ClientSession() as session:
        log_ids, latencies = await steady_calls(session, proxy, canary, STALL_SECONDS)
        held = promptlayer.held
        promptlayer.release()
        seen = await all_exported(promptlayer, log_ids, timeout=30)
    assert held == concurrency  # exports in flight are bounded; the rest wait in the store
    assert max(latencies) < LATENCY_BOUND
    assert set(seen.values()) == {1}
    record_fault(
        evidence,
        f"PromptLayer stalling {STALL_SECONDS:g} s",
        len(log_ids),
        seen,
        max_call_latency_ms=round(max(latencies) * 1000),
    )


async def test_promptlayer_resetting_connections_mid_answer(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    """A reset before PromptLayer took the body costs a retry; one after it did costs a duplicate — the
    at-least-once contract. The duplicates are counted: exactly the resets after acceptance."""
    before, after = 3, 3
    promptlayer.reset_next(before)
    promptlayer.reset_next(after, after_accept=True)
    proxy = await run_plproxy(fake_openai, promptlayer)
    async with aiohttp.ClientSession() as session:
        log_ids = []
        for _ in range(before + after + 4):
            status, log_id, _ = await chat(session, proxy, canary)
            assert status == 200
            assert log_id is not None
            log_ids.append(log_id)
        seen = await all_exported(promptlayer, log_ids, timeout=20)
        await wait_until(lambda: sum(log_ids_at(promptlayer).values()) >= len(log_ids) + after, 10, "retries")
    seen = log_ids_at(promptlayer)
    assert sum(1 for r in promptlayer.received if r.reset) == before + after
    assert sum(n - 1 for n in seen.values()) == after
    record_fault(
        evidence, f"PromptLayer resetting {before + after} connections mid-answer", len(log_ids), seen
    )


async def test_promptlayer_answering_html_pages(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    """An HTML error page (a CDN in front of PromptLayer) is retried, whatever its status says: a 502 page,
    and a captive portal's 200 page, which names no id."""
    promptlayer.fail_next(502, 3, body=HTML_PAGE)
    promptlayer.fail_next(200, 3, body=HTML_PAGE)
    promptlayer.stall_until_released()
    proxy = await run_plproxy(fake_openai, promptlayer)
    async with aiohttp.ClientSession() as session:
        log_ids, _ = await steady_calls(session, proxy, canary, 0.3)
        promptlayer.release()
        seen = await all_exported(promptlayer, log_ids, timeout=20)
        async with session.get(f"{proxy.url}/plproxy/logs/{log_ids[0]}") as response:
            state = await response.json()
    assert state["state"] == "exported"
    assert set(seen.values()) == {1}
    errors = [e for e in proxy.events_named("export_retry") if "PromptLayer answered" in e.get("error", "")]
    assert any("502" in e["error"] for e in errors)
    assert any("200 but not JSON" in e["error"] for e in errors)
    record_fault(evidence, "PromptLayer answering HTML pages (502 and 200)", len(log_ids), seen)
