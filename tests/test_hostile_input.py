"""Hostile input against a real `plproxy serve`: bodies that are not JSON, nested 100,000 deep, huge or
not UTF-8, 100 MB uploads, header floods, CR/LF and control characters in `X-PL-*` values, 10,000 tags,
path traversal, absolute-URI targets, `Host` spoofing.

Each gets a clear answer in the OpenAI error shape, or is proxied (with `X-PL-Warning` when a header was
ignored) and recorded. After each, the same worker still answers `/healthz`, its memory stayed bounded,
and a decoy server on another loopback port — the host a request tried to reach — received nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.fault_helpers import (
    CHAT,
    Plproxy,
    RawAnswer,
    RssSampler,
    is_openai_error,
    log_ids_at,
    parse_answer,
    raw_request,
    wait_until,
)
from tests.pipeline_helpers import record_for


@dataclass
class Target:
    proxy: Plproxy
    upstream: FakeOpenAI
    decoy: FakeOpenAI
    promptlayer: PromptLayerStandIn
    canary: Canary
    evidence: Evidence

    def request(
        self, target: str, headers: list[bytes] = (), body: bytes = b"", method: str = "POST"
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers]
        lines.append(f"Authorization: Bearer {self.canary.provider_key}".encode())
        if body or method == "POST":
            lines += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def send(self, data: bytes, timeout: float = 20.0) -> RawAnswer:
        return await raw_request(self.proxy.port, data, timeout)

    async def survived(self, kind: str) -> None:
        """The worker still serves, and nothing reached the decoy."""
        status, body = await self.proxy.get("/healthz")
        assert status == 200
        assert orjson.loads(body)["pid"] == self.proxy.pid
        assert self.decoy.received == []
        self.evidence.add("hostile input", kind, 1)


@pytest.fixture
async def hostile(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> AsyncIterator[Target]:
    async with FakeOpenAI() as decoy:
        proxy = await run_plproxy(fake_openai, promptlayer)
        target = Target(proxy, fake_openai, decoy, promptlayer, canary, evidence)
        yield target
        assert decoy.received == [], "a request reached the decoy"
        evidence.add("hostile input", "requests that reached another host", len(decoy.received))


def assert_openai_error(answer: RawAnswer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer
    assert is_openai_error(answer), answer.body[:300]
    return answer.json()["error"]  # type: ignore[no-any-return]


async def recorded(target: Target, answer: RawAnswer) -> dict[str, Any]:
    log_id = answer.header("X-PL-Log-Id")
    assert log_id, "the call was not recorded"
    return await record_for(target.promptlayer, log_id, timeout=20)


# --- bodies ----------------------------------------------------------------------------------------


DEEP = 100_000


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"this is not JSON", id="text"),
        pytest.param(b"\x00\x01\x02\xff binary", id="binary"),
        pytest.param(b"[1, 2, 3]", id="array"),
        pytest.param(b'{"model": "gpt-4o-mini", "messages": [', id="cut"),
        pytest.param(
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}', id="utf8"
        ),
        pytest.param(b"[" * DEEP + b"]" * DEEP, id="nested-arrays-100k"),
        pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, id="nested-objects-100k"),
        pytest.param(
            json.dumps({**CHAT, "response_format": json.loads('{"a":' * 300 + "1" + "}" * 300)}).encode(),
            id="nested-300-in-a-parameter",
        ),
    ],
)
async def test_bodies_that_are_not_what_they_claim_are_proxied_and_recorded(
    hostile: Target, body: bytes
) -> None:
    answer = await hostile.send(hostile.request("/v1/chat/completions", body=body))
    assert answer.status in (200, 400, 500)  # the upstream's own verdict, passed through
    record = await recorded(hostile, answer)
    assert record["status"] in ("SUCCESS", "ERROR")
    await hostile.survived("malformed or deeply nested bodies")


async def test_a_huge_json_body_is_proxied_recorded_and_memory_stays_bounded(hostile: Target) -> None:
    """24 MiB in one string (a base64 image, say), plain and streamed (re-encoded for usage injection):
    each call costs a bounded multiple of its body while its record is built, stored and sent, and calls
    after the first add nothing: memory plateaus instead of growing with every call."""
    size = 24 * 2**20
    content = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "A" * size}}]
    before = hostile.proxy.rss_mb()
    peaks = []
    with RssSampler(hostile.proxy.pid) as rss:
        for stream in (False, True, False, True, False, True):
            body = orjson.dumps(
                {**CHAT, "messages": [{"role": "user", "content": content}], "stream": stream}
            )
            answer = await hostile.send(hostile.request("/v1/chat/completions", body=body))
            assert answer.status == 200
            record = await recorded(hostile, answer)
            assert record["status"] == "SUCCESS"
            peaks.append(rss.peak_mb - before)
    first, last = peaks[1], peaks[-1]  # after one call of each kind, and after six
    mib = size / 2**20
    assert first < 10 * mib, f"{first:.0f} MiB for a {mib:.0f} MiB body"
    assert last - first < 2 * mib, f"memory kept growing: {[round(p) for p in peaks]}"
    hostile.evidence.figure("memory", "24 MiB JSON body, first plain and streamed calls", round(first))
    hostile.evidence.figure("memory", "24 MiB JSON body, after 6 calls", round(last))
    await hostile.survived("huge JSON bodies")


async def upload(port: int, head: bytes, pieces: int, piece: bytes) -> tuple[RawAnswer, int]:
    """Send `head`, then `pieces` pieces while reading: the answer, and how much was sent when it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    sent = 0
    answered_at: int | None = None

    async def read() -> None:
        nonlocal raw, answered_at
        while chunk := await reader.read(65536):
            raw += chunk
            if answered_at is None and b"\r\n\r\n" in raw:
                answered_at = sent

    reading = asyncio.create_task(read())
    try:
        writer.write(head)
        for _ in range(pieces):
            if reading.done():
                break
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 20)
            sent += len(piece)
    except (ConnectionError, TimeoutError):
        pass
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(reading, 20)
    return parse_answer(raw), sent if answered_at is None else answered_at


