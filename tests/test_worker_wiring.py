"""How work reaches the workers: the Celery sink, job → task mapping, CLI wiring, metrics.

Real Redis (DB 11, flushed at the start and end of the module) as the broker;
a closed port stands in for a broker that is down.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis

from regsweep.cli import main, split_celery_args
from service.app import create_app
from service.publish import CelerySink
from tests.harness import service as h
from tests.harness import stack as s
from tests.harness.registry import free_port
from tests.harness.sinks import RedisListSink
from worker.engine.events import CiEvent, RegistryEvent
from worker.errors import StateError
from worker.queue.messages import job_message
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.keys import Keys
from worker.store.metrics import WorkerMetrics, bucket_of


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    s.flush()
    client = redis.Redis.from_url(s.REDIS_URL, decode_responses=True)
    yield client
    client.close()
    s.flush()


def config(redis_url: str = s.REDIS_URL) -> Config:
    return Config(registry=RegistrySettings(url="http://127.0.0.1:1"), redis_url=redis_url)


def messages(broker: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, kwargs) of each message waiting on ``queue``, oldest first."""
    out = []
    for raw in reversed(broker.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[1]))
    return out


def test_celery_args_pass_through_untouched() -> None:
    """Options after `worker`/`beat` go to Celery, `-c` before them is regsweep's config."""
    assert split_celery_args(["-c", "f.yml", "worker", "-Q", "gc", "-c", "1"]) == (
        ["-c", "f.yml", "worker"],
        ["-Q", "gc", "-c", "1"],
    )
    assert split_celery_args(["beat", "-s", "/tmp/x"]) == (["beat"], ["-s", "/tmp/x"])
    assert split_celery_args(["prune", "--enqueue", "worker"]) == (
        ["prune", "--enqueue", "worker"],
        [],
    )


def test_job_kinds_map_to_tasks_and_queues() -> None:
    """prune (one repository or all), sweep, gc and restore each become the right task, on
    the `jobs` queue apart from GC: never in the way of the prunes pushes ask for."""
    one = job_message("j", "prune", {"repository": "a/b", "dry_run": True})
    assert (one.name, one.queue) == ("regsweep.prune", "jobs")
    assert one.kwargs == {
        "repository": "a/b",
        "job_id": "j",
        "dry_run": True,
        "incremental": False,
        "trigger": "api",
    }
    every = job_message("j", "prune", {})
    assert (every.name, every.queue, every.kwargs["repository"]) == ("regsweep.sweep", "jobs", None)
    gc = job_message("j", "gc", {"dry_run": True})
    assert (gc.name, gc.queue, gc.kwargs) == ("regsweep.gc", "gc", {"job_id": "j", "dry_run": True})
    restore = job_message("j", "restore", {"repository": "a/b", "digest": "sha256:" + "0" * 64})
    assert (restore.name, restore.queue) == ("regsweep.restore", "jobs")
    assert restore.kwargs["digest"] == "sha256:" + "0" * 64


def test_celery_sink_puts_each_message_on_its_own_queue(broker: redis.Redis) -> None:
    """Events go to `events`, jobs to `jobs`, GC to `gc`: each exactly once."""
    sink = CelerySink.from_config(config())
    event = RegistryEvent(
        id="e1",
        action="push",
        repository="a/b",
        digest=h.digest_of("a/b:v1"),
        tag="v1",
        media_type=h.OCI_MANIFEST,
        size=528,
        timestamp=datetime.now(UTC),
    )
    ci = CiEvent("github", "d1", "acme/web", "branch_deleted", branch="feature")

    async def send() -> None:
        await sink.registry_events([event])
        await sink.ci_event(ci)
        await sink.job("j1", "prune", {"repository": "a/b"})
        await sink.job("j2", "gc", {})

    anyio.run(send)
    sink.close()
    events = messages(broker, "events")
    assert [name for name, _ in events] == ["regsweep.registry_events", "regsweep.ci_event"]
    assert events[0][1]["events"][0]["id"] == "e1"
    assert events[1][1]["event"]["branch"] == "feature"
    assert messages(broker, "prune") == []
    assert messages(broker, "jobs") == [
        (
            "regsweep.prune",
            {
                "repository": "a/b",
                "job_id": "j1",
                "dry_run": False,
                "incremental": False,
                "trigger": "api",
            },
        )
    ]
    assert messages(broker, "gc") == [("regsweep.gc", {"job_id": "j2", "dry_run": False})]


