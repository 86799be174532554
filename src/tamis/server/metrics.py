"""Prometheus metrics, one registry per app (tests build several apps in one process).

Every label takes values from a fixed set, so no client can grow ``/metrics``: ``route`` is a route
template or "other", ``method`` a known HTTP method or "other", ``status`` a status code, ``model`` a
served model name, ``kind`` "embedding" or "rerank" (one queue per model and kind).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tamis_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "tamis_request_latency_seconds", "HTTP request latency, arrival to last byte", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter("tamis_tokens_total", "tokens processed", ["model", "route"], registry=r)
        self.inputs = Counter("tamis_inputs_total", "inputs (texts or documents) processed", ["model", "route"],
                              registry=r)
        self.truncated = Counter("tamis_inputs_truncated_total", "inputs cut at the model's context", ["model"],
                                 registry=r)
        self.batch_size = Histogram("tamis_batch_size", "rows per forward pass", ["model", "kind"], buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("tamis_batch_tokens", "padded token slots per forward pass", ["model", "kind"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("tamis_batch_requests", "distinct requests sharing one forward pass",
                                        ["model", "kind"], buckets=SIZE_BUCKETS, registry=r)
        self.forward_seconds = Histogram("tamis_forward_seconds", "time of one model call", ["model", "kind"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("tamis_queue_wait_seconds", "time from admission to first model call",
                                    ["model", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tamis_queue_depth", "admitted inputs not yet finished", ["model", "kind"],
                                 registry=r)
        self.queue_requests = Gauge("tamis_queue_requests", "admitted requests not yet finished", ["model", "kind"],
                                    registry=r)
        self.rejected = Counter("tamis_rejected_total", "requests refused before queueing", ["model", "kind", "reason"],
                                registry=r)
        self.dropped = Counter("tamis_dropped_total", "queued requests dropped", ["model", "kind", "reason"], registry=r)
        self.ready = Gauge("tamis_ready", "1 when models are loaded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
