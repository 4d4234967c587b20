"""Proxy authentication for shared gateways (PLPROXY_AUTH_TOKENS / PLPROXY_AUTH_TOKENS_FILE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from plproxy.proxy_auth import token_matches
from plproxy.settings import Settings, SettingsError
from tests.proxy_fixtures import StartProxy

TOKEN = "gw-token-canary-0123456789"
OTHER = "gw-token-second-9876543210"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gateway(start_proxy: StartProxy) -> Any:
    return await start_proxy(PLPROXY_AUTH_TOKENS=f"{TOKEN},{OTHER}")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "requires a token"),
        ({"Proxy-Authorization": "Bearer wrong-token-0000000000"}, "not valid"),
        ({"X-PL-Proxy-Auth": TOKEN[:-1]}, "not valid"),
        # the provider's header is not the proxy's
        ({"Authorization": f"Bearer {TOKEN}"}, "requires a token"),
    ],
)
async def test_calls_without_a_valid_token_get_401(
    gateway: Any, fake_openai: Any, http: aiohttp.ClientSession, headers: dict[str, str], message: str
) -> None:
    before = len(fake_openai.received)
    async with http.post(f"{gateway.base_url}/chat/completions", json=CHAT, headers=headers) as response:
        assert response.status == 401
        assert response.headers["Proxy-Authenticate"].startswith("Bearer")
        error = orjson.loads(await response.read())["error"]
        assert error["code"] == "proxy_auth_required"
        assert message in error["message"]
        assert TOKEN not in error["message"]
    assert len(fake_openai.received) == before  # nothing went upstream


@pytest.mark.parametrize(
    "headers",
    [
        {"Proxy-Authorization": f"Bearer {TOKEN}"},
        {"X-PL-Proxy-Auth": OTHER},
        {"X-PL-Proxy-Auth": f"Bearer {TOKEN}"},
    ],
)
async def test_a_valid_token_opens_the_proxy_and_never_goes_upstream(
    gateway: Any, fake_openai: Any, promptlayer: Any, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(f"{gateway.base_url}/chat/completions", json=CHAT, headers=headers) as response:
        assert response.status == 200
        assert "X-PL-Warning" not in response.headers
    received = fake_openai.received[-1].headers
    assert "Proxy-Authorization" not in received
    assert "X-PL-Proxy-Auth" not in received
    await promptlayer.wait_for_log_requests(1, timeout=10)
    assert TOKEN not in orjson.dumps(promptlayer.log_requests).decode()


async def test_the_openai_client_with_a_token_header(gateway: Any) -> None:
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="sk-x", default_headers={"X-PL-Proxy-Auth": TOKEN}, max_retries=0
    )
    reply = await client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content == "echo: hi"
    await client.close()


async def test_probes_and_metrics_stay_open_but_plproxy_endpoints_do_not(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{gateway.url}{path}") as response:
            assert response.status == 200
    async with http.get(f"{gateway.url}/plproxy/logs/00000000-0000-0000-0000-000000000000") as response:
        assert response.status == 401


async def test_no_tokens_configured_means_open(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
        assert response.status == 200


def test_tokens_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# gateway tokens\n{TOKEN}\n\n{OTHER}\n")
    settings = Settings.from_sources({"HOME": str(tmp_path), "PLPROXY_AUTH_TOKENS_FILE": str(path)})
    assert settings.proxy_tokens == (TOKEN, OTHER)
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PLPROXY_AUTH_TOKENS", "short", "PLPROXY_AUTH_TOKENS=<hidden>: use tokens of at least 16"),
        ("PLPROXY_AUTH_TOKENS_FILE", "/nonexistent/tokens", "cannot be read"),
    ],
)
def test_bad_tokens_stop_the_program_without_showing_them(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources({"HOME": str(tmp_path), variable: value})
    assert expected in caught.value.problems[0]
    if variable == "PLPROXY_AUTH_TOKENS":
        assert "short" not in str(caught.value)


def test_comparison_checks_every_token() -> None:
    tokens = (TOKEN.encode(), OTHER.encode())
    assert token_matches(OTHER, tokens)
    assert not token_matches(OTHER + "x", tokens)
    assert not token_matches("", tokens)
