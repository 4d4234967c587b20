"""Prometheus metrics: one `Metrics` object per app, over a registry passed in (nothing global).

Label values stay bounded: route names from settings, methods, status classes, models (capped), outcomes.
Never ids, tags or keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# Models are client-chosen strings: past this many distinct values they are counted as "other".
MAX_MODEL_LABELS = 50


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "plproxy_requests", "Proxied calls", ["route", "method", "status_class", "model"], registry=r
        )
        self.request_duration = Histogram(
            "plproxy_request_duration_seconds",
            "Time from request received to last byte sent",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "plproxy_upstream_ttfb_seconds",
            "Time from request sent upstream to response headers",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "plproxy_overhead_seconds",
            "plproxy's own time in a call: total minus time waiting on the upstream",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "plproxy_tokens", "Tokens reported by upstreams", ["direction", "model"], registry=r
        )
        self.streams_in_flight = Gauge(
            "plproxy_streams_in_flight", "Streams being relayed now", registry=r, multiprocess_mode="livesum"
        )
        self.records = Counter(
            "plproxy_records",
            "Records by outcome: stored, exported, failed, pruned, dropped",
            ["outcome"],
            registry=r,
        )
        self.store_backlog = Gauge(
            "plproxy_store_backlog",
            "Records waiting for export (pending)",
            registry=r,
            multiprocess_mode="max",
        )
        self.store_writable = Gauge(
            "plproxy_store_writable", "1 when the store accepts writes", registry=r, multiprocess_mode="min"
        )
        self.export_latency = Histogram(
            "plproxy_export_latency_seconds",
            "Time of one PromptLayer call",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.export_retries = Counter(
            "plproxy_export_retries", "PromptLayer calls that will be retried", registry=r
        )
        self.promptlayer_responses = Counter(
            "plproxy_promptlayer_responses",
            "PromptLayer answers by status",
            ["endpoint", "status"],
            registry=r,
        )
        self._models: set[str] = set()
        self._token_counters: dict[tuple[str, str], Counter] = {}

    def token_counter(self, direction: str, model: str) -> Counter:
        """`tokens.labels(direction, model)`, looked up once per pair (a label lookup costs ~1 µs)."""
        key = (direction, model)
        counter = self._token_counters.get(key)
        if counter is None:
            counter = self._token_counters[key] = self.tokens.labels(direction, model)
        return counter

    def model_label(self, model: str | None) -> str:
        """A bounded label for a client-chosen model name."""
        if not model:
            return "unknown"
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS and len(model) <= 100:
            self._models.add(model)
            return model
        return "other"
