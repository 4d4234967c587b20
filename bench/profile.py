"""`--profile`: where plproxy's CPU goes, while the benchmark's own load runs.

Two instruments per scenario, on a fresh plproxy process each time (so no earlier backlog is exported
meanwhile):

- per-thread CPU seconds from /proc/PID/task/*/stat: exact, and it splits the event loop from the
  store's writer thread and the executor threads that `asyncio.to_thread` uses;
- py-spy in `--gil` mode: only the thread holding the GIL is sampled, so the shares say where Python code
  runs, without the runnable-but-waiting threads that all-thread sampling counts as busy on one CPU.
  C code that releases the GIL (SQLite's statement steps, fsync, uvloop's I/O) is not in these samples;
  the per-thread CPU shows it.

Scenarios: saturation (wrk, upstream delay 0) with logging on and off, the bare relay at saturation for
comparison, and plproxy at 500 calls/s with the upstream delay at 50 ms. Raw collapsed stacks stay in
bench/results/profile-*.txt; `summarize` gives each function's self and inclusive share of the samples,
and its µs per call (share x the process's CPU per call, an approximation when GIL-free C code is large).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.phases import LOG_OFF, Bench, Target
from bench.procs import Proc, run_pinned

RATE_HZ = 250
_DIGITS = re.compile(r"[_-]?\d+$")


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def summarize(raw: Path, cpu_s: float, calls: int, top: int = 30) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        threads[_thread_group(thread)] += n
        self_c[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
    us_per_call = cpu_s / calls * 1e6 if calls else 0.0

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "share": round(c / total, 4), "us_per_call": round(c / total * us_per_call, 1)}
            for f, c in counter.most_common(top)
        ]

    return {
        "samples": total,
        "cpu_s": round(cpu_s, 3),
        "calls": calls,
        "cpu_us_per_call": round(us_per_call, 1),
        "gil_threads": {k: round(v / total, 4) for k, v in threads.most_common()} if total else {},
        "self": rows(self_c),
        "inclusive": rows(incl),
    }


def _thread_group(frame: str) -> str:
    """`thread (123): uvloop_3` → `uvloop_N`: executor threads are one group."""
    name = frame.split(": ", 1)[1] if ": " in frame else frame
    return _DIGITS.sub("_N", name.strip('"'))


_THREAD = re.compile(r"^thread \((\d+)\): ([^;]*);", re.M)


def thread_names(raw: Path) -> dict[int, str]:
    """Thread id → Python thread name, from py-spy's stacks (threads that held the GIL at least once)."""
    return {int(m.group(1)): m.group(2) for m in _THREAD.finditer(raw.read_text(errors="replace"))}


