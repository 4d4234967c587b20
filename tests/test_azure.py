"""Azure OpenAI through plproxy, with the official `openai.AzureOpenAI` client, two ways:

- the default upstream is the Azure resource (`PLPROXY_UPSTREAM=https://<resource>.openai.azure.com/openai`)
  and the client is given `base_url=<plproxy>/v1`: it sends `/v1/deployments/{d}/…?api-version=…`;
- a route named `openai` is the resource (`PLPROXY_ROUTES=openai=https://<resource>.openai.azure.com/openai`)
  and the client keeps `azure_endpoint` (or `AZURE_OPENAI_ENDPOINT`) pointing at plproxy: it sends
  `/openai/deployments/{d}/…` exactly as it would to Azure.

Either way the `api-key` header reaches Azure and never a record; the record's provider is `openai.azure`
and its model the one Azure answered with, else the deployment.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes.openai_upstream import AZURE_MODEL, FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import chat_text, record_for
from tests.proxy_fixtures import RunningProxy, StartProxy

CANARY = "azure-test-canary-5c1d0e"
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say hi to Ada"}]


@pytest.fixture
async def azure_proxy(start_proxy: StartProxy, fake_openai: FakeOpenAI) -> RunningProxy:
    """plproxy whose default upstream is the (fake) Azure resource, and which mounts it as /openai too."""
    resource = f"{fake_openai.azure_endpoint}/openai"
    return await start_proxy(PLPROXY_UPSTREAM=resource, PLPROXY_ROUTES=f"openai={resource}")


def azure_client(proxy_url: str, way: str) -> openai.AsyncAzureOpenAI:
    """The client pointed at plproxy one way or the other."""
    where = {"base_url": f"{proxy_url}/v1"} if way == "base_url" else {"azure_endpoint": proxy_url}
    return openai.AsyncAzureOpenAI(**where, api_key=CANARY, api_version=API_VERSION, max_retries=0)


@pytest.fixture(params=["base_url", "azure_endpoint"])
async def client(
    request: pytest.FixtureRequest, azure_proxy: RunningProxy
) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    async with azure_client(azure_proxy.url, request.param) as client:
        yield client


@pytest.fixture
async def direct(fake_openai: FakeOpenAI) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=fake_openai.azure_endpoint, api_key=CANARY, api_version=API_VERSION, max_retries=0
    ) as client:
        yield client


def assert_azure(body: dict[str, Any], model: str = AZURE_MODEL) -> None:
    assert body["provider"] == "openai.azure"
    assert body["model"] == model
    assert CANARY not in json.dumps(body)


async def test_chat_is_relayed_and_recorded(
    client: openai.AsyncAzureOpenAI, direct: openai.AsyncAzureOpenAI, fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
) -> None:
    expected = await direct.chat.completions.create(model="chat-prod", messages=MESSAGES)
    raw = await client.chat.completions.with_raw_response.create(
        model="chat-prod", messages=MESSAGES
    )
    assert raw.parse().model_dump() == expected.model_dump()
    received = fake_openai.received[-1]
    assert received.path_qs == f"/openai/deployments/chat-prod/chat/completions?api-version={API_VERSION}"
    assert received.headers["api-key"] == CANARY
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert_azure(body)
    assert body["function_name"] == "openai.chat.completions.create"
    assert chat_text(body) == "echo: Say hi to Ada"
    assert (body["input_tokens"], body["output_tokens"]) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens)


async def test_stream_is_relayed_and_recorded_with_the_injected_usage(
    client: openai.AsyncAzureOpenAI, direct: openai.AsyncAzureOpenAI, fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
) -> None:
    kwargs: Any = {"model": "chat-prod", "messages": MESSAGES, "stream": True}
    direct_stream = await direct.chat.completions.create(**kwargs)
    expected = [c.model_dump(exclude_unset=True) async for c in direct_stream]
    raw = await client.chat.completions.with_raw_response.create(**kwargs)
    chunks = [c.model_dump(exclude_unset=True) async for c in raw.parse()]
    assert chunks == expected
    assert (chunks[0]["choices"], chunks[0]["model"]) == ([], "")  # Azure's filter-results chunk
    assert fake_openai.received[-1].json()["stream_options"] == {"include_usage": True}
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert_azure(body)  # the first chunk's empty model is not the answer's model
    assert chat_text(body) == "echo: Say hi to Ada"
    assert body["output_tokens"] == 5


async def test_the_deployment_is_the_model_when_the_answer_names_none(
    azure_proxy: RunningProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession
) -> None:
    url = f"{azure_proxy.url}/v1/deployments/fake-no-model/chat/completions?api-version={API_VERSION}"
    async with http.post(url, json={"messages": MESSAGES}, headers={"api-key": CANARY}) as response:
        assert response.status == 200
        assert "model" not in await response.json()
        log_id = response.headers["X-PL-Log-Id"]
    body = await record_for(promptlayer, log_id)
    assert_azure(body, model="fake-no-model")


async def test_embeddings_and_responses(
    client: openai.AsyncAzureOpenAI, fake_openai: FakeOpenAI, promptlayer: PromptLayerStandIn
) -> None:
    raw = await client.embeddings.with_raw_response.create(model="embed-prod", input=["a", "b"])
    body = await record_for(promptlayer, raw.headers["X-PL-Log-Id"])
    assert_azure(body)
    assert body["function_name"] == "openai.embeddings.create"

    raw_response = await client.responses.with_raw_response.create(model="resp-prod", input="Say hi")
    assert fake_openai.received[-1].path_qs == f"/openai/responses?api-version={API_VERSION}"
    body = await record_for(promptlayer, raw_response.headers["X-PL-Log-Id"])
    assert_azure(body)
    assert (body["api_type"], body["function_name"]) == ("responses", "openai.responses.create")
    assert body["output"]["messages"][0]["content"] == [{"type": "text", "text": "echo: Say hi"}]


async def test_an_azure_error_passes_through_and_is_recorded(
    client: openai.AsyncAzureOpenAI, promptlayer: PromptLayerStandIn
) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="fake-error-429", messages=MESSAGES)
    body = await record_for(promptlayer, raised.value.response.headers["X-PL-Log-Id"])
    assert (body["status"], body["error_type"]) == ("ERROR", "PROVIDER_RATE_LIMIT")
    assert body["provider"] == "openai.azure"
