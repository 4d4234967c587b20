"""`python -m bench`: the whole benchmark, one command. See docs/benchmarks.md.

It starts everything itself (fake upstream, PromptLayer stand-ins, bare relay, plproxy, load generators,
each a process of its own), stops only what it started, prints a Markdown table, and writes
`bench/results/latest.{json,md,png}` (plus a timestamped JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import raise_fd_limit
from bench.phases import Bench, Options
from bench.procs import REPO, Processes, cpu_busy

PHASES = ("latency", "throughput", "streams", "rss", "handler")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through `finally`: what we started is stopped


def ensure_wrk(install: bool) -> tuple[str | None, str]:
    """wrk on PATH, installing Debian's package when allowed; else a note on the fallback."""
    found = shutil.which("wrk")
    if found:
        return found, ""
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("[bench] wrk is missing: apt-get install -y wrk …", file=sys.stderr, flush=True)
        for cmd in (
            ["apt-get", "install", "-y", "-qq", "wrk"],
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "wrk"],
        ):
            subprocess.run(cmd, capture_output=True, timeout=600, check=False)
            found = shutil.which("wrk")
            if found:
                return found, ""
    return None, (
        "wrk is not installed (`apt-get install wrk`, as root); maximum calls/s were measured with "
        "the in-house closed-loop generator (`bench.loadgen closed`) instead"
    )


def wait_quiet(limit: float, cpus: set[int]) -> tuple[float, float]:
    """Wait (up to `limit` seconds) until other processes use under 10% of a CPU; (busy share, waited s)."""
    start = time.monotonic()
    while True:
        b0 = cpu_busy(cpus)
        time.sleep(2.0)
        share = (cpu_busy(cpus) - b0) / 2.0
        waited = time.monotonic() - start
        if share < 0.10 or waited >= limit:
            return share, waited
        print(
            f"[bench] the machine is busy ({share:.0%} of a CPU in use by others); waiting …", file=sys.stderr
        )


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "proxy", "handler"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    wrk = shutil.which("wrk")
    wrk_version = ""
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        wrk_version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "orjson": version("orjson"),
        "wrk": wrk_version,
        "plproxy_commit": commit,
        "uncommitted_proxy_changes": [line[3:] for line in dirty if line.strip()],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="plproxy vs a direct connection vs a bare relay"
    )
    p.add_argument("--quick", action="store_true", help="short windows, one repetition (under ~2 minutes)")
    p.add_argument(
        "--peers", action="store_true", help="also LiteLLM's proxy and the promptlayer SDK (own venvs)"
    )
    p.add_argument("--profile", action="store_true", help="py-spy profiles of plproxy under load")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--window", type=float, help="seconds measured per point (quick 3, full 10)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per point (quick 1, full 2)")
    p.add_argument("--reps", type=int, help="repetitions of latency/throughput points (quick 1, full 2)")
    p.add_argument("--stream-conns", type=int, default=100)
    p.add_argument("--rss-streams", type=int, default=1000)
    p.add_argument("--handler-calls", type=int, help="calls per side (quick 2000, full 10000)")
    p.add_argument("--wrk-conns", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--merge", type=Path, metavar="JSON", help="start from a saved run; re-run only what is asked"
    )
    p.add_argument(
        "--report", type=Path, metavar="JSON", help="only render the table and chart of a saved run"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        help="seconds to wait for other processes to go quiet before starting (quick 0, full 300)",
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get install a missing wrk")
    return p.parse_args(argv)


def render(results: dict[str, Any], out: Path, chart: bool) -> str:
    results["targets"] = report.targets(results)
    table = report.markdown(results)
    if "profile" in results:
        from bench import profile

        table += "\n### Profile (py-spy)\n\n" + profile.markdown(results["profile"])
    (out / "latest.md").write_text(table)
    if chart:
        note = report.chart(results, out / "latest.png")
        if note:
            print(f"[bench] {note}", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        results = json.loads(a.report.read_text())
        a.out.mkdir(parents=True, exist_ok=True)
        print(render(results, a.out, not a.no_chart))
        return 0
    quick = a.quick
    opts = Options(
        quick=quick,
        window=a.window or (3.0 if quick else 10.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if quick else 2.0),
        reps=a.reps or (1 if quick else 2),
        rates=(200.0, 500.0),
        stream_conns=a.stream_conns,
        rss_streams=a.rss_streams,
        handler_calls=a.handler_calls or (2000 if quick else 10000),
        wrk_conns=a.wrk_conns,
        peers=a.peers,
        profile=a.profile,
        results=a.out,
    )
    only = [x for x in a.only.split(",") if x] or ([] if a.merge else list(PHASES))
    unknown = set(only) - set(PHASES)
    if unknown:
        print(f"bench: unknown phase(s) {sorted(unknown)}; choose from {PHASES}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = a.out / f"logs-{stamp}"
    log_dir.mkdir()
    fds = raise_fd_limit()
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes(log_dir)
    if len(procs.other_cpus | procs.sut_cpus) > 1:
        os.sched_setaffinity(0, procs.other_cpus)
    wrk, wrk_note = ensure_wrk(not a.no_install)
    bench = Bench(opts, procs)
    if a.merge:
        saved = json.loads(a.merge.read_text())
        bench.results.update(
            {k: v for k, v in saved.items() if k not in ("errors", "targets", "phase_seconds")}
        )
        bench.notes.extend(saved.get("notes", []))
    bench.wrk = wrk
    if wrk_note:
        bench.notes.append(wrk_note)
    if fds < 2 * opts.rss_streams + 100:
        bench.notes.append(f"open-file limit is {fds}: {opts.rss_streams} streams may not all open")
    quiet_limit = a.wait_quiet if a.wait_quiet is not None else (0.0 if quick else 300.0)
    busy, waited = wait_quiet(quiet_limit, procs.sut_cpus | procs.other_cpus)
    if busy >= 0.10:
        bench.notes.append(
            f"other processes were using {busy:.0%} of a CPU when the run started "
            f"(after waiting {waited:.0f} s)"
        )
    load_start = os.getloadavg()
    try:
        bench.setup()
        for name in PHASES:
            if name in only:
                bench.phase(name, getattr(bench, name))
        if opts.peers:
            from bench import peers

            bench.phase("peers", lambda: peers.run(bench))
        if opts.profile:
            from bench import profile

            bench.phase("profile", lambda: profile.run(bench))
    finally:
        procs.stop_all()
    results: dict[str, Any] = bench.results
    results.update(
        mode="quick" if quick else "full",
        command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        started_utc=stamp,
        duration_s=round(time.monotonic() - started, 1),
        machine=machine(),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        pinning={"process_under_test": sorted(procs.sut_cpus), "everything_else": sorted(procs.other_cpus)},
        notes=bench.notes,
        open_files_limit=fds,
        loadavg={"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    )
    table = render(results, a.out, not a.no_chart)
    (a.out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=1))
    (a.out / "latest.json").write_text(json.dumps(results, indent=1))
    print(table)
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
