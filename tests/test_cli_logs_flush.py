"""With no PromptLayer key, calls work and their records are kept; `plproxy logs` shows them (table, --json,
--limit, --follow) and `plproxy flush`, once a key is set, ships them all.

plproxy serves in-process; `logs` and `flush` run as real subprocesses beside it, on the same data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.fakes.promptlayer import PromptLayerStandIn
from tests.pipeline_helpers import client, log_status, pl_id_of, wait_state
from tests.proxy_fixtures import REPO, RunningProxy, StartProxy, plproxy_command

MESSAGES = [{"role": "user", "content": "Say hi to Ada"}]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", **extra}


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, plproxy_command(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


async def keyless_proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(PROMPTLAYER_API_KEY=None)


async def calls(proxy: RunningProxy, n: int, *, tags: str = "cli") -> list[str]:
    openai_client = client(proxy.base_url)
    log_ids = []
    for i in range(n):
        raw = await openai_client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"call {i}"}],
            extra_headers={"X-PL-Tags": tags},
        )
        assert raw.parse().choices[0].message.content == f"echo: call {i}"
        log_ids.append(raw.headers["X-PL-Log-Id"])
        await asyncio.sleep(0.002)  # distinct creation times: "newest first" is then well defined
    await openai_client.close()
    return log_ids


async def test_without_a_key_records_are_kept_and_listed(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await keyless_proxy(start_proxy)
    log_ids = await calls(proxy, 5)
    for log_id in log_ids:
        status, body = await log_status(http, proxy.url, log_id)
        assert status == 200
        assert body == {"log_id": log_id, "state": "kept", "promptlayer_request_id": None, "error": None}
    data_dir = str(proxy.settings.data_dir)
    env = cli_env(tmp_path)

    listed = await run_cli(env, "logs", "--json", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    records = [orjson.loads(line) for line in lines]  # one JSON object per line
    assert [r["log_id"] for r in records] == log_ids[::-1]  # full ids, newest first
    for record in records:
        assert record["state"] == "kept"
        assert record["model"] == "gpt-4o-mini"
        assert record["tags"] == ["cli"]
        assert record["input_tokens"] > 0
        assert record["latency_s"] > 0
        assert record["payload"]["metadata"]["plproxy_log_id"] == record["log_id"]

    table = await run_cli(env, "logs", "--data-dir", data_dir)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["TIME", "LOG", "ID", "STATE", "MODEL", "TAGS", "LATENCY", "TOKENS"]
    assert len(rows) == 5
    for row, log_id in zip(rows, log_ids[::-1], strict=True):
        assert log_id in row  # whole: version-7 ids share their first characters (their time)
        assert "kept" in row
        assert "gpt-4o-mini" in row
        assert " ms" in row

    limited = await run_cli(env, "logs", "--limit", "2", "--data-dir", data_dir)
    assert [line.split()[2] for line in limited.stdout.splitlines()[1:]] == log_ids[:-3:-1]
    limited_json = await run_cli(env, "logs", "--json", "-n", "3", "--data-dir", data_dir)
    assert [orjson.loads(line)["log_id"] for line in limited_json.stdout.splitlines()] == log_ids[:-4:-1]

    # the data dir from the environment, as `serve` finds it
    from_env = await run_cli(cli_env(tmp_path, PLPROXY_DATA_DIR=data_dir), "logs", "--json")
    assert from_env.stdout == listed.stdout

    empty = await run_cli(env, "logs", "--data-dir", str(tmp_path / "empty"))
    assert empty.returncode == 0
    assert "no records yet" in empty.stdout
    assert promptlayer.received == []  # no key: nothing was sent anywhere


async def read_line(stream: asyncio.StreamReader, timeout: float = 15.0) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the command ended"
    return line.decode()


async def test_logs_follow_prints_records_that_arrive_later(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, tmp_path: Path
) -> None:
    proxy = await keyless_proxy(start_proxy)
    [first] = await calls(proxy, 1)
    for existing, as_json in ((1, True), (2, False)):
        args = ["logs", "--follow", "--data-dir", str(proxy.settings.data_dir)]
        process = await asyncio.create_subprocess_exec(
            *plproxy_command(*args, *(["--json"] if as_json else [])),
            env=cli_env(tmp_path),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            if not as_json:
                assert (await read_line(process.stdout)).startswith("TIME")
            shown = [await read_line(process.stdout) for _ in range(existing)]  # what is there, newest first
            assert first[:8] in shown[0]
            [later] = await calls(proxy, 1, tags="later")
            started = time.monotonic()
            line = await read_line(process.stdout)
            assert time.monotonic() - started < 5
            if as_json:
                record: dict[str, Any] = orjson.loads(line)
                assert record["log_id"] == later
                assert record["tags"] == ["later"]
            else:
                assert later[:8] in line
                assert "later" in line
            first = later
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def test_flush_ships_kept_records_once_a_key_is_set(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await keyless_proxy(start_proxy)
    log_ids = await calls(proxy, 6)
    # follow-ups wait with their kept record
    async with http.post(f"{proxy.url}/plproxy/logs/{log_ids[0]}/score", json={"score": 42}) as response:
        assert response.status == 202
    async with http.post(f"{proxy.url}/plproxy/logs/{log_ids[1]}/group", json={"group_id": 9}) as response:
        assert response.status == 202
    await asyncio.sleep(0.3)
    assert promptlayer.received == []
    data_dir = str(proxy.settings.data_dir)

    without_key = await run_cli(cli_env(tmp_path), "flush", "--data-dir", data_dir)
    assert without_key.returncode == 0, without_key.stderr
    assert "nothing to send" in without_key.stdout
    assert "6 kept record(s) wait for PROMPTLAYER_API_KEY" in without_key.stdout

    env = cli_env(tmp_path, PROMPTLAYER_API_KEY="pl_flush_key", PROMPTLAYER_BASE_URL=promptlayer.base_url)
    flushed = await run_cli(env, "flush", "--data-dir", data_dir)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert flushed.stdout.splitlines()[0] == (
        "exported 6, failed 0, still pending 0 (6 kept record(s) released with the key)"
    )
    arrived = [body["metadata"]["plproxy_log_id"] for body in promptlayer.log_requests]
    assert sorted(arrived) == sorted(log_ids)  # all of them, each once
    assert promptlayer.api_keys_seen == {"pl_flush_key"}
    assert promptlayer.followups("track-score") == [
        {"request_id": pl_id_of(promptlayer, log_ids[0]), "score": 42}
    ]
    assert promptlayer.followups("track-group") == [
        {"request_id": pl_id_of(promptlayer, log_ids[1]), "group_id": 9}
    ]
    for log_id in log_ids:  # the running proxy sees what flush did in the shared store
        state = await wait_state(http, proxy.url, log_id, "exported")
        assert state["promptlayer_request_id"] == pl_id_of(promptlayer, log_id)

    again = await run_cli(env, "flush", "--data-dir", data_dir)
    assert again.returncode == 0
    assert again.stdout.strip() == "nothing to send"
    listed = await run_cli(env, "logs", "--json", "--data-dir", data_dir)
    assert {orjson.loads(line)["state"] for line in listed.stdout.splitlines()} == {"exported"}


async def test_flush_says_what_failed(
    start_proxy: StartProxy, promptlayer: PromptLayerStandIn, tmp_path: Path
) -> None:
    proxy = await keyless_proxy(start_proxy)
    await calls(proxy, 2)
    promptlayer.invalid_keys.add("pl_revoked_key")
    env = cli_env(tmp_path, PROMPTLAYER_API_KEY="pl_revoked_key", PROMPTLAYER_BASE_URL=promptlayer.base_url)
    flushed = await run_cli(env, "flush", "--data-dir", str(proxy.settings.data_dir))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert flushed.stdout.splitlines() == [
        "exported 0, failed 2, still pending 0 (2 kept record(s) released with the key)",
        "see `plproxy logs` for why PromptLayer refused the failed records",
    ]
    listed = await run_cli(env, "logs", "--json", "--data-dir", str(proxy.settings.data_dir))
    records = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert {r["state"] for r in records} == {"failed"}
    assert all("401" in r["error"] for r in records)
    assert "pl_revoked_key" not in listed.stdout + flushed.stdout + flushed.stderr
