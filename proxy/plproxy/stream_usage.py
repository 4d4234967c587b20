"""Usage on chat streams: ask the upstream for it, keep it for the record, strip it from the client's stream.

With `PLPROXY_STREAM_USAGE=inject` a streamed chat or completion request that did not ask for usage is
sent with `stream_options.include_usage = true`. The upstream then adds `"usage": null` to every chunk
and one final chunk with `"choices": []` and the usage; `client_view` removes both, so the client
receives exactly the events it would have received without injection. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class UsageInjection:
    request: dict[str, Any]  # the body sent upstream instead of the client's

    @classmethod
    def for_request(cls, body: dict[str, Any]) -> UsageInjection | None:
        """An injection for this request body, or None when there is nothing to inject."""
        if body.get("stream") is not True:
            return None
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return None  # malformed: the upstream answers it as it would have
        if options is not None and options.get("include_usage") is True:
            return None  # the client asked for usage itself and receives it
        return cls({**body, "stream_options": {**(options or {}), "include_usage": True}})

    @staticmethod
    def client_view(chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as the client would have received it, or None for the usage-only chunk."""
        if "usage" not in chunk:
            return chunk
        if chunk["usage"] is not None:
            if chunk.get("choices") == []:
                return None
            return chunk  # an upstream that reports usage on its own chunks: keep what it sends
        return {key: value for key, value in chunk.items() if key != "usage"}
