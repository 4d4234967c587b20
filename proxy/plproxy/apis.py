"""Which provider API a call uses, recognised from its shape (method, path, base), never from a host name.

Pure: no I/O. A call that is none of these is relayed unchanged and not recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from plproxy.record import Api
from plproxy.routing import Target

_AZURE_DEPLOYMENT = re.compile(r"^(?:openai/)?deployments/([^/]+)/(.+)$")

_OPENAI_PATHS = {
    "chat/completions": Api.CHAT,
    "completions": Api.COMPLETION,
    "embeddings": Api.EMBEDDING,
    "responses": Api.RESPONSES,
}


@dataclass(frozen=True, slots=True)
class CallKind:
    api: Api
    provider: str
    model_hint: str | None = None  # an Azure deployment: the model when the answer names none


def _has_api_version(query: str) -> bool:
    return any(part.partition("=")[0] == "api-version" for part in query.split("&"))


def classify(method: str, target: Target) -> CallKind | None:
    if method != "POST":
        return None
    rest = target.rest.rstrip("/")
    base_path = target.route.url.path.rstrip("/")
    azure_base = base_path.endswith("/openai")
    api_version = _has_api_version(target.query)
    deployment = _AZURE_DEPLOYMENT.match(rest)
    if deployment and (azure_base or api_version):
        api = _OPENAI_PATHS.get(deployment.group(2))
        return CallKind(api, "openai.azure", deployment.group(1)) if api else None
    if f"{base_path}/{rest}".endswith("/v1/messages"):
        return CallKind(Api.ANTHROPIC_MESSAGES, "anthropic")
    # Azure without a deployment in the path: `/openai/responses?api-version=…`, or its v1 surface
    # `/openai/v1/responses`. A base ending in /openai alone is not enough: gateways (Cloudflare's, for
    # one) serve plain OpenAI under such a base.
    azure = (azure_base and (api_version or rest.startswith("v1/"))) or (
        api_version and rest.startswith("openai/")
    )
    if azure:
        rest = rest.removeprefix("openai/").removeprefix("v1/")
    api = _OPENAI_PATHS.get(rest)
    if api is None:
        return None
    return CallKind(api, "openai.azure" if azure else "openai")
