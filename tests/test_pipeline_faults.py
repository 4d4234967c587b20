"""No call goes unrecorded, whatever fails: the upstream (errors, unreachable, silent, cut), the client
(leaves mid-stream), PromptLayer (down, rate-limiting, erroring) or plproxy itself (SIGKILL, SIGTERM).

Real servers on loopback; plproxy in-process, or as a real `plproxy serve` subprocess for the crash tests.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from plproxy.store import Store
from tests.fakes.openai_upstream import ERRORS, FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import chat_text, client, eventually, record_for, sse_events
from tests.proxy_fixtures import ProxyProcess, RunningProxy, StartProxy, free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi to Ada"}]}


async def post_chat(http: aiohttp.ClientSession, base_url: str, **overrides: Any) -> tuple[int, str, bytes]:
    async with http.post(
        f"{base_url}/chat/completions", data=orjson.dumps({**CHAT, **overrides})
    ) as response:
        return response.status, response.headers["X-PL-Log-Id"], await response.read()


# --- 4. upstream failures are recorded as what they were ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error_type", "exception"),
    [
        ("fake-error-429", "PROVIDER_RATE_LIMIT", openai.RateLimitError),
        ("fake-error-401", "PROVIDER_AUTH_ERROR", openai.AuthenticationError),
        ("fake-error-500", "PROVIDER_ERROR", openai.InternalServerError),
        ("fake-error-400", "PROVIDER_ERROR", openai.BadRequestError),
    ],
)
async def test_upstream_error_is_recorded(
    proxy: RunningProxy,
    promptlayer: PromptLayerStandIn,
    model: str,
    error_type: str,
    exception: type[Exception],
) -> None:
    openai_client = client(proxy.base_url)
    with pytest.raises(exception) as raised:
        await openai_client.chat.completions.create(**{**CHAT, "model": model, "temperature": 0})
    await openai_client.close()
    log_id = raised.value.response.headers["X-PL-Log-Id"]  # type: ignore[attr-defined]
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "ERROR"
    assert body["error_type"] == error_type
    assert body["error_message"] == ERRORS[int(model[-3:])][0]  # the upstream's own words
    assert body["model"] == model
    assert body["input"]["messages"][0]["content"] == [{"type": "text", "text": "Say hi to Ada"}]
    assert body["output"] == {"type": "chat", "messages": []}
    assert body["parameters"] == {"temperature": 0}


async def test_upstream_error_on_a_streamed_call_is_recorded(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    status, log_id, answer = await post_chat(http, proxy.base_url, model="fake-error-429", stream=True)
    assert status == 429
    body = await record_for(promptlayer, log_id)
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_RATE_LIMIT")
    assert body["error_message"] == orjson.loads(answer)["error"]["message"]


async def test_upstream_unreachable_is_recorded(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PLPROXY_UPSTREAM=f"http://127.0.0.1:{free_port()}/v1")
    status, log_id, answer = await post_chat(http, proxy.base_url)
    assert status == 502
    assert orjson.loads(answer)["error"]["code"] == "upstream_unreachable"
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "ERROR"
    assert body["error_type"] == "PROVIDER_ERROR"
    assert "could not be reached" in body["error_message"]
    assert body["model"] == "gpt-4o-mini"


async def test_upstream_timeout_is_recorded(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PLPROXY_READ_TIMEOUT="0.3")
    started = time.monotonic()
    status, log_id, answer = await post_chat(http, proxy.base_url, model="fake-hang")
    assert status == 504
    assert time.monotonic() - started < 3
    assert orjson.loads(answer)["error"]["code"] == "upstream_timeout"
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "ERROR"
    assert body["error_type"] == "PROVIDER_TIMEOUT"
    assert body["model"] == "fake-hang"


async def read_events_until_error(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        return received, True
    return received, False


def delta_text(events: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event["choices"]
    )


@pytest.mark.parametrize("stream_usage", ["inject", "off"])
async def test_stream_cut_by_the_upstream_is_partial(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession, stream_usage: str
) -> None:
    proxy = await start_proxy(PLPROXY_STREAM_USAGE=stream_usage)
    async with http.post(
        f"{proxy.base_url}/chat/completions", json={**CHAT, "model": "fake-cut", "stream": True}
    ) as r:
        assert r.status == 200
        log_id = r.headers["X-PL-Log-Id"]
        received, _ = await read_events_until_error(r)
    events = sse_events(received)
    assert "[DONE]" not in events
    text = delta_text(events)
    assert text == "echo: Say"  # the two chunks sent before the cut
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "WARNING"
    assert body["error_type"] == "PROVIDER_PARTIAL_RESPONSE"
    assert chat_text(body) == text
    assert "cut" in body["error_message"] or "ended" in body["error_message"]


async def test_client_leaving_mid_stream_is_partial(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, fake_openai: FakeOpenAI
) -> None:
    fake_openai.chunk_delay = 0.02
    received = b""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.base_url}/chat/completions",
            json={**CHAT, "model": "fake-many-chunks-400", "stream": True},
        )
        log_id = response.headers["X-PL-Log-Id"]
        while received.count(b"\n\n") < 5:
            received += await response.content.readany()
        response.close()  # the client goes away
    got = delta_text(sse_events(received[: received.rindex(b"\n\n") + 2]))
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "WARNING"
    assert body["error_type"] == "PROVIDER_PARTIAL_RESPONSE"
    assert body["error_message"] == "the client left before the response ended"
    recorded = chat_text(body)
    assert recorded.startswith(got)
    # what the client was sent, at most: the proxy stops reading the upstream once the client is gone
    assert len(recorded.split()) < 100
    assert fake_openai.streams[-1].client_gone


async def test_client_giving_up_before_the_answer_is_not_a_success(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn
) -> None:
    # the client's own timeout on a hung upstream: nobody received an answer, so it is no success
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await impatient.post(f"{proxy.base_url}/chat/completions", json={**CHAT, "model": "fake-hang"})
    [body] = await promptlayer.wait_for_log_requests(1, timeout=15)
    assert body["status"] == "WARNING"
    assert body["error_type"] == "PROVIDER_PARTIAL_RESPONSE"
    assert body["error_message"] == "the client left before the upstream answered"
    assert body["output"] == {"type": "chat", "messages": []}
    assert body["model"] == "fake-hang"


async def test_upstream_silent_mid_stream_is_partial(
    start_proxy: StartProxy,
    promptlayer: PromptLayerStandIn,
    fake_openai: FakeOpenAI,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await start_proxy(PLPROXY_READ_TIMEOUT="0.3")
    fake_openai.chunk_delay = 1.0
    async with http.post(
        f"{proxy.base_url}/chat/completions", json={**CHAT, "model": "fake-many-chunks-3", "stream": True}
    ) as response:
        log_id = response.headers["X-PL-Log-Id"]
        received, _ = await read_events_until_error(response)
    text = delta_text(sse_events(received))
    assert text == "t0"
    body = await record_for(promptlayer, log_id)
    assert body["status"] == "WARNING"
    assert body["error_type"] == "PROVIDER_PARTIAL_RESPONSE"
    assert chat_text(body) == text


# --- 5. PromptLayer down, rate-limiting, erroring: every record still arrives, exactly once -----------


async def timed_calls(
    http: aiohttp.ClientSession, base_url: str, n: int, tag: str
) -> tuple[list[str], list[float]]:
    log_ids, latencies = [], []
    body = orjson.dumps({**CHAT, "temperature": 0.1})
    for _ in range(n):
        started = time.perf_counter()
        async with http.post(
            f"{base_url}/chat/completions", data=body, headers={"X-PL-Tags": tag}
        ) as response:
            await response.read()
        latencies.append(time.perf_counter() - started)
        assert response.status == 200
        log_ids.append(response.headers["X-PL-Log-Id"])
    return log_ids, latencies


def assert_each_once(promptlayer: PromptLayerStandIn, log_ids: list[str]) -> None:
    seen = Counter(body["metadata"]["plproxy_log_id"] for body in promptlayer.log_requests)
    assert {log_id: seen[log_id] for log_id in log_ids} == dict.fromkeys(log_ids, 1)


async def test_promptlayer_down_costs_no_record_and_no_latency(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    await timed_calls(http, proxy.base_url, 20, "warm-up")
    await promptlayer.wait_for_log_requests(20, timeout=15)

    up_ids, up_latencies = await timed_calls(http, proxy.base_url, 200, "up")
    await promptlayer.wait_for_log_requests(220, timeout=15)  # all exported before PromptLayer goes away

    await promptlayer.stop()
    down_ids, down_latencies = await timed_calls(http, proxy.base_url, 200, "down")
    assert len(promptlayer.log_requests) == 220
    await promptlayer.start()

    started = time.monotonic()
    await promptlayer.wait_for_log_requests(420, timeout=20)
    recovery = time.monotonic() - started
    assert_each_once(promptlayer, up_ids + down_ids)
    assert len(promptlayer.log_requests) == 420

    up, down = statistics.median(up_latencies), statistics.median(down_latencies)
    assert down <= 1.5 * up + 0.005, (
        f"median latency {down * 1000:.2f} ms while down, {up * 1000:.2f} ms while up"
    )
    print(f"median up {up * 1000:.2f} ms, down {down * 1000:.2f} ms, recovery {recovery:.2f} s")


async def test_the_backlog_goes_out_as_soon_as_promptlayer_is_back(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    await promptlayer.stop()
    log_ids, _ = await timed_calls(http, proxy.base_url, 100, "outage")
    # a few seconds of outage: every record has failed several times and its backoff has grown
    await eventually(lambda: proxy.store.backlog() == 100, what="all pending")
    await asyncio.sleep(4.0)
    await promptlayer.start()
    started = time.monotonic()
    await promptlayer.wait_for_log_requests(100, timeout=20)
    recovery = time.monotonic() - started
    assert_each_once(promptlayer, log_ids)
    # not spread over the records' backoffs (up to 8 s here, 60 s after a long outage)
    assert recovery < 2.0, f"the backlog took {recovery:.2f} s to go out after PromptLayer came back"


async def test_rate_limited_promptlayer_gets_every_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    promptlayer.rate_limit(count=5, retry_after=1)
    log_ids, _ = await timed_calls(http, proxy.base_url, 30, "rate-limited")
    await promptlayer.wait_for_log_requests(30, timeout=15)
    assert_each_once(promptlayer, log_ids)
    statuses = Counter(r.status for r in promptlayer.received)
    assert statuses[429] == 5


async def test_promptlayer_500_storm_gets_every_record(
    proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    promptlayer.fail_next(500, count=60)
    promptlayer.fail_next(502, count=5, body="<html><body>Bad gateway</body></html>")
    log_ids, _ = await timed_calls(http, proxy.base_url, 30, "storm")
    await promptlayer.wait_for_log_requests(30, timeout=15)
    assert_each_once(promptlayer, log_ids)
    assert Counter(r.status for r in promptlayer.received)[500] == 60


# --- 6. plproxy itself killed or stopped ----------------------------------------------------------------


def serve_env(fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn, data_dir: Path) -> dict[str, str]:
    return {
        "PLPROXY_UPSTREAM": fake_openai.base_url,
        "PLPROXY_DATA_DIR": str(data_dir),
        "PROMPTLAYER_BASE_URL": promptlayer.base_url,
        "PROMPTLAYER_API_KEY": "pl_test_key",
        "PLPROXY_FLUSH_TIMEOUT": "0.5",
        "PLPROXY_DRAIN_TIMEOUT": "2",
    }


async def spawn(spawn_proxy: Any, env: dict[str, str], port: int | None = None) -> ProxyProcess:
    return await asyncio.to_thread(spawn_proxy, env, port=port)


async def calls_through(http: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    async def one(i: int) -> str:
        status, log_id, _ = await post_chat(
            http, f"{url}/v1", messages=[{"role": "user", "content": f"call {i}"}]
        )
        assert status == 200
        return log_id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def store_counts(data_dir: Path) -> dict[str, int]:
    store = Store(data_dir, has_default_key=True)
    try:
        return store.counts()
    finally:
        store.close()


async def test_sigkill_after_the_calls_loses_no_record(
    spawn_proxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    env = serve_env(fake_openai, promptlayer, tmp_path / "data")
    promptlayer.stall_until_released()  # what the exporter sends now is in flight when plproxy dies
    first = await spawn(spawn_proxy, env)
    log_ids = await calls_through(http, first.url, 30)
    await asyncio.sleep(0.2)  # the group commit
    await eventually(lambda: promptlayer.held > 0, what="exports in flight")
    first.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.process.wait, 10)
    # what was in flight never reaches PromptLayer: its connections died with the process
    promptlayer.reset_next(promptlayer.held)
    promptlayer.release()
    await eventually(lambda: promptlayer.held == 0, what="held requests dropped")
    assert promptlayer.log_requests == []

    second = await spawn(spawn_proxy, env)
    await promptlayer.wait_for_log_requests(30, timeout=15)
    arrived = {body["metadata"]["plproxy_log_id"] for body in promptlayer.log_requests}
    assert arrived == set(log_ids)
    second.stop()


async def test_sigterm_with_promptlayer_down_keeps_records_for_the_next_start(
    spawn_proxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = serve_env(fake_openai, promptlayer, data_dir)
    await promptlayer.stop()  # down: connection refused
    first = await spawn(spawn_proxy, env)
    log_ids = await calls_through(http, first.url, 25)
    started = time.monotonic()
    assert await asyncio.to_thread(first.stop, 15) == 0
    assert time.monotonic() - started < 8
    assert store_counts(data_dir)["pending"] == 25

    await promptlayer.start()
    second = await spawn(spawn_proxy, env)
    await promptlayer.wait_for_log_requests(25, timeout=15)
    assert_each_once(promptlayer, log_ids)
    assert await asyncio.to_thread(second.stop, 15) == 0
    assert store_counts(data_dir) == {"pending": 0, "kept": 0, "exported": 25, "failed": 0}
