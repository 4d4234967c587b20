"""Turning a run's results into the targets verdict, the Markdown table and the PNG chart.

Conventions: "added latency" of a target is its `net` latency (client latency measured from the scheduled
send time, minus the upstream's deliberate hold) minus the direct connection's, percentile by percentile,
in the same repetition; the median over repetitions is reported. Ratios compare medians.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

LIMITS = {
    "added_p50_500_ms": 0.5,
    "added_p99_500_ms": 2.0,
    "max_calls_ratio": 0.8,
    "cpu_ratio": 1.3,
    "ttfb_overhead_ms": 1.0,
    "chunk_overhead_ms": 1.0,
    "rss_mb": 150.0,
    "within": 0.05,
    "handler_us": 100.0,
}


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _get(d: Any, *path: Any) -> Any:
    for key in path:
        if d is None:
            return None
        is_list = isinstance(d, list)
        d = (d[key] if isinstance(key, int) and key < len(d) else None) if is_list else d.get(key)
    return d


def latency_stat(r: dict[str, Any], rate: str, name: str, field: str, pct: str) -> float | None:
    """Median over repetitions of one percentile (ms)."""
    reps = _get(r, "latency", rate, name) or []
    return _ms(_med([_get(x, field, pct) for x in reps]))


def added(r: dict[str, Any], rate: str, name: str, pct: str) -> float | None:
    """Added latency (ms) of `name` over direct, paired by repetition."""
    reps = _get(r, "latency", rate, name) or []
    direct = {x["rep"]: x for x in _get(r, "latency", rate, "direct") or []}
    diffs = []
    for x in reps:
        d = direct.get(x["rep"])
        a, b = _get(x, "net_us", pct), _get(d, "net_us", pct)
        if a is not None and b is not None:
            diffs.append(a - b)
    return _ms(_med(diffs))


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def throughput(r: dict[str, Any], name: str, field: str = "calls_per_s") -> float | None:
    return _med([x.get(field) for x in _get(r, "throughput", name) or []])


def cpu_500(r: dict[str, Any], name: str) -> float | None:
    return _med([x.get("cpu_per_1000_s") for x in _get(r, "latency", "500", name) or []])


def _verdict(value: float | None, ok: bool | None) -> bool | None:
    return None if value is None or ok is None else bool(ok)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(key: str, what: str, value: float | None, limit: str, ok: bool | None, detail: str = "") -> None:
        out.append(
            {
                "id": key,
                "what": what,
                "value": value,
                "limit": limit,
                "met": _verdict(value, ok),
                "detail": detail,
            }
        )

    p50 = added(r, "500", "plproxy", "p50")
    p99 = added(r, "500", "plproxy", "p99")
    add(
        "added_p50_500",
        "added latency p50 at 500 calls/s (ms)",
        p50,
        "\u2264 0.5 ms",
        p50 is not None and p50 <= 0.5,
    )
    add(
        "added_p99_500",
        "added latency p99 at 500 calls/s (ms)",
        p99,
        "\u2264 2 ms",
        p99 is not None and p99 <= 2.0,
    )
    px, relay = throughput(r, "plproxy"), throughput(r, "relay")
    ratio = px / relay if px and relay else None
    add(
        "max_calls",
        "max calls/s ÷ bare relay",
        ratio,
        "\u2265 0.8\u00d7",
        ratio is not None and ratio >= 0.8,
        f"{px or 0:.0f} vs {relay or 0:.0f} calls/s",
    )
    cp, cr = cpu_500(r, "plproxy"), cpu_500(r, "relay")
    ratio = cp / cr if cp and cr else None
    add(
        "cpu",
        "CPU per 1,000 calls ÷ bare relay (500/s, export included)",
        ratio,
        "\u2264 1.3\u00d7",
        ratio is not None and ratio <= 1.3,
        f"{cp or 0:.3f} vs {cr or 0:.3f} s",
    )
    s = r.get("streams") or {}
    t_px, t_d = _ms(_get(s, "plproxy", "ttfb_us", "p50")), _ms(_get(s, "direct", "ttfb_us", "p50"))
    ttfb = t_px - t_d if t_px is not None and t_d is not None else None
    add("stream_ttfb", "stream TTFB overhead p50 (ms)", ttfb, "\u2264 1 ms", ttfb is not None and ttfb <= 1.0)
    c_px, c_d = (
        _ms(_get(s, "plproxy", "chunk_delay_us", "p99")),
        _ms(_get(s, "direct", "chunk_delay_us", "p99")),
    )
    chunk = c_px - c_d if c_px is not None and c_d is not None else None
    mx = _ms(_get(s, "plproxy", "chunk_delay_us", "max"))
    add(
        "stream_chunk",
        "per-chunk relay delay p99 over direct (ms)",
        chunk,
        "\u2264 1 ms",
        chunk is not None and chunk <= 1.0,
        f"max {mx:.2f} ms" if mx is not None else "",
    )
    rss = _get(r, "rss", "plproxy", "peak_mb")
    n = _get(r, "rss", "streams")
    add(
        "rss", f"RSS with {n} concurrent streams (MB)", rss, "\u2264 150 MB", rss is not None and rss <= 150.0
    )
    on, off = throughput(r, "plproxy"), throughput(r, "plproxy_log_off")
    lat_on, lat_off = (
        latency_stat(r, "500", "plproxy", "latency_us", "p50"),
        latency_stat(r, "500", "plproxy_log_off", "latency_us", "p50"),
    )
    ratio = on / off if on and off else None
    ok = (
        ratio is not None
        and ratio >= 0.95
        and lat_on is not None
        and lat_off is not None
        and lat_on <= lat_off * 1.05
    )
    add(
        "log_on_off",
        "logging on ÷ off: max calls/s",
        ratio,
        "\u2265 0.95\u00d7 (and p50 at 500/s within 5%)",
        ok,
        f"{on or 0:.0f} vs {off or 0:.0f} calls/s; p50 {lat_on or 0:.2f} vs {lat_off or 0:.2f} ms",
    )
    f50, s50 = (
        latency_stat(r, "500", "plproxy", "latency_us", "p50"),
        latency_stat(r, "500", "plproxy_pl_slow", "latency_us", "p50"),
    )
    f99, s99 = (
        latency_stat(r, "500", "plproxy", "latency_us", "p99"),
        latency_stat(r, "500", "plproxy_pl_slow", "latency_us", "p99"),
    )
    worst = max(s50 / f50, s99 / f99) if f50 and s50 and f99 and s99 else None
    add(
        "pl_slow",
        "PromptLayer slow ÷ fast: client latency at 500/s (worse of p50, p99)",
        worst,
        "\u2264 1.05\u00d7",
        worst is not None and worst <= 1.05,
        f"p50 {f50 or 0:.2f}\u2192{s50 or 0:.2f} ms, p99 {f99 or 0:.2f}\u2192{s99 or 0:.2f} ms",
    )
    h = r.get("handler") or {}
    hv = h.get("added_us") if h.get("status") == "measured" else None
    add(
        "handler",
        "LangChain handler added per call (\u00b5s)",
        hv,
        "\u2264 100 \u00b5s",
        hv is not None and hv <= 100.0,
        h.get("why", "") if h.get("status") != "measured" else "",
    )
    return out


# ---- Markdown -------------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 2, suffix: str = "") -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}{suffix}"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.{digits}f}\u00d7"


def _one_line(text: str, limit: int = 300) -> str:
    """A reason fit for a table cell: one line, pipes escaped, the end kept (where errors say why)."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= limit else "\u2026" + flat[-limit:]


