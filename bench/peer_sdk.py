"""The official `promptlayer` SDK's in-process OpenAI wrapper, measured in its own venv and process.

`bench/.venv-promptlayer/bin/python -m bench.peer_sdk --upstream URL --calls N` (PROMPTLAYER_API_KEY and
PROMPTLAYER_BASE_URL pointing at a stand-in) prints one JSON line: per-call latency of the same chat
completion through a bare `openai.OpenAI` client and through `PromptLayer().openai.OpenAI`, in alternating
blocks, and the process CPU per call of each. Only the standard library, `openai` and `promptlayer` are
imported here (that venv has nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p * (len(v) - 1)))]


def measure(upstream: str, calls: int) -> dict[str, Any]:
    base = os.environ.get("PROMPTLAYER_BASE_URL", "")
    if not base.startswith("http://127.0.0.1:"):
        return {"status": "refused", "why": "PROMPTLAYER_BASE_URL must point at the loopback stand-in"}
    import openai
    from promptlayer import PromptLayer

    bare = openai.OpenAI(base_url=upstream, api_key="sk-bench-not-a-real-key", max_retries=0)
    pl = PromptLayer(api_key=os.environ["PROMPTLAYER_API_KEY"])
    wrapped = pl.openai.OpenAI(base_url=upstream, api_key="sk-bench-not-a-real-key", max_retries=0)
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Say hello to the benchmark."}]  # fmt: skip

    def call(client: Any) -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0)

    for client in (bare, wrapped):  # warm connections and imports
        for _ in range(5):
            call(client)
    lat: dict[str, list[float]] = {"bare": [], "wrapped": []}
    cpu: dict[str, float] = {"bare": 0.0, "wrapped": 0.0}
    block = max(5, calls // 10)
    for i in range(2 * max(1, calls // block)):
        name = "wrapped" if i % 2 else "bare"
        client = wrapped if i % 2 else bare
        c0 = time.process_time()
        for _ in range(block):
            t0 = time.perf_counter()
            call(client)
            lat[name].append(time.perf_counter() - t0)
        cpu[name] += time.process_time() - c0
    out: dict[str, Any] = {"status": "measured", "calls_per_side": len(lat["bare"])}
    for name, values in lat.items():
        out[name] = {
            "p50_ms": round(_pct(values, 0.5) * 1000, 3),
            "p99_ms": round(_pct(values, 0.99) * 1000, 3),
            "cpu_us_per_call": round(cpu[name] / len(values) * 1e6, 1),
        }
    out["added_p50_ms"] = round(out["wrapped"]["p50_ms"] - out["bare"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["wrapped"]["p99_ms"] - out["bare"]["p99_ms"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_sdk", description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        result = measure(args.upstream, args.calls)
    except Exception as exc:
        result = {"status": "error", "why": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
