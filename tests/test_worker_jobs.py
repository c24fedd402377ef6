"""Job functions and Celery tasks against a real 2.8.2 registry and Redis DB 11.

Tasks run in this process (``Task.apply``) on the worker's own context, so
their effects are asserted directly; messages they enqueue are read off the
broker's Redis list. DB 11 is flushed at the start and end of the module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import redis

from tests.harness import cli
from tests.harness import stack as s
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import ImageBuilder
from tests.harness.proxy import Exchange, FaultyProxy, Rule
from tests.harness.registry import RegistryProcess
from tests.harness.workers import tasks_in_process
from worker import oci
from worker.engine.events import CiEvent
from worker.engine.prune import Pruner
from worker.errors import RegistryUnavailable, RepositoryBusy
from worker.identity import ProcessIdentity
from worker.queue import parking, pruning, pushes, tasks
from worker.queue.context import WorkerContext
from worker.queue.names import JOBS_QUEUE, PRUNE_QUEUE
from worker.settings.load import load_config
from worker.settings.model import Config
from worker.store.locks import PruneLock

POLICY = {
    "name": "jobs",
    "repositories": ["w/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}
#: Keeps every tag; a closed pull request of acme/web deletes its `pr-{number}` tag.
CI_POLICY = {
    "name": "ci",
    "repositories": ["ci/**"],
    "mode": "enforce",
    "keep": [{"tags": ["*"]}],
    "on": {"pull_request_closed": ["pr-{number}"]},
    "sources": {"github": ["acme/web"]},
}


@pytest.fixture(scope="module")
def own_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A registry of this module's own, so a test may restart it read-only."""
    registry = RegistryProcess.create(tmp_path_factory.mktemp("jobs-registry"))
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, own_registry: RegistryProcess) -> Path:
    return s.policy_file(
        tmp_path_factory.mktemp("jobs-config") / "regsweep.yaml",
        own_registry.url,
        [POLICY, CI_POLICY],
        s.REDIS_URL,
    )


@pytest.fixture(scope="module")
def config(config_path: Path) -> Config:
    return load_config(config_path, {})


@pytest.fixture(scope="module")
def broker(config: Config) -> Iterator[redis.Redis]:
    """DB 11 (flushed) and the tasks' Celery app and per-process context made for ``config``."""
    s.flush()
    client = redis.Redis.from_url(s.REDIS_URL, decode_responses=True)
    with tasks_in_process(config):
        yield client
    client.close()
    s.flush()


@pytest.fixture
async def ctx(config: Config, broker: redis.Redis) -> AsyncIterator[WorkerContext]:
    context = await WorkerContext.open(config)
    yield context
    await context.aclose()


@pytest.fixture
def images(own_registry: RegistryProcess) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(own_registry.url) as builder:
        yield builder


def status(images: ImageBuilder, repository: str, reference: str) -> int:
    headers = {"Accept": oci.MANIFEST_ACCEPT}
    return images.client.head(
        f"/v2/{repository}/manifests/{reference}", headers=headers
    ).status_code


#: Where prunes wait: a push's on ``prune``, every other on ``jobs``.
PRUNE_QUEUES: Final = (PRUNE_QUEUE, JOBS_QUEUE)


def queued(broker: redis.Redis, *queues: str) -> list[dict[str, Any]]:
    """The kwargs of each task message waiting on ``queues`` (Celery protocol 2); by default
    the two a prune may be sent to (``prune`` for a push's, ``jobs`` for the others)."""
    out = []
    for queue in queues or PRUNE_QUEUES:
        for raw in reversed(broker.lrange(queue, 0, -1)):
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            out.append(body[1])
    return out


