"""A flood of jobs never stands between a push and its prune: a real ``regsweep worker``
(one process, every queue) on the real 2.8.2 registry and a private Redis, 200 jobs queued
ahead of one registry push notification."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import anyio
import redis
import yaml

from regsweep.cli import enqueue
from service.publish import CelerySink
from tests.harness import service as h
from tests.harness import stack
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.workers import WorkerProcess, start_worker
from worker.engine.events import RegistryEvent
from worker.queue.messages import JobKind, JobRequest
from worker.settings.load import load_config
from worker.settings.model import Config

FLOOD = 200
#: At least this many of the flood's jobs are still waiting when the push's prune is done.
STILL_WAITING = FLOOD // 2


def test_a_push_is_pruned_while_a_flood_of_jobs_still_waits(tmp_path: Path) -> None:
    """200 prune jobs queued, then a push notified: the push's prune (queue prune) is done
    while at least half of the jobs (queue jobs) still wait; on one queue it came last."""
    server = h.RedisServer(free_port())
    server.start()
    registry = RegistryProcess.create(tmp_path / "registry")
    registry.start()
    client = redis.Redis.from_url(server.url)
    worker: WorkerProcess | None = None
    try:
        with ImageBuilder.connect(registry.url) as builder:
            builder.image("flood/app", "keep")
            pushed = builder.image("push/app", "new")
        config = _config(tmp_path, registry.url, server.url)
        flood = anyio.run(enqueue, config, [JobRequest(JobKind.PRUNE, "flood/app", True)] * FLOOD)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
        worker = start_worker(config.source, log=tmp_path / "worker.log", env=env)
        stack.wait_for(lambda: _finished(client, flood[:1]), 60, what="the flood started")
        anyio.run(_notify_push, config, pushed.digest)
        push_job = stack.wait_for(lambda: _push_prune(client), 60, what="the push's prune done")
        waiting = FLOOD - _finished(client, flood)
        assert waiting >= STILL_WAITING, (waiting, push_job)
        assert push_job["state"] == "succeeded", push_job
    finally:
        if worker is not None:
            worker.kill()
        client.close()
        registry.stop()
        server.stop()


def _config(root: Path, registry_url: str, redis_url: str) -> Config:
    document = {
        "registry": {"url": registry_url},
        "redis": {"url": redis_url},
        "policies": [{"name": "all", "repositories": ["**"], "keep": [{"tags": ["*"]}]}],
    }
    path = root / "regsweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path, {})


async def _notify_push(config: Config, digest: str) -> None:
    """What the service does with the registry's notification of the push."""
    event = RegistryEvent(
        id="push-1",
        action="push",
        repository="push/app",
        digest=digest,
        tag="new",
        media_type=h.OCI_MANIFEST,
        size=528,
        timestamp=datetime.now(UTC),
    )
    sink = CelerySink.from_config(config)
    try:
        await sink.registry_events([event])
    finally:
        await sink.aclose()
        sink.close()


def _finished(client: redis.Redis, job_ids: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(f"regsweep:job:{job_id}", "state")
    return sum(1 for state in pipe.execute() if state == b'"succeeded"')


def _push_prune(client: redis.Redis) -> dict[str, object] | None:
    """The job of the prune the push asked for, once it has ended."""
    ids: list[bytes] = client.zrange("regsweep:jobs:recent", 0, -1)  # type: ignore[assignment]
    for job_id in ids:
        raw: dict[bytes, bytes] = client.hgetall(f"regsweep:job:{job_id.decode()}")  # type: ignore[assignment]
        job = {k.decode(): json.loads(v) for k, v in raw.items()}
        if job.get("params", {}).get("trigger") == "push" and job.get("state") != "running":
            return job if job.get("state") in ("succeeded", "failed") else None
    return None
