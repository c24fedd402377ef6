"""End to end through a Redis outage: the registry's own retries deliver what was pushed meanwhile.

Redis here is a private ``redis-server`` with an append-only file (as a
production Redis for regsweep should be), stopped and started by the test;
it is broker and state for `regsweep serve` and `regsweep worker`.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import service as payloads
from tests.harness import stack as s
from tests.harness.images import ImageBuilder
from tests.harness.registry import free_port
from worker import oci

POLICIES = [
    {
        "name": "moved",
        "repositories": ["e2e/**"],
        "mode": "enforce",
        "keep": [{"tags": ["*"]}],
        "untagged": {"delete_after": "0s"},
    }
]


@dataclass
class DurableRedis:
    """A private redis-server that keeps its data across a stop/start (appendonly)."""

    directory: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        options += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.proc = subprocess.Popen(
            [payloads.REDIS_SERVER, *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        s.wait_for(lambda: _pings(client), timeout=10)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def outage_stack(tmp_path: Path, durable_redis: DurableRedis) -> Iterator[s.Stack]:
    running = s.Stack(tmp_path / "stack", POLICIES, redis_url=durable_redis.url)
    (tmp_path / "stack").mkdir()
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _prune_waiting_for_the_lock(state: redis.Redis) -> bool:
    """A prune found the repository busy and is retried with a countdown (its message
    waits in the worker, unacknowledged)."""
    for key in state.scan_iter(match="regsweep:job:*"):
        if state.hget(key, "waiting") is not None:
            return True
    return False


def _unavailable_answers(http: httpx.Client) -> float:
    """How many registry deliveries the service answered 503, from its /metrics."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            labels = {"source": "registry", "outcome": "unavailable"}
            if sample.name == "regsweep_events_total" and sample.labels == labels:
                return sample.value
    return 0.0


def test_push_during_redis_outage_is_delivered_by_registry_retry(
    outage_stack: s.Stack, durable_redis: DurableRedis
) -> None:
    """Redis down (a prune in flight): 503s, the worker lives on; Redis back: the registry's
    retry delivers the push made meanwhile and the superseded digest is deleted."""
    assert outage_stack.registry is not None and outage_stack.worker is not None
    repository = f"e2e/outage-{uuid.uuid4().hex[:8]}"
    state = redis.Redis.from_url(durable_redis.url, decode_responses=True)
    lock = f"regsweep:lock:prune:{repository}"
    with (
        ImageBuilder.connect(outage_stack.registry.url) as images,
        httpx.Client(base_url=outage_stack.url, timeout=10) as http,
    ):
        # Someone else "holds" the repository, so the push's prune is in flight
        # (retried with a countdown, unacknowledged) when Redis goes away.
        state.set(lock, "held-by-the-test", ex=120)
        first = images.image(repository, "v1")
        s.wait_for(lambda: state.hget(f"regsweep:idx:{repository}:tags", "v1") == first.digest)
        s.wait_for(lambda: _prune_waiting_for_the_lock(state))
        durable_redis.stop()
        probe = payloads.envelope(payloads.registry_event(repository=repository, tag="probe"))
        headers = {"Authorization": f"Bearer {s.HOOK_TOKEN}", "Content-Type": payloads.V1}
        started = time.monotonic()
        down = http.post("/hooks/registry", content=probe, headers=headers)
        assert down.status_code == 503 and time.monotonic() - started < 5
        second = images.image(repository, "v1")  # its notification now fails and is retried
        # The registry has tried to deliver that push and been answered 503 (the probe
        # above is the first 503).
        s.wait_for(lambda: _unavailable_answers(http) >= 2, timeout=30)
        durable_redis.start()
        state.delete(lock)
        s.wait_for(
            lambda: state.hget(f"regsweep:idx:{repository}:tags", "v1") == second.digest,
            timeout=30,
        )

        def first_gone() -> bool:
            response = images.client.head(
                f"/v2/{repository}/manifests/{first.digest}",
                headers={"Accept": oci.MANIFEST_ACCEPT},
            )
            return response.status_code == 404

        try:
            s.wait_for(first_gone, timeout=30)
        except AssertionError as exc:
            raise AssertionError(outage_stack.logs()) from exc
        kept = images.client.head(
            f"/v2/{repository}/manifests/v1", headers={"Accept": oci.MANIFEST_ACCEPT}
        )
        assert kept.headers["Docker-Content-Digest"] == second.digest
    assert outage_stack.worker.proc is not None and outage_stack.worker.proc.poll() is None
    assert "Unrecoverable error" not in outage_stack.worker.log()
    state.close()
