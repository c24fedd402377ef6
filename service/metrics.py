"""Prometheus metrics of one service process, in a registry of its own."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.store.metrics import WorkerMetricsSnapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: A scrape answered within this long of the last one gets that one's payload.
SCRAPE_INTERVAL: Final = 1.0


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

    def render(self) -> bytes:
        """The exposition text (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class Scrapes:
    """``/metrics``' payload, made at most once per ``interval`` however often it is asked
    for; asks that come while it is being made share that one.

    So a flood of scrapes costs about what a flood of ``/healthz`` does: the render
    (every histogram bucket of every route) and the workers' read from Redis happen
    once a second at most, on the event loop, with the service's short Redis timeouts.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        workers: WorkerMetricsSnapshot | None,
        interval: float = SCRAPE_INTERVAL,
    ) -> None:
        self.metrics = metrics
        self.workers = workers
        self.interval = interval
        self._payload = b""
        self._made = -math.inf
        self._making: asyncio.Future[bytes] | None = None

    async def payload(self) -> bytes:
        if time.monotonic() - self._made < self.interval:
            return self._payload
        if self._making is None:
            self._making = asyncio.ensure_future(self._make())
            self._making.add_done_callback(self._made_one)
        return await asyncio.shield(self._making)

    async def _make(self) -> bytes:
        if self.workers is not None:
            await self.workers.refresh()
        self._payload = self.metrics.render()
        self._made = time.monotonic()
        return self._payload

    def _made_one(self, _: asyncio.Future[bytes]) -> None:
        self._making = None


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
