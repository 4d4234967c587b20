"""plproxy's own errors, and their OpenAI-shaped HTTP answers.

    PlproxyError                 the root; carries status, type and code for the answer
    ├── BadRequest               400  invalid_request_error
    ├── Unauthorized             401  authentication_error (proxy authentication, when enabled)
    ├── NotFound                 404  invalid_request_error
    ├── MethodNotAllowed         405  invalid_request_error
    ├── RequestTimeout           408  invalid_request_error (the body stalled)
    ├── PayloadTooLarge          413  invalid_request_error
    ├── UpstreamUnreachable      502  upstream_error
    └── UpstreamTimeout          504  upstream_error

An upstream's own error answer is never one of these: it is relayed unchanged.
"""

from __future__ import annotations

import orjson
from aiohttp import web


class PlproxyError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # headers the answer must carry anyway (X-PL-Log-Id, X-PL-Warning)
        self.headers: list[tuple[str, str]] = []


class BadRequest(PlproxyError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(PlproxyError):
    status = 401
    type = "authentication_error"
    code = "proxy_auth_required"


class NotFound(PlproxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(PlproxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(PlproxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(PlproxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamUnreachable(PlproxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(PlproxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def openai_error_body(message: str, *, type: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})


def error_response(error: PlproxyError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=openai_error_body(error.message, type=error.type, code=error.code),
        content_type="application/json",
    )
    for name, value in error.headers:
        response.headers.add(name, value)
    return response
