"""Proxy authentication for shared gateways: callers present one of `PLPROXY_AUTH_TOKENS`.

A token comes in `Proxy-Authorization: Bearer <token>` or `X-PL-Proxy-Auth: <token>`; both headers are
removed before forwarding (the first is hop-by-hop, the second an `X-PL-*` header) and, like every
header, never recorded. Every configured token is compared, in constant time, whatever matches first,
so the answer's timing says nothing about which token was close. Health, readiness and metrics stay
open for probes and scrapers.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from plproxy.errors import Unauthorized, error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def presented_token(request: web.Request) -> str | None:
    raw = request.headers.get("Proxy-Authorization") or request.headers.get("X-PL-Proxy-Auth")
    if raw is None:
        return None
    scheme, _, value = raw.strip().partition(" ")
    if value and scheme.lower() == "bearer":
        return value.strip()
    return raw.strip()


def token_matches(presented: str, tokens: tuple[bytes, ...]) -> bool:
    candidate = presented.encode("utf-8", "surrogateescape")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    return matched


def auth_middleware(tokens: tuple[str, ...]) -> Middleware:
    encoded = tuple(token.encode() for token in tokens)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = presented_token(request)
        if presented is None or not token_matches(presented, encoded):
            error = Unauthorized(
                "This plproxy requires a token: send `Proxy-Authorization: Bearer <token>` "
                "or `X-PL-Proxy-Auth: <token>`."
                if presented is None
                else "The proxy token is not valid."
            )
            response = error_response(error)
            response.headers["Proxy-Authenticate"] = 'Bearer realm="plproxy"'
            return response
        return await handler(request)

    return middleware
