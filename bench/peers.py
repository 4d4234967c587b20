"""`--peers`: LiteLLM's proxy and the official `promptlayer` SDK, each in a venv of its own.

The venvs live in bench/.venv-litellm and bench/.venv-promptlayer (gitignored) and are created with pip
on first use, so the project's venv never holds a peer. A peer that cannot be installed or started is
reported with the reason instead of failing the run.

LiteLLM (`litellm[proxy]`, one worker): one model, `openai/gpt-4o-mini` on the fake upstream,
`LITELLM_LOCAL_MODEL_COST_MAP=True`. Its PromptLayer callback posts to a hard-coded
https://api.promptlayer.com (litellm/integrations/prompt_layer.py ignores PROMPTLAYER_BASE_URL), and only
loopback may be a target here, so it cannot be pointed at the stand-in: it is measured without a callback
and, as the nearest equivalent, with its `generic_api` logging callback posting to the stand-in.

The promptlayer SDK's OpenAI wrapper runs in the caller's process: `bench.peer_sdk` runs there, pinned
to the CPU of the process under test, against the fast and the slow stand-in.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.phases import Bench, Target
from bench.procs import REPO, free_port, run_pinned


def ensure_venv(name: str, packages: list[str], probe: str) -> tuple[Path | None, str]:
    """bench/.venv-<name> with `packages`; (python, "") or (None, why)."""
    venv = REPO / "bench" / f".venv-{name}"
    python = venv / "bin" / "python"
    if python.exists() and (venv / probe).exists():
        return python, ""
    print(f"[bench] installing {' '.join(packages)} into {venv} …", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", *packages]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1500, check=False)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(step[-3:])}` took over 25 minutes"
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            return None, f"`{' '.join(step[-len(packages) - 2 :])}` failed: {tail[-400:]}"
    if not (venv / probe).exists():
        return None, f"{probe} is missing after installing {packages}"
    return python, ""


def run(bench: Bench) -> None:
    out: dict[str, Any] = {}
    for name, fn in (("LiteLLM proxy", litellm), ("promptlayer SDK wrapper", sdk)):
        try:
            out[name] = fn(bench)
        except Exception as exc:
            out[name] = {"status": "failed", "why": f"{type(exc).__name__}: {exc}"}
    bench.results["peers"] = out


def _lat(res: dict[str, Any], field: str, pct: str) -> float | None:
    v = (res.get(field) or {}).get(pct)
    return None if v is None else v / 1000


def litellm(bench: Bench) -> dict[str, Any]:
    python, why = ensure_venv("litellm", ["litellm[proxy]"], "bin/litellm")
    if python is None:
        return {"status": "not installed", "why": why}
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    site = next(python.parent.parent.glob("lib/python3*/site-packages/litellm"), None)
    pl_src = (site / "integrations" / "prompt_layer.py").read_text() if site else ""
    pl_hardcoded = "api.promptlayer.com" in pl_src and "PROMPTLAYER_BASE_URL" not in pl_src
    result: dict[str, Any] = {
        "status": "measured",
        "version": version,
        "promptlayer_callback": (
            "not used: it posts to a hard-coded https://api.promptlayer.com, ignoring PROMPTLAYER_BASE_URL"
            if pl_hardcoded
            else "available"
        ),
        "rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="litellm-", dir=bench.tmp))
    runs: dict[str, dict[str, Any]] = {}
    for mode in ("no callback", "generic_api callback"):
        cfg = tmp / f"{mode.split()[0]}.yaml"
        callback = '  success_callback: ["generic_api"]\n' if mode != "no callback" else ""
        cfg.write_text(
            "model_list:\n"
            "  - model_name: gpt-4o-mini\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o-mini\n"
            f"      api_base: {bench.upstream.url}\n"
            "      api_key: sk-bench-not-a-real-key\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            f"{callback}"
        )
        port = free_port()
        master_key = "sk-" + secrets.token_hex(24)
        env = {
            "LITELLM_MASTER_KEY": master_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "GENERIC_LOGGER_ENDPOINT": bench.standin.url + "/litellm-generic",
            "PROMPTLAYER_API_KEY": "pl_bench",
            "PROMPTLAYER_BASE_URL": bench.standin.url,
            "NO_PROXY": "*",
        }
        argv = [
            str(python.parent / "litellm"),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        proc = bench.procs.start_command(
            f"litellm-{mode.split()[0]}", argv, f"http://127.0.0.1:{port}/health/liveliness", env, timeout=180
        )
        try:
            t = Target(
                "litellm",
                f"http://127.0.0.1:{port}/v1",
                proc,
                headers=(f"Authorization: Bearer {master_key}",),
            )
            bench.configure_upstream(delay=0.0)
            bench.run_wrk(t, 2)  # warm
            wrk = bench.run_wrk(t, bench.o.window)
            bench.configure_upstream(delay=0.05)
            before = bench.exported(bench.standin.url)
            cpu0 = proc.cpu_seconds()
            low = bench.open_loop(t, 20)
            cpu = proc.cpu_seconds() - cpu0
            stats = bench.exported(bench.standin.url) - before
            high = bench.open_loop(t, 200)
            runs[mode] = {
                "wrk": wrk,
                "rate20": low,
                "rate200": high,
                "cpu_per_1000_s_at_20": round(cpu / max(1, low["ok_total"]) * 1000, 3),
                "rss_mb": round(proc.rss_mb(), 1),
                "standin_posts": stats,
            }
        finally:
            bench.procs.stop(proc)
    # the same low rate for direct, the bare relay and plproxy, for added latency at 20/s
    bench.configure_upstream(delay=0.05)
    px = bench.start_plproxy("plproxy-peers", bench.standin.url)
    try:
        base: dict[str, dict[str, Any]] = {}
        for t in (
            Target("direct", bench.upstream.url, None),
            Target("relay", bench.relay.url + "/v1", bench.relay),
            Target("plproxy", px.url + "/v1", px),
        ):
            c0 = t.proc.cpu_seconds() if t.proc else 0.0
            base[t.name] = bench.open_loop(t, 20)
            if t.proc:
                base[t.name]["cpu_per_1000_s"] = round(
                    (t.proc.cpu_seconds() - c0) / max(1, base[t.name]["ok_total"]) * 1000, 3
                )
    finally:
        bench.procs.stop(px)
    result["runs"] = runs
    result["baselines_at_20"] = base
    d_net = {p: _lat(base["direct"], "net_us", p) for p in ("p50", "p99")}
    rows = result["rows"]
    for mode, r in runs.items():
        rows.append(
            {
                "what": f"{mode}: max calls/s (wrk)",
                "direct": _tp(bench, "direct"),
                "relay": _tp(bench, "relay"),
                "plproxy": _tp(bench, "plproxy"),
                "peer": r["wrk"]["calls_per_s"],
                "digits": 0,
            }
        )
        for p in ("p50", "p99"):
            # LiteLLM does not relay the upstream's X-Bench-Hold-Us: compare its total latency with the
            # direct connection's total instead (the upstream's timer jitter then stays in the figure)
            peer = _sub(_lat(r["rate20"], "net_us", p), d_net[p])
            if peer is None:
                peer = _sub(_lat(r["rate20"], "latency_us", p), _lat(base["direct"], "latency_us", p))
            rows.append(
                {
                    "what": f"{mode}: added latency {p} at 20/s, ms",
                    "direct": d_net[p],
                    "relay": _sub(_lat(base["relay"], "net_us", p), d_net[p]),
                    "plproxy": _sub(_lat(base["plproxy"], "net_us", p), d_net[p]),
                    "peer": peer,
                    "digits": 3,
                }
            )
        hi = r["rate200"]
        rows.append(
            {
                "what": f"{mode}: client latency p50 at 200/s, ms "
                f"({hi['timeouts']} timeouts of {hi['scheduled']})",
                "peer": _lat(hi, "latency_us", "p50"),
                "digits": 1,
            }
        )
        rows.append(
            {
                "what": f"{mode}: CPU s per 1,000 calls at 20/s",
                "relay": base["relay"].get("cpu_per_1000_s"),
                "plproxy": base["plproxy"].get("cpu_per_1000_s"),
                "peer": r["cpu_per_1000_s_at_20"],
                "digits": 3,
            }
        )
    return result


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _tp(bench: Bench, name: str) -> float | None:
    from bench.report import throughput

    return throughput(bench.results, name)


def sdk(bench: Bench) -> dict[str, Any]:
    python, why = ensure_venv("promptlayer", ["promptlayer", "openai"], "lib")
    if python is None:
        return {"status": "not installed", "why": why}
    probe = subprocess.run(
        [str(python), "-c", "import promptlayer, openai"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        python, why = ensure_venv("promptlayer", ["promptlayer", "openai"], "bin/promptlayer-missing")
        if python is None:
            return {"status": "not installed", "why": why}
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('promptlayer'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    calls = 200 if bench.o.quick else 600
    bench.configure_upstream(delay=0.05)
    out: dict[str, Any] = {"status": "measured", "version": version, "rows": []}
    for label, standin in (("fast", bench.standin.url), ("slow", bench.standin_slow.url)):
        env = {"PROMPTLAYER_API_KEY": "pl_bench", "PROMPTLAYER_BASE_URL": standin}
        n = calls if label == "fast" else max(20, calls // 10)
        res = json.loads(
            run_pinned(
                [str(python), "-m", "bench.peer_sdk", "--upstream", bench.upstream.url, "--calls", str(n)],
                bench.procs.sut_cpus,
                600,
                env=env,
            )
            .strip()
            .splitlines()[-1]
        )
        out[label] = res
        if res.get("status") != "measured":
            out["status"], out["why"] = res.get("status"), res.get("why")
            return out
    from bench.report import added

    fast, slow = out["fast"], out["slow"]
    for p in ("p50", "p99"):
        out["rows"].append(
            {
                "what": f"added latency {p} per call, sequential, PromptLayer fast, ms (plproxy: at 200/s)",
                "plproxy": added(bench.results, "200", "plproxy", p),
                "relay": added(bench.results, "200", "relay", p),
                "peer": fast[f"added_{p}_ms"],
                "digits": 3,
            }
        )
    out["rows"].append(
        {
            "what": "added latency p50 per call with PromptLayer 500 ms slow, ms",
            "peer": slow["added_p50_ms"],
            "digits": 1,
        }
    )
    out["rows"].append(
        {
            "what": "CPU µs per call in the caller's process (bare client → wrapped)",
            "direct": fast["bare"]["cpu_us_per_call"],
            "peer": fast["wrapped"]["cpu_us_per_call"],
            "digits": 0,
        }
    )
    return out
