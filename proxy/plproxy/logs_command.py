"""`plproxy logs` and `plproxy flush`: the store from the command line, beside a running or crashed serve.

Both open the same SQLite file as `serve` (WAL and leases make that safe), so they need no server.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

import orjson

from plproxy.exporter import Exporter
from plproxy.server import open_store
from plproxy.settings import Settings
from plproxy.store import RecordSummary, Store

FOLLOW_INTERVAL = 1.0
COLUMNS = ("TIME", "LOG ID", "STATE", "MODEL", "TAGS", "LATENCY", "TOKENS")


def _open_store(settings: Settings) -> Store:
    return open_store(settings)


def summary_json(summary: RecordSummary) -> dict[str, Any]:
    return {
        "log_id": summary.log_id,
        "created": summary.created,
        "state": summary.state,
        "model": summary.model,
        "tags": list(summary.tags),
        "latency_s": summary.latency,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
        "promptlayer_request_id": summary.promptlayer_request_id,
        "error": summary.error,
        "payload": summary.payload,
    }


def summary_row(summary: RecordSummary) -> tuple[str, ...]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary.created))
    latency = f"{summary.latency * 1000:.0f} ms" if summary.latency is not None else "-"
    tokens = "-" if summary.tokens is None else f"{summary.input_tokens or 0}+{summary.output_tokens or 0}"
    tags = ",".join(summary.tags) or "-"
    if len(tags) > 30:
        tags = tags[:29] + "…"
    # the whole id: proxied calls' ids begin with their time (version 7), so a prefix would not tell
    # records apart; and the whole id is what `/plproxy/logs/{id}` and PromptLayer's metadata hold
    return (stamp, summary.log_id, summary.state, summary.model or "-", tags, latency, tokens)


def _print_table(rows: list[tuple[str, ...]], out: TextIO, *, header: bool) -> None:
    table = [COLUMNS, *rows] if header else rows
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in table)) for i in range(len(COLUMNS))]
    for row in table:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    out.flush()


def run_logs(settings: Settings, *, as_json: bool, follow: bool, limit: int, out: TextIO = sys.stdout) -> int:
    store = _open_store(settings)
    try:
        summaries = store.recent(limit, include_payload=as_json)
        _emit(summaries, out, as_json=as_json, header=True)
        if not follow:
            if not summaries and not as_json:
                out.write(f"no records yet in {settings.data_dir}\n")
            return 0
        seen = {summary.log_id for summary in summaries}
        since = max((summary.created for summary in summaries), default=0.0)
        while True:
            time.sleep(FOLLOW_INTERVAL)
            fresh = [
                summary
                for summary in store.recent(1000, since=since - 1.0, include_payload=as_json)
                if summary.log_id not in seen
            ]
            if fresh:
                seen.update(summary.log_id for summary in fresh)
                since = max(since, *(summary.created for summary in fresh))
                _emit(fresh, out, as_json=as_json, header=False)
    except KeyboardInterrupt:
        return 0
    finally:
        store.close()


def _emit(summaries: list[RecordSummary], out: TextIO, *, as_json: bool, header: bool) -> None:
    if as_json:
        for summary in summaries:
            out.write(orjson.dumps(summary_json(summary)).decode() + "\n")
        out.flush()
    elif summaries:
        _print_table([summary_row(summary) for summary in summaries], out, header=header)


def run_flush(settings: Settings, *, timeout: float, out: TextIO = sys.stdout) -> int:
    store = _open_store(settings)
    try:
        return asyncio.run(_flush(settings, store, timeout, out))
    finally:
        store.close()


async def _flush(settings: Settings, store: Store, deadline: float, out: TextIO) -> int:
    released = 0
    if settings.promptlayer_api_key:
        released = await asyncio.to_thread(store.release_kept)
    before = await asyncio.to_thread(store.counts)
    if not before.get("pending"):
        kept = before.get("kept", 0)
        hint = f"; {kept} kept record(s) wait for PROMPTLAYER_API_KEY" if kept else ""
        out.write(f"nothing to send{hint}\n")
        return 0
    exporter = Exporter(
        store,
        base_url=str(settings.promptlayer_base_url),
        default_api_key=settings.promptlayer_api_key,
        concurrency=settings.export_concurrency,
    )
    report = await exporter.flush(deadline)
    await exporter.stop()
    left = report.still_pending if report.still_pending is not None else "unknown"
    out.write(
        f"exported {report.exported}, failed {report.failed}, still pending {left}"
        + (f" ({released} kept record(s) released with the key)" if released else "")
        + (" — the deadline was reached; run again to continue" if report.deadline_reached else "")
        + "\n"
    )
    if report.failed:
        out.write("see `plproxy logs` for why PromptLayer refused the failed records\n")
    return 0 if not report.deadline_reached and not report.still_pending else 1
