"""The benchmark harness still runs end to end (`python -m bench`), on a tiny budget.

Not a benchmark: the figures of so short a run mean nothing and are not checked against the targets.
It only keeps bench/ from rotting as the proxy changes: every phase must run, every figure must be
measured, and the table, JSON and (with matplotlib) PNG must be written. 40 to 90 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_quick_harness_runs_every_phase(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--window",
        "0.5",
        "--warmup",
        "0.2",
        "--rss-streams",
        "100",
        "--stream-conns",
        "20",
        "--handler-calls",
        "200",
        "--wait-quiet",
        "0",
        "--no-install",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=230, check=False)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {}
    assert "| 1 | added latency p50 at 500/s" in done.stdout
    measured = {t["id"]: t["value"] for t in results["targets"]}
    for key in (
        "added_p50_500",
        "added_p99_500",
        "max_calls",
        "cpu",
        "stream_ttfb",
        "stream_chunk",
        "rss",
        "log_on_off",
        "pl_slow",
    ):
        assert measured[key] is not None, (key, measured, results["notes"])
    assert results["latency"]["500"]["plproxy"][0]["exported"] > 0
    assert results["streams"]["plproxy"]["streams"] > 0
    assert results["rss"]["plproxy"]["max_in_flight"] >= 50
    assert results["handler"]["status"] in ("measured", "pending")
    assert (tmp_path / "latest.md").read_text().startswith("### plproxy benchmark")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "latest.png").stat().st_size > 10_000