def group_threads(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """CPU seconds (user, system) per thread group over the profile."""
    out: dict[str, list[float]] = {}
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        group = _DIGITS.sub("_N", names.get(tid, "unnamed (never held the GIL)"))
        acc = out.setdefault(group, [0.0, 0.0])
        acc[0] += user - u0
        acc[1] += system - s0
    ranked = sorted(out.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    return {k: {"user": round(u, 3), "system": round(s, 3)} for k, (u, s) in ranked}


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` → `func (module.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.replace("\\", "/").split("/")
    keep = ("plproxy", "aiohttp", "asyncio", "bench", "plproxy_langchain")
    tail = "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] in keep else parts[-1]
    return f"{name} ({tail})"


def run(bench: Bench) -> None:
    py_spy = _py_spy()
    if py_spy is None:
        bench.results["profile"] = {
            "status": "missing",
            "why": "py-spy is not installed (pip install py-spy)",
        }
        return
    out_dir = bench.o.results
    seconds = max(4.0, bench.o.window)
    results: dict[str, Any] = {"status": "measured", "rate_hz": RATE_HZ, "mode": "--gil --nonblocking"}

    def profile(name: str, proc: Proc, load: Callable[[], int]) -> None:
        raw = out_dir / f"profile-{name}.txt"
        argv = [
            py_spy,
            "record",
            "--pid",
            str(proc.pid),
            "--rate",
            str(RATE_HZ),
            "--duration",
            str(round(seconds)),
            "--nonblocking",
            "--gil",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        threads0 = proc.thread_cpu()
        cpu0 = proc.cpu_seconds()
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches
        calls = load()
        _, err = spy.communicate(timeout=seconds + 60)
        cpu = proc.cpu_seconds() - cpu0
        threads1 = proc.thread_cpu()
        if spy.returncode != 0 or not raw.exists():
            results[name] = {"status": "failed", "why": err.decode(errors="replace")[-500:]}
            return
        summary = summarize(raw, cpu, calls)
        summary["thread_cpu_s"] = group_threads(threads0, threads1, thread_names(raw))
        summary["thread_cpu_us_per_call"] = {
            k: {kind: round(v / max(1, calls) * 1e6, 1) for kind, v in t.items()}
            for k, t in summary["thread_cpu_s"].items()
        }
        results[name] = summary

    def fresh(name: str) -> Proc:
        px = bench.start_plproxy(name, bench.standin.url)
        bench.run_wrk(Target(name, px.url + "/v1", px, headers=(LOG_OFF,)), 1)  # warm, without records
        return px

    bench.configure_upstream(delay=0.0)
    for name, headers in (("saturation-plproxy", ()), ("saturation-plproxy-log-off", (LOG_OFF,))):
        px = fresh(f"{name}-proc")
        t = Target(name, px.url + "/v1", px, headers=headers)
        try:
            profile(name, px, lambda t=t: bench.run_wrk(t, seconds - 1)["calls"])
        finally:
            bench.procs.stop(px)
    relay = Target("relay", bench.relay.url + "/v1", bench.relay)
    profile("saturation-relay", bench.relay, lambda: bench.run_wrk(relay, seconds - 1)["calls"])

    bench.configure_upstream(delay=0.0, gap=0.02, chunks=20)
    for name in ("streams-plproxy", "streams-relay"):
        proc = fresh(f"{name}-proc") if name == "streams-plproxy" else bench.relay
        t = Target(name, proc.url + "/v1", proc)

        def streams(t: Target = t) -> int:
            return int(bench.stream_load(t, seconds - 1, ("--no-warm-first",))["streams"])

        try:
            profile(name, proc, streams)
        finally:
            if proc is not bench.relay:
                bench.procs.stop(proc)

    bench.configure_upstream(delay=0.05)
    saved = bench.o.window, bench.o.warmup
    bench.o.window, bench.o.warmup = seconds - 1, 0.0
    try:
        for name, headers in (("rate500-plproxy", ()), ("rate500-plproxy-log-off", (LOG_OFF,))):
            px = fresh(f"{name}-proc")
            t = Target(name, px.url + "/v1", px, headers=headers)
            before = bench.exported(bench.standin.url)

            def load(t: Target = t, before: int = before) -> int:
                res = bench.open_loop(t, 500)
                if not t.headers:  # let the export of these calls finish inside the profile
                    bench.wait_exported(bench.standin.url, before + res["ok_total"], 10)
                return int(res["ok_total"])

            try:
                profile(name, px, load)
            finally:
                bench.procs.stop(px)
        profile("rate500-relay", bench.relay, lambda: int(bench.open_loop(relay, 500)["ok_total"]))
    finally:
        bench.o.window, bench.o.warmup = saved
    handler(bench, py_spy, results)
    bench.results["profile"] = results


def handler(bench: Bench, py_spy: str, results: dict[str, Any]) -> None:
    """The LangChain handler in a process of its own, launched under py-spy (all threads, GIL mode)."""
    calls = 3000 if bench.o.quick else 10000
    raw = bench.o.results / "profile-handler.txt"
    env = {
        "PROMPTLAYER_API_KEY": "pl_bench",
        "PROMPTLAYER_BASE_URL": bench.standin.url,
        "PLPROXY_DATA_DIR": tempfile.mkdtemp(prefix="handler-prof-", dir=bench.tmp),
    }
    argv = [
        py_spy,
        "record",
        "--rate",
        str(RATE_HZ),
        "--nonblocking",
        "--gil",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--",
        sys.executable,
        "-m",
        "bench.handler_cost",
        "--handler-only",
        "--calls",
        str(calls),
    ]
    try:
        out = run_pinned(argv, bench.procs.sut_cpus, 600, env=env)
        info = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    except (RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
        results["handler"] = {"status": "failed", "why": str(exc)[-500:]}
        return
    if "us_per_call" not in info:
        results["handler"] = {"status": info.get("status", "failed"), "why": info.get("why", "")}
        return
    cpu = sum(info["thread_cpu_after_flush_s"].values())
    summary = summarize(raw, cpu, calls)
    summary["wall_us_per_call"] = info["us_per_call"]
    summary["caller_thread_cpu_during_calls_s"] = info["thread_cpu_s"]
    summary["flush_s"] = info["flush_s"]
    grouped: dict[str, float] = {}
    for name, seconds in info["thread_cpu_after_flush_s"].items():
        key = _DIGITS.sub("_N", name)
        grouped[key] = grouped.get(key, 0.0) + seconds
    summary["thread_cpu_s"] = {k: {"user": round(v, 3), "system": 0.0} for k, v in grouped.items()}
    summary["thread_cpu_us_per_call"] = {
        k: {"user": round(v / calls * 1e6, 1), "system": 0.0} for k, v in grouped.items()
    }
    results["handler"] = summary


_SKIP = (
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "Thread._bootstrap",
    "Thread.run",
    "run (",
    "main (",
    "serve (",
    "Runner.run",
    "_worker",
    "Context.run",
)


def markdown(profile: dict[str, Any], top: int = 15) -> str:
    """The profile as Markdown: per scenario, CPU per call by thread, then the top frames."""
    if not profile or profile.get("status") != "measured":
        why = profile.get("why", "") if profile else ""
        return f"Profile: {profile.get('status', 'not run') if profile else 'not run'} {why}\n"
    lines = []
    for name, p in profile.items():
        if not isinstance(p, dict) or "samples" not in p:
            continue
        lines.append(
            f"#### {name}: {p['calls']} calls, {p['cpu_us_per_call']} \u00b5s CPU per call, "
            f"{p['samples']} GIL samples"
        )
        lines.append("")
        per_thread = p["thread_cpu_us_per_call"].items()
        lines.append(
            "CPU per call by thread, \u00b5s user + system: "
            + "; ".join(
                f"{k} {v['user']} + {v['system']}" for k, v in per_thread if v["user"] + v["system"] >= 0.5
            )
        )
        lines.append("")
        us = "\u2248\u00b5s/call"
        lines.append(f"| self % | {us} | function (self) | | incl. % | {us} | function (inclusive) |")
        lines.append("|---:|---:|---|---|---:|---:|---|")
        incl = [r for r in p["inclusive"] if not r["function"].startswith(_SKIP)]
        for i in range(top):
            s = p["self"][i] if i < len(p["self"]) else None
            c = incl[i] if i < len(incl) else None
            left = (
                f"| {s['share'] * 100:.1f} | {s['us_per_call']} | `{s['function']}` | " if s else "| | | | "
            )
            right = f"| {c['share'] * 100:.1f} | {c['us_per_call']} | `{c['function']}` |" if c else "| | | |"
            lines.append(left + right)
        lines.append("")
    return "\n".join(lines)
