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


def classify(method: str, target: Target) -> CallKind | None:
    if method != "POST":
        return None
    rest = target.rest.rstrip("/")
    base_path = target.route.url.path.rstrip("/")
    azure_base = base_path.endswith("/openai")
    deployment = _AZURE_DEPLOYMENT.match(rest)
    if deployment and (azure_base or "api-version=" in target.query):
        api = _OPENAI_PATHS.get(deployment.group(2))
        return CallKind(api, "openai.azure", deployment.group(1)) if api else None
    if f"{base_path}/{rest}".endswith("/v1/messages"):
        return CallKind(Api.ANTHROPIC_MESSAGES, "anthropic")
    # Azure's v1 surface (/openai/v1/chat/completions) has no deployment in the path
    rest_api = rest.removeprefix("openai/v1/") if azure_base else rest
    api = _OPENAI_PATHS.get(rest_api)
    if api is None:
        return None
    return CallKind(api, "openai.azure" if azure_base else "openai")
