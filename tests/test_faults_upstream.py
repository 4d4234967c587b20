"""The upstream and the client misbehaving, seen from a real `plproxy serve`: refused connections, silence
before headers, a reset mid-stream, malformed SSE, a 200 MiB answer sent slowly, a client that leaves
mid-upload or mid-stream. Every call gets an answer that says what happened (or the cut is passed on),
every call is recorded as what it was, memory stays bounded, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from plproxy.capture import MAX_RECORDED_BODY_BYTES
from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import JUNK_JSON, JUNK_SSE, FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.fault_helpers import CHAT, Plproxy, RssSampler, chat, raw_request, wait_until
from tests.pipeline_helpers import chat_text, record_for, sse_events
from tests.proxy_fixtures import free_port

LARGE_MIB = 200
RECORDED_MIB = MAX_RECORDED_BODY_BYTES / 2**20
# While relaying, the proxy holds at most the recorded copy (MAX_RECORDED_BODY_BYTES) and its buffers;
# afterwards that copy becomes a record, encoded, stored and sent: a few copies of it, never of the answer.
RELAY_BOUND_MB = RECORDED_MIB + 32
RECORD_BOUND_MB = 6 * RECORDED_MIB + 32


async def healthy(proxy: Plproxy) -> None:
    status, body = await proxy.get("/healthz")
    assert status == 200
    assert orjson.loads(body)["pid"] == proxy.pid  # the same worker, still serving


def openai_error(body: bytes, code: str) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert isinstance(error["message"], str)
    assert error["code"] == code
    return error  # type: ignore[no-any-return]


def fault(evidence: Evidence, name: str, **figures: Any) -> None:
    evidence.figure("faults", name, {"records_lost": 0, **figures})


async def read_all(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body as far as it came, and whether the client could tell it was cut."""
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        return received, True
    return received, False


async def test_upstream_refusing_connections(
    run_plproxy: Any, promptlayer: PromptLayerStandIn, canary: Canary, evidence: Evidence
) -> None:
    proxy = await run_plproxy(f"http://127.0.0.1:{free_port()}/v1", promptlayer)
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, {**CHAT, "stream": True}):
            started = time.monotonic()
            status, log_id, answer = await chat(session, proxy, canary, body)
            assert status == 502
            assert time.monotonic() - started < 2
            assert "could not be reached" in openai_error(answer, "upstream_unreachable")["message"]
            assert log_id is not None
            record = await record_for(promptlayer, log_id)
            assert (record["status"], record["error_type"]) == ("ERROR", "PROVIDER_ERROR")
    await healthy(proxy)
    fault(evidence, "upstream refusing connections", calls=2, answer="502 upstream_unreachable")


async def test_upstream_silent_before_headers(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    proxy = await run_plproxy(fake_openai, promptlayer, PLPROXY_READ_TIMEOUT="1")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, log_id, answer = await chat(session, proxy, canary, {**CHAT, "model": "fake-hang"})
        waited = time.monotonic() - started
    assert status == 504
    assert 0.9 < waited < 3
    openai_error(answer, "upstream_timeout")
    assert log_id is not None
    record = await record_for(promptlayer, log_id)
    assert (record["status"], record["error_type"]) == ("ERROR", "PROVIDER_TIMEOUT")
    await healthy(proxy)
    fault(
        evidence, "upstream silent before headers (read timeout 1 s)", calls=1, answer="504 upstream_timeout"
    )


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_upstream_cutting_the_answer_is_passed_on(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
    stream: bool,
) -> None:
    """A cut answer must look cut to the client too: a relay that ended it cleanly would turn half an
    answer into what looks like a whole one."""
    proxy = await run_plproxy(fake_openai, promptlayer)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(
            f"{proxy.base_url}/chat/completions",
            json={**CHAT, "model": "fake-cut", "stream": stream},
            headers=canary.authorization,
        ) as response,
    ):
        assert response.status == 200
        log_id = response.headers["X-PL-Log-Id"]
        received, cut = await read_all(response)
    assert cut, "the client could not tell that the answer was cut"
    record = await record_for(promptlayer, log_id)
    if stream:
        assert "[DONE]" not in sse_events(received)
        assert (record["status"], record["error_type"]) == ("WARNING", "PROVIDER_PARTIAL_RESPONSE")
        assert chat_text(record) == "echo: Say"
    else:
        assert record["status"] in ("WARNING", "ERROR")
    await healthy(proxy)
    fault(evidence, f"upstream resetting mid-answer ({'SSE' if stream else 'JSON'})", calls=1)


