"""The durable outbox: every record waits in SQLite (`<data dir>/plproxy.db`) until PromptLayer has it.

Writing never blocks the event loop. `Store.submit` and `Store.add_followup` only put an item on a
queue; one writer thread per `Store` builds the PromptLayer body (the `build_payload` callable, which
also serializes with orjson off the loop), and inserts whatever has accumulated in one transaction
(group commit). A record is committed about 20 ms after `submit`, well within ~100 ms, unless the
disk itself is slower than that.

Durability. The database runs in WAL mode. The writer's connection uses `synchronous=FULL`: with WAL that
is one fsync of the log per *transaction*, and group commit makes that one fsync per batch of records, so
a record that was committed survives a power loss or kernel crash, not just a killed process, for the
price of one fsync per batch, paid on the writer thread. The other connection (exporter claims, state
changes, reads) uses `synchronous=NORMAL`: a state change lost to a power cut only means a record is
sent again, which the at-least-once contract allows. `busy_timeout` lets several processes (plproxy
workers, `plproxy logs`, `plproxy flush`) share the file.

States of a record:

    pending   a key exists (the default key, or the record's own `api_key`); the exporter will send it
    kept      no key: the store keeps it (`plproxy logs` shows it) until `release_kept()` makes it pending
    exported  PromptLayer accepted it; `promptlayer_request_id` is set
    failed    PromptLayer refused it for good (4xx), or it could not be built or kept; `error` says why

A per-record `api_key` is stored beside the record, never in its payload, for as long as something
still has to be sent with it: while the record is pending or kept, and after its export while it has
unsent follow-ups. It is then erased, from every byte on disk: the connections run with
`secure_delete` (the old row is overwritten with zeros, not just unlinked), and the writer then
checkpoints the WAL and truncates it (within about a second; at once when the store closes), so that no
older copy of the page survives in `plproxy.db-wal`. A follow-up that arrives after that cannot be sent
to the right workspace, so it is stored as failed, saying so, rather than sent with the default key.

Follow-ups (score, metadata, prompt, group) are stored per log id and sent, in order, once their record
is exported; they fail with their record.

Leases. `claim_due` marks what it returns with a lease (`lease_until`, `lease_owner`) in one
`UPDATE … RETURNING`, so two processes on the same file never hold the same record at once. A lease
that is not ended by `mark_*`, `retry_later` or `release` (the process died) simply expires, and the
record is due again: records pending before a crash are exported after the restart. A restart does not
wait for that: every open store holds an flock on `<data dir>/owners/<owner>`, which the kernel drops
when its process dies however it dies, and a store that opens releases at once the leases of owners whose
file it can lock (or that have none). flock works across processes, containers and PID namespaces on one
host, and SQLite's WAL mode already requires every process sharing the file to be on one host.

Size cap (`max_bytes`, 1024 MiB by default), measured as the pages in use (free pages are reused):

 1. when a batch would take the store over the cap, payloads of exported records are dropped, oldest
    first; their status row stays (`plproxy logs` still shows state, model, tags, latency, tokens);
 2. then payloads of failed records, oldest first;
 3. then the status rows of exported and failed records themselves, oldest first;
 4. pending and kept records are never pruned. If the store is still over its cap, the new record's
    payload is refused: a status row says `failed` with the reason, a warning is logged and
    `plproxy_records{outcome="dropped"}` counts it.

Pruned payloads count as `plproxy_records{outcome="pruned"}`. A record whose `build_payload` raised is
stored as `failed` with the error (never silently lost) and counted as `outcome="failed"`.

Except `submit`, `add_followup`, `writable` and `queued`, which never wait, every method runs SQL and
may wait for the database lock: call it through `asyncio.to_thread` (or an executor), never on the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from plproxy import json_bytes
from plproxy.metrics import Metrics

try:
    import fcntl
except ImportError:  # not POSIX: the leases of a dead process simply expire
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_FILENAME: Final = "plproxy.db"
OWNERS_DIRNAME: Final = "owners"  # one locked file per open store: proof that its leases are alive
SCHEMA_VERSION: Final = 2
STATES: Final = ("pending", "kept", "exported", "failed")
FOLLOWUP_KINDS: Final = frozenset({"score", "metadata", "prompt", "group"})
DEFAULT_MAX_BYTES: Final = 1024 * 1024 * 1024
DEFAULT_LEASE_SECONDS: Final = 60.0

_BUSY_TIMEOUT_MS = 10_000
_MAX_BATCH = 500  # records per group commit
# How long the writer lets records gather before committing a batch: one fsync then covers 20 ms of
# calls instead of one (at 500 calls/s, ~170 µs of CPU per record alone, ~35 in batches of 10 or
# more), still well within the ~100 ms in which a record is promised to be committed.
_GATHER_SECONDS = 0.02
# Building a batch's bodies is Python, under the GIL, while the event loop may be waiting to relay a chunk:
# the loop would wait for the whole batch (five stream records: ~250 µs), or 5 ms for Python to force a
# switch. After this much building the writer sleeps a little so that the loop takes the GIL. A zero sleep
# would not do: the writer usually takes the GIL back before the waiting thread wakes. Measured with
# `python -m bench.variants` (four interleaved pairs each): per-chunk delay p99 under 100 streams 1.8 ->
# 1.3 ms; at 500 calls/s, client latency unchanged (p50 and p99 0.1 ms lower) for ~5% more CPU per call.
# Every 40 µs cut the tail further but cost 15-20% CPU at 500/s; every 150 µs changed nothing. Not in a
# large batch: records then arrive faster than the writer commits them, the loop is saturated and always
# wants the GIL; handing it over there too, a full run measured 12% fewer maximum calls/s, and 12 µs more
# per call of the LangChain handler (whose caller calls back to back).
_GIL_SLICE_SECONDS = 100e-6
_GIL_HANDOVER_SECONDS = 50e-6
_GIL_HANDOVER_MAX_BATCH = 32
# The size cap is measured exactly (three PRAGMAs) only near it, or every this many batches.
_MEASURE_EVERY = 100
_HEARTBEAT_SECONDS = 5.0  # an idle writer proves the file is still writable this often
_SCRUB_INTERVAL = 1.0  # at most one WAL truncation a second, however many keys are erased
_SCRUB_BUSY_TIMEOUT_MS = 200  # how long a truncation waits for readers before it is tried again later
_ERROR_MAX_CHARS = 2000
_ROW_OVERHEAD = 256  # bytes a status row costs, roughly, beside its payload
_PRUNE_TO = 0.9  # prune down to this fraction of the cap, so that not every batch prunes
REDACTED: Final = "[REDACTED]"


class StoreError(Exception):
    """The store cannot be opened or used (corrupt file, newer schema, data dir unusable)."""


class CorruptStore(StoreError):
    """The file is damaged or not a plproxy store: `move_aside` it and start with an empty one."""


def move_aside(path: Path) -> Path:
    """Rename a damaged store file (and its -wal/-shm companions) to `<name>.corrupt-<time>`; never delete."""
    suffix = time.strftime(".corrupt-%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(path.name + suffix)
    for companion in ("", "-wal", "-shm"):
        source = path.with_name(path.name + companion)
        if source.exists():
            source.rename(path.with_name(path.name + suffix + companion))
    return target


@dataclass(frozen=True, slots=True)
class RecordStatus:
    log_id: str
    state: str
    promptlayer_request_id: int | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "state": self.state,
            "promptlayer_request_id": self.promptlayer_request_id,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """One line of `plproxy logs`: what a record was, parsed from its payload when it was stored."""

    log_id: str
    created: float  # epoch seconds, when it was submitted
    state: str
    model: str | None
    tags: tuple[str, ...]
    latency: float | None  # request_end_time - request_start_time, seconds
    input_tokens: int | None
    output_tokens: int | None
    promptlayer_request_id: int | None
    error: str | None
    payload: dict[str, Any] | None = field(repr=False)  # None once pruned, or never built

    @property
    def tokens(self) -> int | None:
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


@dataclass(frozen=True, slots=True)
class Claim:
    """A pending record leased to one exporter: send `payload` (already JSON) to /log-request."""

    log_id: str
    payload: bytes = field(repr=False)
    api_key: str | None = field(repr=False)  # the record's own key; None means the default key
    attempts: int
    has_followups: bool = False  # it had pending follow-ups when claimed: they become due once it is exported


@dataclass(frozen=True, slots=True)
class FollowupClaim:
    """A follow-up of an exported record, leased: send {"request_id": request_id, **body}."""

    id: int
    log_id: str
    kind: str
    body: dict[str, Any] = field(repr=False)
    request_id: int
    api_key: str | None = field(repr=False)
    attempts: int


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each non-empty secret replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


@dataclass(slots=True)
class _NewRecord:
    log_id: str
    build: Callable[[], dict[str, Any]]
    api_key: str | None
    followups: Sequence[tuple[str, dict[str, Any]]]
    created: float
    size_hint: int | None  # bounds the length of every string in the payload (json_bytes.dumps)
    scrub: tuple[str, ...]  # secrets besides `api_key` that must not stay in the body


@dataclass(slots=True)
class _NewFollowup:
    log_id: str
    kind: str
    body: dict[str, Any]
    created: float


@dataclass(slots=True)
class _Barrier:
    done: threading.Event = field(default_factory=threading.Event)


_STOP: Final = object()
_SCRUB: Final = object()  # wakes the writer: an erased key's old bytes are to leave the WAL


@dataclass(slots=True)
class _Row:
    log_id: str
    created: float
    state: str
    payload: bytes | None
    api_key: str | None
    model: str | None = None
    tags: bytes | None = None
    latency: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    build_failed: bool = False
    dropped: bool = False


@dataclass(slots=True)
class _FollowupRow:
    log_id: str
    kind: str
    body: bytes | None
    error: str | None
    created: float


_SCHEMA = """
CREATE TABLE records (
    log_id        TEXT PRIMARY KEY,
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'kept', 'exported', 'failed')),
    payload       BLOB,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    api_key       TEXT,
    own_key       INTEGER NOT NULL DEFAULT 0,
    model         TEXT,
    tags          TEXT,
    latency       REAL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL DEFAULT 0,
    lease_until   REAL NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    pl_id         INTEGER,
    error         TEXT
);
-- `created` in the index lets a claim (`ORDER BY next_attempt, created LIMIT n`) read n rows in order;
-- without it every claim sorted the whole backlog (schema version 1).
CREATE INDEX records_due ON records (state, next_attempt, created);
CREATE INDEX records_created ON records (created);
CREATE INDEX records_prunable ON records (state, created) WHERE payload IS NOT NULL;
CREATE TABLE followups (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    log_id        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    body          BLOB,
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'exported', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL DEFAULT 0,
    lease_until   REAL NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    error         TEXT
);
CREATE INDEX followups_log ON followups (log_id, state, id);
CREATE INDEX followups_due ON followups (state, next_attempt);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""

