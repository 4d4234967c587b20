"""The measurements of one run. Each phase fills `Bench.results[...]`; a failing phase records its error
and the run goes on, so one broken figure never hides the others.

Pinning (on two or more CPUs): the process under test (plproxy, or the bare relay) runs alone on the
last CPU; the load generators, wrk, the fake upstream, the stand-ins and this harness share the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Proc, Processes, cpu_busy, http, run_pinned

MAX_RETRIES = 1  # redo a point disturbed by other processes this many times at most (not in --quick)
FOREIGN_LIMIT = 0.15  # CPUs' worth of other processes' work that counts as disturbed

CHAT = (
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},'
    '{"role":"user","content":"Say hello to the benchmark."}],"temperature":0}'
)
STREAM = CHAT[:-1] + ',"stream":true}'
LOG_OFF = "X-PL-Log: off"


@dataclass
class Options:
    quick: bool
    window: float  # seconds measured per point
    warmup: float  # seconds sent before each point, not measured
    reps: int  # repetitions of the latency and throughput points, targets interleaved
    rates: tuple[float, ...]
    stream_conns: int
    rss_streams: int
    handler_calls: int
    wrk_conns: int
    peers: bool
    profile: bool
    results: Path


@dataclass
class Target:
    name: str
    base: str  # …/v1
    proc: Proc | None  # the process between client and upstream (None: direct)
    headers: tuple[str, ...] = ()
    recorded: bool = False  # its calls become records at the stand-in
    standin: str = ""  # the stand-in it exports to


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, opts: Options, procs: Processes) -> None:
        self.o = opts
        self.procs = procs
        self.tmp = Path(tempfile.mkdtemp(prefix="plproxy-bench-"))
        self.results: dict[str, Any] = {"errors": {}}
        self.notes: list[str] = []
        self.wrk = shutil.which("wrk")
        self.upstream: Proc
        self.standin: Proc
        self.standin_slow: Proc
        self.relay: Proc

    # ---- plumbing -------------------------------------------------------------------------------------

    def setup(self) -> None:
        p = self.procs
        self.upstream = p.start_server("upstream", "bench.upstream", ["--delay", "0.05"])
        self.standin = p.start_server("standin", "bench.standin", [])
        self.standin_slow = p.start_server("standin-slow", "bench.standin", ["--delay", "0.5"])
        self.relay = p.start_server("relay", "bench.relay", ["--upstream", self.upstream.url], sut=True)

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as exc:
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"[bench] {name} FAILED: {exc}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        self.results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)

    def configure_upstream(self, **knobs: float) -> None:
        http("POST", self.upstream.url.removesuffix("/v1") + "/_bench/config", knobs)

    def exported(self, standin: str) -> int:
        return int(http("GET", standin + "/_bench/stats")["log_requests"])

    def start_plproxy(self, name: str, standin: str, extra: dict[str, str] | None = None) -> Proc:
        data = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))
        env = {
            "PLPROXY_UPSTREAM": self.upstream.url,
            "PROMPTLAYER_API_KEY": "pl_bench",
            "PROMPTLAYER_BASE_URL": standin,
            "PLPROXY_DATA_DIR": str(data),
            "PLPROXY_LOG_LEVEL": "warning",
            "PLPROXY_DRAIN_TIMEOUT": "2",
            "PLPROXY_FLUSH_TIMEOUT": "2",
            **(extra or {}),
        }
        return self.procs.start_plproxy(name, env)

    def wait_exported(self, standin: str, expected: int, timeout: float) -> float | None:
        """Seconds until the stand-in has `expected` records, or None at the timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.exported(standin) >= expected:
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def loadgen(self, mode: str, args: list[str], timeout: float) -> dict[str, Any]:
        out = run_pinned([sys.executable, "-m", "bench.loadgen", mode, *args], self.procs.other_cpus, timeout)
        return json.loads(out.strip().splitlines()[-1])

    def open_loop(self, t: Target, rate: float, body: str = CHAT) -> dict[str, Any]:
        args = [
            "--url",
            t.base + "/chat/completions",
            "--rate",
            str(rate),
            "--duration",
            str(self.o.window),
            "--warmup",
            str(self.o.warmup),
            "--body",
            body,
            "--connections",
            str(min(256, int(rate * 0.1) + 16)),
            "--timeout",
            "10",
        ]
        for h in t.headers:
            args += ["--header", h]
        return self.loadgen("open", args, self.o.window + self.o.warmup + 40)

    def run_wrk(self, t: Target, seconds: float) -> dict[str, Any]:
        url = t.base + "/chat/completions"
        if not self.wrk:
            args = [
                "--url",
                url,
                "--concurrency",
                str(self.o.wrk_conns),
                "--duration",
                str(seconds),
                "--warmup",
                "0",
            ]
            for h in t.headers:
                args += ["--header", h]
            res = self.loadgen("closed", args, seconds + 30)
            return {
                "tool": "bench.loadgen closed",
                "calls_per_s": res["calls_per_s"],
                "calls": res["calls"],
                "errors": sum(res["errors"].values()),
                "latency_p50_ms": res["latency_us"].get("p50", 0) / 1000,
            }
        lua = [
            'wrk.method = "POST"',
            f"wrk.body = [[{CHAT}]]",
            'wrk.headers["Content-Type"] = "application/json"',
            'wrk.headers["Authorization"] = "Bearer sk-bench-not-a-real-key"',
        ]
        for h in t.headers:
            name, _, value = h.partition(":")
            lua.append(f'wrk.headers["{name.strip()}"] = "{value.strip()}"')
        script = self.tmp / f"post-{abs(hash(tuple(t.headers)))}.lua"
        script.write_text("\n".join(lua) + "\n")
        out = run_pinned(
            [
                self.wrk,
                "-t1",
                f"-c{self.o.wrk_conns}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            self.procs.other_cpus,
            seconds + 30,
        )
        return parse_wrk(out)

    def mine(self) -> float:
        """CPU seconds used so far by this harness: itself, its waited-for tools, its running servers."""
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for p in self.procs.started:
            if p.alive():
                with contextlib.suppress(OSError):
                    total += p.cpu_seconds()
        return total

    def disturbed(self, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `measure()`; redo it (up to MAX_RETRIES times, the least disturbed run kept) while other
        processes on this machine (a concurrent test suite, …) took over 15% of a CPU meanwhile."""
        cpus = self.procs.sut_cpus | self.procs.other_cpus
        best: dict[str, Any] | None = None
        for attempt in range((MAX_RETRIES if not self.o.quick else 0) + 1):
            busy0, mine0, t0 = cpu_busy(cpus), self.mine(), time.monotonic()
            res = measure()
            elapsed = time.monotonic() - t0
            foreign = max(0.0, (cpu_busy(cpus) - busy0) - (self.mine() - mine0)) / max(elapsed, 0.001)
            res["foreign_cpu"] = round(foreign, 3)
            res["attempts"] = attempt + 1
            if best is None or foreign < best["foreign_cpu"]:
                best = res
            if foreign <= FOREIGN_LIMIT:
                break
            time.sleep(5.0)
        assert best is not None
        best["attempts"] = attempt + 1
        self.results.setdefault("interference", {})[what] = best["foreign_cpu"]
        if best["foreign_cpu"] > FOREIGN_LIMIT:
            self.notes.append(
                f"{what}: other processes used {best['foreign_cpu']:.0%} of a CPU during the least disturbed "
                f"of {best['attempts']} attempt(s)"
            )
        return best

    # ---- (1) latency, (5) CPU, (6) pipeline, (7) logging off, (8) PromptLayer slow ------------------------

    def latency(self) -> None:
        self.configure_upstream(delay=0.05, gap=0.02, chunks=20)
        px = self.start_plproxy("plproxy", self.standin.url)
        upstream = Target("direct", self.upstream.url, None)
        targets = [
            upstream,
            Target("relay", self.relay.url + "/v1", self.relay),
            Target("plproxy", px.url + "/v1", px, recorded=True, standin=self.standin.url),
            Target("plproxy_log_off", px.url + "/v1", px, headers=(LOG_OFF,)),
            Target("plproxy_pl_slow", "", None, recorded=True, standin=self.standin_slow.url),
        ]
        out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rep in range(self.o.reps):
            for rate in self.o.rates:
                for t in targets:
                    if t.name == "plproxy_pl_slow" and rate != max(self.o.rates):
                        continue
                    slow = None
                    if t.name == "plproxy_pl_slow":  # a fresh process each time: its backlog must not linger
                        slow = self.start_plproxy(f"plproxy-pl-slow-{rep}", self.standin_slow.url)
                        t = Target(t.name, slow.url + "/v1", slow, recorded=True, standin=t.standin)
                    res = self.disturbed(
                        f"latency {t.name} {rate:g}/s rep {rep}",
                        lambda t=t, rate=rate: self.measure_open(t, rate, pipeline=t.name == "plproxy"),
                    )
                    res["rep"] = rep
                    out.setdefault(str(int(rate)), {}).setdefault(t.name, []).append(res)
                    if slow is not None:
                        self.procs.stop(slow)
        self.results["latency"] = out
        self.procs.stop(px)

    def measure_open(self, t: Target, rate: float, *, pipeline: bool) -> dict[str, Any]:
        proc = t.proc
        before = self.exported(t.standin) if t.recorded else 0
        cpu0 = proc.cpu_seconds() if proc else 0.0
        sampler = MetricsSampler(proc.url + "/metrics") if pipeline and proc else None
        if sampler:
            sampler.start()
        wall0 = time.time()
        res = self.open_loop(t, rate)
        wall1 = time.time()
        ok_total = res.pop("ok_total", res["completed"])
        if t.recorded:
            res["drain_s"] = self.wait_exported(
                t.standin, before + ok_total, timeout=20 if "slow" not in t.name else 0.1
            )
        if sampler:
            sampler.stop()
        if proc:
            res["cpu_s"] = round(proc.cpu_seconds() - cpu0, 3)
            res["cpu_calls"] = ok_total
            res["cpu_per_1000_s"] = round(res["cpu_s"] / max(1, ok_total) * 1000, 4)
            res["rss_mb"] = round(proc.rss_mb(), 1)
        if t.recorded:
            stats = http("GET", t.standin + "/_bench/stats")
            res["exported"] = stats["log_requests"] - before
            if pipeline:
                res["pipeline"] = pipeline_series(
                    res,
                    stats["bins"],
                    wall0,
                    wall1 + (res.get("drain_s") or 0) + 0.5,
                    sampler.samples if sampler else [],
                )
        return res

    # ---- (2) maximum calls/s, (7) logging off -------------------------------------------------------------

    def throughput(self) -> None:
        self.configure_upstream(delay=0.0)
        out: dict[str, list[dict[str, Any]]] = {}
        names = ["direct", "relay", "plproxy", "plproxy_log_off"]
        if not self.o.quick:
            names.append("plproxy_info_log")
        for rep in range(self.o.reps):
            for name in names:
                px = None
                if name == "direct":
                    t = Target(name, self.upstream.url, None)
                elif name == "relay":
                    t = Target(name, self.relay.url + "/v1", self.relay)
                else:
                    extra = {"PLPROXY_LOG_LEVEL": "info"} if name == "plproxy_info_log" else None
                    px = self.start_plproxy(f"{name}-wrk-{rep}", self.standin.url, extra)
                    headers = (LOG_OFF,) if name == "plproxy_log_off" else ()
                    t = Target(
                        name,
                        px.url + "/v1",
                        px,
                        headers=headers,
                        recorded=name != "plproxy_log_off",
                        standin=self.standin.url,
                    )
                    exported0 = self.exported(t.standin)
                    warm = self.run_wrk(t, 1)  # a fresh process: warm it, then let its pipeline catch up
                    if t.recorded:
                        self.wait_exported(t.standin, exported0 + warm["calls"], 30)
                res = self.disturbed(f"throughput {name} rep {rep}", lambda t=t: self.measure_wrk(t))
                res["rep"] = rep
                out.setdefault(name, []).append(res)
                if px is not None:
                    self.procs.stop(px)
        self.results["throughput"] = out

    def measure_wrk(self, t: Target) -> dict[str, Any]:
        before = self.exported(t.standin) if t.recorded else 0
        cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
        started = time.monotonic()
        res = self.run_wrk(t, self.o.window)
        if t.proc:
            res["cpu_s"] = round(t.proc.cpu_seconds() - cpu0, 3)
            res["cpu_per_1000_s"] = round(res["cpu_s"] / max(1, res["calls"]) * 1000, 4)
        if t.recorded:
            during = self.exported(t.standin) - before
            drained = self.wait_exported(t.standin, before + res["calls"], timeout=60)
            res["exported_during"] = during
            res["exported_per_s_during"] = round(during / self.o.window, 1)
            res["drain_after_s"] = None if drained is None else round(drained, 2)
            total = time.monotonic() - started
            res["exported_per_s_overall"] = round(res["calls"] / total, 1) if drained is not None else None
        return res

    # ---- (3) streams --------------------------------------------------------------------------------------

    def streams(self) -> None:
        self.configure_upstream(delay=0.0, gap=0.02, chunks=20)
        px = self.start_plproxy("plproxy-streams", self.standin.url)
        out: dict[str, Any] = {}
        targets = [
            Target("direct", self.upstream.url, None),
            Target("relay", self.relay.url + "/v1", self.relay),
            Target("plproxy", px.url + "/v1", px),
        ]
        for t in targets:
            out[t.name] = self.disturbed(f"streams {t.name}", lambda t=t: self.stream_load(t))
        self.results["streams"] = out
        self.procs.stop(px)

    def stream_load(
        self, t: Target, seconds: float | None = None, extra: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """`stream_conns` connections streaming back to back for `seconds` (one window by default), the
        upstream's chunks as configured; `extra`: more `bench.loadgen streams` arguments."""
        seconds = self.o.window if seconds is None else seconds
        args = [
            "--url",
            t.base + "/chat/completions",
            "--concurrency",
            str(self.o.stream_conns),
            "--duration",
            str(seconds),
            "--body",
            STREAM,
            "--stagger",
            "0.2",
            "--timeout",
            "10",
            *extra,
        ]
        for h in t.headers:
            args += ["--header", h]
        return self.loadgen("streams", args, seconds + 40)

    # ---- (4) RSS ------------------------------------------------------------------------------------------

    def rss(self) -> None:
        n = self.o.rss_streams
        # streams of ~4 s (shorter for tiny windows), so that all n are open at once
        gap, chunks = 0.1, max(10, min(40, int(self.o.window * 10)))
        out: dict[str, Any] = {"streams": n}
        for name in ("relay", "plproxy"):
            if name == "relay":
                proc = self.procs.start_server(
                    "relay-rss", "bench.relay", ["--upstream", self.upstream.url], sut=True
                )
                base = proc.url + "/v1"
            else:
                proc = self.start_plproxy("plproxy-rss", self.standin.url)
                base = proc.url + "/v1"
            r: dict[str, Any] = {"idle_start_mb": round(proc.rss_mb(), 1)}
            self.configure_upstream(delay=0.0)
            warm = Target(name, base, proc)
            saved = self.o.window, self.o.warmup
            self.o.window, self.o.warmup = min(1.0, saved[0]), 0.0
            try:
                self.open_loop(warm, 500)
            finally:
                self.o.window, self.o.warmup = saved
            time.sleep(0.5)
            r["idle_warm_mb"] = round(proc.rss_mb(), 1)
            self.configure_upstream(delay=0.0, gap=gap, chunks=chunks)
            peak = [0.0]
            stop = threading.Event()

            def sample(proc: Proc = proc, stop: threading.Event = stop, peak: list[float] = peak) -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.rss_mb())
                    time.sleep(0.05)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            args = [
                "--url",
                base + "/chat/completions",
                "--concurrency",
                str(n),
                "--per-conn",
                "1",
                "--duration",
                "30",
                "--body",
                STREAM,
                "--stagger",
                "1.0",
                "--no-warm-first",
                "--timeout",
                "20",
            ]
            res = self.loadgen("streams", args, 90)
            stop.set()
            th.join()
            r.update(
                peak_mb=round(peak[0], 1),
                hwm_mb=round(proc.hwm_mb(), 1),
                threads=proc.threads(),
                max_in_flight=res["max_in_flight"],
                streams_ok=res["statuses"].get("200", 0),
                errors=res["errors"],
                chunk_delay_us=res["chunk_delay_us"],
                ttfb_us=res["ttfb_us"],
            )
            out[name] = r
            self.procs.stop(proc)
        self.configure_upstream(delay=0.05, gap=0.02, chunks=20)
        out["stream_seconds"] = round(gap * chunks, 1)
        self.results["rss"] = out

    # ---- (9) the LangChain handler ------------------------------------------------------------------------

    def handler(self) -> None:
        env = {
            "PROMPTLAYER_API_KEY": "pl_bench",
            "PROMPTLAYER_BASE_URL": self.standin.url,
            "PLPROXY_DATA_DIR": tempfile.mkdtemp(prefix="handler-", dir=self.tmp),
        }
        out = run_pinned(
            [sys.executable, "-m", "bench.handler_cost", "--calls", str(self.o.handler_calls)],
            self.procs.sut_cpus,
            300,
            env=env,
        )
        self.results["handler"] = json.loads(out.strip().splitlines()[-1])


class MetricsSampler(threading.Thread):
    """Scrapes plproxy's /metrics once a second: the store backlog gauge and the records counters."""

    _LINE = re.compile(
        r'^(plproxy_store_backlog|plproxy_records_total\{outcome="(\w+)"\})\s+([0-9.e+]+)$', re.M
    )

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                text = http("GET", self.url, timeout=2)
            except OSError:
                text = ""
            sample: dict[str, float] = {"t": time.time()}
            for m in self._LINE.finditer(text if isinstance(text, str) else ""):
                key = "backlog_gauge" if m.group(1) == "plproxy_store_backlog" else m.group(2)
                sample[key] = float(m.group(3))
            self.samples.append(sample)
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def pipeline_series(
    res: dict[str, Any], bins: dict[str, int], wall0: float, wall1: float, samples: list[dict[str, float]]
) -> dict[str, Any]:
    """Calls answered vs records at the stand-in, per 100 ms, over the measured window and the drain after.

    backlog(t) = calls answered so far - records exported so far, both counted from the start of the load
    (warm-up included; t is negative during the warm-up); its slope over the measured window says whether
    the pipeline keeps up (flat) or falls behind (growing).
    """
    first_bin = int(res["wall_start_s"] * 10)
    start_bin = int(res["wall_measure_start_s"] * 10)
    end_bin = int(wall1 * 10) + 1
    done = {int(k): v for k, v in res["done_bins"].items()}
    exp = {int(k): v for k, v in bins.items()}
    t, backlog, exported_rate = [], [], []
    answered = exported = 0
    for b in range(first_bin, end_bin):
        answered += done.get(b, 0)
        exported += exp.get(b, 0)
        t.append(round((b - start_bin) / 10, 1))
        backlog.append(answered - exported)
        exported_rate.append(exp.get(b, 0) * 10)
    window_bins = int(res["duration"] * 10)
    in_window = backlog[start_bin - first_bin : start_bin - first_bin + window_bins]
    slope = _slope(in_window[len(in_window) // 2 :]) * 10 if len(in_window) > 4 else 0.0  # records/s
    exported_in_window = sum(exp.get(b, 0) for b in range(start_bin, start_bin + window_bins))
    return {
        "t_s": t,
        "backlog": backlog,
        "exported_per_s": exported_rate,
        "exported_per_s_window": round(exported_in_window / res["duration"], 1),
        "backlog_max": max(in_window) if in_window else 0,
        "backlog_end_of_window": in_window[-1] if in_window else 0,
        "backlog_slope_per_s": round(slope, 2),
        "flat": abs(slope) < max(5.0, 0.02 * res["rate"]),
        "metrics_samples": [{**s, "t": round(s["t"] - wall0, 2)} for s in samples],
    }


def _slope(ys: list[int]) -> float:
    n = len(ys)
    mx = (n - 1) / 2
    my = sum(ys) / n
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / den if den else 0.0


_WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_PCT = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def parse_wrk(out: str) -> dict[str, Any]:
    rate = _WRK_RATE.search(out)
    total = _WRK_TOTAL.search(out)
    if not rate or not total:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non2xx = _WRK_NON2XX.search(out)
    sock = _WRK_SOCKET.search(out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    pct = {
        f"latency_p{m.group(1)}_ms": round(float(m.group(2)) * scale[m.group(3)], 3)
        for m in _WRK_PCT.finditer(out)
    }
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {
        "tool": "wrk",
        "calls_per_s": float(rate.group(1)),
        "calls": int(total.group(1)),
        "errors": errors,
        **pct,
    }