@pytest.mark.parametrize("stream_usage", ["inject", "off"])
async def test_malformed_sse_is_relayed_and_what_parses_is_recorded(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
    stream_usage: str,
) -> None:
    proxy = await run_plproxy(fake_openai, promptlayer, PLPROXY_STREAM_USAGE=stream_usage)
    async with aiohttp.ClientSession() as session:
        status, log_id, received = await chat(
            session, proxy, canary, {**CHAT, "model": "fake-junk-sse", "stream": True}
        )
        assert status == 200
        # byte for byte, also when plproxy asked for usage: there is none to strip, so nothing is rewritten
        assert received == b"".join(JUNK_SSE) + b"data: [DONE]\n\n"
        assert log_id is not None
        record = await record_for(promptlayer, log_id)
        assert record["status"] == "SUCCESS"
        assert chat_text(record) == "ok still here"
        status, log_id, received = await chat(session, proxy, canary, {**CHAT, "model": "fake-junk-sse"})
        assert (status, received) == (200, JUNK_JSON)
        assert log_id is not None
        await record_for(promptlayer, log_id)  # recorded, with what could be made of it
    await healthy(proxy)
    fault(evidence, f"upstream sending malformed SSE and JSON (stream usage {stream_usage})", calls=2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_large_answer_sent_slowly_is_relayed_not_buffered(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
    stream: bool,
) -> None:
    fake_openai.chunk_delay = 0.04  # a pause every 4 MiB: about 2 s of pauses over 200 MiB
    proxy = await run_plproxy(fake_openai, promptlayer)
    async with aiohttp.ClientSession() as session:
        status, log_id, _ = await chat(session, proxy, canary)  # warm up: imports, pools, the store
        assert status == 200
        baseline = proxy.rss_mb()
        received = 0
        started = time.monotonic()
        with RssSampler(proxy.pid) as rss:
            async with session.post(
                f"{proxy.base_url}/chat/completions",
                json={**CHAT, "model": f"fake-large-{LARGE_MIB}", "stream": stream},
                headers=canary.authorization,
            ) as response:
                assert response.status == 200
                log_id = response.headers["X-PL-Log-Id"]
                async for chunk in response.content.iter_chunked(1 << 20):
                    received += len(chunk)
            relaying = rss.peak_mb - baseline
            took = time.monotonic() - started
            record = await record_for(promptlayer, log_id, timeout=30)
    assert received > LARGE_MIB * 2**20
    assert relaying < RELAY_BOUND_MB, f"the proxy grew by {relaying:.0f} MiB relaying {LARGE_MIB} MiB"
    growth = rss.peak_mb - baseline
    assert growth < RECORD_BOUND_MB, f"the proxy grew by {growth:.0f} MiB recording it"
    assert len(orjson.dumps(record)) < MAX_RECORDED_BODY_BYTES + 2**20  # the recorded copy is capped
    assert record["metadata"].get("plproxy_response_truncated")  # and says so
    await healthy(proxy)
    fault(
        evidence,
        f"upstream sending {LARGE_MIB} MiB slowly ({'SSE' if stream else 'JSON'})",
        calls=1,
        proxy_rss_growth_relaying_mb=round(relaying),
        proxy_rss_growth_recording_mb=round(growth),
        seconds=round(took, 1),
    )


async def test_client_leaving_mid_upload(
    run_plproxy: Any, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn, evidence: Evidence
) -> None:
    proxy = await run_plproxy(fake_openai, promptlayer)
    before = len(fake_openai.received)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20000000\r\n\r\n"
    )
    for _ in range(5):
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(head + b'{"model": "gpt-4o-mini", "messages": [' + b" " * 2_000_000)
        await writer.drain()
        writer.transport.abort()  # gone, 2 MB into 20
    await asyncio.sleep(0.3)
    assert len(fake_openai.received) == before  # a body that never arrived whole is never forwarded
    await healthy(proxy)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await chat(session, proxy, Canary("sk-unused", "pl_unused"))
        assert status == 200
    fault(evidence, "client leaving mid-upload (5 times)", calls=5, forwarded=0)


async def test_client_leaving_mid_stream(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    fake_openai.chunk_delay = 0.02
    proxy = await run_plproxy(fake_openai, promptlayer)
    answer = await raw_request(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.status == 200
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{proxy.base_url}/chat/completions",
            json={**CHAT, "model": "fake-many-chunks-400", "stream": True},
            headers=canary.authorization,
        )
        log_id = response.headers["X-PL-Log-Id"]
        for _ in range(5):
            await response.content.readline()
        response.close()
    await wait_until(
        lambda: fake_openai.streams and fake_openai.streams[-1].client_gone, 5, "upstream cancelled"
    )
    assert fake_openai.streams[-1].events_sent < 100
    record = await record_for(promptlayer, log_id)
    assert (record["status"], record["error_type"]) == ("WARNING", "PROVIDER_PARTIAL_RESPONSE")
    await healthy(proxy)
    fault(evidence, "client leaving mid-stream", calls=1)
