"""A/B runs of one benchmark phase against plproxy variants, interleaved, to tell a change from noise.

    python -m bench.variants streams --variant relay --variant off --variant on --pairs 3
    python -m bench.variants rate --rate 500 --variant 'before:PLPROXY_X=0' --variant after --pairs 3

A single run on a shared machine moves by a quarter in CPU and more in the tail, so a change is judged on
several interleaved rounds: every round starts each variant fresh, in the order given, and measures it
alone. A variant is `NAME` or `NAME:ENV=VALUE,ENV=VALUE` (the environment added to plproxy's, for a
switch a change under study reads). Built-in names: `direct` (the fake upstream itself), `relay` (the
bare aiohttp relay), `off` (plproxy, every call with `X-PL-Log: off`), `nokey` (plproxy without a
PromptLayer key: records stored, none exported); any other name is plproxy as configured by the benchmark.

Phases: `streams` (100 concurrent streams of 20 chunks 20 ms apart: time to first byte and per-chunk
delay) and `rate` (an open-loop generator at `--rate` calls/s, upstream delay 50 ms: client latency).
Each run also reports the CPU per call (or per stream) of the process under test, split into its event
loop thread and the others. One line per run, then the median of each variant over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import raise_fd_limit
from bench.phases import CHAT, LOG_OFF, Bench, Options, Target
from bench.procs import Proc, Processes

BUILT_IN = ("direct", "relay", "off", "nokey")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, env_text = text.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, env_text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not ENV=VALUE")
        env[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} has no name")
    if name in ("direct", "relay") and env:
        raise argparse.ArgumentTypeError(f"{name} is not plproxy: it takes no environment")
    return name, env


def loop_and_other(proc: Proc, before: dict[int, tuple[float, float]]) -> tuple[float, float]:
    """CPU seconds since `before`: the process's first thread (its event loop) and all the others."""
    after = proc.thread_cpu()
    loop = other = 0.0
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        spent = user + system - u0 - s0
        if tid == proc.pid:
            loop += spent
        else:
            other += spent
    return loop, other


def one_run(bench: Bench, phase: str, name: str, env: dict[str, str], rate: float) -> dict[str, Any]:
    headers: tuple[str, ...] = ()
    plproxy: Proc | None = None
    if name == "direct":
        target = Target("direct", bench.upstream.url, None)
    elif name == "relay":
        target = Target("relay", bench.relay.url + "/v1", bench.relay)
    else:
        extra = dict(env)
        if name == "nokey":
            extra["PROMPTLAYER_API_KEY"] = ""
        plproxy = bench.start_plproxy(f"variant-{name}", bench.standin.url, extra)
        headers = (LOG_OFF,) if name == "off" else ()
        target = Target(name, plproxy.url + "/v1", plproxy, headers)
    try:
        sut = target.proc
        before = sut.thread_cpu() if sut else {}
        if phase == "rate":
            bench.configure_upstream(delay=0.05)
            res = bench.open_loop(target, rate, CHAT)
            calls = res["completed"] + int(rate * bench.o.warmup)
            out = {"p50_ms": res["latency_us"]["p50"] / 1e3, "p99_ms": res["latency_us"]["p99"] / 1e3}
        else:
            bench.configure_upstream(delay=0.0, gap=0.02, chunks=20)
            res = bench.stream_load(target)
            calls = res["streams"]
            out = {
                "ttfb_p50_ms": res["ttfb_us"]["p50"] / 1e3,
                "chunk_p99_ms": res["chunk_delay_us"]["p99"] / 1e3,
                "chunk_max_ms": res["chunk_delay_us"]["max"] / 1e3,
            }
        if sut is not None and calls:
            loop, other = loop_and_other(sut, before)
            out["cpu_us"] = (loop + other) / calls * 1e6
            out["loop_us"] = loop / calls * 1e6
            out["other_us"] = other / calls * 1e6
        return out
    finally:
        if plproxy is not None:
            bench.procs.stop(plproxy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("streams", "rate"))
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        required=True,
        help="NAME or NAME:ENV=VALUE,… (repeat; built-in: " + ", ".join(BUILT_IN) + ")",
    )
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per run (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="rate: seconds sent first, unmeasured")
    parser.add_argument("--rate", type=float, default=500.0, help="rate: calls/s (default 500)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/variants"), help="servers' logs")
    a = parser.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    procs = Processes(a.out)
    if len(procs.other_cpus | procs.sut_cpus) > 1:
        os.sched_setaffinity(0, procs.other_cpus)
    opts = Options(
        quick=True,
        window=a.window,
        warmup=a.warmup,
        reps=1,
        rates=(a.rate,),
        stream_conns=100,
        rss_streams=0,
        handler_calls=0,
        wrk_conns=0,
        peers=False,
        profile=False,
        results=a.out,
    )
    bench = Bench(opts, procs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in a.variant}
    try:
        bench.setup()
        for round_no in range(1, a.pairs + 1):
            for name, env in a.variant:
                started = time.monotonic()
                res = one_run(bench, a.phase, name, env, a.rate)
                runs[name].append(res)
                print(
                    f"round {round_no}  {name:<12} {_shown(res)}  ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    finally:
        procs.stop_all()
    print(f"\nmedians over {a.pairs} round(s), {a.phase}:")
    for name, results in runs.items():
        keys = results[0].keys() if results else ()
        print(f"  {name:<12} {_shown({k: statistics.median(r[k] for r in results) for k in keys})}")
    return 0


def _shown(figures: dict[str, Any]) -> str:
    """`name=value` pairs: milliseconds to the microsecond, CPU in whole µs."""
    return "  ".join(f"{k}={v:.3f}" if k.endswith("ms") else f"{k}={v:.0f}" for k, v in figures.items())


if __name__ == "__main__":
    sys.exit(main())
