"""`POST /plproxy/records` on a running plproxy: records made by in-process handlers join its store."""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from plproxy.mapping import to_log_request
from plproxy.record import Annotations, Api, LogRecord
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.proxy_fixtures import RunningProxy, StartProxy


def log_request(**overrides: Any) -> dict[str, Any]:
    record = LogRecord(
        log_id=str(uuid.uuid4()), api=Api.CHAT, provider="llamacpp",
        request={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
        start_time=1_700_000_000.0, end_time=1_700_000_000.5, function_name="langchain.ChatLlamaCpp",
        annotations=Annotations(tags=("local",), metadata={"team": "x"}),
    )
    return {**to_log_request(record), **overrides}


async def post(http: aiohttp.ClientSession, proxy: RunningProxy, body: Any, **kw: Any) -> tuple[int, Any]:
    data = io.BytesIO(body if isinstance(body, bytes) else orjson.dumps(body))
    async with http.post(f"{proxy.url}/plproxy/records", data=data, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_record_is_stored_and_exported_with_the_sidecars_key(
    proxy: RunningProxy, http: aiohttp.ClientSession, promptlayer: PromptLayerStandIn
) -> None:
    log_id = str(uuid.uuid4())
    status, answer = await post(http, proxy, {
        "log_id": log_id, "log_request": log_request(),
        "followups": [{"kind": "score", "body": {"score": 90}}, {"kind": "group", "body": {"group_id": 3}}],
    })
    assert (status, answer) == (202, {"log_id": log_id, "state": "accepted"})
    [body] = await promptlayer.wait_for_log_requests(1)
    assert body["metadata"] == {"team": "x", "plproxy_log_id": log_id}
    assert body["tags"] == ["local"]
    assert body["model"] == "gemma-3-270m"
    assert promptlayer.api_keys_seen == {"pl_test_key"}
    await promptlayer.wait_for_received(3)
    [pl_id] = promptlayer.accepted_ids
    for _ in range(100):
        if promptlayer.followups("track-group"):
            break
        await asyncio.sleep(0.05)
    assert promptlayer.followups("track-score") == [{"request_id": pl_id, "score": 90}]
    assert promptlayer.followups("track-group") == [{"request_id": pl_id, "group_id": 3}]
    async with http.get(f"{proxy.url}/plproxy/logs/{log_id}") as resp:
        assert (await resp.json())["promptlayer_request_id"] == pl_id


async def test_without_a_log_id_one_is_given(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, answer = await post(http, proxy, {"log_request": log_request()})
    assert status == 202
    assert uuid.UUID(answer["log_id"])


async def test_sending_the_same_record_twice_keeps_one(
    proxy: RunningProxy, http: aiohttp.ClientSession, promptlayer: PromptLayerStandIn
) -> None:
    body = {"log_id": str(uuid.uuid4()), "log_request": log_request()}
    assert (await post(http, proxy, body))[0] == 202
    assert (await post(http, proxy, body))[0] == 202
    await promptlayer.wait_for_log_requests(1)
    await asyncio.to_thread(proxy.store.sync)
    await asyncio.sleep(0.3)
    assert len(promptlayer.log_requests) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "JSON object"),
        ([1, 2], "JSON object"),
        ({"log_request": log_request(), "extra": 1}, "Unknown fields: extra"),
        ({}, "'log_request' must be a JSON object"),
        ({"log_request": log_request(), "log_id": "nope"}, "'log_id' must be a UUID"),
        ({"log_request": {**log_request(), "api_key": "pl_x"}}, "must not carry a key"),
        ({"log_request": {**log_request(), "unknown_field": 1}}, "does not know: unknown_field"),
        ({"log_request": {k: v for k, v in log_request().items() if k != "output"}}, "lacks output"),
        ({"log_request": log_request(input={"type": "chat", "messages": "hi"})}, "input.messages"),
        ({"log_request": log_request(output="hello")}, "prompt blueprint"),
        ({"log_request": log_request(tags="a,b")}, "tags"),
        ({"log_request": log_request(metadata={"n": 1})}, "metadata"),
        ({"log_request": log_request(score=101)}, "score"),
        ({"log_request": log_request(status="FINE")}, "status"),
        ({"log_request": log_request(input_tokens=-1)}, "input_tokens"),
        ({"log_request": log_request(parameters={"openai_api_key": "x"})}, "parameters.openai_api_key"),
        ({"log_request": log_request(parameters={"headers": {"Authorization": "x"}})}, "Authorization"),
        ({"log_request": log_request(metadata={"note": "sk-abcdefghijklmnopqrstuvwxyz"})}, "metadata.note"),
        ({"log_request": log_request(), "followups": [{"kind": "score", "body": {"score": 500}}]}, "score"),
        ({"log_request": log_request(), "followups": [{"kind": "delete", "body": {}}]}, "followups[0]"),
        ({"log_request": log_request(), "followups": {"kind": "score"}}, "'followups' must be a list"),
    ],
)
async def test_bad_bodies_are_refused_in_the_openai_shape(
    proxy: RunningProxy, http: aiohttp.ClientSession, promptlayer: PromptLayerStandIn, body: Any, message: str
) -> None:
    status, answer = await post(http, proxy, body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert message in answer["error"]["message"]
    assert "pl_x" not in answer["error"]["message"]
    await asyncio.to_thread(proxy.store.sync)
    assert (await asyncio.to_thread(proxy.store.counts))["pending"] == 0


async def test_a_huge_record_gets_413(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(PLPROXY_MAX_BODY_MB="1")
    big = log_request(input={"type": "completion", "content": [{"type": "text", "text": "x" * 1_200_000}]})
    status, answer = await post(http, proxy, {"log_request": big})
    assert status == 413
    assert answer["error"]["code"] == "request_too_large"


async def test_a_sidecar_with_proxy_auth_requires_the_token(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    token = "s3cret-token-0123456789"
    proxy = await start_proxy(PLPROXY_AUTH_TOKENS=token)
    assert (await post(http, proxy, {"log_request": log_request()}))[0] == 401
    status, _ = await post(http, proxy, {"log_request": log_request()}, headers={"X-PL-Proxy-Auth": token})
    assert status == 202
