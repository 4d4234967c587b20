"""/metrics moves as calls happen, and its labels stay bounded (never ids, tags or keys)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from plproxy.metrics import MAX_MODEL_LABELS
from tests.proxy_fixtures import RunningProxy, StartProxy

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def scrape(
    http: aiohttp.ClientSession, proxy: RunningProxy
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{proxy.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbls), v in samples.items()
        if n == name and all(dict(lbls).get(k) == w for k, w in labels.items())
    )


async def test_counters_and_histograms_move_with_calls(
    proxy: RunningProxy, promptlayer: Any, http: aiohttp.ClientSession
) -> None:
    before = await scrape(http, proxy)
    for _ in range(3):
        async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
            assert response.status == 200
    body = {**CHAT, "stream": True}
    async with http.post(f"{proxy.base_url}/chat/completions", json=body) as response:
        await response.read()
    async with http.post(
        f"{proxy.base_url}/chat/completions", json={**CHAT, "model": "fake-error-500"}
    ) as response:
        assert response.status == 500
    await promptlayer.wait_for_log_requests(5, timeout=10)
    await asyncio.to_thread(proxy.store.sync)
    for _ in range(50):
        after = await scrape(http, proxy)
        if value(after, "plproxy_records_total", outcome="exported") >= 5:
            break
        await asyncio.sleep(0.1)
    ok = {"route": "v1", "method": "POST", "status_class": "2xx", "model": "gpt-4o-mini"}
    assert value(after, "plproxy_requests_total", **ok) - value(before, "plproxy_requests_total", **ok) == 4
    assert value(after, "plproxy_requests_total", status_class="5xx", model="fake-error-500") == 1
    assert value(after, "plproxy_request_duration_seconds_count", route="v1") == 5
    assert value(after, "plproxy_upstream_ttfb_seconds_count", route="v1") == 5
    assert value(after, "plproxy_overhead_seconds_count", route="v1") == 5
    assert value(after, "plproxy_tokens_total", direction="in", model="gpt-4o-mini") > 0
    assert value(after, "plproxy_tokens_total", direction="out", model="gpt-4o-mini") > 0
    assert value(after, "plproxy_streams_in_flight") == 0
    assert value(after, "plproxy_records_total", outcome="exported") == 5
    assert value(after, "plproxy_promptlayer_responses_total", status="201") == 5
    assert value(after, "plproxy_export_latency_seconds_count") == 5
    assert value(after, "plproxy_store_writable") == 1


async def test_backlog_and_retries_show_a_promptlayer_outage(
    start_proxy: StartProxy, promptlayer: Any, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PLPROXY_FLUSH_TIMEOUT="0.2")
    promptlayer.fail_next(503, count=1000)
    for _ in range(4):
        async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
            assert response.status == 200
    for _ in range(100):
        samples = await scrape(http, proxy)
        if value(samples, "plproxy_export_retries_total") >= 1:
            break
        await asyncio.sleep(0.1)
    assert value(samples, "plproxy_export_retries_total") >= 1
    assert value(samples, "plproxy_promptlayer_responses_total", status="503") >= 1
    backlog = await asyncio.to_thread(proxy.store.backlog)  # also refreshes the gauge
    assert backlog == 4
    assert value(await scrape(http, proxy), "plproxy_store_backlog") == 4


async def test_labels_stay_bounded(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    headers = {"X-PL-Tags": "tag-canary-7", "X-PL-Api-Key": "pl_key_canary_7"}
    log_ids = []
    for index in range(MAX_MODEL_LABELS + 20):
        body = {**CHAT, "model": f"client-chosen-{index}"}
        async with http.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers) as response:
            log_ids.append(response.headers["X-PL-Log-Id"])
    async with http.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    samples = await scrape(http, proxy)
    models = {dict(labels).get("model") for (name, labels) in samples if name == "plproxy_requests_total"}
    assert len(models) <= MAX_MODEL_LABELS + 1
    assert "other" in models
    for secret in ("tag-canary-7", "pl_key_canary_7", *log_ids):
        assert secret not in text
