"""Fixtures every test can use: fake OpenAI and Anthropic upstreams and a PromptLayer stand-in, on loopback.

Registered for the whole suite by the root conftest (`pytest_plugins = ["tests.fakes.fixtures"]`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn, load_spec, validate_followup, validate_log_request


@pytest_asyncio.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A started FakeOpenAI; `fake_openai.base_url` is what OPENAI_BASE_URL or plproxy's upstream holds."""
    server = FakeOpenAI()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A started FakeAnthropic; `fake_anthropic.base_url` is what ANTHROPIC_BASE_URL (or a route) holds."""
    server = FakeAnthropic()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def promptlayer() -> AsyncIterator[PromptLayerStandIn]:
    """A started PromptLayer stand-in. The test fails at teardown if a schema-invalid body reached it,
    unless the test set `promptlayer.expect_invalid = True`."""
    standin = PromptLayerStandIn()
    await standin.start()
    try:
        yield standin
    finally:
        standin.release()
        await standin.stop()
    if standin.invalid_bodies and not standin.expect_invalid:
        problems = "\n".join(f"  {b.path}: {'; '.join(b.errors)}" for b in standin.invalid_bodies)
        pytest.fail(
            f"the PromptLayer stand-in received {len(standin.invalid_bodies)} invalid body(ies):\n{problems}",
            pytrace=False,
        )


@dataclass(frozen=True)
class PromptLayerSchema:
    """The logging schema as the stand-in applies it, with its two checks."""

    spec: dict[str, Any]
    validate_log_request: Callable[[Any], list[str]]
    validate_followup: Callable[[str, Any], list[str]]


@pytest.fixture
def promptlayer_schema() -> PromptLayerSchema:
    return PromptLayerSchema(
        spec=load_spec(), validate_log_request=validate_log_request, validate_followup=validate_followup
    )
