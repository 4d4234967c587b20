"""No byte of the canary keys in anything the reliability suite's proxies left behind.

The fault, hostile-input and soak tests run every `plproxy serve` with the session's canary PromptLayer
key and send every call with its canary provider key (tests/canary.py). Those proxies keep their log
files (at debug level: the most a log says), their data dirs (the SQLite store, its WAL and shared memory,
the owner files) and their /metrics scrapes under the session's evidence directory, next to every body the
PromptLayer stand-in received. The canary plugin runs this module last; it reads all of it, looking for
either key whole, in base64, or any 12-character run of its random part.

What is not scanned: proxies started in-process by other test modules (their logs go to pytest's capture)
and the headers the stand-in and the fake upstream received — `X-API-KEY` and `Authorization` are where
those keys belong.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.canary import FRAGMENT, Canary, Evidence, scan


def test_the_scan_finds_what_it_looks_for(canary: Canary, tmp_path: Path) -> None:
    """The scan is not vacuous: a fragment, a whole key or a base64 copy planted in a file is found."""
    core = canary.provider_key.removeprefix("sk-canary-")
    plants = {
        "fragment.log": f'{{"event": "x", "error": "...{core[5 : 5 + FRAGMENT]}..."}}'.encode(),
        "whole.db": b"\x00\x01" + canary.promptlayer_key.encode() + b"\x00",
        "b64.txt": base64.b64encode(canary.provider_key.encode()),
        "clean.txt": b"nothing to see here",
    }
    for name, data in plants.items():
        (tmp_path / name).write_bytes(data)
    files, _, hits = scan([tmp_path], canary.needles())
    assert files == 4
    assert sorted(Path(hit.split(":")[0]).name for hit in hits) == ["b64.txt", "fragment.log", "whole.db"]


def test_no_canary_in_any_log_store_metric_or_promptlayer_body(canary: Canary, evidence: Evidence) -> None:
    proxies = [p for p in evidence.root.iterdir() if p.is_dir() and p.name != "kept"]
    if not proxies:
        pytest.skip("no reliability test ran a proxy in this session: nothing to scan")
    secrets = evidence.figures.get("secrets", {})
    # the canaries were really used, or the scan would prove nothing (the report shows a skip)
    if not (
        secrets.get("promptlayer_calls_with_canary_key") and secrets.get("upstream_calls_with_canary_key")
    ):
        pytest.skip("the tests selected never sent the canary keys: a scan would prove nothing")
    files, size, hits = scan([evidence.root], canary.needles())
    kinds = {
        "log files": sum(1 for p in evidence.root.rglob("*.log")),
        "store files": sum(1 for p in evidence.root.rglob("plproxy.db*")),
        "metric scrapes": sum(1 for p in evidence.root.rglob("metrics-*.txt")),
        "PromptLayer body files": sum(1 for p in (evidence.root / "kept").glob("*.bin"))
        if (evidence.root / "kept").exists()
        else 0,
    }
    evidence.figure("secrets", "files_scanned", files)
    evidence.figure("secrets", "bytes_scanned", size)
    evidence.figure("secrets", "canary_bytes_found", len(hits))
    for kind, n in kinds.items():
        evidence.figure("secrets", kind, n)
    assert kinds["log files"] > 0
    assert kinds["store files"] > 0
    assert hits == [], "\n".join(hits)