# _MIGRATIONS[v - 1] takes a store of schema version v to v + 1, in the transaction that opens it.
_MIGRATIONS: Final = (
    # 1 → 2: claims read the backlog in index order instead of sorting all of it
    (
        "DROP INDEX records_due",
        "CREATE INDEX records_due ON records (state, next_attempt, created)",
    ),
)

# Leases the oldest due records: (lease_until, owner, now, now, own key required 0/1, limit). The due
# index's order is the ORDER BY's, so SQLite reads `limit` rows, never the whole backlog.
CLAIM_DUE_RECORDS: Final = (
    "UPDATE records SET lease_until = ?, lease_owner = ? WHERE log_id IN ("
    " SELECT log_id FROM records WHERE state = 'pending'"
    " AND next_attempt <= ? AND lease_until <= ? AND (? = 0 OR api_key IS NOT NULL)"
    " ORDER BY next_attempt, created LIMIT ?)"
    " RETURNING log_id, api_key, attempts"
)

# Clears a record's own key once nothing is left to send with it.
_FORGET_KEY = """
UPDATE records SET api_key = NULL
WHERE log_id = ? AND state = 'exported' AND api_key IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM followups f WHERE f.log_id = records.log_id AND f.state = 'pending')
"""


class Store:
    """The outbox. Open it once per process; `close()` it at shutdown (idempotent)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        has_default_key: bool,
        max_bytes: int = DEFAULT_MAX_BYTES,
        metrics: Metrics | None = None,
        on_commit: Callable[[], None] | None = None,
        max_queue: int = 100_000,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(data_dir) / DB_FILENAME
        self._has_default_key = has_default_key
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._listeners: list[Callable[[], None]] = [on_commit] if on_commit is not None else []
        self._owner = uuid.uuid4().hex
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._hurry = threading.Event()  # set when someone waits for the next commit: stop gathering
        self._closed = False
        self._close_lock = threading.Lock()
        self._give_up_at: float | None = None  # set by close(): the writer stops retrying then
        self._writable = False
        self._used_estimate = 0  # bytes in use, as last measured plus what was written since
        self._batches_since_measure = _MEASURE_EVERY  # measure on the first batch
        self._ops_closed = False
        self._next_refusal_warning = 0.0
        self._refused_since_warning = 0
        self._scrub_due = False  # a key was erased: the WAL still holds the page it was on
        # Counts submit()s with follow-ups and add_followup()s (approximate, unlocked): the exporter skips
        # looking for follow-ups while it stands still and none of its own records had any.
        self.followups_submitted = 0
        self._next_scrub = 0.0  # monotonic

        _prepare_dir(Path(data_dir))
        self._ops = self._connect("NORMAL")
        self._ops_lock = threading.Lock()
        try:
            self._migrate(self._ops)
            self._wconn = self._connect(synchronous.upper())
        except BaseException:
            self._ops.close()
            raise
        self._owner_lock = _OwnerLock.take(Path(data_dir) / OWNERS_DIRNAME, self._owner)
        self._reclaim_dead_leases()
        self._writable = True
        self._set_writable(True)
        self._writer = threading.Thread(target=self._writer_main, name="plproxy-store-writer", daemon=True)
        self._writer.start()

    # ---- opening ---------------------------------------------------------------------------------

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        if not self.path.exists():
            # Records hold prompts and may hold a per-request key: readable by the owner only.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        try:
            conn = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = _enable_wal(conn)
            if mode != "wal":
                raise StoreError(f"the store {self.path} cannot use WAL mode (journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA secure_delete = ON")  # an erased key is overwritten, not just unlinked
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA foreign_keys = OFF")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CorruptStore(
                f"the store {self.path} is not a usable plproxy database ({exc}); "
                "move it aside to start with an empty store"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            with _transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the store {self.path} has schema version {version}, newer than this plproxy "
                        f"understands ({SCHEMA_VERSION}); upgrade plproxy or use another data dir"
                    )
                if version == 0:
                    tables = conn.execute(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                    ).fetchone()
                    if tables[0]:
                        raise CorruptStore(
                            f"{self.path} is an SQLite file that is not a plproxy store; "
                            "move it aside or use another data dir"
                        )
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version < SCHEMA_VERSION:
                    for step in _MIGRATIONS[version - 1 :]:
                        for statement in step:
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise CorruptStore(
                f"the store {self.path} is corrupt or not a plproxy database ({exc}); "
                "move it aside to start with an empty store"
            ) from exc

    # ---- writing (non-blocking) ------------------------------------------------------------------

    def submit(
        self,
        log_id: str,
        build_payload: Callable[[], dict[str, Any]],
        *,
        api_key: str | None = None,
        followups: Sequence[tuple[str, dict[str, Any]]] = (),
        size_hint: int | None = None,
        scrub: Sequence[str] = (),
    ) -> None:
        """Queue a record; the writer thread calls `build_payload()` and commits it. Never blocks.
        `size_hint`, when known, bounds the length of every string in the payload: small records are
        then encoded without first searching them for a long string. `scrub`: secrets (a default
        PromptLayer key, say) replaced in the encoded body, like the record's own `api_key`."""
        for kind, _ in followups:
            _check_kind(kind)
        if followups:
            self.followups_submitted += 1
        self._enqueue(
            _NewRecord(
                log_id,
                build_payload,
                api_key or None,
                tuple(followups),
                time.time(),
                size_hint,
                tuple(secret for secret in scrub if secret),
            ),
            log_id,
        )

    def add_followup(self, log_id: str, kind: str, body: Mapping[str, Any]) -> None:
        """Queue a follow-up (score, metadata, prompt, group) for `log_id`; `body` without request_id."""
        _check_kind(kind)
        self.followups_submitted += 1
        self._enqueue(_NewFollowup(log_id, kind, dict(body), time.time()), log_id)

    def _enqueue(self, item: object, log_id: str) -> None:
        if self._closed:
            self._count("dropped")
            log.warning("store_closed_dropped", extra={"fields": {"log_id": log_id}})
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")
            log.warning(
                "store_queue_full_dropped",
                extra={"fields": {"log_id": log_id, "queued": self._queue.qsize()}},
            )

    def sync(self, timeout: float = 5.0) -> bool:
        """Block until everything submitted before this call is committed (or `timeout`). For tests/CLI."""
        if self._closed:
            return not self._writer.is_alive()
        barrier = _Barrier()
        try:
            self._queue.put(barrier, timeout=timeout)
        except queue.Full:
            return False
        self._hurry.set()
        return barrier.done.wait(timeout)

    def add_commit_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the writer thread after each commit that added sendable work."""
        self._listeners.append(callback)

    def remove_commit_listener(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def writable(self) -> bool:
        """True while the writer runs and its last write (or probe) succeeded. Cheap: safe on the loop."""
        return self._writable and not self._closed and self._writer.is_alive()

    def queued(self) -> int:
        """Items submitted but not yet committed."""
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is queued (up to `timeout` seconds), stop the writer, close the file."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._give_up_at = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):  # a stuck writer is a daemon thread, reported below
            self._queue.put(_STOP, timeout=timeout)
        self._hurry.set()
        self._writer.join(max(0.0, self._give_up_at - time.monotonic()))
        if self._writer.is_alive():
            log.error("store_close_timeout", extra={"fields": {"queued": self._queue.qsize()}})
        else:
            self._wconn.close()
        self._set_writable(False)
        with self._ops_lock:
            self._ops_closed = True
            self._ops.close()
        if self._owner_lock is not None:
            self._owner_lock.release()

    # ---- the writer thread -----------------------------------------------------------------------

    def _writer_main(self) -> None:
        last_write = time.monotonic()
        while True:
            timeout = _HEARTBEAT_SECONDS
            if self._scrub_due:
                timeout = min(timeout, max(0.0, self._next_scrub - time.monotonic()))
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                if self._scrub_due:
                    self._scrub_wal()
                if time.monotonic() - last_write >= _HEARTBEAT_SECONDS:
                    self._heartbeat()
                    last_write = time.monotonic()
                continue
            batch = [first]
            if first is not _STOP and not isinstance(first, _Barrier):
                # Let the batch fill without waking for each item (a wake-up per record, on a busy
                # CPU, costs the event loop the GIL): sleep, unless someone waits on a commit.
                self._hurry.wait(_GATHER_SECONDS)
            self._hurry.clear()
            while len(batch) < _MAX_BATCH and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:  # a bug must not stop the writer: what is queued behind would be lost
                log.exception("store_writer_batch_failed", extra={"fields": {"items": len(batch)}})
                self._count("dropped", sum(1 for i in batch if isinstance(i, _NewRecord)))
                for item in batch:
                    if isinstance(item, _Barrier):
                        item.done.set()
            last_write = time.monotonic()
            stopping = batch[-1] is _STOP
            # drop the batch now, not when the next one arrives: it may hold large LLM answers
            del batch, first
            item = None
            if stopping:
                if self._scrub_due:
                    self._scrub_wal()
                return
            if self._scrub_due and time.monotonic() >= self._next_scrub:
                self._scrub_wal()

    def _key_erased(self) -> None:
        """An own key was erased from a row: have the writer truncate the WAL, which still holds it."""
        self._scrub_due = True
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_SCRUB)

    def _scrub_wal(self) -> None:
        self._scrub_due = False  # before the checkpoint: a key erased meanwhile asks for another one
        self._next_scrub = time.monotonic() + _SCRUB_INTERVAL
        conn = self._wconn
        try:
            conn.execute(f"PRAGMA busy_timeout = {_SCRUB_BUSY_TIMEOUT_MS}")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.warning("store_wal_scrub_failed", extra={"fields": {"error": exc}})
            busy = 1
        if busy:  # a reader still uses an older snapshot: try again
            self._scrub_due = True

    def _process(self, batch: list[object]) -> None:
        rows: list[_Row] = []
        followups: list[_FollowupRow] = []
        barriers: list[_Barrier] = []
        hand_over = len(batch) <= _GIL_HANDOVER_MAX_BATCH
        holding_since = time.perf_counter()
        for item in batch:
            if isinstance(item, _NewRecord):
                rows.append(self._build(item))
                if hand_over and time.perf_counter() - holding_since > _GIL_SLICE_SECONDS:
                    _hand_over_gil()
                    holding_since = time.perf_counter()
                followups.extend(
                    self._followup_row(item.log_id, k, b, item.created) for k, b in item.followups
                )
            elif isinstance(item, _NewFollowup):
                followups.append(self._followup_row(item.log_id, item.kind, item.body, item.created))
            elif isinstance(item, _Barrier):
                barriers.append(item)
        if rows or followups:
            self._write_with_retry(rows, followups)
        for barrier in barriers:
            barrier.done.set()

    def _build(self, item: _NewRecord) -> _Row:
        try:
            payload = item.build()
            if not isinstance(payload, dict):
                raise TypeError(f"build_payload returned {type(payload).__name__}, not dict")
            # not orjson's: a large string would cost 15 times its size
            data = json_bytes.dumps(payload, size_hint=item.size_hint)
        except Exception as exc:
            log.warning(
                "store_build_payload_failed",
                extra={"fields": {"log_id": item.log_id, "error_type": type(exc).__name__}},
            )
            message = redact(f"{type(exc).__name__}: {exc}", item.api_key)[:_ERROR_MAX_CHARS]
            return _Row(
                item.log_id,
                item.created,
                "failed",
                None,
                None,
                error=f"the record could not be built, nothing was sent: {message}",
                build_failed=True,
            )
        found = [s for s in (item.api_key, *item.scrub) if s and s.encode() in data]
        if found:
            # A key must never be sent in a body. Scrub it; the JSON stays valid as long as the key
            # needs no escaping, which is checked by parsing it again.
            log.warning("store_payload_contained_key", extra={"fields": {"log_id": item.log_id}})
            for secret in found:
                data = data.replace(secret.encode(), REDACTED.encode())
            payload = orjson.loads(data)
        model = payload.get("model")
        tags = payload.get("tags")
        tag_list = [str(t) for t in tags] if isinstance(tags, list) else []
        return _Row(
            item.log_id,
            item.created,
            "pending" if item.api_key or self._has_default_key else "kept",
            data,
            item.api_key,
            model=model if isinstance(model, str) else None,
            tags=orjson.dumps(tag_list),
            latency=_latency(payload.get("request_start_time"), payload.get("request_end_time")),
            input_tokens=_int_or_none(payload.get("input_tokens")),
            output_tokens=_int_or_none(payload.get("output_tokens")),
        )

    @staticmethod
    def _followup_row(log_id: str, kind: str, body: Mapping[str, Any], created: float) -> _FollowupRow:
        clean = {k: v for k, v in body.items() if k != "request_id"}
        try:
            return _FollowupRow(log_id, kind, orjson.dumps(clean), None, created)
        except Exception as exc:
            log.warning(
                "store_followup_invalid",
                extra={"fields": {"log_id": log_id, "kind": kind, "error_type": type(exc).__name__}},
            )
            return _FollowupRow(log_id, kind, None, f"the follow-up body is not JSON: {exc}", created)

    def _write_with_retry(self, rows: list[_Row], followups: list[_FollowupRow]) -> None:
        delay = 0.05
        while True:
            try:
                outcome = self._write(rows, followups)
            except sqlite3.Error as exc:
                self._set_writable(False)
                give_up = self._give_up_at
                if give_up is not None and time.monotonic() >= give_up:
                    log.error(
                        "store_write_abandoned",
                        extra={"fields": {"records": len(rows), "followups": len(followups), "error": exc}},
                    )
                    self._count("dropped", len(rows))
                    return
                log.error(
                    "store_write_failed",
                    extra={"fields": {"records": len(rows), "error": exc, "retry_in": round(delay, 2)}},
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._set_writable(True)
            stored, pruned, dropped, duplicates = outcome
            self._count("stored", stored)
            self._count("pruned", pruned)
            self._count("dropped", dropped)
            self._count("failed", sum(1 for r in rows if r.build_failed))
            for log_id in duplicates:
                log.warning("store_duplicate_log_id", extra={"fields": {"log_id": log_id}})
            if any(r.state == "pending" for r in rows) or followups:
                self._notify()
            return

    def _write(self, rows: list[_Row], followups: list[_FollowupRow]) -> tuple[int, int, int, list[str]]:
        conn = self._wconn
        now = time.time()
        stored = dropped = 0
        duplicates: list[str] = []
        with _transaction(conn):
            pruned = 0
            incoming = sum(len(r.payload or b"") + _ROW_OVERHEAD for r in rows)
            if rows and self._over_cap(conn, incoming):
                pruned = self._prune(conn, incoming)
                rows = self._refuse_over_cap(conn, rows)
            for r in rows:
                cur = conn.execute(
                    "INSERT INTO records (log_id, created, updated, state, payload, payload_bytes, api_key,"
                    " own_key, model, tags, latency, input_tokens, output_tokens, error)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (log_id) DO NOTHING",
                    (
                        r.log_id,
                        r.created,
                        now,
                        r.state,
                        r.payload,
                        len(r.payload or b""),
                        r.api_key,
                        1 if r.api_key else 0,
                        r.model,
                        r.tags.decode() if r.tags is not None else None,
                        r.latency,
                        r.input_tokens,
                        r.output_tokens,
                        r.error,
                    ),
                )
                if cur.rowcount == 0:
                    duplicates.append(r.log_id)
                elif r.dropped:
                    dropped += 1
                elif not r.build_failed:
                    stored += 1
            for f in followups:
                state, error = self._followup_initial_state(conn, f)
                conn.execute(
                    "INSERT INTO followups (log_id, kind, body, created, updated, state, error)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (f.log_id, f.kind, f.body, f.created, now, state, error),
                )
        return stored, pruned, dropped, duplicates

    @staticmethod
    def _followup_initial_state(conn: sqlite3.Connection, f: _FollowupRow) -> tuple[str, str | None]:
        if f.error is not None:
            return "failed", f.error
        row = conn.execute(
            "SELECT state, own_key, api_key FROM records WHERE log_id = ?", (f.log_id,)
        ).fetchone()
        if row is None:
            return "pending", None  # its record may come from another process; sent if it is exported
        state, own_key, api_key = row
        if state == "failed":
            return "failed", "not sent: its record failed"
        if state == "exported" and own_key and api_key is None:
            return "failed", (
                "not sent: the record was exported with its own API key, which the store no longer keeps"
            )
        return "pending", None

    def _over_cap(self, conn: sqlite3.Connection, incoming: int) -> bool:
        """Would `incoming` bytes take the store over its cap? Exact near the cap, estimated far from it."""
        self._batches_since_measure += 1
        estimate = self._used_estimate + incoming
        if estimate <= self._max_bytes * 0.8 and self._batches_since_measure < _MEASURE_EVERY:
            self._used_estimate = estimate
            return False
        used = self._used_bytes(conn)
        self._used_estimate, self._batches_since_measure = used + incoming, 0
        return used + incoming > self._max_bytes

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _prune(self, conn: sqlite3.Connection, incoming: int) -> int:
        """Free space for `incoming` bytes, following the policy in the module docstring."""
        target = int(self._max_bytes * _PRUNE_TO) - incoming
        excess = self._used_bytes(conn) - target
        pruned = 0
        for state in ("exported", "failed"):
            while excess > 0:
                victims = conn.execute(
                    "SELECT log_id, payload_bytes FROM records WHERE state = ? AND payload IS NOT NULL"
                    " ORDER BY created LIMIT 200",
                    (state,),
                ).fetchall()
                if not victims:
                    break
                chosen = []
                for log_id, size in victims:
                    chosen.append((log_id,))
                    excess -= size
                    if excess <= 0:
                        break
                conn.executemany(
                    "UPDATE records SET payload = NULL, payload_bytes = 0 WHERE log_id = ?", chosen
                )
                pruned += len(chosen)
        if excess > 0:  # no payload left to drop: finished records' status rows go, oldest first
            excess = self._used_bytes(conn) - target
        while excess > 0:
            victims = conn.execute(
                "SELECT log_id FROM records WHERE state IN ('exported', 'failed') AND NOT EXISTS"
                " (SELECT 1 FROM followups f WHERE f.log_id = records.log_id AND f.state = 'pending')"
                " ORDER BY created LIMIT 500"
            ).fetchall()
            if not victims:
                break
            conn.executemany("DELETE FROM followups WHERE log_id = ?", victims)
            conn.executemany("DELETE FROM records WHERE log_id = ?", victims)
            excess = self._used_bytes(conn) - target
        return pruned

    def _refuse_over_cap(self, conn: sqlite3.Connection, rows: list[_Row]) -> list[_Row]:
        used = self._used_bytes(conn)
        kept: list[_Row] = []
        for r in rows:
            size = len(r.payload or b"") + _ROW_OVERHEAD
            if r.payload is not None and used + size > self._max_bytes:
                self._refused_since_warning += 1
                if time.monotonic() >= self._next_refusal_warning:  # one line a minute, not one a record
                    self._next_refusal_warning = time.monotonic() + 60
                    log.warning(
                        "store_over_cap_refused",
                        extra={
                            "fields": {
                                "log_id": r.log_id,
                                "refused": self._refused_since_warning,
                                "used_bytes": used,
                                "max_bytes": self._max_bytes,
                            }
                        },
                    )
                    self._refused_since_warning = 0
                r = _Row(
                    r.log_id,
                    r.created,
                    "failed",
                    None,
                    None,
                    model=r.model,
                    tags=r.tags,
                    latency=r.latency,
                    input_tokens=r.input_tokens,
                    output_tokens=r.output_tokens,
                    error=(
                        f"dropped: the store is full (max_bytes={self._max_bytes}) with records not yet "
                        "exported; this record was not kept"
                    ),
                    dropped=True,
                )
                size = _ROW_OVERHEAD
            used += size
            kept.append(r)
        return kept

    def _heartbeat(self) -> None:
        try:
            with _transaction(self._wconn):
                self._wconn.execute(
                    "INSERT INTO meta (key, value) VALUES ('heartbeat', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(time.time()),),
                )
        except sqlite3.Error as exc:
            if self._writable:
                log.error("store_not_writable", extra={"fields": {"error": exc}})
            self._set_writable(False)
        else:
            self._set_writable(True)

    def _set_writable(self, value: bool) -> None:
        self._writable = value
        if self._metrics is not None:
            self._metrics.store_writable.set(1 if value and not self._closed else 0)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("store_commit_listener_failed")

    def _count(self, outcome: str, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._metrics.records.labels(outcome=outcome).inc(n)

    # ---- the exporter's side (blocking) ----------------------------------------------------------

    @contextlib.contextmanager
    def _ops_txn(self) -> Iterator[sqlite3.Connection]:
        with self._ops_lock:
            if self._ops_closed:
                raise StoreError("the store is closed")
            with _transaction(self._ops):
                yield self._ops

    def _reclaim_dead_leases(self) -> None:
        """Release the leases of stores whose process is gone, and forget their owner files."""
        if self._owner_lock is None:
            return  # without a lock of our own, another store could not tell that we are alive either
        owners_dir = self._owner_lock.path.parent
        now = time.time()
        try:
            with self._ops_lock:
                rows = self._ops.execute(
                    "SELECT lease_owner FROM records WHERE lease_until > ? AND lease_owner IS NOT NULL UNION"
                    " SELECT lease_owner FROM followups WHERE lease_until > ? AND lease_owner IS NOT NULL",
                    (now, now),
                ).fetchall()
            dead = [r[0] for r in rows if r[0] != self._owner and not _owner_alive(owners_dir, r[0])]
            if dead:
                with self._ops_txn() as conn:
                    for table in ("records", "followups"):
                        conn.executemany(
                            f"UPDATE {table} SET lease_until = 0, lease_owner = NULL"  # noqa: S608
                            " WHERE lease_owner = ?",
                            [(owner,) for owner in dead],
                        )
                log.info("store_released_dead_leases", extra={"fields": {"owners": len(dead)}})
            for path in owners_dir.iterdir():  # files of owners that died without leases
                if _OWNER_NAME.fullmatch(path.name) and path.name != self._owner:
                    _owner_alive(owners_dir, path.name)
        except (sqlite3.Error, OSError) as exc:  # leases then expire as they would have
            log.warning("store_reclaim_failed", extra={"fields": {"error": exc}})

    def claim_due(
        self,
        limit: int,
        now: float | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        require_own_key: bool = False,
    ) -> list[Claim]:
        """Lease up to `limit` pending records due at `now`. `require_own_key`: only records with a key."""
        now = time.time() if now is None else now
        with self._ops_txn() as conn:
            rows = conn.execute(
                CLAIM_DUE_RECORDS, (now + lease_seconds, self._owner, now, now, int(require_own_key), limit)
            ).fetchall()
            # Payloads are read apart: RETURNING holds every returned row in memory several times over,
            # about 6 times a payload's size, where a plain SELECT costs about twice.
            with_followups: set[str] = set()
            if rows:
                marks = ",".join("?" * len(rows))
                with_followups = {
                    r[0]
                    for r in conn.execute(
                        f"SELECT DISTINCT log_id FROM followups WHERE state = 'pending'"  # noqa: S608
                        f" AND log_id IN ({marks})",
                        [r[0] for r in rows],
                    )
                }
            return [
                Claim(log_id, self._payload(conn, log_id), api_key, attempts, log_id in with_followups)
                for log_id, api_key, attempts in rows
            ]

    @staticmethod
    def _payload(conn: sqlite3.Connection, log_id: str) -> bytes:
        row = conn.execute("SELECT payload FROM records WHERE log_id = ?", (log_id,)).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else b""

    def mark_exported(self, log_id: str, pl_id: int) -> bool:
        """pending → exported. False if the record was not pending (e.g. another process got there)."""
        return self.mark_exported_many([(log_id, pl_id)], own_key=(log_id,))[0]

    def mark_exported_many(
        self, marks: Sequence[tuple[str, int]], *, own_key: Collection[str] = ()
    ) -> list[bool]:
        """`mark_exported` for several (log_id, pl_id) in one transaction; one bool each. The own key is
        erased only for the records in `own_key` (the others have none to erase)."""
        now = time.time()
        with self._ops_txn() as conn:
            done = [
                conn.execute(
                    "UPDATE records SET state = 'exported', pl_id = ?, error = NULL, lease_until = 0,"
                    " lease_owner = NULL, updated = ? WHERE log_id = ? AND state = 'pending'",
                    (pl_id, now, log_id),
                ).rowcount
                > 0
                for log_id, pl_id in marks
            ]
            erased = sum(conn.execute(_FORGET_KEY, (log_id,)).rowcount for log_id in own_key)
        if erased:
            self._key_erased()
        return done

    def mark_failed(self, log_id: str, error: str) -> bool:
        """pending → failed for good; its pending follow-ups fail with it and its key is erased."""
        now = time.time()
        with self._ops_txn() as conn:
            row = conn.execute(
                "UPDATE records SET state = 'failed', error = ?, api_key = NULL, lease_until = 0,"
                " lease_owner = NULL, updated = ? WHERE log_id = ? AND state = 'pending' RETURNING own_key",
                (error[:_ERROR_MAX_CHARS], now, log_id),
            ).fetchone()
            conn.execute(
                "UPDATE followups SET state = 'failed', error = 'not sent: its record failed', updated = ?"
                " WHERE log_id = ? AND state = 'pending'",
                (now, log_id),
            )
        if row is not None and row[0]:
            self._key_erased()
        return row is not None

    def retry_later(self, log_id: str, at: float, error: str) -> bool:
        """Count an attempt, keep the record pending, due again at `at` (epoch seconds)."""
        with self._ops_txn() as conn:
            cur = conn.execute(
                "UPDATE records SET attempts = attempts + 1, next_attempt = ?, error = ?, lease_until = 0,"
                " lease_owner = NULL, updated = ? WHERE log_id = ? AND state = 'pending'",
                (at, error[:_ERROR_MAX_CHARS], time.time(), log_id),
            )
            return cur.rowcount > 0

    def release(self, log_ids: Sequence[str] = (), followup_ids: Sequence[int] = ()) -> None:
        """End this store's leases without counting an attempt (an exporter stopping mid-send)."""
        with self._ops_txn() as conn:
            conn.executemany(
                "UPDATE records SET lease_until = 0, lease_owner = NULL WHERE log_id = ? AND lease_owner = ?",
                [(i, self._owner) for i in log_ids],
            )
            conn.executemany(
                "UPDATE followups SET lease_until = 0, lease_owner = NULL WHERE id = ? AND lease_owner = ?",
                [(i, self._owner) for i in followup_ids],
            )

    def claim_due_followups(
        self,
        limit: int,
        now: float | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        require_own_key: bool = False,
    ) -> list[FollowupClaim]:
        """Lease follow-ups of exported records, the oldest unsent one per record (they go in order)."""
        now = time.time() if now is None else now
        with self._ops_txn() as conn:
            rows = conn.execute(
                "UPDATE followups SET lease_until = ?, lease_owner = ? WHERE id IN ("
                " SELECT f.id FROM followups f JOIN records r ON r.log_id = f.log_id"
                " WHERE f.state = 'pending' AND r.state = 'exported' AND f.next_attempt <= ?"
                " AND f.lease_until <= ? AND (? = 0 OR r.api_key IS NOT NULL)"
                " AND f.id = (SELECT min(g.id) FROM followups g"
                " WHERE g.log_id = f.log_id AND g.state = 'pending')"
                " ORDER BY f.next_attempt, f.id LIMIT ?)"
                " RETURNING id, log_id, kind, body, attempts",
                (now + lease_seconds, self._owner, now, now, int(require_own_key), limit),
            ).fetchall()
            claims = []
            for fid, log_id, kind, body, attempts in rows:
                pl_id, api_key = conn.execute(
                    "SELECT pl_id, api_key FROM records WHERE log_id = ?", (log_id,)
                ).fetchone()
                claims.append(FollowupClaim(fid, log_id, kind, orjson.loads(body), pl_id, api_key, attempts))
        return claims

    def mark_followup_exported(self, followup_id: int) -> bool:
        return self._finish_followup(followup_id, "exported", None)

    def mark_followup_failed(self, followup_id: int, error: str) -> bool:
        return self._finish_followup(followup_id, "failed", error[:_ERROR_MAX_CHARS])

    def _finish_followup(self, followup_id: int, state: str, error: str | None) -> bool:
        with self._ops_txn() as conn:
            row = conn.execute(
                "UPDATE followups SET state = ?, error = ?, lease_until = 0, lease_owner = NULL, updated = ?"
                " WHERE id = ? AND state = 'pending' RETURNING log_id",
                (state, error, time.time(), followup_id),
            ).fetchone()
            erased = conn.execute(_FORGET_KEY, (row[0],)).rowcount if row is not None else 0
        if erased:
            self._key_erased()
        return row is not None

    def retry_followup_later(self, followup_id: int, at: float, error: str) -> bool:
        with self._ops_txn() as conn:
            cur = conn.execute(
                "UPDATE followups SET attempts = attempts + 1, next_attempt = ?, error = ?, lease_until = 0,"
                " lease_owner = NULL, updated = ? WHERE id = ? AND state = 'pending'",
                (at, error[:_ERROR_MAX_CHARS], time.time(), followup_id),
            )
            return cur.rowcount > 0

    def expedite(self, until: float, now: float | None = None) -> int:
        """Make pending work due before `until` due now (a flush waives backoff that ends in time)."""
        now = time.time() if now is None else now
        with self._ops_txn() as conn:
            n = conn.execute(
                "UPDATE records SET next_attempt = ? WHERE state = 'pending' AND next_attempt > ?"
                " AND next_attempt <= ?",
                (now, now, until),
            ).rowcount
            n += conn.execute(
                "UPDATE followups SET next_attempt = ? WHERE state = 'pending' AND next_attempt > ?"
                " AND next_attempt <= ?",
                (now, now, until),
            ).rowcount
        return int(n)

    def next_due(self, *, require_own_key: bool = False) -> float | None:
        """When the earliest pending record or sendable follow-up can next be claimed (None: nothing)."""
        own = int(require_own_key)
        with self._ops_lock:
            a = self._ops.execute(
                "SELECT min(max(next_attempt, lease_until)) FROM records"
                " WHERE state = 'pending' AND (? = 0 OR api_key IS NOT NULL)",
                (own,),
            ).fetchone()[0]
            b = self._ops.execute(
                "SELECT min(max(f.next_attempt, f.lease_until)) FROM followups f JOIN records r"
                " ON r.log_id = f.log_id WHERE f.state = 'pending' AND r.state = 'exported'"
                " AND (? = 0 OR r.api_key IS NOT NULL)",
                (own,),
            ).fetchone()[0]
        values = [v for v in (a, b) if v is not None]
        return min(values) if values else None

    def release_kept(self) -> int:
        """kept → pending (a key is now available). Returns how many."""
        with self._ops_txn() as conn:
            n = conn.execute(
                "UPDATE records SET state = 'pending', next_attempt = 0, updated = ? WHERE state = 'kept'",
                (time.time(),),
            ).rowcount
        if n:
            self._notify()
        return int(n)

    # ---- reads (blocking) ------------------------------------------------------------------------

    def get(self, log_id: str) -> RecordStatus | None:
        with self._ops_lock:
            row = self._ops.execute(
                "SELECT log_id, state, pl_id, error FROM records WHERE log_id = ?", (log_id,)
            ).fetchone()
        return None if row is None else RecordStatus(row[0], row[1], row[2], row[3])

    def recent(
        self, limit: int = 20, *, since: float | None = None, include_payload: bool = True
    ) -> list[RecordSummary]:
        """The newest `limit` records (created after `since`, if given), newest first."""
        cols = "log_id, created, state, model, tags, latency, input_tokens, output_tokens, pl_id, error"
        cols += ", payload" if include_payload else ", NULL"
        where, args = ("WHERE created > ?", [since]) if since is not None else ("", [])
        with self._ops_lock:
            rows = self._ops.execute(
                f"SELECT {cols} FROM records {where} ORDER BY created DESC, rowid DESC LIMIT ?",  # noqa: S608
                (*args, limit),
            ).fetchall()
        return [
            RecordSummary(
                log_id=r[0],
                created=r[1],
                state=r[2],
                model=r[3],
                tags=tuple(orjson.loads(r[4])) if r[4] else (),
                latency=r[5],
                input_tokens=r[6],
                output_tokens=r[7],
                promptlayer_request_id=r[8],
                error=r[9],
                payload=orjson.loads(r[10]) if r[10] is not None else None,
            )
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        with self._ops_lock:
            rows = self._ops.execute("SELECT state, count(*) FROM records GROUP BY state").fetchall()
        result = dict.fromkeys(STATES, 0)
        result.update({state: n for state, n in rows})
        return result

    def backlog(self) -> int:
        """Committed records waiting for export (pending)."""
        with self._ops_lock:
            n = int(self._ops.execute("SELECT count(*) FROM records WHERE state = 'pending'").fetchone()[0])
        if self._metrics is not None:
            self._metrics.store_backlog.set(n)
        return n

    def followup_states(self, log_id: str) -> list[tuple[str, str, str | None]]:
        """(kind, state, error) of `log_id`'s follow-ups, oldest first."""
        with self._ops_lock:
            rows = self._ops.execute(
                "SELECT kind, state, error FROM followups WHERE log_id = ? ORDER BY id", (log_id,)
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]


_OWNER_NAME = re.compile(r"[0-9a-f]{32}")


class _OwnerLock:
    """An open store's proof of life: an exclusive flock on `<owners dir>/<owner>`, held until `release()`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, directory: Path, owner: str) -> _OwnerLock | None:
        if fcntl is None:
            return None
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            # Locked under a temporary name, then renamed: an owner file is never seen unlocked while
            # its store is open, so one that can be locked belongs to a dead process.
            temporary = directory / f".{owner}.tmp"
            fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(temporary, directory / owner)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    temporary.unlink()
                raise
        except OSError as exc:
            log.warning("store_owner_lock_failed", extra={"fields": {"error": exc}})
            return None
        return cls(directory / owner, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)  # drops the lock


def _owner_alive(directory: Path, owner: str) -> bool:
    """True while the store `owner` holds its lock; the file of a dead owner is removed."""
    if fcntl is None or not _OWNER_NAME.fullmatch(owner):
        return True  # cannot tell: its leases expire as they would have
    path = directory / owner
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    finally:
        os.close(fd)


def _enable_wal(conn: sqlite3.Connection) -> str:
    # Switching to WAL takes an exclusive lock and SQLite does not run the busy handler for it: several
    # processes opening a new store at once must retry. Once set, WAL is a property of the file.
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode == "wal":
            return mode
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _hand_over_gil() -> None:
    """Let a thread waiting for the GIL (the event loop) have it: see `_GIL_SLICE_SECONDS`."""
    time.sleep(_GIL_HANDOVER_SECONDS)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _prepare_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StoreError(f"the data dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create the data dir {path}: {exc.strerror or exc}") from exc


def _check_kind(kind: str) -> None:
    if kind not in FOLLOWUP_KINDS:
        raise ValueError(f"follow-up kind must be one of {sorted(FOLLOWUP_KINDS)}, not {kind!r}")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _epoch(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _latency(start: object, end: object) -> float | None:
    s, e = _epoch(start), _epoch(end)
    return None if s is None or e is None else e - s