def test_celery_sink_with_broker_down_raises_state_error_quickly() -> None:
    """A broker that is not there is a StateError within seconds (the hook then answers 503)."""
    sink = CelerySink.from_config(config(f"redis://127.0.0.1:{free_port()}/0"))
    started = time.monotonic()
    with pytest.raises(StateError, match=r"broker refused regsweep\.ci_event"):
        anyio.run(sink.ci_event, CiEvent("gitlab", "d", "acme/web", "branch_deleted"))
    assert time.monotonic() - started < 5
    sink.close()


def test_prune_enqueue_records_jobs_and_queues_prunes(
    broker: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`regsweep prune REPO... --enqueue` prints one job id per repository, each queued."""
    governing = {"name": "all", "repositories": ["**"], "keep": [{"tags": ["*"], "newest": 1}]}
    path = s.policy_file(tmp_path / "regsweep.yaml", "http://127.0.0.1:1", [governing], s.REDIS_URL)
    assert main(["-c", str(path), "prune", "a/b", "c/d", "--enqueue", "--dry-run"]) == 0
    job_ids = capsys.readouterr().out.split()
    assert len(job_ids) == 2
    for job_id, repository in zip(job_ids, ("a/b", "c/d"), strict=True):
        record = broker.hgetall(f"regsweep:job:{job_id}")
        assert json.loads(record["state"]) == "queued"
        assert json.loads(record["params"]) == {"repository": repository, "dry_run": True}
    queued = messages(broker, "jobs")
    assert [(k["repository"], k["job_id"], k["dry_run"]) for _, k in queued] == [
        ("a/b", job_ids[0], True),
        ("c/d", job_ids[1], True),
    ]


def test_prune_enqueue_without_redis_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--enqueue with no Redis configured exits 2 and says what is missing."""
    monkeypatch.delenv("REGSWEEP_REDIS_URL", raising=False)
    path = tmp_path / "regsweep.yaml"
    path.write_text(
        "registry: {url: 'http://127.0.0.1:1'}\n"
        "policies: [{name: all, repositories: ['**'], keep: [{tags: ['*'], newest: 1}]}]\n"
    )
    assert main(["-c", str(path), "prune", "a/b", "--enqueue"]) == 2
    assert "--enqueue needs redis.url" in capsys.readouterr().err


def test_service_metrics_show_worker_counters(broker: redis.Redis) -> None:
    """/metrics exposes what workers wrote to Redis: deletions, job states, latency histogram."""
    metrics = WorkerMetrics()
    metrics.deletion("web", "untagged", 3)
    metrics.job("prune", "failed")
    for seconds in (0.003, 0.03, 0.3, 30.0):
        metrics.registry_response("DELETE", "/v2/{name}/manifests/{reference}", 202, seconds)

    async def flush() -> None:
        client = aioredis.Redis.from_url(s.REDIS_URL)
        await metrics.flush(client)
        await client.aclose()

    anyio.run(flush)
    assert not metrics.pending and bucket_of(30.0) == "+Inf"
    gc_key = Keys().metrics_gc
    broker.hset(gc_key, mapping={"runs": 2, "blobs_deleted": 7, "last_readonly_seconds": 1.5})
    cfg = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        redis_url=s.REDIS_URL,
        hooks=HookSettings(registry_token=Secret("t")),
    )
    app = create_app(cfg, sink=RedisListSink.from_url(s.REDIS_URL))
    with h.running(app) as url:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'regsweep_deletions_total{policy="web",reason="untagged"} 3.0' in text
    assert 'regsweep_worker_jobs_total{kind="prune",state="failed"} 1.0' in text
    route = 'method="DELETE",route="/v2/{name}/manifests/{reference}"'
    assert f'regsweep_registry_request_duration_seconds_bucket{{le="0.005",{route}}} 1.0' in text
    assert f'regsweep_registry_request_duration_seconds_bucket{{le="0.5",{route}}} 3.0' in text
    assert f'regsweep_registry_request_duration_seconds_bucket{{le="+Inf",{route}}} 4.0' in text
    assert f"regsweep_registry_request_duration_seconds_count{{{route}}} 4.0" in text
    assert 'regsweep_gc_runs_total{outcome="completed"} 2.0' in text
    assert "regsweep_gc_blobs_deleted_total 7.0" in text
    assert "regsweep_gc_last_readonly_seconds 1.5" in text
    assert "regsweep_gc_switch_back_failures_total 0.0" in text
