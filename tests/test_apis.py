"""plproxy.apis.classify: the API and provider of a call from its method, path and base, never its host."""

from __future__ import annotations

import pytest
from yarl import URL

from plproxy.apis import CallKind, classify
from plproxy.record import Api
from plproxy.routing import resolve
from plproxy.settings import Route

OPENAI = URL("https://api.openai.com/v1")
AZURE = URL("https://res.openai.azure.com/openai")
ANTHROPIC = URL("https://api.anthropic.com")
LOCAL = URL("http://127.0.0.1:8080/v1")
# Cloudflare's AI Gateway serves plain OpenAI under a base ending in /openai
GATEWAY = URL("https://gateway.ai.cloudflare.com/v1/acct/gw/openai")


def kind(base: URL, target: str, method: str = "POST") -> CallKind | None:
    routes = (Route("v1", base), Route("anthropic", ANTHROPIC), Route("openai", AZURE), Route("local", LOCAL))
    return classify(method, resolve(target, routes))


@pytest.mark.parametrize(("base", "target", "expected"), [
    (OPENAI, "/v1/chat/completions", CallKind(Api.CHAT, "openai")),
    (OPENAI, "/v1/chat/completions/", CallKind(Api.CHAT, "openai")),
    (OPENAI, "/v1/completions", CallKind(Api.COMPLETION, "openai")),
    (OPENAI, "/v1/embeddings", CallKind(Api.EMBEDDING, "openai")),
    (OPENAI, "/v1/responses", CallKind(Api.RESPONSES, "openai")),
    (OPENAI, "/local/chat/completions", CallKind(Api.CHAT, "openai")),
    (OPENAI, "/anthropic/v1/messages", CallKind(Api.ANTHROPIC_MESSAGES, "anthropic")),
    # Azure, base_url=<plproxy>/v1 with PLPROXY_UPSTREAM at the resource
    (AZURE, "/v1/deployments/gpt4o/chat/completions?api-version=2024-10-21",
     CallKind(Api.CHAT, "openai.azure", "gpt4o")),
    (AZURE, "/v1/deployments/emb/embeddings?api-version=2024-10-21",
     CallKind(Api.EMBEDDING, "openai.azure", "emb")),
    (AZURE, "/v1/deployments/old/completions?api-version=2024-10-21",
     CallKind(Api.COMPLETION, "openai.azure", "old")),
    (AZURE, "/v1/deployments/gpt4o/chat/completions", CallKind(Api.CHAT, "openai.azure", "gpt4o")),
    (AZURE, "/v1/responses?api-version=2025-03-01-preview", CallKind(Api.RESPONSES, "openai.azure")),
    (AZURE, "/v1/v1/responses", CallKind(Api.RESPONSES, "openai.azure")),  # Azure's v1 surface
    # Azure, azure_endpoint=<plproxy> with the route openai=<resource>/openai
    (OPENAI, "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
     CallKind(Api.CHAT, "openai.azure", "gpt4o")),
    (OPENAI, "/openai/responses?api-version=2024-10-21", CallKind(Api.RESPONSES, "openai.azure")),
    # a deployments path with api-version is Azure whatever the base (a resource root as the upstream)
    (URL("https://res.openai.azure.com"), "/v1/openai/deployments/d/chat/completions?api-version=1",
     CallKind(Api.CHAT, "openai.azure", "d")),
    (URL("https://res.openai.azure.com"), "/v1/openai/responses?api-version=1",
     CallKind(Api.RESPONSES, "openai.azure")),
    # not Azure: a base ending in /openai without Azure's query or paths
    (GATEWAY, "/v1/chat/completions", CallKind(Api.CHAT, "openai")),
    (OPENAI, "/v1/chat/completions?xapi-version=1", CallKind(Api.CHAT, "openai")),
])
def test_recorded_calls(base: URL, target: str, expected: CallKind) -> None:
    assert kind(base, target) == expected


@pytest.mark.parametrize(("base", "target", "method"), [
    (OPENAI, "/v1/chat/completions", "GET"),
    (OPENAI, "/v1/models", "GET"),
    (OPENAI, "/v1/files", "POST"),
    (OPENAI, "/v1/batches", "POST"),
    (OPENAI, "/v1/audio/transcriptions", "POST"),
    (OPENAI, "/v1/audio/speech", "POST"),
    (OPENAI, "/v1/images/generations", "POST"),
    (OPENAI, "/v1/moderations", "POST"),
    (OPENAI, "/v1/responses/resp_1/cancel", "POST"),
    (OPENAI, "/v1/chat/completions/chatcmpl-1", "POST"),
    (OPENAI, "/anthropic/v1/messages/count_tokens", "POST"),
    (OPENAI, "/anthropic/v1/messages/batches", "POST"),
    (AZURE, "/v1/deployments/d/images/generations?api-version=1", "POST"),
    (AZURE, "/v1/deployments/d/audio/transcriptions?api-version=1", "POST"),
])
def test_everything_else_is_not_recorded(base: URL, target: str, method: str) -> None:
    assert kind(base, target, method) is None
