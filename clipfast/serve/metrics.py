"""Prometheus metrics of one server, in its own registry (several apps in one process, as in the
tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """clipfast_requests_total{endpoint,status}, clipfast_errors_total{endpoint,kind},
    clipfast_request_latency_seconds{endpoint}, clipfast_batch_size{tower},
    clipfast_batch_latency_seconds{tower}, clipfast_items_total{tower},
    clipfast_queue_depth{tower} (rows waiting for a batch), clipfast_admitted_rows{tower}
    (rows decoding, queued or running)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("clipfast_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("clipfast_errors", "Requests or items that failed, by kind "
                              "(overloaded, timeout, limit, invalid, bad_item, unauthorized, "
                              "internal)", ["endpoint", "kind"], registry=r)
        self.latency = Histogram("clipfast_request_latency_seconds",
                                 "Time from a request's arrival to its answer", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("clipfast_batch_size", "Rows per tower call", ["tower"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram("clipfast_batch_latency_seconds",
                                       "Duration of one tower call", ["tower"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.items = Counter("clipfast_items", "Rows run through a tower", ["tower"],
                             registry=r)
        self.queue_depth = Gauge("clipfast_queue_depth", "Rows waiting for a tower batch",
                                 ["tower"], registry=r)
        self.admitted = Gauge("clipfast_admitted_rows", "Rows admitted (decoding, queued or "
                              "running), bounded by --max-queue", ["tower"], registry=r)

    def batch_observer(self, tower: str):
        size, took, items = (self.batch_size.labels(tower), self.batch_latency.labels(tower),
                             self.items.labels(tower))

        def observe(n: int, seconds: float) -> None:
            size.observe(n)
            took.observe(seconds)
            items.inc(n)
        return observe

    def depth_observer(self, tower: str):
        queued, admitted = self.queue_depth.labels(tower), self.admitted.labels(tower)

        def observe(q: int, a: int) -> None:
            queued.set(q)
            admitted.set(a)
        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
