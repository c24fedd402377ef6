"""Prometheus metrics of one service process, in a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """Counters and histograms the service exposes on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "regsweep_events",
            "Deliveries by source and outcome (accepted, duplicate, ignored, dead_letter, ...).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "regsweep_jobs",
            "Jobs by kind and state.",
            ["kind", "state"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "regsweep_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # Label children by their values: ``labels()`` costs a lock and a tuple
        # per call, and the hot path counts every delivery.
        self._event_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[tuple[str, str, str], Any] = {}

    def count(self, source: str, outcome: str, amount: int = 1) -> None:
        key = (source, outcome)
        child = self._event_children.get(key)
        if child is None:
            child = self._event_children[key] = self.events.labels(source, outcome)
        child.inc(amount)

    def observe_latency(self, route: str, method: str, status: str, seconds: float) -> None:
        key = (route, method, status)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self.http_latency.labels(*key)
        child.observe(seconds)

    def count_many(self, source: str, outcomes: Mapping[str, int]) -> None:
        for outcome, amount in outcomes.items():
            if amount:
                self.count(source, outcome, amount)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestLatency:
    """ASGI middleware that observes every request into ``ServiceMetrics.http_latency``."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            route = scope.get("route")
            # Label by template so /api/v1/jobs/<id> does not make one series per job.
            template = getattr(route, "path", "unmatched")
            self.metrics.observe_latency(
                template, scope["method"], str(status), time.perf_counter() - started
            )