async def test_a_100_mb_body_is_refused_before_it_is_read(hostile: Target) -> None:
    mib = 2**20
    request = hostile.request("/v1/chat/completions", body=b"")
    before = hostile.proxy.rss_mb()
    started = time.monotonic()
    with RssSampler(hostile.proxy.pid) as rss:
        head = request.replace(b"Content-Length: 0", f"Content-Length: {100 * mib}".encode())
        answer, sent = await upload(hostile.proxy.port, head, 100, b" " * mib)
    error = assert_openai_error(answer, 413)
    assert error["code"] == "request_too_large"
    assert sent < 8 * mib, f"{sent / mib:.0f} MiB were sent before the 413"
    assert time.monotonic() - started < 10
    growth_declared = rss.peak_mb - before
    assert growth_declared < 16

    # chunked, with no length to judge by: read up to the limit, never buffered beyond it
    with RssSampler(hostile.proxy.pid) as rss:
        head = request.replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        answer, sent = await upload(hostile.proxy.port, head, 100, b"100000\r\n" + b" " * mib + b"\r\n")
    assert_openai_error(answer, 413)
    # how much a client pushes into socket buffers before it reads the 413 depends on the machine's
    # load; what matters is that plproxy stops reading at its limit and holds no more (RSS below)
    assert sent < 90 * mib
    growth = rss.peak_mb - before
    assert growth < 32 + 32, f"{growth:.0f} MiB"  # the 32 MiB limit and buffers, not 100 MiB
    hostile.evidence.figure("memory", "100 MB upload with Content-Length", round(growth_declared))
    hostile.evidence.figure("memory", "100 MB chunked upload", round(growth))
    assert len(hostile.upstream.received) == 0
    await hostile.survived("100 MB bodies")


