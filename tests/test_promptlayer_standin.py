"""The PromptLayer stand-in: its schema checks against the SDK captures, its answers, and its fault knobs."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fakes.fixtures import PromptLayerSchema
from tests.fakes.promptlayer import (
    FOLLOWUP_PATHS,
    PromptLayerStandIn,
    load_spec,
    validate_followup,
    validate_log_request,
)

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "tests" / "data" / "captures"
KEY = {"X-API-KEY": "pl_test_key_123"}
LOG_CAPTURES = sorted(CAPTURES.glob("log-request-*.json"))
FOLLOWUP_CAPTURES = sorted([*CAPTURES.glob("library-track-*.json"), CAPTURES / "track-group.json"])


def _capture(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _as_rest(capture: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The SDK's legacy follow-up as its /rest/track-* twin: same fields, key in a header, not the body."""
    name = capture["path"].removeprefix("/").removeprefix("library-").removeprefix("track-")
    body = {k: v for k, v in capture["json"].items() if k != "api_key"}
    return f"/rest/track-{name}", body


def _chat_body() -> dict[str, Any]:
    return _capture(CAPTURES / "log-request-chat.json")["json"]


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(KEY if headers is None else headers)}
    async with session.post(url, data=data, headers=hdrs) as resp:
        text = await resp.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, parsed, resp


async def _log(session: aiohttp.ClientSession, pl: PromptLayerStandIn, body: Any = None) -> int:
    status, answer, _ = await _post(session, f"{pl.base_url}/log-request", body or _chat_body())
    assert status == 201, answer
    return int(answer["id"])


# --- schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", LOG_CAPTURES, ids=lambda p: p.stem)
async def test_every_log_request_capture_is_accepted(
    capture: Path, promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    recorded = _capture(capture)
    assert validate_log_request(recorded["json"]) == []
    status, answer, _ = await _post(
        session, promptlayer.base_url + recorded["path"], recorded["json"], recorded["headers"]
    )
    assert status == 201
    assert answer == {
        "id": 1000,
        "prompt_version": None,
        "status": recorded["json"]["status"],
        "error_type": recorded["json"]["error_type"],
        "error_message": recorded["json"]["error_message"],
    }
    assert promptlayer.log_requests == [recorded["json"]]


def test_captures_cover_both_records() -> None:
    assert {p.stem for p in LOG_CAPTURES} >= {"log-request-chat", "log-request-error"}


def test_schema_alone_refuses_plain_string_content() -> None:
    """No extra rule is needed: every message schema types `content` as an array (or null)."""
    schemas = load_spec()["components"]["schemas"]
    for name in (
        "SystemMessage",
        "UserMessage",
        "AssistantMessage",
        "ToolMessage",
        "DeveloperMessage",
        "FunctionMessage",
        "PlaceholderMessage",
    ):
        content = schemas[name]["properties"]["content"]
        types = {content.get("type")} | {branch.get("type") for branch in content.get("anyOf", [])}
        assert "string" not in types, name
        assert types - {None} <= {"array", "null"}, name


@pytest.mark.parametrize(("side", "index"), [("input", 0), ("input", 1), ("output", 0)])
async def test_plain_string_content_is_rejected(
    side: str, index: int, promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    body = _chat_body()
    body[side]["messages"][index]["content"] = "a plain string"
    errors = validate_log_request(body)
    assert errors == [f"{side}.messages.{index}.content: 'a plain string' is not of type 'array'"]
    promptlayer.expect_invalid = True
    status, answer, _ = await _post(session, f"{promptlayer.base_url}/log-request", body)
    assert status == 422
    assert answer["detail"][0]["loc"] == ["body", side, "messages", index, "content"]
    assert set(answer["detail"][0]) == {"loc", "msg", "type"}
    assert promptlayer.log_requests == []
    assert [b.errors for b in promptlayer.invalid_bodies] == [errors]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda b: b.pop("model"), "<body>"),
        (lambda b: b.update(request_start_time="yesterday"), "request_start_time"),
        (lambda b: b.update(request_end_time="2024-01-15T10:30:00"), "request_end_time"),  # no offset
        (lambda b: b.update(metadata={"n": 1}), "metadata.n"),
        (lambda b: b.update(tags=["x" * 513]), "tags.0"),
        (lambda b: b.update(score=101), "score"),
        (lambda b: b.update(prompt_version_number=0), "prompt_version_number"),
        (lambda b: b.update(status="OK"), "status"),
        (lambda b: b.update(error_type="TIMEOUT"), "error_type"),
        (lambda b: b.update(error_message="e" * 1025), "error_message"),
        (lambda b: b["input"]["messages"][0].pop("role"), "input.messages.0"),
        (lambda b: b["input"]["messages"][0].update(role="robot"), "input.messages.0"),
        (lambda b: b["input"]["messages"][0]["content"][0].pop("type"), "input.messages.0.content.0"),
        (lambda b: b["output"].update(type="poem"), "output"),
        (lambda b: b["output"]["messages"].append({"role": "tool", "content": []}), "output.messages.1"),
    ],
)
def test_invalid_bodies_are_named_by_location(change: Any, where: str) -> None:
    body = _chat_body()
    change(body)
    errors = validate_log_request(body)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{where}: ")


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(
            request_start_time="2024-01-15T10:30:00Z", request_end_time="2024-01-15T10:30:05.5+02:00"
        ),
        lambda b: b.update(input={"type": "completion", "content": [{"type": "text", "text": "Once"}]}),
        lambda b: b["output"]["messages"].__setitem__(
            0,
            {
                "role": "assistant",
                "content": [],
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
        ),
        lambda b: b["input"]["messages"].append(
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}
        ),
        lambda b: b["input"]["messages"][1]["content"].append(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
        ),
        lambda b: b["output"]["messages"][0]["content"].insert(0, {"type": "thinking", "thinking": "hmm"}),
    ],
)
def test_valid_variants_pass(change: Any) -> None:
    body = _chat_body()
    change(body)
    assert validate_log_request(body) == []


