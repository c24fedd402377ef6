"""Restores of what the service deleted, with real processes: registry 2.8.2 → `regsweep serve`
→ Redis → `regsweep worker`, and the `regsweep` CLI pointed at the same Redis.

The workers write the audit into the Redis stream; the CLI (with `redis.url`) reads and
restores from that same stream. A restore's own PUTs make the registry notify the
service, which prunes the repository again: the hold the restore wrote first must keep
what it put back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.harness import cli
from tests.harness import stack as s
from tests.harness.images import ImageBuilder, PushedImage

POLICIES: list[dict[str, Any]] = [
    {
        "name": "restorable",
        "repositories": ["e2e/restore-*"],
        "mode": "enforce",
        "keep": [{"tags": ["keep-*"]}],
    }
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s.Stack]:
    running = s.Stack(tmp_path_factory.mktemp("e2e-restore"), POLICIES)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def images(stack: s.Stack) -> Iterator[ImageBuilder]:
    assert stack.registry is not None
    with ImageBuilder.connect(stack.registry.url) as builder:
        yield builder


@pytest.fixture
def http(stack: s.Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        yield client


@pytest.fixture
def state() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(s.REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def repository() -> str:
    return f"e2e/restore-{uuid.uuid4().hex[:8]}"


def regsweep(stack: s.Stack, *args: str) -> str:
    """The CLI with the stack's policy file (and so its Redis); its output, exit 0 required."""
    result = cli.run(*args, config=stack.config, env=stack.env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def wait_deleted(stack: s.Stack, images: ImageBuilder, repo: str, *pushed: PushedImage) -> None:
    try:
        s.wait_for(lambda: all(images.head(repo, p.digest) is None for p in pushed), timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"not deleted by the service\n{stack.logs()}") from exc


def indexed(state: redis.Redis, repo: str, tag: str) -> str | None:
    """The digest the service's tag index has for ``tag`` (set by its push notification)."""
    return state.hget(f"regsweep:idx:{repo}:tags", tag)  # type: ignore[return-value]


def prune_after_restore(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis, repo: str, restored: PushedImage
) -> None:
    """Wait until the restore's push notification reached the tag index, then until a prune
    that started after it has run: a sentinel pushed now is gone only once one has."""
    tag = restored.tags[0]
    s.wait_for(lambda: indexed(state, repo, tag) == restored.digest, timeout=30)
    sentinel = images.image(repo, f"sentinel-{uuid.uuid4().hex[:6]}")
    wait_deleted(stack, images, repo, sentinel)


def test_service_deletions_are_restored_from_the_cli(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis, repository: str
) -> None:
    """Three images the workers deleted: `regsweep audit` (redis.url set) lists their records
    from the workers' stream, `regsweep restore` puts each back byte for byte, and the
    service's prunes after the restores keep them (held, as `plan` says)."""
    kept = images.image(repository, "keep-1")
    dropped = [images.image(repository, f"drop-{n}") for n in range(3)]
    wait_deleted(stack, images, repository, *dropped)
    records = cli.audit_records(stack.config, "--repository", repository)
    assert {r["digest"] for r in records} == {p.digest for p in dropped}
    assert {r["outcome"] for r in records} == {"deleted"}
    assert not any(r["job_id"].startswith("cli-") for r in records)
    for image in dropped:
        out = regsweep(stack, "restore", repository, image.digest.partition(":")[2][:12])
        assert f"restored manifest {image.digest} ({image.tags[0]})" in out
        assert images.manifest(repository, image.digest)[0] == image.raw
    prune_after_restore(stack, images, state, repository, dropped[-1])
    for image in dropped:
        assert images.head(repository, image.tags[0]) is not None, stack.logs()
    plan = regsweep(stack, "plan", repository)
    assert plan.count("held (restore of ") == 3, plan
    assert images.head(repository, kept.digest) is not None


def test_api_restore_survives_the_push_notifications_it_causes(
    stack: s.Stack,
    images: ImageBuilder,
    http: httpx.Client,
    state: redis.Redis,
    repository: str,
) -> None:
    """An API restore of a tag the policy deletes: after the restore's own push notifications
    are processed and a later prune has run, the tag is still there, and the plan says it
    is held by the restore until a date."""
    images.image(repository, "keep-1")
    image = images.image(repository, "pr-7")
    wait_deleted(stack, images, repository, image)
    response = http.post(
        "/api/v1/jobs",
        json={"kind": "restore", "repository": repository, "digest": image.digest[:19]},
        headers=s.API_HEADERS,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    def finished() -> dict[str, Any] | None:
        job = http.get(f"/api/v1/jobs/{job_id}", headers=s.API_HEADERS).json()
        return job if job["state"] in ("succeeded", "failed") else None

    job = s.wait_for(finished, timeout=30, step=0.1)
    assert job["state"] == "succeeded", job
    assert job["restored"] == [
        {"digest": image.digest, "tags": ["pr-7"], "action": "manifest", "pushed": True}
    ]
    prune_after_restore(stack, images, state, repository, image)
    assert images.manifest(repository, "pr-7")[0] == image.raw, stack.logs()
    plan = regsweep(stack, "plan", repository)
    held = next(line for line in plan.splitlines() if "pr-7" in line)
    assert "held (restore of " in held and " until 20" in held, plan