# --- headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([f"X-Flood-{i}: {i}".encode() for i in range(500)], id="500-headers"),
        pytest.param([b"X-Big: " + b"a" * 20_000], id="one-20kB-header"),
        pytest.param([b"X-PL-Tags: " + b"t" * 2**20], id="1MB-tag-header"),
        pytest.param(
            [b"X-PL-Tags: " + b",".join(b"t%d" % i for i in range(10_000))], id="10k-tags-one-header"
        ),
        pytest.param([b"X-PL-Tags: a\rb"], id="bare-CR-in-X-PL-value"),
        pytest.param([b"X-PL-Tags: a\nX-Injected: yes"], id="bare-LF-in-X-PL-value"),
        pytest.param([b"X-PL-Metadata: {}\r\n folded"], id="obs-fold-X-PL-value"),
        pytest.param([b"X-PL-Api-Key: pl_a\x01b"], id="control-char-in-api-key"),
        pytest.param([b"X-PL-Api-Key: pl_a\x7fb"], id="DEL-in-api-key"),
        pytest.param([b"X-PL-Api-Key: pl_a\x00b"], id="NUL-in-api-key"),
    ],
)
async def test_requests_the_http_parser_refuses_get_an_openai_shaped_400(
    hostile: Target, headers: list[bytes]
) -> None:
    answer = await hostile.send(hostile.request("/v1/chat/completions", headers, orjson.dumps(CHAT)))
    error = assert_openai_error(answer, 400)
    assert b"pl_a" not in answer.body
    assert b"X-PL" not in answer.body
    assert error["type"] == "invalid_request_error"
    assert hostile.upstream.received == []
    await hostile.survived("header floods and malformed header lines")


async def test_a_malformed_credential_line_is_neither_echoed_nor_logged(hostile: Target) -> None:
    """The line the parser refuses is an `Authorization` holding the canary key: aiohttp would quote it."""
    key = hostile.canary.provider_key.encode()
    raw = hostile.request("/v1/chat/completions", body=orjson.dumps(CHAT))
    raw = raw.replace(b"Authorization: Bearer " + key, b"Authorization: Bearer " + key + b"\x7f")
    answer = await hostile.send(raw)
    assert_openai_error(answer, 400)
    assert key not in answer.body
    await asyncio.sleep(0.2)  # the log line is written
    assert hostile.canary.provider_key not in hostile.proxy.log_text()
    assert hostile.proxy.events_named("request_refused")
    await hostile.survived("malformed credential lines")


async def test_10000_tags_over_many_headers_are_capped_with_a_warning(hostile: Target) -> None:
    headers = [b"X-PL-Tags: " + b",".join(b"tag%d" % (i * 100 + j) for j in range(100)) for i in range(100)]
    answer = await hostile.send(hostile.request("/v1/chat/completions", headers, orjson.dumps(CHAT)))
    assert answer.status == 200
    warnings = answer.headers_named("X-PL-Warning")
    assert any("more than 100 tags" in w for w in warnings)
    record = await recorded(hostile, answer)
    assert len(record["tags"]) == 100
    assert not any(k.lower().startswith("x-pl-") for k in hostile.upstream.received[-1].headers)
    await hostile.survived("10,000 tags")


@pytest.mark.parametrize(
    ("header", "warned"),
    [
        pytest.param(b"X-PL-Api-Key: pl_a\tb", "X-PL-Api-Key", id="tab-in-api-key"),
        pytest.param("X-PL-Api-Key: pl_clé".encode(), "X-PL-Api-Key", id="non-ascii-api-key"),
        pytest.param(b"X-PL-Tags: ok, a\xff\xfeb", "X-PL-Tags", id="invalid-utf8-tags"),
        pytest.param(b'X-PL-Metadata: {"k": "\xff"}', "X-PL-Metadata", id="invalid-utf8-metadata"),
        pytest.param(b"X-PL-Prompt-Name: n\xffame", "X-PL-Prompt-Name", id="invalid-utf8-prompt-name"),
        pytest.param(b'X-PL-Metadata: {"k": "a\\r\\nX-Evil: 1"}', None, id="escaped-CRLF-in-metadata"),
        pytest.param(b"X-Custom: caf\xe9 \xff", None, id="invalid-utf8-other-header"),
    ],
)
async def test_odd_header_values_are_proxied_recorded_and_warned_about(
    hostile: Target, header: bytes, warned: str | None
) -> None:
    answer = await hostile.send(hostile.request("/v1/chat/completions", [header], orjson.dumps(CHAT)))
    assert answer.status == 200, answer.body[:300]
    warnings = answer.headers_named("X-PL-Warning")
    if warned is None:
        assert warnings == []
    else:
        assert any(w.startswith(warned) for w in warnings), warnings
    for warning in warnings:
        assert "\r" not in warning
        assert "\n" not in warning
        assert "pl_a" not in warning
        assert "clé" not in warning
    arrived = hostile.upstream.received[-1]
    assert not any(k.lower().startswith("x-pl-") for k in arrived.headers)
    assert "X-Evil" not in arrived.headers
    record = await recorded(hostile, answer)
    assert record["status"] == "SUCCESS"
    if b"api-key" in header.lower():  # the default key was used, not the malformed one
        keys = [r.headers.get("X-API-KEY") for r in hostile.promptlayer.received]
        assert set(keys) == {hostile.canary.promptlayer_key}
    await hostile.survived("odd X-PL-* and other header values")


