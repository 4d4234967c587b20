"""plproxy itself failing: SIGKILLed under load and restarted, again and again; its data dir filling up;
its file system turning read-only under it.

SIGKILL: every call whose answer the client had is exported in the end, except those that finished within
the store's durability window before a kill (the record is written a few milliseconds after the answer:
counted, and reported); duplicates at PromptLayer are counted and stay within what was in flight.

Disk full and read-only need root, to mount a small tmpfs and a loop-mounted ext4 volume (ext4's `abort`
mount option turns it read-only the way an I/O error does, with the files open); where that is not
possible the tests skip and say why. Chmod means nothing to root and a read-only remount is refused while
files are open for writing, so neither could stand in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from plproxy.exporter import MARK_BATCH
from tests.canary import Canary, Evidence
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.fault_helpers import CHAT, Plproxy, all_exported, chat, log_ids_at, wait_until

KILLS = 4
CLIENTS = 4
EXPORT_CONCURRENCY = 8
ROUND_SECONDS = 1.0
CALLS_PER_CLIENT_PER_ROUND = 300  # a bound, never reached at loopback speed within a round
PACE = 0.02  # seconds between one client's calls: a steady load, not a flood to drain afterwards
DURABILITY_WINDOW = 0.25  # seconds: a call answered this close to a kill may not have been written yet


async def load(proxy: Plproxy, canary: Canary, seconds: float, completed: dict[str, float]) -> int:
    """`CLIENTS` clients calling at a steady pace for `seconds`; fills `completed` (log id → when the client
    had the whole answer) and returns how many calls were cut (the process was killed under them)."""
    stop = time.monotonic() + seconds
    failed = 0

    async def client() -> None:
        nonlocal failed
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for _ in range(CALLS_PER_CLIENT_PER_ROUND):
                if time.monotonic() > stop:
                    return
                try:
                    status, log_id, _ = await chat(session, proxy, canary)
                except aiohttp.ClientConnectorError:  # refused: the process is gone, nothing was cut
                    await asyncio.sleep(0.05)
                    continue
                except (aiohttp.ClientError, TimeoutError):  # cut: in flight when the process died
                    failed += 1
                    continue
                if status == 200 and log_id:
                    completed[log_id] = time.monotonic()
                await asyncio.sleep(PACE)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return failed


async def test_sigkill_under_load_again_and_again(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
) -> None:
    promptlayer.delay = 0.01  # exports take a moment: some are always in flight when the kill comes
    proxy = await run_plproxy(
        fake_openai, promptlayer, PLPROXY_EXPORT_CONCURRENCY=str(EXPORT_CONCURRENCY), PLPROXY_LOG_LEVEL="info"
    )
    completed: dict[str, float] = {}
    kills: list[float] = []
    failed = 0
    for round_ in range(KILLS):
        if round_:
            await proxy.start()  # same port, same data dir
        loading = asyncio.create_task(load(proxy, canary, ROUND_SECONDS + 0.2, completed))
        await asyncio.sleep(ROUND_SECONDS)
        kills.append(time.monotonic())
        await proxy.kill()
        failed += await loading
    await proxy.start()
    failed += await load(proxy, canary, ROUND_SECONDS, completed)

    def at_risk(log_id: str) -> bool:
        # answered just before the kill, or while the signal was on its way (after `kills` was noted)
        done = completed[log_id]
        return any(-0.1 <= kill - done < DURABILITY_WINDOW for kill in kills)

    must_arrive = [log_id for log_id in completed if not at_risk(log_id)]
    await all_exported(promptlayer, must_arrive, timeout=60)
    await asyncio.sleep(1.0)  # what was at risk and did survive arrives too
    seen = log_ids_at(promptlayer)
    lost = [log_id for log_id in completed if log_id not in seen]
    duplicates = sum(n - 1 for n in seen.values())
    assert all(at_risk(log_id) for log_id in lost)
    duplicate_bound = KILLS * (EXPORT_CONCURRENCY + MARK_BATCH)  # in flight + waiting for their mark
    assert duplicates <= duplicate_bound, f"{duplicates} duplicates for {KILLS} kills"
    assert len(proxy.events_named("store_released_dead_leases")) >= 1  # a restart does not wait for leases
    evidence.figure(
        "faults",
        f"SIGKILL under load, {KILLS} times, restarted each time",
        {
            "calls": len(completed),
            "calls_cut_by_the_kills": failed,
            "records_lost": len(lost),
            "records_lost_outside_the_durability_window": 0,
            "duplicates": duplicates,
            "duplicate_bound": duplicate_bound,
        },
    )


# --- the data dir failing under a running proxy ---------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs stands in for a full disk, and mounting one needs root")
    path.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))  # lazy: a process still holding files never blocks the suite


@dataclass
class Volume:
    device: str
    path: Path

    def turn_read_only(self) -> None:
        """What ext4 does on an I/O error with errors=remount-ro: read-only now, files open or not."""
        result = _run("mount", "-o", "remount,abort", str(self.path))
        assert result.returncode == 0, result.stderr

    def repair(self) -> None:
        """What an operator does: unmount, fsck, mount again."""
        assert _run("umount", str(self.path)).returncode == 0
        _run("e2fsck", "-fy", self.device)  # exits 1 when it fixed something
        result = _run("mount", "-o", "errors=remount-ro", self.device, str(self.path))
        assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def ext4_volume(tmp_path: Path, size_mb: int = 64) -> Iterator[Volume]:
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted ext4 volume stands in for a failing disk, and mounting one needs root")
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "volume.img"
    with image.open("wb") as sink:
        sink.truncate(size_mb * 2**20)
    attached = _run("losetup", "-f", "--show", str(image))
    if attached.returncode:
        pytest.skip(f"no loop device here: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    mount = tmp_path / "volume"
    mount.mkdir()
    try:
        assert _run("mkfs.ext4", "-q", "-F", device).returncode == 0
        mounted = _run("mount", "-o", "errors=remount-ro", device, str(mount))
        if mounted.returncode:
            pytest.skip(f"cannot mount an ext4 volume here: {mounted.stderr.strip()}")
        yield Volume(device, mount)
    finally:
        _run("umount", "-l", str(mount))
        _run("losetup", "-d", device)


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full (unbuffered: nothing left to flush at close)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)


def keep_store(proxy: Plproxy) -> None:
    """A copy of a data dir that lives on a volume about to be unmounted, for the secrets scan."""
    with contextlib.suppress(OSError):
        shutil.copytree(proxy.data_dir, proxy.dir / "data-copy")


async def readiness(proxy: Plproxy) -> tuple[int, dict[str, Any]]:
    status, body = await proxy.get("/readyz")
    return status, orjson.loads(body)


async def calls(
    session: aiohttp.ClientSession, proxy: Plproxy, canary: Canary, n: int, body: dict[str, Any] = CHAT
) -> list[str]:
    log_ids = []
    for _ in range(n):
        status, log_id, _ = await chat(session, proxy, canary, body)
        assert status == 200  # plproxy keeps proxying, whatever its disk does
        assert log_id is not None
        log_ids.append(log_id)
    return log_ids


async def stored(proxy: Plproxy, n: int) -> None:
    async def enough() -> bool:
        return await proxy.metric("plproxy_records_total", outcome="stored") >= n

    await wait_until(enough, 10, f"{n} records stored")


async def test_data_dir_full_then_freed(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
    tmp_path: Path,
) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 256 * 1024}]}
    with tmpfs(tmp_path / "small-disk", "16m") as disk:
        promptlayer.stall_until_released()  # nothing leaves the store until the end: all of it must be there
        proxy = await run_plproxy(fake_openai, promptlayer, data_dir=disk / "data")
        try:
            async with aiohttp.ClientSession() as session:
                before = await calls(session, proxy, canary, 5)
                await stored(proxy, 5)
                filler = disk / "filler"
                fill(filler)
                during = await calls(session, proxy, canary, 8, big)
                _status, ready = await wait_until(
                    lambda: _not_ready(proxy), 10, "/readyz to turn 503 with the disk full"
                )
                assert "store not writable" in ready["problems"]
                assert await proxy.metric("plproxy_store_writable") == 0
                failures = proxy.events_named("store_write_failed")
                assert failures
                assert "full" in str(failures[0]["error"])
                filler.unlink()  # an operator frees space: the writer's next retry goes through
                await wait_until(lambda: _ready(proxy), 15, "/readyz back to 200")
                assert await proxy.metric("plproxy_store_writable") == 1
                promptlayer.release()
                seen = await all_exported(promptlayer, before + during, timeout=30)
        finally:
            await proxy.stop()
            keep_store(proxy)
    assert set(seen.values()) == {1}
    evidence.figure(
        "faults",
        "data dir full (16 MiB tmpfs), then freed",
        {
            "calls": len(before) + len(during),
            "records_lost": 0,
            "duplicates": 0,
            "answered_while_full": len(during),
        },
    )


async def _not_ready(proxy: Plproxy) -> tuple[int, dict[str, Any]] | None:
    status, body = await readiness(proxy)
    return (status, body) if status == 503 else None


async def _ready(proxy: Plproxy) -> bool:
    status, _ = await readiness(proxy)
    return status == 200


async def test_data_dir_turned_read_only(
    run_plproxy: Any,
    fake_openai: FakeOpenAI,
    promptlayer: PromptLayerStandIn,
    canary: Canary,
    evidence: Evidence,
    tmp_path: Path,
) -> None:
    with ext4_volume(tmp_path) as volume:
        promptlayer.stall_until_released()
        proxy = await run_plproxy(fake_openai, promptlayer, data_dir=volume.path / "data")
        try:
            async with aiohttp.ClientSession() as session:
                before = await calls(session, proxy, canary, 20)
                await stored(proxy, 20)
                volume.turn_read_only()
                during = await calls(session, proxy, canary, 10)
                _status, ready = await wait_until(
                    lambda: _not_ready(proxy), 15, "/readyz to turn 503 on a read-only disk"
                )
                assert "store not writable" in ready["problems"]
                assert await proxy.metric("plproxy_store_writable") == 0
                failures = proxy.events_named("store_write_failed")
                assert failures
                assert "I/O" in str(failures[0]["error"]) or "readonly" in str(failures[0]["error"])
        finally:
            await proxy.stop()  # what never reached the disk is dropped at the stop, and counted
        volume.repair()
        await proxy.start()  # the same data dir, repaired
        try:
            promptlayer.release()
            seen = await all_exported(promptlayer, before, timeout=30)
        finally:
            await proxy.stop()
            keep_store(proxy)
    lost_during = [log_id for log_id in during if log_id not in seen]
    # exports in flight when the disk failed were accepted but could not be marked: sent again, at most
    # those in flight and those waiting for their mark (at-least-once)
    duplicates = sum(seen[log_id] - 1 for log_id in before)
    assert duplicates <= 8 + MARK_BATCH  # PLPROXY_EXPORT_CONCURRENCY's default
    evidence.figure(
        "faults",
        "data dir turned read-only (ext4 errors=remount-ro), repaired, restarted",
        {
            "calls": len(before) + len(during),
            "records_lost": len(lost_during),
            "records_lost_that_were_stored": 0,
            "duplicates": duplicates,
            "answered_while_read_only": len(during),
            "note": "calls made while the disk refused writes were answered but could not be stored",
        },
    )
