"""Worker-side metrics kept in Redis, so the service's ``/metrics`` can show them.

Worker processes cannot share prometheus_client's in-process registry with
the service, so each worker buffers its counts in memory (the registry
client's ``on_response`` hook is synchronous and runs on the event loop) and
adds them to Redis hashes after every task step: one hash per metric, one
field per label set (a JSON list of label values). The service reads the
hashes at scrape time through :class:`WorkerMetricsSnapshot`. A maintenance window's
figures go to ``metrics:gc`` through :class:`GcMetrics`, notification outcomes to
``metrics:notifications`` through :func:`count_notification`.

Keys (under the state prefix, default ``regsweep:``)::

    metrics:deletions          ["<policy>", "<reason>"]           -> count
    metrics:jobs               ["<kind>", "<state>"]              -> count
    metrics:registry_latency   ["<method>", "<route>", "<le>"]    -> count in that bucket
                               ["<method>", "<route>", "sum"]     -> seconds (float)
    metrics:gc                 runs, runs_dry, blobs_deleted...   -> count, or a gauge
    metrics:notifications      ["<target>", "<event>", "<outcome>"] -> count
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import redis
import redis.asyncio as aioredis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.redis import wrapped

log = logging.getLogger("regsweep.metrics")

#: Upper bounds of the registry latency histogram, in seconds (+Inf added).
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM: Final = "sum"


def _field(*labels: str) -> str:
    return json.dumps(list(labels))


def _labels(field: bytes | str) -> list[str]:
    text = field.decode() if isinstance(field, bytes) else field
    value = json.loads(text)
    return [str(v) for v in value] if isinstance(value, list) else []


def bucket_of(seconds: float) -> str:
    """The ``le`` label of the first bucket ``seconds`` fits in."""
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return repr(bound)
    return "+Inf"


class WorkerMetrics:
    """In-memory counts of one worker process, added to Redis by :meth:`flush`."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.keys = Keys(prefix)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._seconds: defaultdict[tuple[str, str], float] = defaultdict(float)

    def deletion(self, policy: str, reason: str, amount: int = 1) -> None:
        self._counts[(self.keys.metrics_deletions, _field(policy, reason))] += amount

    def job(self, kind: str, state: str) -> None:
        self._counts[(self.keys.metrics_jobs, _field(kind, state))] += 1

    def registry_response(
        self, method: str, route: str, status: int | None, seconds: float
    ) -> None:
        """The registry client's ``on_response`` hook: one latency observation."""
        key = self.keys.metrics_registry_latency
        self._counts[(key, _field(method, route, bucket_of(seconds)))] += 1
        self._seconds[(key, _field(method, route, _SUM))] += seconds

    @property
    def pending(self) -> bool:
        return bool(self._counts or self._seconds)

    async def flush(self, client: aioredis.Redis) -> None:
        """Add the buffered counts to Redis; kept for the next flush when Redis fails."""
        if not self.pending:
            return
        counts, seconds = self._counts, self._seconds
        self._counts, self._seconds = Counter(), defaultdict(float)
        pipe = client.pipeline(transaction=False)
        for (key, field), amount in counts.items():
            pipe.hincrby(key, field, amount)
        for (key, field), total in seconds.items():
            pipe.hincrbyfloat(key, field, total)
        try:
            await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # Metrics are best effort: never fail a task for them.
            log.warning("metrics not written (kept for the next try): %s", exc)
            self._counts.update(counts)
            for series, total in seconds.items():
                self._seconds[series] += total


@dataclass(frozen=True)
class GcCollected:
    """What the registry's garbage-collect did in a window that deleted."""

    blobs_deleted: int
    manifests_deleted: int
    seconds: float


@dataclass(frozen=True)
class GcRun:
    """What one maintenance window's report adds to ``metrics:gc``."""

    dry_run: bool
    ok: bool
    overran: bool
    #: None when no GC ran, or a dry run.
    collected: GcCollected | None = None
    bytes_reclaimed: int | None = None
    readonly_seconds: float | None = None