def _mark(t: dict[str, Any] | None) -> str:
    if t is None:
        return ""
    return {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]


def markdown(r: dict[str, Any]) -> str:
    tg = {t["id"]: t for t in r.get("targets", [])}
    m = r.get("machine", {})
    pin = r.get("pinning", {})
    lines = [
        f"### plproxy benchmark — {r.get('mode')} run, {r.get('started_utc')}, {r.get('duration_s')} s",
        "",
        f"{m.get('nproc')} CPUs ({m.get('cpu_model')}), Python {m.get('python')}, "
        f"aiohttp {m.get('aiohttp')}, "
        f"uvloop {m.get('uvloop')}, plproxy {m.get('plproxy_commit')}; process under test pinned to CPU "
        f"{pin.get('process_under_test')}, everything else to {pin.get('everything_else')}; "
        f"{_get(r, 'options', 'reps')} repetition(s) of {_get(r, 'options', 'window')} s per point.",
        "",
        "| # | figure | direct | bare relay | plproxy | plproxy ÷ relay | plproxy ÷ direct | target | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(
        num: str,
        what: str,
        d: str,
        rl: str,
        px: str,
        r_rel: str,
        r_dir: str,
        target: str = "",
        mark: str = "",
    ) -> None:
        lines.append(f"| {num} | {what} | {d} | {rl} | {px} | {r_rel} | {r_dir} | {target} | {mark} |")

    for rate in ("200", "500"):
        for pct in ("p50", "p99"):
            a_rl, a_px = added(r, rate, "relay", pct), added(r, rate, "plproxy", pct)
            d_net = _ms(_med([_get(x, "net_us", pct) for x in _get(r, "latency", rate, "direct") or []]))
            tot_d = latency_stat(r, rate, "direct", "latency_us", pct)
            tot_px = latency_stat(r, rate, "plproxy", "latency_us", pct)
            key = f"added_{pct}_500" if rate == "500" else ""
            row(
                "1",
                f"added latency {pct} at {rate}/s, ms (direct: its own net)",
                _f(d_net, 3),
                _f(a_rl, 3),
                _f(a_px, 3),
                _ratio(a_px, a_rl),
                _ratio(tot_px, tot_d, 3) + " total" if tot_px else "—",
                tg[key]["limit"] if key in tg else "",
                _mark(tg.get(key)),
            )
    d, rl, px = throughput(r, "direct"), throughput(r, "relay"), throughput(r, "plproxy")
    tool = _get(r, "throughput", "plproxy", 0, "tool") or "wrk"
    row(
        "2",
        f"max calls/s, one worker, upstream delay 0 ({tool})",
        _f(d, 0),
        _f(rl, 0),
        _f(px, 0),
        _ratio(px, rl),
        _ratio(px, d),
        "\u2265 0.8\u00d7 relay",
        _mark(tg.get("max_calls")),
    )
    s = r.get("streams") or {}
    for label, field, pct in (
        ("stream TTFB p50, ms", "ttfb_us", "p50"),
        ("stream TTFB p99, ms", "ttfb_us", "p99"),
        ("stream total p50 (20 chunks \u00d7 20 ms), ms", "total_us", "p50"),
    ):
        vals = [_ms(_get(s, n, field, pct)) for n in ("direct", "relay", "plproxy")]
        key = "stream_ttfb" if label.startswith("stream TTFB p50") else ""
        row(
            "3",
            label + f", {_get(s, 'plproxy', 'concurrency') or ''} concurrent",
            *(_f(v, 3) for v in vals),
            _ratio(vals[2], vals[1]),
            _ratio(vals[2], vals[0]),
            "overhead \u2264 1 ms" if key else "",
            _mark(tg.get(key)),
        )
    for pct in ("p50", "p99", "max"):
        vals = [_ms(_get(s, n, "chunk_delay_us", pct)) for n in ("direct", "relay", "plproxy")]
        key = "stream_chunk" if pct == "p99" else ""
        row(
            "3",
            f"per-chunk delay upstream write \u2192 client, {pct}, ms",
            *(_f(v, 3) for v in vals),
            _ratio(vals[2], vals[1]),
            _ratio(vals[2], vals[0]),
            "overhead \u2264 1 ms" if key else "",
            _mark(tg.get(key)),
        )
    rs = r.get("rss") or {}
    row(
        "4",
        "RSS idle after 500 calls, MB",
        "—",
        _f(_get(rs, "relay", "idle_warm_mb"), 1),
        _f(_get(rs, "plproxy", "idle_warm_mb"), 1),
        _ratio(_get(rs, "plproxy", "idle_warm_mb"), _get(rs, "relay", "idle_warm_mb")),
        "—",
    )
    row(
        "4",
        f"RSS peak with {rs.get('streams', '?')} concurrent streams, MB",
        "—",
        _f(_get(rs, "relay", "peak_mb"), 1),
        _f(_get(rs, "plproxy", "peak_mb"), 1),
        _ratio(_get(rs, "plproxy", "peak_mb"), _get(rs, "relay", "peak_mb")),
        "—",
        "\u2264 150 MB",
        _mark(tg.get("rss")),
    )
    cr, cp, co = cpu_500(r, "relay"), cpu_500(r, "plproxy"), cpu_500(r, "plproxy_log_off")
    row(
        "5",
        "CPU s per 1,000 calls at 500/s (plproxy: until its records are exported)",
        "—",
        _f(cr, 3),
        _f(cp, 3),
        _ratio(cp, cr),
        "—",
        "\u2264 1.3\u00d7 relay",
        _mark(tg.get("cpu")),
    )
    wr, wp = throughput(r, "relay", "cpu_per_1000_s"), throughput(r, "plproxy", "cpu_per_1000_s")
    row(
        "5",
        "CPU s per 1,000 calls at saturation (wrk; export partly after)",
        "—",
        _f(wr, 3),
        _f(wp, 3),
        _ratio(wp, wr),
        "—",
    )
    pl = [_get(x, "pipeline") for x in _get(r, "latency", "500", "plproxy") or []]
    pl = [p for p in pl if p]
    if pl:
        row(
            "6",
            "records/s exported at 500 calls/s (window)",
            "—",
            "—",
            _f(_med([p["exported_per_s_window"] for p in pl]), 0),
            "—",
            "—",
        )
        row(
            "6",
            "store backlog at 500/s: max / slope (records/s) / flat?",
            "—",
            "—",
            f"{_med([p['backlog_max'] for p in pl]):.0f} / "
            f"{_med([p['backlog_slope_per_s'] for p in pl]):+.1f} / "
            f"{'flat' if all(p['flat'] for p in pl) else 'GROWING'}",
            "—",
            "—",
            "flat",
        )
    ex = throughput(r, "plproxy", "exported_per_s_during")
    dr = throughput(r, "plproxy", "drain_after_s")
    row(
        "6",
        "at saturation: records/s exported during wrk / s to drain after",
        "—",
        "—",
        f"{_f(ex, 0)} / {_f(dr, 1)} s",
        "—",
        "—",
    )
    off = throughput(r, "plproxy_log_off")
    row(
        "7",
        "logging off (X-PL-Log: off): max calls/s",
        _f(d, 0),
        _f(rl, 0),
        _f(off, 0),
        _ratio(off, rl),
        _ratio(off, d),
        "on \u2265 0.95\u00d7 off",
        _mark(tg.get("log_on_off")),
    )
    for pct in ("p50", "p99"):
        a_off = added(r, "500", "plproxy_log_off", pct)
        row(
            "7",
            f"logging off: added latency {pct} at 500/s, ms "
            f"(logging on: {_f(added(r, '500', 'plproxy', pct), 3)})",
            "—",
            _f(added(r, "500", "relay", pct), 3),
            _f(a_off, 3),
            _ratio(a_off, added(r, "500", "relay", pct)),
            "—",
        )
    row("7", "logging off: CPU s per 1,000 calls at 500/s", "—", _f(cr, 3), _f(co, 3), _ratio(co, cr), "—")
    info = throughput(r, "plproxy_info_log")
    if info:
        row(
            "7",
            "operational log at info (one JSON line per call): max calls/s",
            _f(d, 0),
            _f(rl, 0),
            _f(info, 0),
            _ratio(info, rl),
            _ratio(info, d),
        )
    for pct in ("p50", "p99"):
        fast = latency_stat(r, "500", "plproxy", "latency_us", pct)
        slow = latency_stat(r, "500", "plproxy_pl_slow", "latency_us", pct)
        row(
            "8",
            f"PromptLayer 500 ms slow: client latency {pct} at 500/s, ms (fast: {_f(fast, 2)})",
            _f(latency_stat(r, "500", "direct", "latency_us", pct), 2),
            _f(latency_stat(r, "500", "relay", "latency_us", pct), 2),
            _f(slow, 2),
            _ratio(slow, latency_stat(r, "500", "relay", "latency_us", pct), 3),
            _ratio(slow, latency_stat(r, "500", "direct", "latency_us", pct), 3),
            "slow \u2264 1.05\u00d7 fast" if pct == "p50" else "",
            _mark(tg.get("pl_slow")) if pct == "p50" else "",
        )
    h = r.get("handler") or {}
    if h.get("status") == "measured":
        row(
            "9",
            f"LangChain handler: \u00b5s added per call (fake LLM {h['llm']['no_handler_us']} "
            f"\u00b5s bare; chat {h['chat']['no_handler_us']} \u00b5s bare)",
            "—",
            "—",
            f"llm {h['llm']['added_us']} / chat {h['chat']['added_us']}",
            "—",
            "—",
            "\u2264 100 \u00b5s",
            _mark(tg.get("handler")),
        )
        if "langchain_callbacks_us" in h["llm"]:
            row(
                "9",
                "… of which LangChain's callbacks (a no-op handler) / the handler's own code, \u00b5s",
                "—",
                "—",
                f"llm {h['llm']['langchain_callbacks_us']} / {h['llm']['handler_own_us']}; "
                f"chat {h['chat']['langchain_callbacks_us']} / {h['chat']['handler_own_us']}",
                "—",
                "—",
            )
    else:
        row(
            "9",
            f"LangChain handler: {h.get('status', 'not run')} — {_one_line(h.get('why', ''))}",
            "—",
            "—",
            "—",
            "—",
            "—",
            "\u2264 100 \u00b5s",
            _mark(tg.get("handler")),
        )
    peers = r.get("peers") or {}
    peer_lines: list[str] = []
    for name, p in peers.items():
        if not isinstance(p, dict):
            continue
        if p.get("status") != "measured":
            peer_lines.append(
                f"| {name} | {p.get('status', 'not run')}: {_one_line(p.get('why', ''))} | | | | | | |"
            )
            continue
        label = f"{name} {p.get('version', '')}".strip()
        for line in p.get("rows", []):
            dg = line.get("digits", 2)
            peer_lines.append(
                f"| {label} | {line['what']} | {_f(line.get('direct'), dg)} | {_f(line.get('relay'), dg)} | "
                f"{_f(line.get('plproxy'), dg)} | {_f(line.get('peer'), dg)} | "
                f"{_ratio(line.get('peer'), line.get('relay'))} | "
                f"{_ratio(line.get('peer'), line.get('plproxy'))} |"
            )
        if p.get("promptlayer_callback"):
            peer_lines.append(f"| {label} | PromptLayer callback: {p['promptlayer_callback']} | | | | | | |")
    if peer_lines:
        lines += [
            "",
            "Peers (same run, same upstream, same pinning):",
            "",
            "| peer | figure | direct | bare relay | plproxy | peer | peer \u00f7 relay "
            "| peer \u00f7 plproxy |",
            "|---|---|---|---|---|---|---|---|",
            *peer_lines,
        ]
    lines.append("")
    met = [t for t in r.get("targets", []) if t["met"] is True]
    missed = [t for t in r.get("targets", []) if t["met"] is False]
    lines.append(
        f"Targets: {len(met)} met, {len(missed)} missed"
        + (
            ": "
            + "; ".join(
                f"{t['what']} = {_f(t['value'], 3)} ({t['limit']}{', ' + t['detail'] if t['detail'] else ''})"
                for t in missed
            )
            if missed
            else ""
        )
        + "."
    )
    for note in r.get("notes", []):
        lines.append(f"\nNote: {note}")
    if r.get("errors"):
        lines.append("\nFailed phases: " + "; ".join(f"{k}: {_one_line(v)}" for k, v in r["errors"].items()))
    return "\n".join(lines) + "\n"