# --- targets and hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "expected"),
    [
        ("/v1/../../etc/passwd", "GET", 400),
        ("/v1/%2e%2e/%2e%2e/etc/passwd", "GET", 400),
        ("/v1/%2E%2e/x", "GET", 400),
        ("/v1/..%2f..%2fetc/passwd", "GET", 200),  # %2F stays encoded: one odd segment under /v1/
        ("/../v1/models", "GET", 404),
        ("//127.0.0.1:{decoy}/v1/models", "GET", 404),
        ("http://127.0.0.1:{decoy}/v1/models", "GET", 200),  # absolute form: only its path counts
        ("http://user:pass@127.0.0.1:{decoy}/v1/models", "GET", 200),
        ("https://127.0.0.1:{decoy}", "GET", 404),
        ("127.0.0.1:{decoy}", "CONNECT", 404),
        ("*", "OPTIONS", 404),
        ("/v1/models?next=http://127.0.0.1:{decoy}/v1/models", "GET", 200),
        ("/v1/models#http://127.0.0.1:{decoy}", "GET", 200),
    ],
)
async def test_targets_never_reach_another_host(
    hostile: Target, target: str, method: str, expected: int
) -> None:
    target = target.format(decoy=hostile.decoy.port)
    answer = await hostile.send(hostile.request(target, method=method))
    assert answer.status == expected, answer.body[:300]
    if expected >= 400:
        assert_openai_error(answer, expected)
    for arrived in hostile.upstream.received:  # as sent on the wire: %2F is data, not a separator
        assert arrived.raw_path.startswith("/v1/")
        assert ".." not in arrived.raw_path.split("/")
    await hostile.survived("path traversal and absolute-URI targets")


@pytest.mark.parametrize(
    "headers",
    [
        [b"Host: 127.0.0.1:{decoy}"],
        [b"X-Forwarded-Host: 127.0.0.1:{decoy}", b"Forwarded: host=127.0.0.1:{decoy}"],
        [b"X-Original-URL: http://127.0.0.1:{decoy}/v1/models", b"X-Rewrite-URL: /v2"],
    ],
    ids=["host", "forwarded-host", "rewrite-url"],
)
async def test_host_spoofing_reaches_only_the_upstream(hostile: Target, headers: list[bytes]) -> None:
    raw = hostile.request("/v1/models", method="GET")
    if any(h.startswith(b"Host:") for h in headers):
        raw = raw.replace(b"Host: 127.0.0.1\r\n", b"")
    spoofed = [h.replace(b"{decoy}", str(hostile.decoy.port).encode()) for h in headers]
    head, _, rest = raw.partition(b"\r\n")
    answer = await hostile.send(head + b"\r\n" + b"\r\n".join(spoofed) + b"\r\n" + rest)
    assert answer.status == 200
    arrived = hostile.upstream.received[-1]
    assert arrived.headers["Host"] == f"127.0.0.1:{hostile.upstream.port}"
    await hostile.survived("Host spoofing")


async def test_nothing_above_left_the_worker_unwell(hostile: Target) -> None:
    """A burst of every kind of bad request at once, then a good call: answered, recorded, promptly."""
    bad = [
        hostile.request("/v1/chat/completions", [b"X-PL-Api-Key: pl_\x01"], orjson.dumps(CHAT)),
        hostile.request("/v1/../x", method="GET"),
        hostile.request("/v1/chat/completions", body=b"[" * DEEP),
        hostile.request("/v1/chat/completions", [f"X-H{i}: v".encode() for i in range(300)]),
    ]
    answers = await asyncio.gather(*(hostile.send(b) for b in bad * 10))
    assert all(a.status in (200, 400, 500) for a in answers)
    started = time.monotonic()
    answer = await hostile.send(hostile.request("/v1/chat/completions", body=orjson.dumps(CHAT)))
    assert answer.status == 200
    assert time.monotonic() - started < 2
    await recorded(hostile, answer)
    await wait_until(lambda: len(log_ids_at(hostile.promptlayer)) >= 1, 10, "records exported")
    await hostile.survived("a burst of everything")
