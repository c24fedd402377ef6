"""Nothing accepted is lost, end to end: registry 2.8.2 → `regsweep serve` → Redis →
`regsweep worker`, all real processes on a private `redis-server`.

Prunes of one repository parked during a maintenance window (CI requests, a push, API
prunes, a sweep's child) all run after it, merged; a dead letter and a recorded CI
event are run again through the API.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import redis

from tests.harness import service as payloads
from tests.harness import stack as s
from tests.harness.cli import run
from tests.harness.images import ImageBuilder
from tests.harness.registry import free_port
from worker.queue.celery_app import make_celery
from worker.queue.names import EVENTS_QUEUE, TASK_TICK
from worker.settings.load import load_config
from worker.store.state import State

POLICIES = [
    {
        "name": "parked",
        "repositories": ["park/**"],
        "mode": "enforce",
        "keep": [{"tags": ["*"]}],
        "untagged": {"delete_after": "0s"},
        "on": {"pull_request_closed": ["pr-{number}"]},
        "sources": {"github": ["acme/web"]},
    }
]
FINAL = ("succeeded", "failed")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s.Stack]:
    server = payloads.RedisServer(free_port())
    server.start()
    running = s.Stack(tmp_path_factory.mktemp("nolost"), POLICIES, redis_url=server.url)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        server.stop()


@pytest.fixture
def state(stack: s.Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def http(stack: s.Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        yield client


@pytest.fixture
def images(stack: s.Stack) -> Iterator[ImageBuilder]:
    assert stack.registry is not None
    with ImageBuilder.connect(stack.registry.url) as builder:
        yield builder


def job(state: redis.Redis, job_id: str) -> dict[str, Any]:
    raw: dict[str, str] = state.hgetall(f"regsweep:job:{job_id}")  # type: ignore[assignment]
    return {k: json.loads(v) for k, v in raw.items()}


def close_pull_request(http: httpx.Client, number: int, delivery: str | None = None) -> str:
    body = payloads.github_pull_request("closed", merged=True, number=number)
    headers = payloads.github_headers(s.GITHUB_SECRET, body, "pull_request", delivery)
    answer = http.post("/hooks/github", content=body, headers=headers)
    assert answer.status_code in (200, 202), answer.text
    return headers["X-GitHub-Delivery"]


def post_job(http: httpx.Client, **body: Any) -> str:
    answer = http.post("/api/v1/jobs", json=body, headers=s.API_HEADERS)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["job_id"])


def quiet(state: redis.Redis) -> bool:
    """No prune running or waiting for its repository."""
    return not state.keys("regsweep:lock:prune:*") and not state.keys("regsweep:pending:*")


def test_prunes_parked_during_a_window_all_run_after_it_merged(
    stack: s.Stack, state: redis.Redis, http: httpx.Client, images: ImageBuilder
) -> None:
    """Two closed pull requests, a push, an API prune, a sweep and a dry-run API prune of one
    repository, all during a maintenance window: each is parked as its own entry (`status`
    lists six), none overwrites another; after the window the workers' tick runs them as one
    enforced prune (the union of the pull requests' tags) and one dry run, and every job,
    the sweep too, ends `succeeded`."""
    repository = f"park/{uuid.uuid4().hex[:8]}"
    pr1, pr2 = images.image(repository, "pr-1"), images.image(repository, "pr-2")
    old = images.image(repository, "main")
    s.wait_for(lambda: len(state.hgetall(f"regsweep:idx:{repository}:tags")) == 3)
    s.wait_for(lambda: quiet(state), timeout=30, what="the pushes' prunes")
    state.set("regsweep:maintenance", "gc-test-window")
    try:
        close_pull_request(http, 1)
        close_pull_request(http, 2)
        new = images.image(repository, "main")  # a push: `old` is superseded
        asked = [
            post_job(http, kind="prune", repository=repository),
            post_job(http, kind="sweep", repository=repository),
            post_job(http, kind="prune", repository=repository, dry_run=True),
        ]
        parked = s.wait_for(
            lambda: parked_jobs(state, repository, 6), timeout=60, what="six parked prunes"
        )
        shown = run("status", "--json", config=stack.config, env=s.ENVIRONMENT)
        assert shown.returncode == 0, shown.stderr
        listed = [d for d in json.loads(shown.stdout)["deferred"] if d["repository"] == repository]
        assert sorted(d["job_id"] for d in listed) == sorted(parked)
        assert asked[0] in parked and asked[2] in parked
        assert all(job(state, j)["state"] == "deferred" for j in parked)
    finally:
        state.delete("regsweep:maintenance")
    tick(stack)
    for job_id in [*parked, asked[1]]:
        s.wait_for(partial(ended, state, job_id), timeout=60, what=job_id)
        assert job(state, job_id)["state"] == "succeeded", (job_id, job(state, job_id))
    for gone in (pr1, pr2, old):
        assert not images.manifest_exists(repository, gone.digest), gone.tags
    assert images.manifest_exists(repository, new.digest)
    ran = {j: job(state, j).get("ran_with") for j in parked}
    primaries = {j for j, with_ in ran.items() if with_ is None}
    assert len(primaries) == 2, ran  # one enforced prune, one dry run
    assert job(state, asked[2])["executed"] is False
    assert state.hlen("regsweep:deferred") == 0
    rider = next(j for j, with_ in ran.items() if with_ is not None and with_ != asked[2])
    shown = run("jobs", rider, "--json", config=stack.config, env=s.ENVIRONMENT)
    assert shown.returncode == 0, shown.stderr
    deleted = {d["digest"] for d in json.loads(shown.stdout)["deletions"]}
    assert {pr1.digest, pr2.digest, old.digest} <= deleted, "jobs shows what its merged run did"


def ended(state: redis.Redis, job_id: str) -> bool:
    return job(state, job_id).get("state") in FINAL


def parked_jobs(state: redis.Redis, repository: str, count: int) -> list[str] | None:
    """The job ids parked for ``repository`` once there are ``count`` of them."""
    entries = [json.loads(v) for v in state.hvals("regsweep:deferred")]
    ids = [str(e["job_id"]) for e in entries if e.get("repository") == repository]
    return ids if len(ids) >= count else None


def tick(stack: s.Stack) -> None:
    """What beat sends every 30 s (beat is not running here)."""
    app = make_celery(load_config(stack.config, s.ENVIRONMENT))
    try:
        app.send_task(TASK_TICK, queue=EVENTS_QUEUE)
    finally:
        app.close()


def test_the_api_replays_a_dead_letter_once_and_a_recorded_ci_event(
    stack: s.Stack, state: redis.Redis, http: httpx.Client, images: ImageBuilder
) -> None:
    """`POST /api/v1/dead-letters/{id}/replay` (API token) runs a dead-lettered prune again
    as a new job, and answers the same job when asked again; given a GitHub delivery id,
    it runs that CI event again although GitHub's own redelivery is a duplicate; an
    unknown id is 404, a missing token 401."""
    repository = f"park/{uuid.uuid4().hex[:8]}"
    pr = images.image(repository, "pr-9")
    images.image(repository, "main")
    s.wait_for(lambda: len(state.hgetall(f"regsweep:idx:{repository}:tags")) == 2)
    delivery = close_pull_request(http, 9)
    s.wait_for(lambda: not images.manifest_exists(repository, pr.digest), timeout=30)
    again = images.image(repository, "pr-9")  # pushed again after the pull request closed
    s.wait_for(lambda: quiet(state), timeout=30, what="the push's prune")
    assert close_pull_request(http, 9, delivery) == delivery  # GitHub's redelivery
    replay = http.post(f"/api/v1/dead-letters/{delivery}/replay", headers=s.API_HEADERS)
    assert replay.status_code == 202, replay.text
    assert replay.json()["kind"] == "ci_event" and replay.json()["job_id"] is None
    s.wait_for(lambda: not images.manifest_exists(repository, again.digest), timeout=30)

    letter = dead_letter(stack, repository)
    first = http.post(f"/api/v1/dead-letters/{letter}/replay", headers=s.API_HEADERS)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert first.json()["status_url"] == f"/api/v1/jobs/{job_id}"
    s.wait_for(lambda: ended(state, job_id), timeout=30, what=job_id)
    assert job(state, job_id)["state"] == "succeeded", job(state, job_id)
    second = http.post(f"/api/v1/dead-letters/{letter[:10]}/replay", headers=s.API_HEADERS)
    assert second.status_code == 202 and second.json() | {"status_url": ""} == {
        "id": letter,
        "kind": "prune",
        "job_id": job_id,
        "again": True,
        "detail": "",
        "status_url": "",
    }
    unknown = http.post(f"/api/v1/dead-letters/{'e' * 32}/replay", headers=s.API_HEADERS)
    assert unknown.status_code == 404 and "no dead letter" in unknown.json()["error"]
    assert http.post(f"/api/v1/dead-letters/{letter}/replay").status_code == 401
    bad = http.post("/api/v1/dead-letters/%2e%2e/replay", headers=s.API_HEADERS)
    assert bad.status_code in (400, 404) and "error" in bad.json()


def dead_letter(stack: s.Stack, repository: str) -> str:
    """A prune dead-lettered as a worker keeps one after its last retry (the retries
    themselves take minutes; tests/test_worker_jobs.py goes through them)."""

    async def keep() -> str:
        state = State.from_url(stack.redis_url)
        try:
            params = {"repository": repository, "dry_run": False, "requests": []}
            return await state.dead_letter(
                "prune",
                f"prune of {repository} failed after 9 attempts: registry unreachable",
                json.dumps(params),
                replay={"kind": "prune", "params": params},
            )
        finally:
            await state.aclose()

    return asyncio.run(keep())
