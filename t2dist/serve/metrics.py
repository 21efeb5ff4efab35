"""Prometheus metrics of the whole app, served by the ingress at ``GET /metrics``.

The ingress sees every request, so it counts them itself: requests by model, expert and HTTP
status, dispatch labels, output tokens, end-to-end and first-pass latency, requests in flight.
Expert switches and queue depths happen in the engine replicas, which are other processes (other
machines on a cluster): every answer a replica sends carries its counters (``stats``: replica id,
switches so far, batches, queue depth now), and the ingress keeps the latest report of each
replica (:class:`ReplicaReports`).  ``t2dist_expert_switches_total{replica}`` is each replica's own
monotonic count (sum over ``replica`` for the app; a replaced replica is a new series), and
``t2dist_queue_depth{replica}`` the depth at its latest answer, dropped after 60 s without one (an
idle replica has drained its queue; a dead one is gone).  Ray Serve's own metrics (router queues,
replica health) stay on Ray's metrics port.  One :class:`ServeMetrics` per ingress, in a registry of
its own (never prometheus_client's global one).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
STALE_S = 60.0


class ReplicaReports:
    """The latest ``stats`` each replica reported, exposed as per-replica metric families."""

    def __init__(self):
        self.latest: dict[str, tuple[float, dict[str, Any]]] = {}

    def update(self, stats: dict[str, Any] | None) -> None:
        if stats and stats.get("replica"):
            self.latest[stats["replica"]] = (time.monotonic(), dict(stats))

    def collect(self) -> Iterable:
        switches = CounterMetricFamily("t2dist_expert_switches", "expert switches (W' recomposed) per engine replica",
                                       labels=["replica", "role"])
        batches = CounterMetricFamily("t2dist_engine_batches", "engine calls per replica", labels=["replica", "role"])
        depth = GaugeMetricFamily("t2dist_queue_depth", "requests waiting in a replica at its latest answer",
                                  labels=["replica", "role"])
        now = time.monotonic()
        for rid, (seen, s) in sorted(self.latest.items()):
            role = s.get("role", "experts")
            switches.add_metric([rid, role], float(s.get("switches", 0)))
            batches.add_metric([rid, role], float(s.get("batches", 0)))
            if now - seen < STALE_S:
                depth.add_metric([rid, role], float(s.get("queue_depth", 0)))
        yield from (switches, batches, depth)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("t2dist_requests", "requests by model asked, expert that answered, and HTTP status",
                                ["model", "expert", "status"], registry=r)
        self.dispatch = Counter("t2dist_dispatch_labels", "model=auto: first-pass labels", ["strategy", "label"],
                                registry=r)
        self.tokens = Counter("t2dist_output_tokens", "generated tokens by expert", ["expert"], registry=r)
        self.latency = Histogram("t2dist_request_seconds", "end-to-end request latency", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_pass = Histogram("t2dist_dispatch_seconds", "model=auto: first-pass latency",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("t2dist_queue_seconds", "time a request waited in a replica's queue",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.engine = Histogram("t2dist_engine_seconds", "time of the engine call that answered a request",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("t2dist_requests_in_flight", "requests the ingress is answering now", registry=r)
        self.replicas = ReplicaReports()
        r.register(self.replicas)

    def observe_result(self, result: dict[str, Any], role: str = "experts") -> None:
        """A replica's answer: its timing and its counters."""
        stats = result.get("stats")
        if stats:
            self.replicas.update({**stats, "role": role})
        if "queue_s" in result:
            self.queue.observe(result["queue_s"])
            self.engine.observe(result["engine_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
