"""GC requests coalesce: those queued while a window runs are settled `skipped`, not each
run as a window of its own after it. A real `regsweep worker -Q gc -c 1`, a registry
switched by the process controller, a private `redis-server`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import redis

from tests.harness import service as h
from tests.harness.images import ImageBuilder
from tests.harness.maintenance import ProcessRegistry, write_config
from tests.harness.registry import free_port
from tests.harness.stack import wait_for
from tests.harness.workers import HEARTBEAT_OFF, start_worker
from worker.queue.celery_app import make_celery
from worker.queue.messages import job_message
from worker.settings.load import load_config
from worker.store.state import JobState, SyncState

FINAL = (JobState.SUCCEEDED.value, JobState.SKIPPED.value, JobState.FAILED.value)


@pytest.fixture
def server() -> Iterator[h.RedisServer]:
    made = h.RedisServer(free_port())
    made.start()
    yield made
    made.stop()


def counting_registry(root: Path) -> ProcessRegistry:
    """A process-controlled registry whose read-only switch appends a line to
    ``root/switches`` (one per window) and whose GC takes two seconds."""
    registry = ProcessRegistry.create(root / "registry")
    s = registry.settings
    registry.settings = replace(
        s,
        readonly_command=f"echo read-only >> {root}/switches; {s.readonly_command}",
        gc_command=f"sleep 2; {s.gc_command}",
    )
    return registry


def request_gc(config: Path, state: SyncState) -> str:
    """What `POST /api/v1/jobs {"kind": "gc"}` does: record the job, queue its task."""
    job_id = state.create_job("gc", {})
    message = job_message(job_id, "gc", {})
    app = make_celery(load_config(config, {}))
    try:
        app.send_task(message.name, kwargs=message.kwargs, queue=message.queue)
    finally:
        app.close()
    return job_id


def record(state: SyncState, job_id: str) -> dict[str, object]:
    found = state.get_job(job_id)
    assert found is not None, job_id
    return found


def ended(state: SyncState, job_id: str) -> bool:
    return record(state, job_id)["state"] in FINAL


def windows(root: Path) -> int:
    switches = root / "switches"
    return len(switches.read_text().splitlines()) if switches.exists() else 0


def test_gc_requests_made_while_one_runs_are_skipped_not_run_after_it(
    tmp_path: Path, server: h.RedisServer
) -> None:
    """Five GC requests queued while a window runs end `skipped`, naming the running job,
    and cost no window of their own (one read-only switch in all, not six); a request made
    after that window ended runs a window of its own."""
    registry = counting_registry(tmp_path)
    registry.start()
    with ImageBuilder.connect(registry.url) as builder:
        builder.image("gc/requests", "v1")  # GC fails on an empty storage
    config = write_config(tmp_path / "regsweep.yaml", registry, redis_url=server.url)
    client = redis.Redis.from_url(server.url)
    state = SyncState(client)
    try:
        worker = start_worker(config, ("gc",), log=tmp_path / "worker.log", extra=HEARTBEAT_OFF)
        try:
            first = request_gc(config, state)
            wait_for(lambda: client.get("regsweep:maintenance") == first.encode(), timeout=60)
            waiting = [request_gc(config, state) for _ in range(5)]
            for job_id in [first, *waiting]:
                wait_for(partial(ended, state, job_id), timeout=120, what=job_id)
            assert record(state, first)["state"] == JobState.SUCCEEDED.value, record(state, first)
            for job_id in waiting:
                settled = record(state, job_id)
                assert settled["state"] == JobState.SKIPPED.value, settled
                assert settled["running_job_id"] == first
            assert windows(tmp_path) == 1
            later = request_gc(config, state)
            wait_for(partial(ended, state, later), timeout=120, what=later)
            assert record(state, later)["state"] == JobState.SUCCEEDED.value
            assert windows(tmp_path) == 2
            skipped = json.loads(client.hget("regsweep:metrics:jobs", '["gc", "skipped"]') or "0")
            assert skipped == 5
        finally:
            worker.stop()
    finally:
        client.close()
        registry.stop()
