"""plproxy's answer to requests aiohttp refuses before any handler runs, and to a handler that crashed.

aiohttp answers a request its parser refuses (more than `MAX_HEADERS` headers, a line over
`MAX_LINE_BYTES`, a control character in a header value, a missing `Host`) in text/plain, quoting the
offending bytes, and logs the same quote at ERROR with a traceback. The offending line may be an
`Authorization` or `X-PL-Api-Key` header, so that quote would put a credential in the operational log and
echo it to whoever sent it. Here such requests get plproxy's own error shape instead (400 with a fixed
message naming the limit, never the bytes), and one log line naming the kind of problem.

`Runner` is `web.AppRunner` with that protocol; `plproxy serve` runs the app with it.
"""

from __future__ import annotations

import logging
import traceback

from aiohttp import http_exceptions as hx
from aiohttp import web

from plproxy.errors import BadRequest, PlproxyError, error_response

log = logging.getLogger("plproxy.server")

# aiohttp's parser limits (its defaults, stated here so that the messages can name them)
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128


def _describe(exc: BaseException | None) -> str:
    """What was wrong with a refused request, in words that never quote it."""
    if isinstance(exc, hx.LineTooLong):
        return f"A request line or header is longer than {MAX_LINE_BYTES} bytes."
    if isinstance(exc, hx.InvalidHeader):
        return "A header name or value holds characters HTTP does not allow (control characters, CR or LF)."
    if isinstance(exc, hx.BadHttpMethod):
        return "This is not an HTTP request plproxy understands."
    if isinstance(exc, hx.InvalidURLError):
        return "The request target is not a valid URL."
    if isinstance(exc, hx.PayloadEncodingError):
        return "The request body is not framed as its headers say (Content-Length or chunked encoding)."
    message = getattr(exc, "message", "")
    if isinstance(message, str):
        if "Too many headers" in message:
            return f"The request has more than {MAX_HEADERS} headers."
        if "Missing 'Host' header" in message:
            return "The request has no Host header."
        if "header" in message.lower():  # llhttp: invalid character, bare CR or LF, obs-fold, …
            return "A header holds characters HTTP does not allow, or a line break where none may be."
    return "The request is not valid HTTP/1.1; it was refused before it reached plproxy."


class _RequestHandler(web.RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response")
        if status >= 500:
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc and exc.__traceback__ else None
            log.error(
                "request_failed",
                extra={
                    "fields": {
                        "status": status,
                        "error_type": type(exc).__name__ if exc else None,
                        # where, not what: an exception's text may quote a body or a header
                        "at": f"{where.filename}:{where.lineno}" if where else None,
                    }
                },
            )
            error = PlproxyError("plproxy could not handle this request.")
            error.status = status
        else:
            log.warning(
                "request_refused",
                extra={"fields": {"status": status, "problem": type(exc).__name__ if exc else None}},
            )
            error = BadRequest(_describe(exc), code="invalid_http_request")
            error.status = status
        response = error_response(error)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections answer refused requests in plproxy's error shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # the app's own Server, made by aiohttp; only its protocol class changes (no state is added)
        server.__class__ = _Server
        return server
