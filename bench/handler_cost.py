"""The LangChain handler's cost per call, in its own process: a fake model with and without the handler.

`python -m bench.handler_cost --calls N` (PROMPTLAYER_API_KEY / PROMPTLAYER_BASE_URL pointing at a
stand-in) prints one JSON line. Calls run in alternating blocks (no handler, handler, no handler, …) so
that drift (CPU frequency) falls on every side; the cost is the difference of the medians of the
blocks' per-call CPU time (process-wide: the caller and every background thread, on one CPU). The
handler's shipping runs in its background thread meanwhile, and each handler block ends with
`handler.flush()` inside its count: the block pays for every record it made (built, stored, exported),
so the figure is the steady-state cost, not a backlog left to the next block; the flush's waits (disk,
network) are not CPU and not counted. The calls' wall time alone is reported beside it. The final
`flush()` is timed separately. When `plproxy_langchain.PromptLayerCallbackHandler` cannot be imported
yet, the line says `"status": "pending"` and why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def _exported() -> int | None:
    base = os.environ.get("PROMPTLAYER_BASE_URL", "")
    if not base.startswith("http://127.0.0.1:"):
        return None
    try:
        with urllib.request.urlopen(base + "/_bench/stats", timeout=5) as resp:  # noqa: S310 - loopback
            return int(json.loads(resp.read())["log_requests"])
    except OSError:
        return None


def measure(calls: int) -> dict[str, Any]:
    try:
        from plproxy_langchain import PromptLayerCallbackHandler  # type: ignore[attr-defined]
    except ImportError as exc:
        return {"status": "pending", "why": f"plproxy_langchain.PromptLayerCallbackHandler: {exc}"}
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    class Noop(BaseCallbackHandler):
        """A handler that does nothing: what LangChain's callback machinery costs by itself."""

    results: dict[str, Any] = {"status": "measured", "calls_per_block": 0}
    before = _exported()
    handler = PromptLayerCallbackHandler(pl_tags=["bench"])
    configs: dict[str, Any] = {
        "none": None,
        "noop": {"callbacks": [Noop()]},
        "handler": {"callbacks": [handler]},
    }
    block = max(200, calls // 10)  # large enough that the flush ending a handler block is amortised
    results["calls_per_block"] = block
    models = {
        "llm": (FakeListLLM(responses=["Once upon a time there was a benchmark."]), "Once upon a time, "),
        "chat": (FakeListChatModel(responses=["Hello from the benchmark."]), "Say hello"),
    }
    total_recorded = 0
    for kind, (model, prompt) in models.items():
        for config in configs.values():  # warm every path
            for _ in range(block):
                model.invoke(prompt, config=config)
        total_recorded += block
        per_call: dict[str, list[float]] = {name: [] for name in configs}  # CPU s per call
        wall: dict[str, list[float]] = {name: [] for name in configs}  # the calls alone, s per call
        flush_cpu: list[float] = []  # CPU s of each handler block's closing flush
        for _ in range(max(1, calls // block)):
            for name, config in configs.items():  # interleaved, so drift falls on every side
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(block):
                    model.invoke(prompt, config=config)
                wall[name].append((time.perf_counter() - t0) / block)
                if name == "handler":
                    # The block pays for its own background work (records built, stored, exported)
                    # before the next block starts: deferred work must not spill into the blocks
                    # without the handler and flatter the difference. Counted as CPU (every thread
                    # of the process), so the flush's waits on the disk and the network are not.
                    f0 = time.process_time()
                    handler.flush(timeout=30)
                    flush_cpu.append(time.process_time() - f0)
                per_call[name].append((time.process_time() - c0) / block)
            total_recorded += block
        m = {name: statistics.median(v) for name, v in per_call.items()}
        results[kind] = {
            "no_handler_us": round(m["none"] * 1e6, 1),
            "noop_handler_us": round(m["noop"] * 1e6, 1),
            "handler_us": round(m["handler"] * 1e6, 1),
            "added_us": round((m["handler"] - m["none"]) * 1e6, 1),
            "langchain_callbacks_us": round((m["noop"] - m["none"]) * 1e6, 1),
            "handler_own_us": round((m["handler"] - m["noop"]) * 1e6, 1),
            "handler_wall_us": round(statistics.median(wall["handler"]) * 1e6, 1),
            "no_handler_wall_us": round(statistics.median(wall["none"]) * 1e6, 1),
            "flush_cpu_us_per_call": round(statistics.median(flush_cpu) / block * 1e6, 1),
            "blocks": len(per_call["none"]),
        }
    t0 = time.perf_counter()
    flushed = handler.flush(timeout=30)
    results["flush_s"] = round(time.perf_counter() - t0, 3)
    results["flush_returned"] = repr(flushed)[:200]
    results["recorded_calls"] = total_recorded
    after = _exported()
    if before is not None and after is not None:
        results["exported"] = after - before
    results["added_us"] = max(results["llm"]["added_us"], results["chat"]["added_us"])
    results["handler_own_us"] = max(results["llm"]["handler_own_us"], results["chat"]["handler_own_us"])
    return results


def thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread of this process, by Python thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = names.get(int(task.name), f"thread {task.name}")
        out[name] = round(out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick, 3)
    return out


def handler_only(calls: int) -> dict[str, Any]:
    """Only calls with the handler, for a profiler to watch; per-thread CPU at the end."""
    from langchain_core.language_models.fake import FakeListLLM

    from plproxy_langchain import PromptLayerCallbackHandler  # type: ignore[attr-defined]

    model = FakeListLLM(responses=["Once upon a time there was a benchmark."])
    handler = PromptLayerCallbackHandler(pl_tags=["bench"])
    for _ in range(50):  # start the background thread, the store and the exporter before measuring
        model.invoke("Once upon a time, ", config={"callbacks": [handler]})
    handler.flush(timeout=30)
    before = thread_cpu()
    t0 = time.perf_counter()
    for _ in range(calls):
        model.invoke("Once upon a time, ", config={"callbacks": [handler]})
    elapsed = time.perf_counter() - t0
    during = thread_cpu()
    handler.flush(timeout=30)
    flush_s = time.perf_counter() - t0 - elapsed
    after = thread_cpu()

    def delta(now: dict[str, float]) -> dict[str, float]:
        return {k: round(v - before.get(k, 0.0), 3) for k, v in now.items()}

    return {
        "calls": calls,
        "us_per_call": round(elapsed / calls * 1e6, 1),
        "thread_cpu_s": delta(during),
        "thread_cpu_after_flush_s": delta(after),
        "flush_s": round(flush_s, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handler_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per side and model")
    parser.add_argument("--handler-only", action="store_true", help="only calls with the handler (profiling)")
    args = parser.parse_args(argv)
    try:
        result = handler_only(args.calls) if args.handler_only else measure(args.calls)
    except Exception as exc:
        result = {"status": "error", "why": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