# ---- the chart ------------------------------------------------------------------------------------------


def chart(r: dict[str, Any], path: Path) -> str:
    """Write the PNG; returns a note when matplotlib is missing (then no chart)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart written"
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    fig.suptitle(
        f"plproxy vs direct vs bare aiohttp relay — {r.get('mode')} run {r.get('started_utc')}, "
        f"{_get(r, 'machine', 'nproc')} CPUs, one worker, loopback",
        fontsize=12,
    )
    colors = {
        "direct": "#777777",
        "relay": "#1f77b4",
        "plproxy": "#d62728",
        "plproxy_log_off": "#ff9896",
        "plproxy_pl_slow": "#9467bd",
        "plproxy_info_log": "#8c564b",
    }

    ax = axes[0][0]
    names = ["relay", "plproxy", "plproxy_log_off", "plproxy_pl_slow"]
    groups = [("200", "p50"), ("200", "p99"), ("500", "p50"), ("500", "p99")]
    width = 0.2
    for i, name in enumerate(names):
        vals = [added(r, rate, name, pct) or 0 for rate, pct in groups]
        ax.bar(
            [g + (i - 1.5) * width for g in range(len(groups))], vals, width, label=name, color=colors[name]
        )
    ax.set_xticks(range(len(groups)), [f"{p} @{rate}/s" for rate, p in groups])
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.axhline(2.0, color="k", ls="--", lw=0.8)
    ax.set_ylabel("ms added over direct")
    ax.set_title("(1) added latency (targets: p50 0.5 ms ··, p99 2 ms --)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    names = [
        n for n in ("direct", "relay", "plproxy", "plproxy_log_off", "plproxy_info_log") if throughput(r, n)
    ]
    vals = [throughput(r, n) or 0 for n in names]
    ax.bar(names, vals, color=[colors[n] for n in names])
    rl = throughput(r, "relay")
    if rl:
        ax.axhline(0.8 * rl, color="k", ls="--", lw=0.8)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("calls/s (log)")
    ax.set_title("(2) max calls/s, upstream delay 0 (-- 0.8\u00d7 relay)")
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[0][2]
    for name in ("direct", "relay", "plproxy", "plproxy_pl_slow"):
        reps = _get(r, "latency", "500", name) or []
        if reps and _get(reps[0], "net_us", "curve"):
            curve = reps[0]["net_us"]["curve"]
            ax.plot(
                [max(c, 1) / 1000 for c in curve],
                [i / 200 for i in range(len(curve))],
                label=name,
                color=colors[name],
            )
    ax.set_xscale("log")
    ax.set_xlabel("net latency, ms (client, from scheduled send, minus upstream hold)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("latency CDF at 500 calls/s (first repetition)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    s = r.get("streams") or {}
    for name in ("direct", "relay", "plproxy"):
        curve = _get(s, name, "chunk_delay_us", "curve")
        if curve:
            ax.plot(
                [max(c, 1) / 1000 for c in curve],
                [i / 200 for i in range(len(curve))],
                label=name,
                color=colors[name],
            )
    ax.set_xscale("log")
    ax.set_xlabel("ms from upstream write to client arrival")
    ax.set_title(f"(3) per-chunk delay, {_get(s, 'plproxy', 'concurrency')} concurrent streams")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    pl = _get(r, "latency", "500", "plproxy", 0, "pipeline")
    if pl:
        ax.plot(pl["t_s"], pl["backlog"], color="#d62728", label="backlog (answered \u2212 exported)")
        ax2 = ax.twinx()
        ax2.plot(pl["t_s"], pl["exported_per_s"], color="#2ca02c", alpha=0.5, lw=0.8, label="exported/s")
        ax2.set_ylabel("records/s exported", color="#2ca02c")
        ax.axvline(_get(r, "options", "window") or 0, color="k", ls=":", lw=0.8)
        ax.set_xlabel("s from start of the measured window (dotted: load stops)")
        ax.set_ylabel("records")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("(6) pipeline at 500 calls/s")

    ax = axes[1][2]
    labels, vals, cols = [], [], []
    for name in ("relay", "plproxy", "plproxy_log_off"):
        v = cpu_500(r, name)
        if v is not None:
            labels.append(f"CPU/1k\n{name}")
            vals.append(v)
            cols.append(colors[name])
    ax.bar(labels, vals, color=cols)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f} s", ha="center", va="bottom", fontsize=8)
    cr = cpu_500(r, "relay")
    if cr:
        ax.axhline(1.3 * cr, color="k", ls="--", lw=0.8)
    ax.set_ylabel("CPU seconds per 1,000 calls at 500/s")
    rs = r.get("rss") or {}
    ax.set_title(
        f"(5) CPU (-- 1.3\u00d7 relay); (4) RSS {rs.get('streams')} streams: relay "
        f"{_f(_get(rs, 'relay', 'peak_mb'), 0)} MB, plproxy {_f(_get(rs, 'plproxy', 'peak_mb'), 0)} MB",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""