def job(broker: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = broker.hgetall(f"regsweep:job:{job_id}")
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


@pytest.mark.anyio
async def test_held_lock_makes_prune_busy_at_once_and_nothing_is_deleted(
    ctx: WorkerContext, images: ImageBuilder, repo_name: str
) -> None:
    """While a live process holds the repository's lock, a prune gives up at once with
    RepositoryBusy (its task retries later, holding no worker slot); released, it runs."""
    repository = f"w/{repo_name}"
    drop = images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    other = PruneLock(ctx.redis, pruning.keys(ctx).prune_lock(repository))
    assert await other.acquire()
    with pytest.raises(RepositoryBusy):
        await pruning.prune_repository(ctx, pruning.PruneJob(repository, "busy"))
    assert status(images, repository, drop.digest) == 200
    await other.release()
    summary = await pruning.prune_repository(ctx, pruning.PruneJob(repository, "free"))
    assert summary["counts"]["deleted"] == 1
    assert status(images, repository, drop.digest) == 404


@pytest.mark.anyio
async def test_a_prune_whose_lock_is_taken_over_stops_and_asks_to_be_retried(
    config: Config,
    broker: redis.Redis,
    own_registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
) -> None:
    """Another prune took the repository's lock (it expired unrenewed, or Redis lost it) as
    this one sent its first DELETE: no wave after that is sent, and the prune asks to be
    retried with the one backoff (planned afresh then) rather than ending as if done."""
    repository = f"w/{repo_name}"
    drops = [images.image(repository, f"drop-{i:02d}") for i in range(13)]
    images.image(repository, "keep-1")
    upstream = urlsplit(own_registry.url)
    with FaultyProxy((str(upstream.hostname), int(upstream.port or 80))) as proxy:
        registry = replace(config.registry, url=proxy.url, concurrency=1)  # waves of 4
        ctx = await WorkerContext.open(replace(config, registry=registry))
        key = pruning.keys(ctx).prune_lock(repository)

        def take_over(_: Exchange) -> None:
            broker.set(key, "another prune's token")

        taken = Rule(method="DELETE", before=take_over)
        proxy.rules.append(taken)
        try:
            with pytest.raises(RegistryUnavailable, match="lost"):
                await pruning.prune_repository(ctx, pruning.PruneJob(repository, "taken"))
        finally:
            await ctx.aclose()
    assert taken.fired, "the prune sent no DELETE"
    # Two waves may be under way when the lock goes; the third and fourth (5 images) never.
    left = [d for d in drops if status(images, repository, d.digest) == 200]
    assert len(left) >= 5, len(left)
    broker.delete(key)


@pytest.mark.anyio
async def test_lock_of_a_dead_prune_is_broken_and_one_elsewhere_waits_for_its_ttl(
    ctx: WorkerContext, images: ImageBuilder, repo_name: str
) -> None:
    """A lock naming a process of this machine that has exited is broken by the next prune
    at once; one naming a process on another host is respected (busy) until it expires."""
    repository = f"w/{repo_name}"
    drop = images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    key = pruning.keys(ctx).prune_lock(repository)
    gone = subprocess.Popen(["sleep", "30"])
    dead = ProcessIdentity.of(gone.pid)
    gone.kill()
    gone.wait()
    elsewhere = replace(ProcessIdentity.of(), host="another-host")
    await ctx.redis.set(key, json.dumps({"owner": asdict(elsewhere), "nonce": "x"}), px=30_000)
    with pytest.raises(RepositoryBusy):
        await pruning.prune_repository(ctx, pruning.PruneJob(repository, "elsewhere"))
    await ctx.redis.set(key, json.dumps({"owner": asdict(dead), "nonce": "y"}), px=30_000)
    summary = await pruning.prune_repository(ctx, pruning.PruneJob(repository, "after-death"))
    assert summary["counts"]["deleted"] == 1
    assert status(images, repository, drop.digest) == 404
    assert await ctx.redis.exists(key) == 0


@pytest.mark.anyio
async def test_prune_lock_is_renewed_while_held_and_loss_is_noticed(ctx: WorkerContext) -> None:
    """A 2 s lock renewed every 0.2 s outlives 5 s of work; taken away, the renewal
    notices and says so."""
    key = pruning.keys(ctx).prune_lock("renewal-test")
    lock = PruneLock(ctx.redis, key, ttl=timedelta(seconds=2), renew_every=timedelta(seconds=0.2))
    assert await lock.acquire()
    async with lock.held():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert await ctx.redis.exists(key) == 1
            await asyncio.sleep(0.1)
        await ctx.redis.delete(key)
        while not lock.lost:
            await asyncio.sleep(0.05)
    assert await ctx.redis.exists(key) == 0


@pytest.mark.anyio
async def test_concurrent_prunes_of_one_repository_never_overlap(
    ctx: WorkerContext, images: ImageBuilder, repo_name: str
) -> None:
    """Two prunes started together: one runs, the other is busy (and would be retried)."""
    repository = f"w/{repo_name}"
    images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    outcomes = await asyncio.gather(
        pruning.prune_repository(ctx, pruning.PruneJob(repository, "a", incremental=False)),
        pruning.prune_repository(ctx, pruning.PruneJob(repository, "b", incremental=False)),
        return_exceptions=True,
    )
    busy = [o for o in outcomes if isinstance(o, RepositoryBusy)]
    done = [o for o in outcomes if isinstance(o, dict)]
    assert len(busy) == 1 and len(done) == 1
    assert done[0]["plan"]["tags_removed"] == 1


@pytest.mark.anyio
async def test_pushes_coalesce_until_the_prune_starts(
    ctx: WorkerContext, images: ImageBuilder, repo_name: str
) -> None:
    """Only the first push claims a prune; once it starts, the next push claims a new one."""
    repository = f"w/{repo_name}"
    images.image(repository, "keep-1")
    assert await pushes.claim_prune(ctx, repository) is True
    assert await pushes.claim_prune(ctx, repository) is False
    await pruning.prune_repository(ctx, pruning.PruneJob(repository, "c"))
    assert await pushes.claim_prune(ctx, repository) is True


@pytest.mark.anyio
async def test_incremental_plan_only_after_a_live_read(
    ctx: WorkerContext, images: ImageBuilder, repo_name: str
) -> None:
    """The first prune of a repository reads the registry; later ones plan from the index."""
    repository = f"w/{repo_name}"
    images.image(repository, "keep-1")
    first = await pruning.prune_repository(ctx, pruning.PruneJob(repository, "d"))
    second = await pruning.prune_repository(ctx, pruning.PruneJob(repository, "e"))
    assert (first["incremental"], second["incremental"]) == (False, True)
    assert await ctx.index.tags(repository) == {"keep-1": images_digest(images, repository)}


def images_digest(images: ImageBuilder, repository: str) -> str:
    headers = {"Accept": oci.MANIFEST_ACCEPT}
    response = images.client.head(f"/v2/{repository}/manifests/keep-1", headers=headers)
    return response.headers["Docker-Content-Digest"]


def test_maintenance_flag_defers_and_tick_releases(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """With the maintenance flag set a prune is deferred (not failed); tick re-queues it after."""
    repository = f"w/{repo_name}"
    drop = images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    job_id = tasks.run(lambda ctx: ctx.state.create_job("prune", {"repository": repository}))
    broker.set("regsweep:maintenance", "gc")
    try:
        tasks.prune.apply(kwargs={"repository": repository, "job_id": job_id})
        assert job(broker, job_id)["state"] == "deferred"
        assert (
            json.loads(broker.hget("regsweep:deferred", job_id) or "{}")["repository"] == repository
        )
        tasks.tick.apply()
        assert queued(broker) == [], "nothing is released while the window runs"
    finally:
        broker.delete("regsweep:maintenance")
    assert status(images, repository, drop.digest) == 200
    tasks.tick.apply()
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    assert message["repository"] == repository and message["job_id"] == job_id
    tasks.prune.apply(kwargs=message)
    assert job(broker, job_id)["state"] == "succeeded"
    assert status(images, repository, drop.digest) == 404


def test_read_only_registry_defers_the_prune(
    broker: redis.Redis, images: ImageBuilder, own_registry: RegistryProcess, repo_name: str
) -> None:
    """A registry in read-only mode during a prune defers the job; it is not failed."""
    repository = f"w/{repo_name}"
    drop = images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    job_id = tasks.run(lambda ctx: ctx.state.create_job("prune", {"repository": repository}))
    own_registry.set_readonly(True)
    own_registry.restart()
    try:
        tasks.prune.apply(kwargs={"repository": repository, "job_id": job_id})
    finally:
        own_registry.set_readonly(False)
        own_registry.restart()
    record = job(broker, job_id)
    assert record["state"] == "deferred", record
    assert "read-only" in record["errors"][0]
    assert json.loads(broker.hget("regsweep:deferred", job_id) or "{}")["repository"] == repository
    assert status(images, repository, drop.digest) == 200
    broker.delete("regsweep:deferred")


def test_sweep_tallies_its_prunes(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A sweep queues one prune per repository; the last one to finish closes the sweep."""
    repository = f"w/{repo_name}"
    images.image(repository, "drop-1")
    sweep_id = tasks.run(lambda ctx: ctx.state.create_job("sweep", {}))
    tasks.sweep.apply(kwargs={"job_id": sweep_id, "repository": repository})
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    assert message["parent"] == sweep_id and message["incremental"] is False
    assert job(broker, sweep_id)["state"] == "running"
    tasks.prune.apply(kwargs=message)
    tasks.prune.apply(kwargs=message)  # a redelivery must not count twice
    sweep = job(broker, sweep_id)
    assert sweep["state"] == "succeeded"
    assert sweep["counts"]["repositories"] == 1 and sweep["counts"]["deleted"] == 1


def test_a_poisoned_push_time_is_unknown_and_the_prune_goes_on(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A push time no clock can read (left in the tag index by an older version) is skipped:
    that tag's push time is unknown (kept), and the prune and its sweep succeed."""
    repository = f"w/{repo_name}"
    images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    sweep_id = tasks.run(lambda ctx: ctx.state.create_job("sweep", {}))
    tasks.sweep.apply(kwargs={"job_id": sweep_id, "repository": repository})
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    broker.hset(f"regsweep:idx:{repository}:pushed", "keep-1", "1e300")
    tasks.prune.apply(kwargs=message)
    assert job(broker, message["job_id"])["state"] == "succeeded"
    assert job(broker, sweep_id)["state"] == "succeeded"


def test_a_prune_that_raises_anything_ends_its_job_and_its_sweep(
    broker: redis.Redis, images: ImageBuilder, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a prune raises, even no regsweep error at all, its job ends failed saying
    why, and its sweep ends too instead of staying running forever. (The fault is injected:
    no real input is left that makes the engine raise something unexpected.)"""
    repository = f"w/{repo_name}"
    images.image(repository, "keep-1")
    sweep_id = tasks.run(lambda ctx: ctx.state.create_job("sweep", {}))
    tasks.sweep.apply(kwargs={"job_id": sweep_id, "repository": repository})
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(Pruner, "plan_one", broken)
    tasks.prune.apply(kwargs=message)
    child = job(broker, message["job_id"])
    assert child["state"] == "failed"
    assert child["errors"][0].startswith("internal error:"), child["errors"]
    sweep = job(broker, sweep_id)
    assert sweep["state"] == "failed" and sweep["counts"]["failed"] == 1


def test_registry_events_task_applies_the_good_and_dead_letters_the_bad(
    broker: redis.Redis, repo_name: str
) -> None:
    """A queued batch holding an event whose time is out of any registry's range (the year
    10000 once in UTC) applies the other events and dead-letters that one, once."""
    repository = f"w/{repo_name}"
    good = {
        "id": "good-1",
        "action": "push",
        "repository": repository,
        "digest": "sha256:" + "1" * 64,
        "tag": "v1",
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "size": 10,
        "timestamp": "2025-03-01T10:00:00+00:00",
        "url": None,
    }
    bad = good | {"id": "bad-1", "tag": "v2", "timestamp": "9999-12-31T23:59:59-23:59"}
    broker.delete("regsweep:deadletter")
    tasks.registry_events.apply(kwargs={"events": [bad, good]})
    assert broker.hgetall(f"regsweep:idx:{repository}:tags") == {"v1": good["digest"]}
    (entry,) = [json.loads(raw) for raw in broker.lrange("regsweep:deadletter", 0, -1)]
    assert "bad-1" in entry["reason"] and "timestamp" in entry["reason"]
    broker.delete(*PRUNE_QUEUES)


def test_metrics_flushed_by_tasks(broker: redis.Redis) -> None:
    """Task steps add the worker's counts to Redis hashes the service's collector reads."""
    tasks.run(_count)
    assert broker.hget("regsweep:metrics:jobs", '["prune", "succeeded"]') is not None
    assert broker.hget("regsweep:metrics:deletions", '["p", "untagged"]') == "2"


async def _count(ctx: WorkerContext) -> None:
    ctx.metrics.deletion("p", "untagged", 2)
    ctx.metrics.job("prune", "succeeded")


# --- nothing accepted is lost (issue 18 item 6) ------------------------------------------


def push_event(repository: str, tag: str, digest: str) -> dict[str, Any]:
    """A registry push event as the service queues it."""
    return {
        "id": uuid.uuid4().hex,
        "action": "push",
        "repository": repository,
        "digest": digest,
        "tag": tag,
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "size": 10,
        "timestamp": "2025-03-01T10:00:00+00:00",
        "url": None,
    }


def newest_dead_letter(broker: redis.Redis) -> dict[str, Any]:
    raw = broker.lindex("regsweep:deadletter", 0)
    assert raw is not None, "nothing dead-lettered"
    entry: dict[str, Any] = json.loads(raw)
    return entry


def test_a_ci_prune_that_never_reaches_the_registry_is_dead_lettered_and_replayed(
    broker: redis.Redis,
    images: ImageBuilder,
    own_registry: RegistryProcess,
    config_path: Path,
    repo_name: str,
) -> None:
    """A closed pull request's prune that meets a stopped registry is retried up to its
    bound, then fails saying why and is dead-lettered with its CI request; `regsweep replay`
    of the dead letter runs that request again as a new job (once, however often asked),
    and `regsweep replay` of the delivery id queues the CI event again."""
    repository = f"ci/{repo_name}"
    pr = images.image(repository, "pr-7")
    main = images.image(repository, "main")
    events = [
        push_event(repository, "pr-7", pr.digest),
        push_event(repository, "main", main.digest),
    ]
    tasks.registry_events.apply(kwargs={"events": events})
    broker.delete(*PRUNE_QUEUES)  # the pushes' own prunes
    delivery = uuid.uuid4().hex
    event = CiEvent("github", delivery, "acme/web", "pull_request_closed", number=7, merged=False)
    tasks.ci_event.apply(kwargs={"event": event.to_dict()})
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    own_registry.stop()
    try:
        tasks.prune.apply(kwargs=message)
    finally:
        own_registry.start()
    letter = newest_dead_letter(broker)
    job_id = json.loads(letter["body"])["job_id"]
    record = job(broker, job_id)
    assert record["state"] == "failed", record
    assert record["dead_letter"] == letter["id"]
    assert "ConnectError" in record["errors"][0], record["errors"]
    assert record["errors"][1] == f"dead-lettered: regsweep replay {letter['id']}"
    assert letter["source"] == "prune"
    assert f"after {tasks.MAX_REGISTRY_RETRIES + 1} attempts" in letter["reason"]
    assert letter["replay"]["params"]["requests"] == message["requests"]
    assert status(images, repository, pr.digest) == 200

    replayed = cli.run("replay", letter["id"], config=config_path)
    assert replayed.returncode == 0, replayed.stderr
    new_job = replayed.stdout.split()[-1]
    assert replayed.stdout.startswith(f"dead letter {letter['id']} replayed: prune job {new_job}")
    (again,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    assert again["job_id"] == new_job and again["requests"] == message["requests"]
    tasks.prune.apply(kwargs=again)
    assert job(broker, new_job)["state"] == "succeeded"
    assert status(images, repository, pr.digest) == 404
    assert status(images, repository, main.digest) == 200
    twice = cli.run("replay", letter["id"][:8], "--json", config=config_path)
    assert twice.returncode == 0, twice.stderr
    assert json.loads(twice.stdout) | {"detail": ""} == {
        "id": letter["id"],
        "kind": "prune",
        "job_id": new_job,
        "again": True,
        "detail": "",
    }
    assert queued(broker) == [], "a second replay queues nothing"

    ci = cli.run("replay", delivery, config=config_path)
    assert ci.returncode == 0, ci.stderr
    assert "github pull_request_closed acme/web #7" in ci.stdout
    (resent,) = queued(broker, "events")
    broker.delete("events")
    assert resent["event"] == event.to_dict()
    unknown = cli.run("replay", "f" * 32, config=config_path)
    assert unknown.returncode == 1 and "no dead letter and no recorded CI event" in unknown.stderr


def test_a_prune_of_a_repository_the_registry_lacks_fails_saying_so(
    broker: redis.Redis, own_registry: RegistryProcess, repo_name: str
) -> None:
    """An API prune of a repository the registry does not have (a typo) ends `failed` with
    the reason, not `succeeded`: the CI step that asked for it goes red."""
    repository = f"w/{repo_name}-typo"
    job_id = tasks.run(lambda ctx: ctx.state.create_job("prune", {"repository": repository}))
    tasks.prune.apply(kwargs={"repository": repository, "job_id": job_id, "incremental": False})
    record = job(broker, job_id)
    assert record["state"] == "failed", record
    assert record["errors"] == [
        f"{repository}: no such repository in the registry at {own_registry.url}"
    ]


@pytest.mark.anyio
async def test_a_registry_lost_between_plan_and_deletes_makes_the_prune_retry(
    config: Config,
    broker: redis.Redis,
    own_registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
) -> None:
    """A registry that stops answering at the first DELETE fails the run only for a reason
    a retry can cure: the prune raises RegistryUnavailable (its task is retried with the
    backoff) instead of ending `failed`, and the retry, the registry back, deletes it."""
    repository = f"w/{repo_name}"
    drop = images.image(repository, "drop-1")
    images.image(repository, "keep-1")
    proxy = FaultProxy(own_registry.port).start()
    through = replace(config.registry, url=f"http://127.0.0.1:{proxy.port}")
    ctx = await WorkerContext.open(replace(config, registry=through))
    try:
        proxy.cut_at(b"DELETE /v2/", after=False)
        with pytest.raises(RegistryUnavailable):
            await pruning.prune_repository(
                ctx, pruning.PruneJob(repository, "cut", incremental=False)
            )
        assert status(images, repository, drop.digest) == 200
        proxy.restore()
        summary = await pruning.prune_repository(
            ctx, pruning.PruneJob(repository, "cut", incremental=False)
        )
    finally:
        await ctx.aclose()
        proxy.stop()
    assert summary["counts"]["deleted"] == 1
    assert status(images, repository, drop.digest) == 404


def test_parked_prunes_merge_per_repository_and_dry_run_keeping_every_job() -> None:
    """Parked prunes merge into one per repository and dry-run flag: the union of their CI
    requests (each once), a live read if any asked for one, the first parked leading and
    every other job carried in `merged`; nothing is dropped."""
    pr1 = {"patterns": ["pr-1"], "rule": "on.pull_request_closed", "detail": "#1"}
    pr2 = {"patterns": ["pr-2"], "rule": "on.pull_request_closed", "detail": "#2"}
    entries: list[dict[str, Any]] = [
        {"repository": "a", "job_id": "j3", "parked": "3", "requests": [pr2], "trigger": "ci"},
        {"repository": "a", "job_id": "j1", "parked": "1", "requests": [pr1], "trigger": "ci"},
        {"repository": "a", "job_id": "j2", "parked": "2", "incremental": False, "parent": "s"},
        {"repository": "a", "job_id": "j4", "parked": "4", "requests": [pr1], "dry_run": True},
        {"repository": "b", "job_id": "j5", "parked": "5", "trigger": "push"},
    ]
    merged = {(p["repository"], p["dry_run"]): p for p in parking.merge_parked(entries)}
    assert set(merged) == {("a", False), ("a", True), ("b", False)}
    enforced = merged[("a", False)]
    assert (enforced["job_id"], enforced["trigger"], enforced["parent"]) == ("j1", "ci", None)
    assert enforced["requests"] == [pr1, pr2]
    assert enforced["incremental"] is False
    assert [(m["job_id"], m["parent"]) for m in enforced["merged"]] == [("j2", "s"), ("j3", None)]
    assert merged[("a", True)]["job_id"] == "j4" and merged[("a", True)]["merged"] == []
    assert merged[("b", False)]["incremental"] is True


def test_a_parked_dashboard_deletion_is_never_merged_with_other_prunes() -> None:
    """A dashboard deletion (requests only, bound to its preview's plan) parked beside a CI
    prune and another deletion of the same repository runs alone, with its own request and
    fingerprint: merged, retention or another request would change the confirmed plan."""
    pr1 = {"patterns": ["pr-1"], "rule": "on.pull_request_closed", "detail": "#1"}
    tag_a = {"patterns": ["a"], "rule": "ui", "detail": "tag a"}
    tag_b = {"patterns": ["b"], "rule": "ui", "detail": "tag b"}
    entries: list[dict[str, Any]] = [
        {"repository": "a", "job_id": "ci", "parked": "1", "requests": [pr1]},
        {
            "repository": "a",
            "job_id": "d1",
            "parked": "2",
            "requests": [tag_a],
            "requests_only": True,
            "expect": "f1",
        },
        {
            "repository": "a",
            "job_id": "d2",
            "parked": "3",
            "requests": [tag_b],
            "requests_only": True,
            "expect": "f2",
        },
    ]
    merged = {p["job_id"]: p for p in parking.merge_parked(entries)}
    assert set(merged) == {"ci", "d1", "d2"}
    assert merged["ci"]["requests_only"] is False and merged["ci"]["requests"] == [pr1]
    assert merged["ci"]["merged"] == []
    for job_id, request, fingerprint in (("d1", tag_a, "f1"), ("d2", tag_b, "f2")):
        one = merged[job_id]
        assert (one["requests"], one["requests_only"], one["expect"]) == (
            [request],
            True,
            fingerprint,
        )
        assert one["merged"] == []


def test_a_sweep_that_cannot_list_the_registry_is_retried_then_dead_lettered(
    broker: redis.Redis, own_registry: RegistryProcess, config_path: Path
) -> None:
    """A sweep whose catalog read meets a stopped registry is retried up to the bound (its
    one job kept across retries), then fails and is dead-lettered; replaying the dead
    letter queues a sweep job of its own."""
    sweep_id = tasks.run(lambda ctx: ctx.state.create_job("sweep", {}))
    own_registry.stop()
    try:
        tasks.sweep.apply(kwargs={"job_id": sweep_id})
    finally:
        own_registry.start()
    record = job(broker, sweep_id)
    letter = newest_dead_letter(broker)
    assert record["state"] == "failed" and record["dead_letter"] == letter["id"], record
    assert letter["source"] == "sweep" and letter["replay"]["kind"] == "sweep"
    assert f"sweep {sweep_id} failed after" in letter["reason"]
    replayed = cli.run("replay", letter["id"], "--json", config=config_path)
    assert replayed.returncode == 0, replayed.stderr
    new_sweep = json.loads(replayed.stdout)["job_id"]
    (message,) = queued(broker)
    broker.delete(*PRUNE_QUEUES)
    assert message["job_id"] == new_sweep and message["repository"] is None
