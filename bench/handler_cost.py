"""The LangChain handler's cost per call, in its own process: a fake model with and without the handler.

`python -m bench.handler_cost --calls N` (PROMPTLAYER_API_KEY / PROMPTLAYER_BASE_URL pointing at a
stand-in) prints one JSON line. Calls run in alternating blocks (no handler, handler, no handler, …) so
that drift (CPU frequency, the background thread's catch-up) falls on both sides; the cost is the
difference of the medians of the blocks' per-call times, as the caller sees it. The handler's shipping
runs in its background thread meanwhile: whatever it takes from the caller (the GIL) is in the figure.
`flush()` is timed separately. When `plproxy_langchain.PromptLayerCallbackHandler` cannot be imported
yet, the line says `"status": "pending"` and why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
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
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    results: dict[str, Any] = {"status": "measured", "calls_per_block": 0}
    before = _exported()
    handler = PromptLayerCallbackHandler(pl_tags=["bench"])
    block = max(10, calls // 20)
    results["calls_per_block"] = block
    models = {
        "llm": (FakeListLLM(responses=["Once upon a time there was a benchmark."]), "Once upon a time, "),
        "chat": (FakeListChatModel(responses=["Hello from the benchmark."]), "Say hello"),
    }
    total_recorded = 0
    for kind, (model, prompt) in models.items():
        for _ in range(block):  # warm both paths
            model.invoke(prompt)
            model.invoke(prompt, config={"callbacks": [handler]})
        total_recorded += block
        bare: list[float] = []
        with_handler: list[float] = []
        for i in range(2 * max(1, calls // block)):
            config = {"callbacks": [handler]} if i % 2 else None
            t0 = time.perf_counter()
            for _ in range(block):
                model.invoke(prompt, config=config)  # type: ignore[arg-type]
            per_call = (time.perf_counter() - t0) / block
            (with_handler if i % 2 else bare).append(per_call)
            if i % 2:
                total_recorded += block
        b, h = statistics.median(bare), statistics.median(with_handler)
        results[kind] = {
            "no_handler_us": round(b * 1e6, 1),
            "handler_us": round(h * 1e6, 1),
            "added_us": round((h - b) * 1e6, 1),
            "blocks": len(bare),
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
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handler_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per side and model")
    args = parser.parse_args(argv)
    try:
        result = measure(args.calls)
    except Exception as exc:
        result = {"status": "error", "why": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
