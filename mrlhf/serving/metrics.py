"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own so several apps can live in one
process (tests). Engine gauges are read at scrape time, so they cost nothing between scrapes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        yield GaugeMetricFamily("mrlhf_queue_depth", "Requests waiting for a sequence slot", value=e.queue_depth)
        yield GaugeMetricFamily("mrlhf_running_slots", "Sequence slots (KV-cache rows) generating now",
                                value=e.busy_rows)  # fmt: skip
        yield GaugeMetricFamily("mrlhf_slots_total", "Sequence slots of the ring (slots x rows)", value=e.capacity)
        yield CounterMetricFamily("mrlhf_generated_tokens", "Tokens generated (every choice)", value=e.generated)
        yield CounterMetricFamily("mrlhf_engine_ticks", "Lockstep ticks run by every rank", value=e.tick)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mrlhf_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("mrlhf_request_latency_seconds", "Generation request latency (arrival to last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("mrlhf_time_to_first_token_seconds", "Arrival to the first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("mrlhf_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("mrlhf_completion_tokens", "Tokens returned to clients", registry=r)
        self.cancelled = Counter("mrlhf_requests_cancelled", "Requests stopped early", ["reason"], registry=r)
        r.register(_EngineCollector(engine))

    @staticmethod
    def route(path: str) -> str:
        """A bounded label: known routes by name, everything else 'other' (a fuzzer's paths must not grow it)."""
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return path if path in ROUTES else "other"
