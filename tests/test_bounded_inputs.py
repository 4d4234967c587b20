"""Bounds on what a single call can make plproxy hold: inflated answers, uploads that stall."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import orjson
import pytest

from plproxy.capture import MAX_RECORDED_BODY_BYTES, _decompress
from tests.proxy_fixtures import StartProxy


def test_a_gzip_bomb_is_not_inflated_past_the_record_cap() -> None:
    bomb = gzip.compress(b"\0" * (MAX_RECORDED_BODY_BYTES * 4), compresslevel=9)
    assert len(bomb) < 200_000
    assert _decompress(bomb, "gzip") == b""


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        ("gzip", gzip.compress(b'{"a": 1}')),
        ("deflate", zlib.compress(b'{"a": 1}')),
        ("deflate", zlib.compress(b'{"a": 1}')[2:-4]),  # raw deflate, as some servers send it
        ("identity", b'{"a": 1}'),
    ],
)
def test_ordinary_encodings_decode(encoding: str, encoded: bytes) -> None:
    assert orjson.loads(_decompress(encoded, encoding)) == {"a": 1}


def test_unknown_or_broken_encodings_record_no_body() -> None:
    assert _decompress(b"not gzip", "gzip") == b""
    assert _decompress(b"whatever", "br") == b""


async def test_an_upload_that_stalls_gets_408(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(PLPROXY_READ_TIMEOUT="0.5")
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{\"model\": "
    )
    await writer.drain()  # ... and never the rest
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
