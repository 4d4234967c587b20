"""From the request target a client sent to the one upstream URL it may reach. Pure: no I/O.

The upstream is fixed by configuration: the request target only ever contributes a path below a
route's base and a query string. Dot segments (also percent-encoded, `%2e%2e`) are resolved first, and
a path that would leave its mount (`/v1/`, `/<route>/`) is refused. `%2F` is left encoded, so it can
never become a separator. An absolute-form target (`GET http://elsewhere/v1/x`) contributes only its
path and query; its host is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from plproxy.errors import BadRequest, NotFound
from plproxy.settings import Route


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    path: str  # the path below the mount: "" or starting with "/", still percent-encoded
    query: str  # the raw query string, without '?'

    @property
    def rest(self) -> str:
        """The path below the mount without its leading slash, as APIs are recognised by."""
        return self.path[1:]

    @property
    def url(self) -> URL:
        """The upstream URL, built from the route's base; `encoded=True` keeps `%2F` and friends as sent."""
        text = f"{self.route.url}{self.path}"
        if self.query:
            text = f"{text}?{self.query}"
        return URL(text, encoded=True)


def split_target(raw_target: str) -> tuple[str, str]:
    """The raw path and raw query of a request target in origin-form or absolute-form."""
    if not raw_target.startswith("/"):
        # absolute-form (RFC 9112 §3.2.2): keep only path and query, never the host
        scheme_end = raw_target.find("://")
        if scheme_end == -1:
            raise BadRequest("The request target must be a path such as /v1/chat/completions.")
        path_start = raw_target.find("/", scheme_end + 3)
        query_start = raw_target.find("?", scheme_end + 3)
        if path_start == -1 or (query_start != -1 and query_start < path_start):
            raw_target = "/" + (raw_target[query_start:] if query_start != -1 else "")
        else:
            raw_target = raw_target[path_start:]
    path, _, query = raw_target.partition("?")
    path = path.partition("#")[0]
    return path, query


def resolve_dot_segments(path: str) -> list[str]:
    """The path's segments with `.` and `..` (also `%2e`) resolved; raises BadRequest above the root."""
    resolved: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        decoded = segment.replace("%2e", ".").replace("%2E", ".")
        last = index == len(segments) - 1
        if decoded == ".":
            if last:
                resolved.append("")
            continue
        if decoded == "..":
            if not resolved:
                raise BadRequest("The path climbs above the root with '..'.")
            resolved.pop()
            if last:
                resolved.append("")
            continue
        resolved.append(segment)
    return resolved


def resolve(raw_target: str, routes: tuple[Route, ...]) -> Target:
    """The upstream target for a request, or BadRequest / NotFound.

    The mount is the first segment as sent; the rest is resolved below it, so `/v1/../x` is refused
    rather than sent anywhere else, even to another configured route.
    """
    path, query = split_target(raw_target)
    mount, slash, rest = path[1:].partition("/")
    for route in routes:
        if route.name == mount:
            try:
                segments = resolve_dot_segments("/" + rest)
            except BadRequest:
                raise BadRequest(
                    f"The path leaves /{mount}/ after resolving '..'; it was not forwarded."
                ) from None
            return Target(route, "/" + "/".join(segments) if slash else "", query)
    raise NotFound(_not_found_message(routes))


def _not_found_message(routes: tuple[Route, ...]) -> str:
    mounts = ", ".join(f"/{route.name}/" for route in routes)
    return f"plproxy forwards only paths under {mounts}; see /healthz, /readyz and /metrics for its own."
