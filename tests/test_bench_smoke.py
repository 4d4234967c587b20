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


@pytest.mark.timeout(180)
def test_variants_measures_each_variant_in_each_round(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench.variants",
        "rate",
        "--variant",
        "off",
        "--variant",
        "on:PLPROXY_LOG_LEVEL=warning",
        "--pairs",
        "2",
        "--window",
        "0.5",
        "--warmup",
        "0.2",
        "--rate",
        "100",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split()[2] for line in rounds] == ["off", "on", "off", "on"]  # interleaved
    medians = done.stdout.split("medians over 2 round(s), rate:")[1]
    for name in ("off", "on"):
        line = next(line for line in medians.splitlines() if line.split()[:1] == [name])
        assert "p50_ms=" in line, line
        assert "cpu_us=" in line, line


def test_a_variant_names_plproxy_settings_or_a_built_in() -> None:
    import argparse

    from bench.variants import parse_variant

    assert parse_variant("on") == ("on", {})
    assert parse_variant("pace:A=1,B=x=y") == ("pace", {"A": "1", "B": "x=y"})
    for bad in ("", ":A=1", "x:A", "relay:A=1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"ENV=VALUE|no name|takes no environment"):
            parse_variant(bad)