class GcMetrics:
    """A maintenance window's counters, written at once; best effort: a metric never fails
    a window (a Redis failure is logged and the figures are lost)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    def job(self, kind: str, state: str) -> None:
        """A job state change, in :meth:`WorkerMetrics.job`'s hash and field format."""
        self._write(lambda p: p.hincrby(self._keys.metrics_jobs, _field(kind, state), 1))

    def run(self, run: GcRun) -> None:
        key = self._keys.metrics_gc

        def write(pipe: Any) -> None:
            pipe.hincrby(key, "runs_dry" if run.dry_run else "runs", 1)
            pipe.hincrby(key, "runs_failed", 0 if run.ok else 1)
            pipe.hincrby(key, "runs_overran", 1 if run.overran else 0)
            if run.collected is not None:
                pipe.hincrby(key, "blobs_deleted", run.collected.blobs_deleted)
                pipe.hincrby(key, "manifests_deleted", run.collected.manifests_deleted)
                pipe.hset(key, "last_gc_seconds", run.collected.seconds)
            if run.bytes_reclaimed is not None:
                pipe.hincrby(key, "bytes_reclaimed", run.bytes_reclaimed)
            if run.readonly_seconds is not None:
                pipe.hset(key, "last_readonly_seconds", run.readonly_seconds)
            if run.ok and not run.dry_run:
                pipe.hset(key, "last_success_time", time.time())

        self._write(write)

    def alert(self, name: str) -> None:
        """``switch_back_failures``, ``recoveries``: counted, and logged by the caller."""
        self._write(lambda p: p.hincrby(self._keys.metrics_gc, name, 1))

    def _write(self, fill: Callable[[Any], object]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            fill(pipe)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("maintenance metrics not written: %s", exc)


def count_notification(
    client: redis.Redis, keys: Keys, target: str, event: str, outcome: str
) -> None:
    """Add one notification outcome (``sent``, ``failed``, ``dropped``) to its count."""
    with wrapped("cannot count a notification outcome"):
        client.hincrby(keys.metrics_notifications, _field(target, event, outcome), 1)


def _histogram(
    raw: Mapping[Any, Any],
) -> Iterator[tuple[list[str], list[tuple[str, float]], float]]:
    """Per (method, route): cumulative buckets and the sum, as prometheus wants them."""
    per_series: dict[tuple[str, str], dict[str, float]] = {}
    for field, value in raw.items():
        labels = _labels(field)
        if len(labels) == 3:
            per_series.setdefault((labels[0], labels[1]), {})[labels[2]] = float(value)
    for (method, route), values in sorted(per_series.items()):
        running = 0.0
        buckets: list[tuple[str, float]] = []
        for bound in [*map(repr, LATENCY_BUCKETS), "+Inf"]:
            running += values.get(bound, 0.0)
            buckets.append((bound, running))
        yield [method, route], buckets, values.get(_SUM, 0.0)


class WorkerMetricsSnapshot(Collector):
    """A prometheus collector of the workers' hashes as :meth:`refresh` last read them.

    The service refreshes it at scrape time, on its event loop (no thread, no
    blocking client), then renders: ``collect`` itself reads nothing.
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._families: list[Metric] = []

    def describe(self) -> Iterable[Metric]:
        # Nothing at registration: describing would read Redis before it is needed.
        return []

    def collect(self) -> Iterable[Metric]:
        return self._families

    async def refresh(self) -> None:
        """Read the hashes; on a Redis failure the workers' metrics are left out this time."""
        try:
            pipe = self.client.pipeline(transaction=False)
            keys = (
                self.keys.metrics_deletions,
                self.keys.metrics_jobs,
                self.keys.metrics_registry_latency,
                self.keys.metrics_gc,
            )
            for key in keys:
                pipe.hgetall(key)
            _operations_reads(pipe, self.keys)
            deletions, jobs, latency, gc, *operations = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("worker metrics unavailable: %s", exc)
            self._families = []
            return
        self._families = [_deletions(deletions), _jobs(jobs), _latency(latency), *_gc(gc)]
        self._families += _operations(*operations)


def _counter(name: str, doc: str, labels: list[str], raw: Mapping[Any, Any]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for field, value in sorted(raw.items()):
        values = _labels(field)
        if len(values) == len(labels):
            family.add_metric(values, float(value))
    return family


def _deletions(raw: Mapping[Any, Any]) -> Metric:
    return _counter(
        "regsweep_deletions",
        "Manifests and tags deleted by workers, by policy and reason (rule).",
        ["policy", "reason"],
        raw,
    )


def _jobs(raw: Mapping[Any, Any]) -> Metric:
    return _counter(
        "regsweep_worker_jobs",
        "Job state changes made by workers (running, succeeded, failed, deferred), by kind.",
        ["kind", "state"],
        raw,
    )


def _latency(raw: Mapping[Any, Any]) -> Metric:
    family = HistogramMetricFamily(
        "regsweep_registry_request_duration_seconds",
        "Time workers waited for the registry, by method and route template.",
        labels=["method", "route"],
    )
    for labels, buckets, total in _histogram(raw):
        family.add_metric(labels, buckets, sum_value=total if math.isfinite(total) else 0.0)
    return family


#: GC hash fields that are running totals, and the counter each one feeds.
_GC_COUNTERS: Final = {
    "blobs_deleted": ("regsweep_gc_blobs_deleted", "Blobs garbage collection deleted."),
    "manifests_deleted": ("regsweep_gc_manifests_deleted", "Manifests GC deleted."),
    "bytes_reclaimed": ("regsweep_gc_bytes_reclaimed", "Storage bytes GC gave back."),
    "switch_back_failures": (
        "regsweep_gc_switch_back_failures",
        "Times switching the registry back to read-write failed (alert).",
    ),
    "recoveries": ("regsweep_gc_recoveries", "Crashed maintenance windows recovered."),
}
_GC_RUNS: Final = {
    "runs": "completed",
    "runs_dry": "dry_run",
    "runs_failed": "failed",
    "runs_overran": "overran",
}
_GC_GAUGES: Final = {
    "last_gc_seconds": ("regsweep_gc_last_duration_seconds", "How long the last GC ran."),
    "last_success_time": (
        "regsweep_gc_last_success_timestamp_seconds",
        "When the last GC window that succeeded ended (Unix time).",
    ),
    "last_readonly_seconds": (
        "regsweep_gc_last_readonly_seconds",
        "How long the registry was read-only in the last window.",
    ),
}


def _gc(raw: Mapping[Any, Any]) -> list[Metric]:
    values = {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}
    runs = CounterMetricFamily("regsweep_gc_runs", "GC runs, by outcome.", labels=["outcome"])
    for field, outcome in _GC_RUNS.items():
        runs.add_metric([outcome], values.get(field, 0.0))
    out: list[Metric] = [runs]
    for field, (name, doc) in _GC_COUNTERS.items():
        out.append(CounterMetricFamily(name, doc, value=values.get(field, 0.0)))
    for field, (name, doc) in _GC_GAUGES.items():
        if field in values:
            out.append(GaugeMetricFamily(name, doc, value=values[field]))
    return out


# --- notifications, dead letters, the last successful prune --------------------------------


def _operations_reads(pipe: Any, keys: Keys) -> None:
    pipe.hgetall(keys.metrics_notifications)
    pipe.get(keys.dead_letters_total)
    pipe.get(keys.last_prune)
    pipe.exists(keys.maintenance_flag)


def _operations(
    notifications: Mapping[Any, Any], dead: Any, last_prune: Any, maintenance: Any
) -> list[Metric]:
    out = [
        _counter(
            "regsweep_notifications",
            "Notifications by target, event and outcome (sent, failed, dropped).",
            ["target", "event", "outcome"],
            notifications,
        ),
        CounterMetricFamily(
            "regsweep_dead_letters",
            "Deliveries and queued events dead-lettered (kept for a person to look at).",
            value=float(dead or 0),
        ),
        GaugeMetricFamily(
            "regsweep_maintenance_active",
            "1 while a maintenance window holds pruning paused (the registry may be read-only).",
            value=float(bool(maintenance)),
        ),
    ]
    when = _record_time(last_prune)
    if when is not None:
        out.append(
            GaugeMetricFamily(
                "regsweep_prune_last_success_timestamp_seconds",
                "When the last prune job that succeeded ended (Unix time).",
                value=when,
            )
        )
    return out


def _record_time(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(json.loads(raw)["time"]).timestamp()
    except (ValueError, TypeError, KeyError):
        return None
