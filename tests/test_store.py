"""The store: durability, states and transitions, leases across processes, follow-ups, size cap."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from plproxy.metrics import Metrics
from plproxy.store import CLAIM_DUE_RECORDS, DB_FILENAME, SCHEMA_VERSION, Store, StoreError

KEY = "pl_tenant_key_0123456789abcdef"


def log_payload(n: int = 0, *, text: str = "hello", model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A /log-request body as plproxy.mapping would build it (valid for the PromptLayer schema)."""
    start = 1_700_000_000.0 + n
    return {
        "provider": "openai",
        "model": model,
        "input": {
            "type": "chat",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },
        "output": {
            "type": "chat",
            "messages": [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
        },
        "request_start_time": start,
        "request_end_time": start + 1.25,
        "tags": ["t1", f"n{n}"],
        "metadata": {"n": str(n)},
        "input_tokens": 3,
        "output_tokens": 5,
        "function_name": "openai.chat.completions.create",
        "api_type": "chat-completions",
    }


def records_count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("plproxy_records_total", {"outcome": outcome})
    return value or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def store(tmp_path: Path, metrics: Metrics):  # type: ignore[no-untyped-def]
    s = Store(tmp_path, has_default_key=True, metrics=metrics)
    yield s
    s.close()


def submit_many(store: Store, n: int, prefix: str = "r", **kwargs: Any) -> list[str]:
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    for i, log_id in enumerate(ids):
        store.submit(log_id, lambda i=i: log_payload(i), **kwargs)
    return ids


# ---- durability and group commit -------------------------------------------------------------------


def test_submitted_records_survive_close_and_reopen(tmp_path: Path) -> None:
    first = Store(tmp_path, has_default_key=True)
    ids = submit_many(first, 300)
    first.close()
    second = Store(tmp_path, has_default_key=True)
    try:
        assert second.counts()["pending"] == 300
        assert {s.log_id for s in second.recent(1000)} == set(ids)
        assert all(second.get(i) is not None for i in ids)
    finally:
        second.close()


def test_a_record_is_committed_promptly_without_close(tmp_path: Path) -> None:
    writer = Store(tmp_path, has_default_key=True)
    reader = Store(tmp_path, has_default_key=True)  # another connection, as another process would have
    try:
        t0 = time.monotonic()
        writer.submit("quick", lambda: log_payload())
        while reader.get("quick") is None:
            assert time.monotonic() - t0 < 1.0, "not committed within 1 s"
            time.sleep(0.005)
        # well within ~100 ms on any sane disk; the bound above is loose only to keep CI stable
        assert time.monotonic() - t0 < 0.5
    finally:
        writer.close()
        reader.close()


def test_group_commit_puts_many_records_in_one_transaction(tmp_path: Path) -> None:
    commits: list[int] = []
    gate = threading.Event()
    s = Store(tmp_path, has_default_key=True, on_commit=lambda: commits.append(1))
    try:

        def slow_first() -> dict[str, Any]:
            gate.wait(5)
            return log_payload()

        s.submit("first", slow_first)  # holds the writer while the others queue up
        submit_many(s, 200)
        gate.set()
        assert s.sync(5)
        assert s.counts()["pending"] == 201
        assert len(commits) <= 2  # the first record, then the 200 that waited, in one transaction
    finally:
        s.close()


def test_submit_never_waits_for_the_writer(tmp_path: Path) -> None:
    gate = threading.Event()
    s = Store(tmp_path, has_default_key=True)
    try:
        s.submit("blocker", lambda: (gate.wait(5), log_payload())[1])
        t0 = time.monotonic()
        submit_many(s, 1000)
        assert time.monotonic() - t0 < 0.5  # the writer is blocked; submit only enqueues
        gate.set()
        assert s.sync(5)
        assert s.counts()["pending"] == 1001
    finally:
        s.close()


def test_build_payload_runs_on_the_writer_thread(store: Store) -> None:
    seen: list[str] = []

    def build() -> dict[str, Any]:
        seen.append(threading.current_thread().name)
        return log_payload()

    store.submit("x", build)
    assert store.sync()
    assert seen == ["plproxy-store-writer"]


def test_build_payload_failure_is_stored_not_lost(tmp_path: Path, metrics: Metrics, caplog) -> None:  # type: ignore[no-untyped-def]
    s = Store(tmp_path, has_default_key=True, metrics=metrics)

    def broken() -> dict[str, Any]:
        raise KeyError("choices")

    s.submit("broken", broken, followups=[("score", {"score": 50})])
    s.submit("not-a-dict", lambda: ["nope"])  # type: ignore[arg-type, return-value]
    s.submit("unserializable", lambda: {"x": {1, 2}})
    s.submit("fine", lambda: log_payload())
    s.close()

    reopened = Store(tmp_path, has_default_key=True)
    try:
        for log_id in ("broken", "not-a-dict", "unserializable"):
            status = reopened.get(log_id)
            assert status is not None, log_id
            assert status.state == "failed"
            assert status.error
            assert "could not be built" in status.error
        broken_status = reopened.get("broken")
        assert broken_status is not None
        assert "KeyError" in (broken_status.error or "")
        assert reopened.followup_states("broken") == [("score", "failed", "not sent: its record failed")]
        assert reopened.get("fine") is not None
        assert reopened.get("fine").state == "pending"
        assert records_count(metrics, "failed") == 3
        assert records_count(metrics, "stored") == 1
        assert "store_build_payload_failed" in caplog.text
    finally:
        reopened.close()


# ---- states and transitions ----------------------------------------------------------------------------


def test_state_follows_the_key(tmp_path: Path) -> None:
    s = Store(tmp_path, has_default_key=False)
    try:
        s.submit("no-key", lambda: log_payload())
        s.submit("own-key", lambda: log_payload(), api_key=KEY)
        assert s.sync()
        assert s.get("no-key").state == "kept"  # type: ignore[union-attr]
        assert s.get("own-key").state == "pending"  # type: ignore[union-attr]
        assert s.counts() == {"pending": 1, "kept": 1, "exported": 0, "failed": 0}
        assert s.backlog() == 1
        # without a default key, only records that carry their own can be claimed
        assert [c.log_id for c in s.claim_due(10, require_own_key=True)] == ["own-key"]
        assert s.release_kept() == 1
        assert s.get("no-key").state == "pending"  # type: ignore[union-attr]
        assert s.release_kept() == 0
    finally:
        s.close()


def test_transitions(store: Store) -> None:
    submit_many(store, 3)
    assert store.sync()
    assert store.get("unknown") is None
    claims = store.claim_due(10)
    assert sorted(c.log_id for c in claims) == ["r0000", "r0001", "r0002"]
    assert orjson.loads(claims[0].payload)["model"] == "gpt-4o-mini"

    assert store.mark_exported("r0000", 1234)
    assert store.get("r0000").as_dict() == {  # type: ignore[union-attr]
        "log_id": "r0000",
        "state": "exported",
        "promptlayer_request_id": 1234,
        "error": None,
    }
    assert not store.mark_exported("r0000", 999)  # already exported: unchanged
    assert store.get("r0000").promptlayer_request_id == 1234  # type: ignore[union-attr]

    assert store.mark_failed("r0001", 'PromptLayer answered 400: {"message": "bad"}')
    status = store.get("r0001")
    assert status is not None
    assert status.state == "failed"
    assert "400" in (status.error or "")
    assert not store.retry_later("r0001", time.time(), "late")  # failed stays failed

    later = time.time() + 30
    assert store.retry_later("r0002", later, "PromptLayer answered 503")
    status = store.get("r0002")
    assert status is not None
    assert status.state == "pending"
    assert status.error == "PromptLayer answered 503"
    assert store.claim_due(10) == []  # not due yet
    again = store.claim_due(10, later + 1)
    assert [(c.log_id, c.attempts) for c in again] == [("r0002", 1)]
    assert store.counts() == {"pending": 1, "kept": 0, "exported": 1, "failed": 1}
    assert store.backlog() == 1


def test_recent_is_newest_first_with_summary_fields(store: Store) -> None:
    submit_many(store, 5)
    store.submit("err", lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    assert store.sync()
    rows = store.recent(3)
    assert [r.log_id for r in rows] == ["err", "r0004", "r0003"]
    row = rows[1]
    assert row.state == "pending"
    assert row.model == "gpt-4o-mini"
    assert row.tags == ("t1", "n4")
    assert row.latency == pytest.approx(1.25)
    assert (row.input_tokens, row.output_tokens, row.tokens) == (3, 5, 8)
    assert row.payload == log_payload(4)
    assert rows[0].payload is None
    assert rows[0].state == "failed"
    assert rows[1].created >= rows[2].created
    assert store.recent(2, include_payload=False)[1].payload is None
    assert [r.log_id for r in store.recent(10, since=rows[1].created)] == ["err"]


def test_iso_times_give_a_latency_too(store: Store) -> None:
    body = log_payload() | {
        "request_start_time": "2025-01-01T00:00:00.000+00:00",
        "request_end_time": "2025-01-01T00:00:02.500+00:00",
    }
    store.submit("iso", lambda: body)
    assert store.sync()
    assert store.recent(1)[0].latency == pytest.approx(2.5)


def test_duplicate_log_id_keeps_the_first(store: Store, caplog) -> None:  # type: ignore[no-untyped-def]
    store.submit("dup", lambda: log_payload(1))
    store.submit("dup", lambda: log_payload(2))
    assert store.sync()
    assert store.recent(5)[0].payload == log_payload(1)
    assert store.counts()["pending"] == 1
    assert "store_duplicate_log_id" in caplog.text


# ---- per-record keys -----------------------------------------------------------------------------------


def _raw_column(path: Path, sql: str, *args: Any) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def test_own_key_is_beside_the_record_never_in_its_payload(tmp_path: Path) -> None:
    s = Store(tmp_path, has_default_key=False)
    db = tmp_path / DB_FILENAME
    try:
        s.submit("k", lambda: log_payload(), api_key=KEY)
        # a body that somehow holds the key is scrubbed before it is stored
        s.submit("leaky", lambda: log_payload() | {"metadata": {"oops": KEY}}, api_key=KEY)
        assert s.sync()
        payloads = _raw_column(db, "SELECT payload FROM records")
        assert all(KEY.encode() not in p for p in payloads)
        assert _raw_column(db, "SELECT api_key FROM records WHERE log_id = 'k'") == [KEY]
        leaky = next(r for r in s.recent(5) if r.log_id == "leaky")
        assert leaky.payload is not None
        assert leaky.payload["metadata"] == {"oops": "[REDACTED]"}
        claim = next(c for c in s.claim_due(10) if c.log_id == "k")
        assert claim.api_key == KEY
        assert KEY not in repr(claim)
        assert s.mark_exported("k", 7)
        # nothing left to send with it: the key is erased
        assert _raw_column(db, "SELECT api_key FROM records WHERE log_id = 'k'") == [None]
    finally:
        s.close()


def test_own_key_is_kept_until_its_followups_are_sent(tmp_path: Path) -> None:
    s = Store(tmp_path, has_default_key=False)
    db = tmp_path / DB_FILENAME
    try:
        s.submit("k", lambda: log_payload(), api_key=KEY, followups=[("group", {"group_id": 3})])
        assert s.sync()
        s.claim_due(1)
        s.mark_exported("k", 42)
        assert _raw_column(db, "SELECT api_key FROM records") == [KEY]
        [fc] = s.claim_due_followups(10, require_own_key=True)
        assert (fc.kind, fc.request_id, fc.api_key, fc.body) == ("group", 42, KEY, {"group_id": 3})
        assert s.mark_followup_exported(fc.id)
        assert _raw_column(db, "SELECT api_key FROM records") == [None]
        # a later follow-up cannot go to the right workspace any more: it says so instead
        s.add_followup("k", "score", {"score": 10})
        assert s.sync()
        states = s.followup_states("k")
        assert states[0] == ("group", "exported", None)
        assert states[1][:2] == ("score", "failed")
        assert "no longer keeps" in (states[1][2] or "")
    finally:
        s.close()


def test_failed_record_forgets_its_key(tmp_path: Path) -> None:
    s = Store(tmp_path, has_default_key=False)
    try:
        s.submit("k", lambda: log_payload(), api_key=KEY)
        assert s.sync()
        s.mark_failed("k", "401")
        assert _raw_column(tmp_path / DB_FILENAME, "SELECT api_key FROM records") == [None]
    finally:
        s.close()


def test_db_file_is_private(tmp_path: Path) -> None:
    s = Store(tmp_path / "new", has_default_key=True)
    s.close()
    assert (tmp_path / "new" / DB_FILENAME).stat().st_mode & 0o077 == 0


# ---- follow-ups ---------------------------------------------------------------------------------------


def test_followups_wait_for_export_and_go_in_order(store: Store) -> None:
    store.submit("r", lambda: log_payload(), followups=[("score", {"score": 90, "request_id": 1})])
    store.add_followup("r", "metadata", {"metadata": {"a": "b"}})
    assert store.sync()
    assert store.claim_due_followups(10) == []  # the record is not exported yet
    store.claim_due(1)
    store.mark_exported("r", 555)
    [first] = store.claim_due_followups(10)
    assert (first.kind, first.request_id, first.body) == ("score", 555, {"score": 90})  # request_id stripped
    assert store.claim_due_followups(10) == []  # the next one waits for the first
    assert store.retry_followup_later(first.id, time.time() + 60, "503")
    assert store.claim_due_followups(10) == []  # still in order: the retried one comes first
    [again] = store.claim_due_followups(10, time.time() + 61)
    assert again.id == first.id
    assert again.attempts == 1
    assert store.mark_followup_exported(again.id)
    [second] = store.claim_due_followups(10)
    assert (second.kind, second.body) == ("metadata", {"metadata": {"a": "b"}})
    assert store.mark_followup_failed(second.id, "422 bad metadata")
    assert store.followup_states("r") == [
        ("score", "exported", None),
        ("metadata", "failed", "422 bad metadata"),
    ]


def test_followups_of_a_failed_record_fail_with_it(store: Store) -> None:
    store.submit("r", lambda: log_payload(), followups=[("score", {"score": 1})])
    assert store.sync()
    store.mark_failed("r", "400")
    store.add_followup("r", "group", {"group_id": 1})
    assert store.sync()
    assert [s[1] for s in store.followup_states("r")] == ["failed", "failed"]


def test_unknown_followup_kind_is_a_programming_error(store: Store) -> None:
    with pytest.raises(ValueError, match="kind"):
        store.add_followup("r", "vote", {})


# ---- leases -------------------------------------------------------------------------------------------


def test_two_stores_never_claim_the_same_record(tmp_path: Path) -> None:
    a = Store(tmp_path, has_default_key=True)
    b = Store(tmp_path, has_default_key=True)
    try:
        ids = submit_many(a, 400)
        assert a.sync()
        got: dict[str, list[str]] = {"a": [], "b": []}

        def drain(name: str, s: Store) -> None:
            while claims := s.claim_due(7):
                got[name].extend(c.log_id for c in claims)

        threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not set(got["a"]) & set(got["b"])
        assert sorted(got["a"] + got["b"]) == ids
    finally:
        a.close()
        b.close()


def test_a_dead_stores_leases_are_released_when_a_store_opens(tmp_path: Path) -> None:
    crashed = Store(tmp_path, has_default_key=True)
    crashed.submit("r", lambda: log_payload())
    assert crashed.sync()
    assert [c.log_id for c in crashed.claim_due(1, lease_seconds=30)] == ["r"]
    crashed.close()  # never marked: as if the process had died mid-send (its owner lock is gone)

    restarted = Store(tmp_path, has_default_key=True)
    try:
        assert restarted.get("r").state == "pending"  # type: ignore[union-attr]
        assert [c.log_id for c in restarted.claim_due(1)] == ["r"]  # at once, not after 30 s
        assert [p.name for p in (tmp_path / "owners").iterdir()] == [restarted._owner]
    finally:
        restarted.close()
    assert list((tmp_path / "owners").iterdir()) == []


def test_an_expired_lease_of_a_live_store_makes_the_record_due_again(tmp_path: Path) -> None:
    stuck = Store(tmp_path, has_default_key=True)  # alive, but never ends its lease
    other = Store(tmp_path, has_default_key=True)
    try:
        stuck.submit("r", lambda: log_payload())
        assert stuck.sync()
        assert [c.log_id for c in stuck.claim_due(1, lease_seconds=30)] == ["r"]
        late = Store(tmp_path, has_default_key=True)  # opening does not take a live store's leases
        late.close()
        assert other.claim_due(1) == []  # still leased
        assert [c.log_id for c in other.claim_due(1, time.time() + 31)] == ["r"]
    finally:
        stuck.close()
        other.close()


def test_release_ends_only_own_leases(tmp_path: Path) -> None:
    a = Store(tmp_path, has_default_key=True)
    b = Store(tmp_path, has_default_key=True)
    try:
        submit_many(a, 2)
        assert a.sync()
        [ca] = a.claim_due(1)
        [cb] = b.claim_due(1)
        a.release([ca.log_id, cb.log_id])
        assert [c.log_id for c in b.claim_due(5)] == [ca.log_id]  # b's own lease still holds
    finally:
        a.close()
        b.close()


def test_expedite_and_next_due(store: Store) -> None:
    submit_many(store, 2)
    assert store.sync()
    now = time.time()
    for c in store.claim_due(2):
        store.retry_later(c.log_id, now + (5 if c.log_id == "r0000" else 500), "503")
    assert store.next_due() == pytest.approx(now + 5)
    assert store.expedite(now + 10) == 1
    assert [c.log_id for c in store.claim_due(5)] == ["r0000"]


# ---- size cap -----------------------------------------------------------------------------------------


def _big(n: int) -> dict[str, Any]:
    return log_payload(n, text="x" * 20_000)


def test_prune_policy(tmp_path: Path, metrics: Metrics, caplog) -> None:  # type: ignore[no-untyped-def]
    cap = 600_000
    s = Store(tmp_path, has_default_key=True, max_bytes=cap, metrics=metrics)
    try:
        # 10 exported and 5 failed records, each ~20 kB
        for i in range(15):
            s.submit(f"old{i:02d}", lambda i=i: _big(i))
        assert s.sync()
        for c in s.claim_due(15):
            n = int(c.log_id[3:])
            if n < 10:
                s.mark_exported(c.log_id, 100 + n)
            else:
                s.mark_failed(c.log_id, "400")
        # pending records until the cap forces pruning: exported payloads go first, oldest first
        for i in range(16):
            s.submit(f"new{i:02d}", lambda i=i: _big(i))
        assert s.sync()
        rows = {r.log_id: r for r in s.recent(100)}
        pruned_exported = [k for k in sorted(rows) if k.startswith("old") and rows[k].payload is None]
        assert pruned_exported, "nothing was pruned"
        assert pruned_exported == [f"old{i:02d}" for i in range(len(pruned_exported))]
        if any(rows[f"old{i:02d}"].payload is None for i in range(10, 15)):
            assert all(rows[f"old{i:02d}"].payload is None for i in range(10))  # failed only after exported
        # a pruned record keeps its status row and summary
        status = s.get("old00")
        assert status is not None
        assert status.state == "exported"
        assert status.promptlayer_request_id == 100
        assert rows["old00"].model == "gpt-4o-mini"
        assert rows["old00"].tokens == 8
        assert records_count(metrics, "pruned") == len([r for r in rows.values() if r.payload is None])

        # only pending records left to keep: new ones are refused, loudly, and no pending one is lost
        for i in range(40):
            s.submit(f"more{i:02d}", lambda i=i: _big(i))
        assert s.sync()
        rows = {r.log_id: r for r in s.recent(1000)}
        pending = [r for r in rows.values() if r.state == "pending"]
        assert all(r.payload is not None for r in pending)
        assert all(rows[f"new{i:02d}"].state == "pending" for i in range(16))
        dropped = [r for r in rows.values() if r.error and r.error.startswith("dropped")]
        assert dropped, "the cap was never reached"
        assert all(r.state == "failed" and r.payload is None for r in dropped)
        assert records_count(metrics, "dropped") == len(dropped)
        assert "store_over_cap_refused" in caplog.text
        # everything prunable went first: payloads, then (oldest first) the status rows themselves
        assert all(rows[k].payload is None for k in rows if k.startswith("old"))
        gone = [i for i in range(15) if f"old{i:02d}" not in rows]
        assert gone == list(range(len(gone)))
    finally:
        s.close()


def test_status_rows_of_finished_records_go_last(tmp_path: Path) -> None:
    s = Store(tmp_path, has_default_key=True, max_bytes=400_000)
    try:
        for i in range(300):  # ~1 kB each, indexes included
            s.submit(f"a{i:03d}", lambda i=i: log_payload(i))
        assert s.sync()
        while claims := s.claim_due(100):
            for c in claims:
                s.mark_exported(c.log_id, 1)
        assert s.counts()["exported"] == 300
        for i in range(300):
            s.submit(f"b{i:03d}", lambda i=i: log_payload(i))
        assert s.sync()
        counts = s.counts()
        assert counts["pending"] == 300  # never pruned
        assert counts["failed"] == 0  # nothing refused: there was room to make
        assert counts["exported"] < 300  # the oldest finished status rows made room, after all payloads
        assert s.get("a000") is None
        assert all(r.payload is None for r in s.recent(1000) if r.log_id.startswith("a"))
    finally:
        s.close()


# ---- opening, readiness, closing ------------------------------------------------------------------------


def test_several_processes_can_open_a_new_store_at_once(tmp_path: Path) -> None:
    opened: list[Store] = []
    errors: list[BaseException] = []

    def open_one(d: Path) -> None:
        try:
            opened.append(Store(d, has_default_key=True))
        except BaseException as exc:
            errors.append(exc)

    for trial in range(5):
        threads = [threading.Thread(target=open_one, args=(tmp_path / str(trial),)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for s in opened:
        s.close()
    assert errors == []
    assert len(opened) == 30


def test_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(StoreError, match=r"plproxy\.db.*(corrupt|not a usable).*move it aside"):
        Store(tmp_path, has_default_key=True)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute("CREATE TABLE mine (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a plproxy store"):
        Store(tmp_path, has_default_key=True)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path, has_default_key=True).close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path, has_default_key=True)


def test_data_dir_is_created_and_must_be_a_directory(tmp_path: Path) -> None:
    Store(tmp_path / "a" / "b", has_default_key=True).close()
    assert (tmp_path / "a" / "b" / DB_FILENAME).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store(tmp_path / "file", has_default_key=True)


def test_writable_and_close_are_idempotent(tmp_path: Path, metrics: Metrics) -> None:
    s = Store(tmp_path, has_default_key=True, metrics=metrics)
    assert s.writable()
    assert metrics.registry.get_sample_value("plproxy_store_writable") == 1
    submit_many(s, 50)
    s.close(timeout=5)
    s.close()
    assert not s.writable()
    assert metrics.registry.get_sample_value("plproxy_store_writable") == 0
    with pytest.raises(StoreError, match="closed"):
        s.claim_due(1)
    s.submit("late", lambda: log_payload())  # counted and logged, never raised into the caller
    assert records_count(metrics, "dropped") == 1
    reopened = Store(tmp_path, has_default_key=True)
    try:
        assert reopened.counts()["pending"] == 50  # close drained the queue
    finally:
        reopened.close()


def test_commit_listener_runs_after_commits(store: Store) -> None:
    calls: list[str] = []
    store.add_commit_listener(lambda: calls.append(threading.current_thread().name))
    store.submit("r", lambda: log_payload())
    assert store.sync()
    assert calls
    assert calls[0] == "plproxy-store-writer"


def test_a_failing_listener_does_not_stop_the_writer(store: Store) -> None:
    store.add_commit_listener(lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    store.submit("r1", lambda: log_payload())
    assert store.sync()
    store.submit("r2", lambda: log_payload())
    assert store.sync()
    assert store.counts()["pending"] == 2
    assert store.writable()


def test_no_log_line_holds_a_key(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    s = Store(tmp_path, has_default_key=False)
    try:

        def broken() -> dict[str, Any]:
            raise RuntimeError(f"mapping blew up near {KEY}")

        s.submit("b", broken, api_key=KEY)
        s.submit("c", lambda: log_payload() | {"metadata": {"k": KEY}}, api_key=KEY)
        assert s.sync()
        assert KEY not in caplog.text
        assert KEY not in (s.get("b").error or "")  # type: ignore[union-attr]
    finally:
        s.close()


def test_a_version_1_store_is_migrated_and_keeps_its_records(tmp_path: Path) -> None:
    store = Store(tmp_path, has_default_key=True)
    store.submit("older", lambda: log_payload(1))
    assert store.sync()
    store.close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    # what version 1 looked like: the due index without `created`
    conn.execute("DROP INDEX records_due")
    conn.execute("CREATE INDEX records_due ON records (state, next_attempt)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    store = Store(tmp_path, has_default_key=True)
    try:
        assert [c.log_id for c in store.claim_due(10)] == ["older"]
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    columns = [row[2] for row in conn.execute("PRAGMA index_info(records_due)")]
    assert columns == ["state", "next_attempt", "created"]
    conn.close()


def test_a_claim_reads_the_backlog_in_index_order_without_sorting_it(tmp_path: Path) -> None:
    # A claim that sorted every pending record cost time in proportion to the backlog: at saturation,
    # with thousands waiting, each claim of 8 read all of them.
    store = Store(tmp_path, has_default_key=True)
    try:
        conn = sqlite3.connect(tmp_path / DB_FILENAME)
        plan = conn.execute(  # the store's own statement, as claim_due runs it
            "EXPLAIN QUERY PLAN " + CLAIM_DUE_RECORDS, (1.0, "owner", 0.0, 0.0, 0, 8)
        ).fetchall()
        conn.close()
        details = " / ".join(str(row[3]) for row in plan)
        assert "records_due" in details
        assert "TEMP B-TREE" not in details, details
        for n in range(30):
            store.submit(f"r{n:02d}", lambda n=n: log_payload(n))
            if n % 10 == 9:
                assert store.sync()
        claimed = [c.log_id for c in store.claim_due(30)]
        assert claimed == [f"r{n:02d}" for n in range(30)]  # oldest first
    finally:
        store.close()


def _busy_build(seconds: float, n: int) -> Any:
    def build() -> dict[str, Any]:
        deadline = time.perf_counter() + seconds  # Python work under the GIL, like a long stream's body
        while time.perf_counter() < deadline:
            pass
        return log_payload(n)

    return build


def test_the_writer_hands_the_gil_over_between_long_builds(tmp_path: Path, monkeypatch: Any) -> None:
    from plproxy import store as store_module

    handovers: list[int] = []
    monkeypatch.setattr(store_module, "_hand_over_gil", lambda: handovers.append(threading.get_ident()))
    store = Store(tmp_path, has_default_key=True)
    try:
        for i in range(10):
            store.submit(f"long-{i}", _busy_build(0.0003, i))
        assert store.sync()
        long_ones = list(handovers)
        handovers.clear()
        for i in range(10):
            store.submit(f"short-{i}", _busy_build(0.0, i))
        assert store.sync()
    finally:
        store.close()
    assert len(long_ones) >= 9  # after every record that built for longer than the slice
    assert threading.get_ident() not in long_ones  # the writer's, not the caller's
    assert len(handovers) <= 2  # short bodies share a slice
    assert store_module._GIL_HANDOVER_SECONDS > 0  # a zero sleep would rarely hand anything over


def test_the_writer_keeps_the_gil_through_a_large_batch(tmp_path: Path, monkeypatch: Any) -> None:
    """A large batch means records arrive faster than they are committed: throughput comes first."""
    from plproxy import store as store_module

    handovers: list[int] = []
    monkeypatch.setattr(store_module, "_hand_over_gil", lambda: handovers.append(threading.get_ident()))
    monkeypatch.setattr(store_module, "_GIL_HANDOVER_MAX_BATCH", 4)
    store = Store(tmp_path, has_default_key=True)
    try:
        for i in range(40):  # queued faster than the 20 ms gather: one or two batches of ~40
            store.submit(f"long-{i}", _busy_build(0.0003, i))
        assert store.sync()
    finally:
        store.close()
    assert len(handovers) <= 2, len(handovers)  # only a trailing batch small enough may hand over
