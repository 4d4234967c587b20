"""The exporter against the PromptLayer stand-in on loopback: delivery, retries, failures, keys, flush."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from plproxy.exporter import MARK_BATCH, Exporter, _parse_retry_after
from plproxy.metrics import Metrics
from plproxy.store import DB_FILENAME, Store
from tests.fakes.promptlayer import PromptLayerStandIn
from tests.test_store import log_payload

DEFAULT_KEY = "pl_default_key_5f3c9a1e7b2d4c6a"
TENANT_KEY = "pl_tenant_key_9e8d7c6b5a4f3e2d"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def open_store(tmp_path: Path, metrics: Metrics):  # type: ignore[no-untyped-def]
    stores: list[Store] = []

    def factory(*, has_default_key: bool = True) -> Store:
        s = Store(tmp_path, has_default_key=has_default_key, metrics=metrics)
        stores.append(s)
        return s

    yield factory
    for s in stores:
        s.close()


@pytest.fixture
def make_exporter(promptlayer: PromptLayerStandIn, metrics: Metrics):  # type: ignore[no-untyped-def]
    exporters: list[Exporter] = []

    def factory(store: Store, **kwargs: Any) -> Exporter:
        options: dict[str, Any] = {
            "base_url": promptlayer.base_url + "/",  # a trailing slash is stripped
            "default_api_key": DEFAULT_KEY,
            "base_backoff": 0.01,
            "max_backoff": 0.05,
            "poll_interval": 0.05,
            "request_timeout": 2.0,
            "metrics": metrics,
        }
        options.update(kwargs)
        exporter = Exporter(store, **options)
        exporters.append(exporter)
        return exporter

    yield factory
    assert all(e._run_task is None for e in exporters), "a test left an exporter running"


async def running(exporter: Exporter) -> asyncio.Task[None]:
    task = exporter.start()
    await asyncio.sleep(0)
    return task


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_state(store: Store, log_id: str, state: str, timeout: float = 5.0) -> None:
    async def check() -> bool:
        status = await asyncio.to_thread(store.get, log_id)
        return status is not None and status.state == state

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{log_id} did not become {state}: {store.get(log_id)}")
        await asyncio.sleep(0.02)


def submit(store: Store, log_id: str, n: int = 0, **kwargs: Any) -> None:
    body = log_payload(n) | {"metadata": {"log_id": log_id}}
    store.submit(log_id, lambda: body, **kwargs)


def arrived_ids(promptlayer: PromptLayerStandIn) -> list[str]:
    return [b["metadata"]["log_id"] for b in promptlayer.log_requests]


# ---- delivery ------------------------------------------------------------------------------------------


async def test_records_are_exported_and_marked(open_store, make_exporter, promptlayer, metrics) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    seen: list[tuple[str, int]] = []
    exporter = make_exporter(store, on_exported=lambda log_id, pl_id: seen.append((log_id, pl_id)))
    task = await running(exporter)
    try:
        for i in range(5):
            submit(store, f"r{i}", i)
        await promptlayer.wait_for_log_requests(5)
        for i in range(5):
            await wait_state(store, f"r{i}", "exported")
        ids = {store.get(f"r{i}").promptlayer_request_id for i in range(5)}  # type: ignore[union-attr]
        assert ids == set(promptlayer.accepted_ids)
        assert sorted(seen) == sorted((f"r{i}", store.get(f"r{i}").promptlayer_request_id) for i in range(5))  # type: ignore[union-attr]
        received = promptlayer.received[0]
        assert received.path == "/log-request"  # not //log-request
        assert received.headers["Content-Type"] == "application/json"
        assert received.headers["X-API-KEY"] == DEFAULT_KEY
        assert metrics.registry.get_sample_value("plproxy_records_total", {"outcome": "exported"}) == 5
        assert (
            metrics.registry.get_sample_value(
                "plproxy_promptlayer_responses_total", {"endpoint": "log-request", "status": "201"}
            )
            == 5
        )
    finally:
        await exporter.stop()
    assert task.done()


class CountingStore:
    """A store whose exporter-side calls are counted."""

    COUNTED = frozenset({"claim_due", "claim_due_followups", "mark_exported", "mark_exported_many"})

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: dict[str, int] = dict.fromkeys(self.COUNTED, 0)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


async def test_records_are_claimed_and_marked_in_batches(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    counting = CountingStore(store)
    for i in range(200):
        submit(store, f"r{i:03d}", i)
    submit(store, "with-followup", 200, followups=[("score", {"score": 5})])
    assert store.sync()
    seen: list[str] = []
    exporter = make_exporter(
        counting, batch_size=50, concurrency=8, on_exported=lambda log_id, _: seen.append(log_id)
    )
    task = await running(exporter)
    try:
        await wait_until(lambda: exporter.exported_count == 201, what="201 exports")
        await wait_until(lambda: len(promptlayer.followups("track-score")) == 1, what="the follow-up")
    finally:
        await exporter.stop()
    assert task.done()
    assert sorted(seen) == sorted({*(f"r{i:03d}" for i in range(200)), "with-followup"})  # one callback each
    assert store.counts()["exported"] == 201
    assert sorted(arrived_ids(promptlayer)) == sorted(seen)  # each sent once
    calls = counting.calls
    assert calls["mark_exported"] == 0
    assert 5 <= calls["claim_due"] <= 20, calls  # 201 records in batches of up to 50, not one by one
    # a transaction per buffer of marks (up to MARK_BATCH), not per record or per few records: when
    # every unmarked record held its send slot, these 201 records took 27 mark transactions
    assert calls["mark_exported_many"] <= 12, calls
    assert calls["claim_due_followups"] <= 20, calls  # looked for only when some may be due


class SlowMarkingStore:
    """A store whose mark transactions wait until `release()` (a disk that stalls)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._go = threading.Event()

    def release(self) -> None:
        self._go.set()

    def mark_exported_many(self, *args: Any, **kwargs: Any) -> Any:
        self._go.wait(10)
        return self._store.mark_exported_many(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_exported_records_waiting_for_their_mark_bound_what_a_crash_sends_again(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    """Sending does not wait for each mark, but records PromptLayer has and the store has not marked
    (what a crash would send again) never exceed the send slots plus one buffer of marks."""
    store = open_store()
    for i in range(100):
        submit(store, f"r{i:03d}", i)
    assert store.sync()
    slow = SlowMarkingStore(store)
    exporter = make_exporter(slow, batch_size=50, concurrency=4)
    await running(exporter)
    try:
        bound = 4 + MARK_BATCH
        await wait_until(lambda: len(promptlayer.log_requests) >= bound, what=f"{bound} exports")
        await asyncio.sleep(0.3)  # room for any send the bound should have held back
        assert len(promptlayer.log_requests) == bound
        assert store.counts()["exported"] == 0  # none marked yet: all of them would go again
        slow.release()
        await wait_until(lambda: exporter.exported_count == 100, what="100 exports")
    finally:
        slow.release()
        await exporter.stop()
    assert sorted(arrived_ids(promptlayer)) == [f"r{i:03d}" for i in range(100)]  # each once
    assert store.counts()["exported"] == 100


async def test_claimed_records_waiting_for_a_slot_are_released_on_stop(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    for i in range(20):
        submit(store, f"r{i:02d}", i)
    assert store.sync()
    promptlayer.stall_until_released()
    exporter = make_exporter(store, batch_size=20, concurrency=2)
    await running(exporter)
    try:
        await wait_until(lambda: promptlayer.held == 2, what="two calls in flight")
        assert len(exporter._queued) == 18  # claimed in one batch, waiting for a slot
    finally:
        await exporter.stop()
        promptlayer.release()
    assert store.counts()["pending"] == 20
    assert len(store.claim_due(100)) == 20  # no lease left behind


async def test_a_commit_wakes_the_exporter_at_once(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    exporter = make_exporter(store, poll_interval=30.0)
    await running(exporter)
    try:
        await asyncio.sleep(0.1)  # idle, waiting on a 30 s poll
        t0 = time.monotonic()
        submit(store, "prompt")
        await promptlayer.wait_for_log_requests(1, timeout=2)
        assert time.monotonic() - t0 < 1.0
    finally:
        await exporter.stop()


async def test_new_work_after_the_store_emptied_gathers_for_one_claim(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer, monkeypatch
) -> None:
    """At a moderate rate every commit (one per ~20 ms) would otherwise cost a claim of its own and a
    mark of its own: a transaction and a hand-off to a thread each."""
    from plproxy import exporter as exporter_module

    monkeypatch.setattr(exporter_module, "_CLAIM_PACE", 0.5)  # room for the commits on a slow machine
    store = open_store()
    counting = CountingStore(store)
    exporter = make_exporter(counting, poll_interval=30.0)  # polling would not find them in time
    await running(exporter)
    try:
        submit(store, "first")
        await promptlayer.wait_for_log_requests(1, timeout=2)  # that claim emptied the store
        claims_before = counting.calls["claim_due"]
        t0 = time.monotonic()
        for i in range(8):  # eight commits 10 ms apart, each of which wakes the exporter
            submit(store, f"r{i}", i)
            assert await asyncio.to_thread(store.sync)
            await asyncio.sleep(0.01)
        await promptlayer.wait_for_log_requests(9, timeout=2)
        waited = time.monotonic() - t0
    finally:
        await exporter.stop()
    assert counting.calls["claim_due"] - claims_before <= 2, counting.calls
    assert waited < 2.0  # claimed when the pace ended, not at the next poll (30 s)


async def test_records_written_by_another_process_are_found_by_polling(  # type: ignore[no-untyped-def]
    tmp_path, open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    exporter = make_exporter(store, poll_interval=0.05)
    await running(exporter)
    other = Store(tmp_path, has_default_key=True)  # its commits do not wake our exporter
    try:
        submit(other, "elsewhere")
        await promptlayer.wait_for_log_requests(1, timeout=3)
    finally:
        other.close()
        await exporter.stop()


async def test_200_records_with_promptlayer_down_then_up_arrive_exactly_once(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    await promptlayer.stop()
    store = open_store()
    exporter = make_exporter(store, concurrency=16, batch_size=50)
    await running(exporter)
    try:
        ids = [f"r{i:03d}" for i in range(200)]
        for i, log_id in enumerate(ids):
            submit(store, log_id, i)
        await asyncio.sleep(0.4)  # every record fails at least once: connection refused
        assert await asyncio.to_thread(store.backlog) == 200
        assert promptlayer.log_requests == []
        await promptlayer.start()
        await promptlayer.wait_for_log_requests(200, timeout=15)
        await wait_until(lambda: store.counts()["exported"] == 200, what="200 exported")
        await asyncio.sleep(0.2)  # nothing more arrives
        got = arrived_ids(promptlayer)
        assert sorted(got) == ids  # all of them, none twice
        assert store.counts() == {"pending": 0, "kept": 0, "exported": 200, "failed": 0}
    finally:
        await exporter.stop()


async def test_two_exporters_on_one_store_file_send_each_record_once(  # type: ignore[no-untyped-def]
    tmp_path, open_store, make_exporter, promptlayer
) -> None:
    a, b = open_store(), open_store()
    ea, eb = make_exporter(a, concurrency=4), make_exporter(b, concurrency=4)
    promptlayer.delay = 0.01
    ids = [f"r{i:03d}" for i in range(120)]
    for i, log_id in enumerate(ids):
        submit(a if i % 2 else b, log_id, i)
    await running(ea)
    await running(eb)
    try:
        await promptlayer.wait_for_log_requests(120, timeout=15)
        await asyncio.sleep(0.2)
        assert sorted(arrived_ids(promptlayer)) == ids
        assert ea.exported_count > 0
        assert eb.exported_count > 0
    finally:
        await ea.stop()
        await eb.stop()


# ---- retries ---------------------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured(open_store, make_exporter, promptlayer, metrics) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    promptlayer.rate_limit(1, retry_after=1)
    exporter = make_exporter(store)
    submit(store, "limited")
    await running(exporter)
    try:
        await promptlayer.wait_for_log_requests(1, timeout=5)
        first, second = promptlayer.received[0], promptlayer.received[1]
        assert first.status == 429
        assert second.at - first.at >= 0.95  # not after the 10-50 ms backoff
        assert len(promptlayer.received) == 2
        await wait_state(store, "limited", "exported")
        assert metrics.registry.get_sample_value("plproxy_export_retries_total") == 1
    finally:
        await exporter.stop()


def test_retry_after_parsing() -> None:
    assert _parse_retry_after("3") == 3
    assert _parse_retry_after("0.5") == 0.5
    assert _parse_retry_after("-4") == 0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after(formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=1.5)
    assert _parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0


async def test_a_5xx_storm_is_retried_until_it_passes(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    promptlayer.fail_next(500, 15)
    promptlayer.fail_next(502, 3, body="<html><body>Bad gateway</body></html>")
    promptlayer.fail_next(503, 2)
    exporter = make_exporter(store)
    for i in range(10):
        submit(store, f"r{i}", i)
    await running(exporter)
    try:
        await promptlayer.wait_for_log_requests(10, timeout=10)
        await wait_until(lambda: store.counts()["exported"] == 10, what="10 exported")
        assert sorted(arrived_ids(promptlayer)) == [f"r{i}" for i in range(10)]
        assert store.counts()["failed"] == 0
    finally:
        await exporter.stop()


async def test_resets_timeouts_and_non_json_answers_are_retried(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    promptlayer.reset_next(2)
    promptlayer.fail_next(200, 1, body="<html>captive portal</html>")
    exporter = make_exporter(store, request_timeout=0.3)
    submit(store, "r")
    await running(exporter)
    try:
        await wait_state(store, "r", "exported", timeout=10)
        statuses = [r.status for r in promptlayer.received]
        assert statuses[:3] == [None, None, 200]
        # a stall longer than the call's timeout is a retry too
        promptlayer.delay = 0.6
        submit(store, "slow")
        await promptlayer.wait_for_received(5, timeout=5)
        promptlayer.delay = 0
        await wait_state(store, "slow", "exported", timeout=10)
    finally:
        await exporter.stop()


# ---- permanent failures ----------------------------------------------------------------------------------


async def test_400_and_422_fail_the_record_with_promptlayers_answer(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer, metrics
) -> None:
    store = open_store()
    promptlayer.expect_invalid = True
    promptlayer.fail_next(400, 1)
    exporter = make_exporter(store)
    submit(store, "bad-request")
    await running(exporter)
    try:
        await wait_state(store, "bad-request", "failed")
        status = store.get("bad-request")
        assert status is not None
        assert "400" in (status.error or "")
        assert "Injected failure" in (status.error or "")

        invalid = {k: v for k, v in log_payload().items() if k != "model"}
        store.submit("invalid", lambda: invalid)
        await wait_state(store, "invalid", "failed")
        error = store.get("invalid").error or ""  # type: ignore[union-attr]
        assert error.startswith("PromptLayer answered 422")
        assert "model" in error  # the stand-in's detail names the missing field

        store.submit("huge-answer", lambda: log_payload())
        promptlayer.fail_next(404, 1, body="x" * 50_000)
        await wait_state(store, "huge-answer", "failed")
        assert len(store.get("huge-answer").error or "") <= 1000  # type: ignore[union-attr]
        assert len([r for r in promptlayer.received if r.status == 404]) == 1  # never retried
        assert metrics.registry.get_sample_value("plproxy_records_total", {"outcome": "failed"}) == 3
    finally:
        await exporter.stop()


# ---- keys --------------------------------------------------------------------------------------------------


async def test_per_record_key_goes_in_the_header_only(  # type: ignore[no-untyped-def]
    tmp_path, open_store, make_exporter, promptlayer
) -> None:
    store = open_store(has_default_key=True)
    exporter = make_exporter(store)
    submit(store, "tenant", api_key=TENANT_KEY)
    submit(store, "default")
    await running(exporter)
    try:
        await promptlayer.wait_for_log_requests(2)
        await wait_until(lambda: store.counts()["exported"] == 2, what="both exported")
        by_id = {r.json["metadata"]["log_id"]: r for r in promptlayer.received}
        assert by_id["tenant"].headers["X-API-KEY"] == TENANT_KEY
        assert by_id["default"].headers["X-API-KEY"] == DEFAULT_KEY
        for r in promptlayer.received:
            assert TENANT_KEY.encode() not in r.body
            assert DEFAULT_KEY.encode() not in r.body
            assert "api_key" not in r.json
        payloads = [s.payload for s in store.recent(10)]
        assert all(TENANT_KEY not in str(p) for p in payloads)
    finally:
        await exporter.stop()
    store.close()
    # after export nothing is left to send with it: the key is gone from the database file
    assert TENANT_KEY.encode() not in (tmp_path / DB_FILENAME).read_bytes()


async def test_a_key_that_is_no_header_value_fails_its_record_and_sends_nothing(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    exporter = make_exporter(store)
    submit(store, "bad", api_key="pl_key\r\nX-Injected: yes")
    submit(store, "good")
    await running(exporter)
    try:
        await wait_state(store, "bad", "failed")
        await wait_state(store, "good", "exported")
    finally:
        await exporter.stop()
    assert store.get("bad").error == "the API key is not a valid HTTP header value"  # type: ignore[union-attr]
    assert arrived_ids(promptlayer) == ["good"]
    assert all("X-Injected" not in r.headers for r in promptlayer.received)


async def test_timeouts_and_unreachable_promptlayer_are_stored_as_such(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    exporter = make_exporter(store, request_timeout=0.2, base_backoff=5.0, max_backoff=5.0)
    promptlayer.delay = 0.5
    submit(store, "slow")
    await running(exporter)

    def error(log_id: str) -> str:
        status = store.get(log_id)
        return (status.error or "") if status is not None else ""

    try:
        await wait_until(lambda: bool(error("slow")), what="a timeout")
        assert error("slow") == "no answer from PromptLayer within 0.2s"
        await promptlayer.stop()
        submit(store, "down")
        await wait_until(lambda: bool(error("down")), what="a connection error")
        assert error("down").startswith(
            "cannot reach PromptLayer: ConnectionFailed: cannot connect to http://127.0.0.1:"
        )
        assert DEFAULT_KEY not in error("down")
    finally:
        await exporter.stop()


async def test_without_a_default_key_only_records_with_their_own_key_are_sent(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store(has_default_key=False)
    exporter = make_exporter(store, default_api_key=None)
    submit(store, "kept")
    submit(store, "tenant", api_key=TENANT_KEY)
    await running(exporter)
    try:
        await wait_state(store, "tenant", "exported")
        await asyncio.sleep(0.2)
        assert store.get("kept").state == "kept"  # type: ignore[union-attr]
        assert promptlayer.api_keys_seen == {TENANT_KEY}
    finally:
        await exporter.stop()


async def test_no_key_in_any_log_line_or_stored_error(open_store, make_exporter, promptlayer, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    store = open_store()
    promptlayer.fail_next(401, 1, body=f"invalid api key {TENANT_KEY}")  # an answer that echoes the key
    promptlayer.fail_next(500, 1, body=f"upstream broke for {DEFAULT_KEY}")
    exporter = make_exporter(store)
    submit(store, "echo", api_key=TENANT_KEY)
    submit(store, "retried")
    await running(exporter)
    try:
        await wait_state(store, "echo", "failed")
        await wait_state(store, "retried", "exported")
        await promptlayer.stop()  # connection errors too
        submit(store, "down", api_key=TENANT_KEY)
        await asyncio.sleep(0.3)
    finally:
        await exporter.stop()
    assert "[REDACTED]" in (store.get("echo").error or "")  # type: ignore[union-attr]
    assert "promptlayer_unavailable" in caplog.text
    assert "export_failed" in caplog.text
    for record in caplog.records:
        text = record.getMessage() + str(record.__dict__)
        assert TENANT_KEY not in text
        assert DEFAULT_KEY not in text
    for status in (store.get(i) for i in ("echo", "retried", "down")):
        assert status is not None
        assert TENANT_KEY not in (status.error or "")
        assert DEFAULT_KEY not in (status.error or "")


# ---- follow-ups ------------------------------------------------------------------------------------------


async def test_followups_are_sent_after_export_with_the_request_id(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    exporter = make_exporter(store)
    submit(store, "r", followups=[("score", {"score": 90, "name": "quality"}), ("group", {"group_id": 7})])
    store.add_followup("r", "metadata", {"metadata": {"reviewed": "yes"}})
    store.add_followup("r", "prompt", {"prompt_name": "greeter", "label": "prod"})
    submit(store, "tenant", api_key=TENANT_KEY, followups=[("score", {"score": 10})])
    await running(exporter)
    try:
        await wait_until(lambda: len(promptlayer.followups("track-score")) == 2, what="two scores")
        await wait_until(lambda: len(promptlayer.followups("track-prompt")) == 1, what="the prompt link")
        pl_id = store.get("r").promptlayer_request_id  # type: ignore[union-attr]
        tenant_id = store.get("tenant").promptlayer_request_id  # type: ignore[union-attr]
        assert {b["request_id"] for b in promptlayer.followups("track-score")} == {pl_id, tenant_id}
        assert promptlayer.followups("track-group") == [{"request_id": pl_id, "group_id": 7}]
        assert promptlayer.followups("track-metadata") == [
            {"request_id": pl_id, "metadata": {"reviewed": "yes"}}
        ]
        assert promptlayer.followups("track-prompt") == [
            {"request_id": pl_id, "prompt_name": "greeter", "label": "prod"}
        ]
        # the tenant's follow-up used the tenant's key
        tenant_score = next(
            r
            for r in promptlayer.received
            if r.path == "/rest/track-score" and r.json["request_id"] == tenant_id
        )
        assert tenant_score.headers["X-API-KEY"] == TENANT_KEY
        await wait_until(
            lambda: [s for _, s, _ in store.followup_states("r")] == ["exported"] * 4,
            what="follow-ups marked",
        )
        # follow-ups of one record go in the order they were added
        r_order = [
            r.path for r in promptlayer.received if r.path != "/log-request" and r.json["request_id"] == pl_id
        ]
        assert r_order == [
            "/rest/track-score",
            "/rest/track-group",
            "/rest/track-metadata",
            "/rest/track-prompt",
        ]
    finally:
        await exporter.stop()


async def test_a_followup_is_retried_then_fails_on_a_4xx(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    exporter = make_exporter(store)
    submit(store, "r")
    await running(exporter)
    try:
        await wait_state(store, "r", "exported")
        promptlayer.fail_next(503, 2)
        store.add_followup("r", "score", {"score": 5})
        await wait_until(lambda: len(promptlayer.followups("track-score")) == 1, what="the score")
        promptlayer.fail_next(422, 1)
        store.add_followup("r", "group", {"group_id": 1})
        await wait_until(lambda: store.followup_states("r")[-1][1] == "failed", what="the failed group")
        assert "422" in (store.followup_states("r")[-1][2] or "")
    finally:
        await exporter.stop()


# ---- flush and stop --------------------------------------------------------------------------------------


async def test_flush_sends_everything_due_and_reports(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    for i in range(30):
        submit(store, f"r{i:02d}", i)
    assert await asyncio.to_thread(store.sync)
    # one record has a long backoff that ends within the deadline: the flush does not wait for it
    [claim] = store.claim_due(1)
    store.retry_later(claim.log_id, time.time() + 3, "503 earlier")
    promptlayer.fail_next(400, 1)
    exporter = make_exporter(store)  # not running: as `plproxy flush` uses it
    t0 = time.monotonic()
    report = await exporter.flush(5.0)
    assert time.monotonic() - t0 < 2.0
    assert (report.exported, report.failed, report.still_pending) == (29, 1, 0)
    assert not report.deadline_reached
    assert len(promptlayer.log_requests) == 29


async def test_flush_respects_its_deadline_with_promptlayer_stalled(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    for i in range(20):
        submit(store, f"r{i:02d}", i)
    assert await asyncio.to_thread(store.sync)
    promptlayer.stall_until_released()
    exporter = make_exporter(store, request_timeout=30.0)
    t0 = time.monotonic()
    report = await exporter.flush(0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.7, elapsed
    assert report.deadline_reached
    assert (report.exported, report.failed, report.still_pending) == (0, 0, 20)
    assert promptlayer.held > 0  # calls were in flight when the deadline came
    # the abandoned calls' leases were released: a later flush can send them at once
    promptlayer.release()
    report = await exporter.flush(5.0)
    assert report.still_pending == 0
    assert report.exported == 20


async def test_flush_with_promptlayer_down_returns_by_the_deadline(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    await promptlayer.stop()
    store = open_store()
    for i in range(5):
        submit(store, f"r{i}", i)
    assert await asyncio.to_thread(store.sync)
    exporter = make_exporter(store)
    t0 = time.monotonic()
    report = await exporter.flush(0.5)
    assert time.monotonic() - t0 < 0.7
    assert report.still_pending == 5
    assert report.exported == 0


async def test_flush_while_running_at_sigterm(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    promptlayer.delay = 0.05
    exporter = make_exporter(store, poll_interval=30.0)
    await running(exporter)
    try:
        for i in range(20):
            submit(store, f"r{i:02d}", i)
        report = await exporter.flush(5.0)
        assert report.still_pending == 0
        assert store.counts()["exported"] == 20
    finally:
        await exporter.stop()
    assert sorted(arrived_ids(promptlayer)) == [f"r{i:02d}" for i in range(20)]


async def test_flush_includes_records_the_writer_has_not_committed_yet(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    exporter = make_exporter(store)

    def slow_body() -> dict[str, Any]:
        time.sleep(0.3)  # a slow disk, a busy writer thread: the record is committed late
        return log_payload() | {"metadata": {"log_id": "slow"}}

    store.submit("slow", slow_body)
    report = await exporter.flush(5.0)
    assert (report.exported, report.still_pending) == (1, 0)
    assert arrived_ids(promptlayer) == ["slow"]


async def test_stop_cancels_in_flight_calls_and_releases_their_leases(  # type: ignore[no-untyped-def]
    open_store, make_exporter, promptlayer
) -> None:
    store = open_store()
    promptlayer.stall_until_released()
    exporter = make_exporter(store, request_timeout=30.0)
    task = await running(exporter)
    for i in range(3):
        submit(store, f"r{i}", i)
    await wait_until(lambda: promptlayer.held == 3, what="three calls held")
    t0 = time.monotonic()
    await exporter.stop()
    await exporter.stop()  # idempotent
    assert time.monotonic() - t0 < 1.0
    assert task.done()
    assert store.counts()["pending"] == 3
    assert len(store.claim_due(10)) == 3  # not leased any more


async def test_kept_records_go_once_released(open_store, make_exporter, promptlayer) -> None:  # type: ignore[no-untyped-def]
    store = open_store(has_default_key=False)
    submit(store, "kept")
    assert await asyncio.to_thread(store.sync)
    assert store.get("kept").state == "kept"  # type: ignore[union-attr]
    # `plproxy flush` with a key: release what was kept, then flush
    assert store.release_kept() == 1
    report = await make_exporter(store).flush(5.0)
    assert report.exported == 1
    assert promptlayer.api_keys_seen == {DEFAULT_KEY}
