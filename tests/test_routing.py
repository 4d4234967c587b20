"""Routing: the request target contributes a path below a configured base and a query, nothing else."""

from __future__ import annotations

import pytest
from yarl import URL

from plproxy.errors import BadRequest, NotFound
from plproxy.routing import resolve
from plproxy.settings import Route

ROUTES = (Route("v1", URL("https://up.example/v1")), Route("local", URL("http://127.0.0.1:8080/base")))


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("/v1/chat/completions", "https://up.example/v1/chat/completions"),
        ("/v1/models?limit=2&x=%20y", "https://up.example/v1/models?limit=2&x=%20y"),
        ("/v1/files/a%2Fb/content", "https://up.example/v1/files/a%2Fb/content"),
        ("/v1/a/../models", "https://up.example/v1/models"),
        ("/v1/a/%2e%2e/models", "https://up.example/v1/models"),
        ("/v1/./models", "https://up.example/v1/models"),
        ("/v1", "https://up.example/v1"),
        ("/v1/", "https://up.example/v1/"),
        ("/local/v1/chat/completions", "http://127.0.0.1:8080/base/v1/chat/completions"),
        ("http://evil.example/v1/models", "https://up.example/v1/models"),
        ("https://evil.example:8443/local/x?y=1", "http://127.0.0.1:8080/base/x?y=1"),
    ],
)
def test_targets(target: str, url: str) -> None:
    assert str(resolve(target, ROUTES).url) == url


@pytest.mark.parametrize(
    "target", ["/v1/../x", "/v1/%2e%2e/x", "/v1/%2E%2E/%2e%2e/etc", "/v1/a/../../local/x", "/v1/.."]
)
def test_leaving_the_mount_is_refused(target: str) -> None:
    with pytest.raises(BadRequest):
        resolve(target, ROUTES)


@pytest.mark.parametrize("target", ["/", "/x/y", "/%2e%2e/v1/models", "/V1/models", "*", "//evil.example/v1"])
def test_unknown_mounts_are_not_found(target: str) -> None:
    with pytest.raises((NotFound, BadRequest)):
        resolve(target, ROUTES)


def test_host_of_an_absolute_target_never_reaches_the_url() -> None:
    url = resolve("http://169.254.169.254/v1/latest/meta-data", ROUTES).url
    assert url.host == "up.example"