@pytest.mark.parametrize("capture", FOLLOWUP_CAPTURES, ids=lambda p: p.stem)
async def test_followup_captures_validate_and_are_accepted_in_rest_shape(
    capture: Path, promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    path, body = _as_rest(_capture(capture))
    assert path in FOLLOWUP_PATHS
    assert validate_followup(path, body) == []
    assert [await _log(session, promptlayer) for _ in range(2)] == [1000, 1001]  # the captures use 1001
    status, answer, _ = await _post(session, promptlayer.base_url + path, body)
    assert status == 200
    assert answer["success"] is True
    assert isinstance(answer["message"], str)
    assert promptlayer.followups(path) == [body]
    assert promptlayer.followups(path.removeprefix("/rest/")) == [body]


async def test_followup_for_an_unknown_request_id_is_a_400(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await _post(
        session, f"{promptlayer.base_url}/rest/track-score", {"request_id": 999, "score": 5}
    )
    assert status == 400
    assert answer["success"] is False
    assert answer["message"]
    assert promptlayer.followups("/rest/track-score") == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rest/track-score", {"request_id": 1000, "score": 101}),
        ("/rest/track-score", {"request_id": 1000}),
        ("/rest/track-metadata", {"request_id": 1000, "metadata": "k=v"}),
        ("/rest/track-prompt", {"request_id": 1000}),
        ("/rest/track-group", {"request_id": 1000, "group_id": "g"}),
    ],
)
async def test_invalid_followups_are_422(
    path: str, body: dict[str, Any], promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    assert validate_followup(path, body) != []
    await _log(session, promptlayer)
    promptlayer.expect_invalid = True
    status, answer, _ = await _post(session, promptlayer.base_url + path, body)
    assert status == 422
    assert answer["detail"][0]["loc"][0] == "body"
    assert len(promptlayer.invalid_bodies) == 1


def test_promptlayer_schema_fixture(promptlayer_schema: PromptLayerSchema) -> None:
    assert promptlayer_schema.validate_log_request(_chat_body()) == []
    assert promptlayer_schema.validate_followup("/rest/track-score", {"request_id": 1, "score": 1}) == []
    assert "LogRequest" in promptlayer_schema.spec["components"]["schemas"]
    with pytest.raises(ValueError, match="no request schema"):
        validate_followup("/track-score", {})


# --- answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "message"), [({}, "Missing"), ({"X-API-KEY": "pl_invalid"}, "Invalid")])
async def test_auth(
    headers: dict[str, str], message: str, promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    for path in ("/log-request", "/rest/track-score"):
        status, answer, _ = await _post(session, promptlayer.base_url + path, _chat_body(), headers)
        assert status == 401
        assert answer["success"] is False
        assert message in answer["message"]
    assert promptlayer.log_requests == []


async def test_malformed_json_is_a_400(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.expect_invalid = True
    status, answer, _ = await _post(session, f"{promptlayer.base_url}/log-request", b'{"provider": ')
    assert status == 400
    assert answer["success"] is False
    assert len(promptlayer.invalid_bodies) == 1


async def test_unknown_prompt_is_a_404(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.unknown_prompts.add("ghost")
    status, answer, _ = await _post(
        session, f"{promptlayer.base_url}/log-request", {**_chat_body(), "prompt_name": "ghost"}
    )
    assert status == 404
    assert answer["success"] is False
    assert await _log(session, promptlayer, {**_chat_body(), "prompt_name": "real"}) == 1000


async def test_unknown_paths_are_404(promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession) -> None:
    status, _, _ = await _post(session, f"{promptlayer.base_url}/track-request", {"api_key": "pl_x"})
    assert status == 404
    assert promptlayer.received[-1].path == "/track-request"


async def test_ids_increment_and_everything_is_recorded(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    ids = [await _log(session, promptlayer) for _ in range(3)]
    assert ids == [1000, 1001, 1002]
    assert promptlayer.accepted_ids == ids
    await _post(session, f"{promptlayer.base_url}/log-request", _chat_body(), {"X-API-KEY": "pl_other"})
    assert promptlayer.api_keys_seen == {"pl_test_key_123", "pl_other"}
    assert [r.status for r in promptlayer.received] == [201] * 4
    assert promptlayer.received[0].headers["x-api-key"] == "pl_test_key_123"
    assert promptlayer.received[0].json == _chat_body()
    assert promptlayer.summary() == {
        "received": {"/log-request": 4},
        "accepted": {"/log-request": 4},
        "invalid": 0,
    }


async def test_wait_for_log_requests(promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await _log(session, promptlayer)
        await _log(session, promptlayer)

    task = asyncio.ensure_future(later())
    bodies = await promptlayer.wait_for_log_requests(2, timeout=5)
    await task
    assert len(bodies) == 2
    with pytest.raises(
        AssertionError, match=r"expected 3 accepted /log-request bodies within 0.1s, 2 arrived"
    ):
        await promptlayer.wait_for_log_requests(3, timeout=0.1)


# --- faults ---------------------------------------------------------------------------------------


async def test_down_refuses_connections_and_restarts_on_the_same_port(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    await _log(session, promptlayer)
    port, url = promptlayer.port, promptlayer.base_url
    await promptlayer.stop()
    assert not promptlayer.running
    with pytest.raises(aiohttp.ClientConnectorError):
        await _post(session, f"{url}/log-request", _chat_body())
    await promptlayer.start()
    assert (promptlayer.port, promptlayer.base_url) == (port, url)
    assert await _log(session, promptlayer) == 1001
    assert len(promptlayer.log_requests) == 2


async def test_rate_limit_carries_retry_after(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.rate_limit(2, retry_after=0.5)
    for _ in range(2):
        status, answer, resp = await _post(session, f"{promptlayer.base_url}/log-request", _chat_body())
        assert status == 429
        assert resp.headers["Retry-After"] == "0.5"
        assert answer["success"] is False
    assert await _log(session, promptlayer) == 1000
    promptlayer.rate_limit(1, retry_after=3)
    _, _, resp = await _post(
        session, f"{promptlayer.base_url}/rest/track-score", {"request_id": 1000, "score": 1}
    )
    assert resp.headers["Retry-After"] == "3"


async def test_fail_next(promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession) -> None:
    promptlayer.fail_next(500, count=2)
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    promptlayer.fail_next(502, body=page)
    url = f"{promptlayer.base_url}/log-request"
    for _ in range(2):
        status, answer, _ = await _post(session, url, _chat_body())
        assert (status, answer["success"]) == (500, False)
    status, answer, resp = await _post(session, url, _chat_body())
    assert (status, answer, resp.content_type) == (502, page, "text/html")
    assert await _log(session, promptlayer) == 1000
    assert [r.status for r in promptlayer.received] == [500, 500, 502, 201]


async def test_delay(promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession) -> None:
    promptlayer.delay = 0.3
    started = time.monotonic()
    await _log(session, promptlayer)
    assert time.monotonic() - started >= 0.3
    promptlayer.delay = 0
    started = time.monotonic()
    await _log(session, promptlayer)
    assert time.monotonic() - started < 0.3


async def test_stall_holds_requests_until_released(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.stall_until_released()
    pending = asyncio.ensure_future(_log(session, promptlayer))
    await promptlayer.wait_for_received(1)
    await asyncio.sleep(0.2)
    assert not pending.done()
    assert promptlayer.held == 1
    assert promptlayer.log_requests == []
    promptlayer.release()
    assert await asyncio.wait_for(pending, 5) == 1000
    assert promptlayer.held == 0


async def test_stop_drops_stalled_requests(
    promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.stall_until_released()
    pending = asyncio.ensure_future(_post(session, f"{promptlayer.base_url}/log-request", _chat_body()))
    await promptlayer.wait_for_received(1)
    started = time.monotonic()
    await promptlayer.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(aiohttp.ClientError):
        await pending


@pytest.mark.parametrize("after_accept", [False, True])
async def test_reset_next_aborts_mid_answer(
    after_accept: bool, promptlayer: PromptLayerStandIn, session: aiohttp.ClientSession
) -> None:
    promptlayer.reset_next(1, after_accept=after_accept)
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await _post(session, f"{promptlayer.base_url}/log-request", _chat_body())
    assert promptlayer.received[-1].reset
    assert promptlayer.received[-1].status is None
    assert len(promptlayer.log_requests) == (1 if after_accept else 0)
    assert await _log(session, promptlayer) == (1001 if after_accept else 1000)


async def test_invalid_body_fails_the_test_at_fixture_teardown(tmp_path: Path) -> None:
    test_file = tmp_path / "test_sends_invalid.py"
    test_file.write_text(
        textwrap.dedent("""
            import aiohttp

            async def test_sends_a_string_content(promptlayer):
                body = {
                    "provider": "openai", "model": "m", "request_start_time": 1.0, "request_end_time": 2.0,
                    "input": {"type": "chat", "messages": [{"role": "user", "content": "hi"}]},
                    "output": {"type": "chat", "messages": []},
                }
                async with aiohttp.ClientSession() as s:
                    url = promptlayer.base_url + "/log-request"
                    async with s.post(url, json=body, headers={"X-API-KEY": "pl_k"}) as r:
                        assert r.status == 422
        """)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        str(test_file),
        "-q",
        "-p",
        "tests.fakes.fixtures",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "--rootdir",
        str(tmp_path),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "1 passed, 1 error" in text
    assert "input.messages.0.content: 'hi' is not of type 'array'" in text


def test_standalone_process_prints_a_summary_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.promptlayer", "--port", "0", "--delay", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        base_url = line.removeprefix("listening on ")

        async def talk() -> None:
            async with aiohttp.ClientSession() as session:
                await _post(session, f"{base_url}/log-request", _chat_body())
                await _post(session, f"{base_url}/rest/track-score", {"request_id": 1000, "score": 7})
                await _post(session, f"{base_url}/rest/track-score", {"request_id": 5, "score": 7})

        asyncio.run(talk())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {
            "received": {"/log-request": 1, "/rest/track-score": 2},
            "accepted": {"/log-request": 1, "/rest/track-score": 1},
            "invalid": 0,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_validators_do_not_modify_their_input() -> None:
    body = _chat_body()
    before = copy.deepcopy(body)
    validate_log_request(body)
    assert body == before
