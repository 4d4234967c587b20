"""No credential leaks: canary keys sent to a real `plproxy serve` never reach a PromptLayer body, a file of
the data dir (every byte of every file, the SQLite -wal and -shm included) or the proxy's log output.

The one exception the design allows: a per-request `X-PL-Api-Key` may sit in the store beside its record
while the record still has to be sent; once it is exported the key must be gone from every byte on disk.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from plproxy.mapping import credential_values, redact_secrets
from plproxy.store import Store
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import eventually
from tests.proxy_fixtures import ProxyProcess, StartProxy, plproxy_command
from tests.test_store import log_payload

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi to Ada"}]}


class Canaries:
    def __init__(self) -> None:
        self.bearer = f"sk-canary-{secrets.token_hex(16)}"
        self.azure = f"canary-azure-{secrets.token_hex(16)}"
        self.anthropic = f"sk-ant-canary-{secrets.token_hex(16)}"
        self.pl_default = f"pl_canary_default_{secrets.token_hex(16)}"
        self.pl_tenant = f"pl_canary_tenant_{secrets.token_hex(16)}"

    @property
    def provider(self) -> list[str]:
        return [self.bearer, self.azure, self.anthropic]

    @property
    def never_stored(self) -> list[str]:
        return [*self.provider, self.pl_default]

    @property
    def all(self) -> list[str]:
        return [*self.never_stored, self.pl_tenant]

    def provider_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer}", "api-key": self.azure, "x-api-key": self.anthropic}


def found_in(data: bytes, values: list[str]) -> list[str]:
    return [value for value in values if value.encode() in data]


def data_dir_bytes(data_dir: Path) -> dict[str, bytes]:
    """Every byte of every file under the data dir, by relative path."""
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


def leaks_on_disk(data_dir: Path, values: list[str]) -> dict[str, list[str]]:
    files = data_dir_bytes(data_dir)
    assert any(name.endswith("plproxy.db") for name in files)
    return {name: hits for name, data in files.items() if (hits := found_in(data, values))}


async def gone_from_disk(data_dir: Path, values: list[str]) -> None:
    """The store scrubs an erased key from its WAL within about a second (it rate-limits truncations)."""
    try:
        await eventually(lambda: not leaks_on_disk(data_dir, values), 10.0, "canaries off the disk")
    except AssertionError:
        assert leaks_on_disk(data_dir, values) == {}
        raise


def leaks_at_promptlayer(promptlayer: PromptLayerStandIn, values: list[str]) -> list[tuple[str, list[str]]]:
    return [(r.path, hits) for r in promptlayer.received if (hits := found_in(r.body, values))]


async def spawn(spawn_proxy: Any, env: dict[str, str]) -> ProxyProcess:
    return await asyncio.to_thread(spawn_proxy, env)


async def make_calls(url: str, canaries: Canaries) -> tuple[list[str], list[str]]:
    """Calls of every kind with the canary provider keys; returns (default-key log ids, tenant log ids)."""
    default_ids: list[str] = []
    tenant_ids: list[str] = []
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=canaries.bearer,
        max_retries=0,
        default_headers={"api-key": canaries.azure, "x-api-key": canaries.anthropic},
    )
    raw = await client.chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"X-PL-Metadata": orjson.dumps({"api_key": canaries.pl_default}).decode()}
    )
    default_ids.append(raw.headers["X-PL-Log-Id"])
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    default_ids.append(raw.headers["X-PL-Log-Id"])
    stream = await client.chat.completions.with_raw_response.create(**CHAT, stream=True)
    _ = [chunk async for chunk in stream.parse()]
    default_ids.append(stream.headers["X-PL-Log-Id"])
    try:
        await client.chat.completions.create(**{**CHAT, "model": "fake-error-401"})
    except openai.AuthenticationError as error:
        default_ids.append(error.response.headers["X-PL-Log-Id"])
    # a key in the request body itself, as some clients send it: never a parameter of the record
    raw = await client.chat.completions.with_raw_response.create(
        **CHAT, extra_body={"api_key": canaries.bearer, "user": canaries.anthropic}
    )
    default_ids.append(raw.headers["X-PL-Log-Id"])
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            **CHAT, extra_headers={"X-PL-Api-Key": canaries.pl_tenant, "X-PL-Group-Id": "77"}
        )
        tenant_ids.append(raw.headers["X-PL-Log-Id"])
    await client.close()
    return default_ids, tenant_ids


async def test_canaries_never_leak(
    spawn_proxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    canaries = Canaries()
    data_dir = tmp_path / "data"
    env = {
        "PLPROXY_UPSTREAM": fake_openai.base_url,
        "PLPROXY_DATA_DIR": str(data_dir),
        "PROMPTLAYER_BASE_URL": promptlayer.base_url,
        "PROMPTLAYER_API_KEY": canaries.pl_default,
        "PLPROXY_LOG_LEVEL": "debug",  # the most the operational log ever says
        "PLPROXY_FLUSH_TIMEOUT": "0.5",
    }
    # PromptLayer refuses, then is slow to come back: retries, errors and warnings are logged too
    promptlayer.fail_next(500, count=4)
    promptlayer.fail_next(503, count=2, body=f"<html>upstream said {canaries.pl_default}</html>")
    proxy = await spawn(spawn_proxy, env)
    promptlayer.stall_until_released()
    default_ids, tenant_ids = await make_calls(proxy.url, canaries)

    # pending: the tenant key may be on disk, no other canary may
    assert leaks_on_disk(data_dir, canaries.never_stored) == {}
    promptlayer.release()
    bodies = await promptlayer.wait_for_log_requests(len(default_ids) + len(tenant_ids), timeout=15)
    await eventually(
        lambda: len(promptlayer.followups("track-group")) == len(tenant_ids), 15, "group follow-ups"
    )

    # the upstream saw the provider keys, never a PromptLayer key
    for received in fake_openai.received:
        seen = orjson.dumps(list(received.headers.items())) + received.body
        assert found_in(seen, [canaries.pl_default, canaries.pl_tenant]) == []

    # PromptLayer: each record with its own key in X-API-KEY, never a key in a body
    assert leaks_at_promptlayer(promptlayer, canaries.all) == []
    by_log_id = {}
    for received in promptlayer.received:
        if received.path == "/log-request" and received.status == 201:
            by_log_id[received.json["metadata"]["plproxy_log_id"]] = received.headers["X-API-KEY"]
    assert by_log_id == {
        **dict.fromkeys(default_ids, canaries.pl_default),
        **dict.fromkeys(tenant_ids, canaries.pl_tenant),
    }
    group_keys = {r.headers["X-API-KEY"] for r in promptlayer.received if r.path == "/rest/track-group"}
    assert group_keys == {canaries.pl_tenant}
    by_record = {body["metadata"]["plproxy_log_id"]: body for body in bodies}
    # a credential-named metadata entry and credentials in the request body are left out of the record
    assert by_record[default_ids[0]]["metadata"] == {"plproxy_log_id": default_ids[0]}
    assert by_record[default_ids[4]]["parameters"] == {}

    # once exported (follow-ups included), the tenant key is gone from every byte of the data dir
    for log_id in tenant_ids:
        async with http.get(f"{proxy.url}/plproxy/logs/{log_id}") as response:
            assert (await response.json())["state"] == "exported"
    await gone_from_disk(data_dir, canaries.all)

    listed = await asyncio.to_thread(
        subprocess.run,
        plproxy_command("logs", "--json", "--limit", "100", "--data-dir", str(data_dir)),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert found_in(listed.stdout + listed.stderr, canaries.all) == []

    assert await asyncio.to_thread(proxy.stop, 15) == 0
    assert leaks_on_disk(data_dir, canaries.all) == {}
    output = proxy.output()
    assert "promptlayer_unavailable" in output  # the log did speak about the failures
    assert found_in(output.encode(), canaries.all) == []


async def test_a_tenant_key_waits_on_disk_only_while_its_record_is_pending(
    spawn_proxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    tmp_path: Path,
) -> None:
    canaries = Canaries()
    data_dir = tmp_path / "data"
    env = {
        "PLPROXY_UPSTREAM": fake_openai.base_url,
        "PLPROXY_DATA_DIR": str(data_dir),
        "PROMPTLAYER_BASE_URL": promptlayer.base_url,
        "PLPROXY_FLUSH_TIMEOUT": "0.3",
        # no default key: only the tenant's record can be sent
    }
    await promptlayer.stop()
    proxy = await spawn(spawn_proxy, env)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/v1/chat/completions",
            json=CHAT,
            headers={**canaries.provider_headers(), "X-PL-Api-Key": canaries.pl_tenant},
        ) as response:
            assert response.status == 200
            log_id = response.headers["X-PL-Log-Id"]
        assert await asyncio.to_thread(proxy.stop, 15) == 0
    # PromptLayer was down: the record waits on disk, with the key it needs after this restart
    assert list(leaks_on_disk(data_dir, canaries.all).values()) in (
        [[canaries.pl_tenant]],
        [[canaries.pl_tenant]] * 2,
    )

    await promptlayer.start()
    proxy = await spawn(spawn_proxy, env)
    [body] = await promptlayer.wait_for_log_requests(1, timeout=15)
    assert body["metadata"]["plproxy_log_id"] == log_id
    assert promptlayer.api_keys_seen == {canaries.pl_tenant}
    async with aiohttp.ClientSession() as session:

        async def exported() -> bool:
            async with session.get(f"{proxy.url}/plproxy/logs/{log_id}") as response:
                return (await response.json())["state"] == "exported"

        await eventually(exported, what="exported")
    await gone_from_disk(data_dir, canaries.all)
    assert await asyncio.to_thread(proxy.stop, 15) == 0
    assert leaks_on_disk(data_dir, canaries.all) == {}
    assert found_in(proxy.output().encode(), canaries.all) == []


# --- the store on its own: every way a record's own key is erased also scrubs it from the files ---------


def wait_off_disk(data_dir: Path, key: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while leaks_on_disk(data_dir, [key]):
        assert time.monotonic() < deadline, leaks_on_disk(data_dir, [key])
        time.sleep(0.02)


def test_store_scrubs_an_erased_key_from_every_file(tmp_path: Path) -> None:
    keys = {name: f"pl_canary_{name}_{secrets.token_hex(12)}" for name in ("exported", "failed", "followup")}
    store = Store(tmp_path, has_default_key=False)
    try:
        for name, key in keys.items():
            store.submit(name, lambda: log_payload(), api_key=key)
        store.add_followup("followup", "score", {"score": 10})
        assert store.sync()
        assert leaks_on_disk(tmp_path, list(keys.values()))  # pending: kept beside the record, as it must
        claims = {c.log_id: c for c in store.claim_due(10, require_own_key=True)}
        assert {c.api_key for c in claims.values()} == set(keys.values())

        store.mark_exported("exported", 1)
        store.mark_failed("failed", "PromptLayer answered 422")
        wait_off_disk(tmp_path, keys["exported"])
        wait_off_disk(tmp_path, keys["failed"])

        store.mark_exported("followup", 2)  # its follow-up still needs the key
        assert leaks_on_disk(tmp_path, [keys["followup"]])
        [followup] = store.claim_due_followups(10)
        assert followup.api_key == keys["followup"]
        store.mark_followup_exported(followup.id)
        wait_off_disk(tmp_path, keys["followup"])
    finally:
        store.close()
    assert leaks_on_disk(tmp_path, list(keys.values())) == {}


# --- an upstream that echoes the caller's key back -----------------------------------------------------


async def echoing_upstream(request: web.Request) -> web.Response:
    """Some OpenAI-compatible servers put the key they refused in their error message, in full."""
    auth = request.headers.get("Authorization", "")
    if request.headers.get("x-api-key") == "refuse":
        message = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}."
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}},
            status=401,
        )
    text = f"you sent api-key {request.headers.get('api-key')} and {auth}"
    return web.json_response(
        {
            "id": "chatcmpl-echo",
            "object": "chat.completion",
            "created": 1,
            "model": "echo",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
    )


async def test_a_key_the_upstream_echoes_back_is_not_recorded(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    canaries = Canaries()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", echoing_upstream)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        proxy = await start_proxy(
            PLPROXY_UPSTREAM=f"http://127.0.0.1:{upstream.port}/v1", PROMPTLAYER_API_KEY=canaries.pl_default
        )
        headers = {"Authorization": f"Bearer {canaries.bearer}", "api-key": canaries.azure}
        async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=headers) as response:
            answer = await response.read()
            assert canaries.azure.encode() in answer  # the client gets the answer untouched
        async with http.post(
            f"{proxy.base_url}/chat/completions", json=CHAT, headers={**headers, "x-api-key": "refuse"}
        ) as response:
            assert response.status == 401
            assert canaries.bearer.encode() in await response.read()
        bodies = await promptlayer.wait_for_log_requests(2, timeout=15)
    finally:
        await upstream.close()
    assert leaks_at_promptlayer(promptlayer, canaries.all) == []
    assert bodies[0]["output"]["messages"][0]["content"] == [
        {"type": "text", "text": "you sent api-key [REDACTED] and Bearer [REDACTED]"}
    ]
    assert bodies[1]["error_message"] == "Incorrect API key provided: [REDACTED]."
    assert leaks_on_disk(proxy.settings.data_dir, canaries.all) == {}


def test_credential_values_and_their_redaction() -> None:
    headers = [
        ("Authorization", "Bearer sk-proj-0123456789abcdef"),
        ("api-key", "azure0123456789abcdef"),
        ("X-Api-Key", " sk-ant-0123456789abcdef "),
        ("X-PL-Api-Key", "pl_tenant_0123456789"),
        ("Authorization", "Bearer EMPTY"),  # a local server's placeholder: not a secret
        ("Content-Type", "application/json-with-a-long-name"),
    ]
    assert credential_values(headers) == (
        "sk-proj-0123456789abcdef",
        "azure0123456789abcdef",
        "sk-ant-0123456789abcdef",
        "pl_tenant_0123456789",
    )
    body = {
        "output": [{"text": "key sk-proj-0123456789abcdef and azure0123456789abcdef"}],
        "azure0123456789abcdef": 1,
        "n": 3,
        "ok": None,
    }
    assert redact_secrets(body, credential_values(headers)) == {
        "output": [{"text": "key [REDACTED] and [REDACTED]"}],
        "[REDACTED]": 1,
        "n": 3,
        "ok": None,
    }
