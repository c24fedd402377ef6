"""End to end with real processes: registry → `regsweep serve` → Redis → `regsweep worker`.

Pushes go through the registry's API, the registry's own notifications reach
the service, Celery workers prune, and every deletion is observed on the
registry itself (HEAD by digest → 404; kept manifests and blobs → 200).

Every test runs against 2.8.2; those marked ``ON_BOTH`` (the events a registry sends and
what the workers do with them: pushes, a moved tag, a tag-only removal, which 3.x
notifies as a tag delete, CI events and a restore) against 3.x too, a second stack with
its own Redis, started when the first 3.x test needs it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import httpx
import pytest
import redis

from tests.harness import service as payloads
from tests.harness import stack as s
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.registry import DISTRIBUTION_2, RegistryBinary, free_port
from tests.harness.service import RedisServer
from worker import oci

#: The test runs on 2.8.2 and on 3.x: its ``stack`` (and ``images``, ``http``, ``state``)
#: is that version's.
ON_BOTH = pytest.mark.usefixtures("registry_binary")

POLICIES: list[dict[str, Any]] = [
    {
        "name": "moved",
        "repositories": ["e2e/moved-*"],
        "mode": "enforce",
        "keep": [{"tags": ["*"]}],
        "untagged": {"delete_after": "0s"},
    },
    {
        "name": "newest",
        "repositories": ["e2e/newest-*"],
        "mode": "enforce",
        "keep": [{"tags": ["build-*"], "newest": 2}],
        "untagged": {"delete_after": "0s"},
    },
    {
        "name": "ci",
        "repositories": ["e2e/ci-*"],
        "mode": "enforce",
        "keep": [{"tags": ["*"]}],
        "on": {"pull_request_closed": ["pr-{number}"], "branch_deleted": ["{branch}"]},
        "sources": {"github": ["acme/web"], "gitlab": ["acme/web"]},
    },
    {
        "name": "grace",
        "repositories": ["e2e/grace-*"],
        "mode": "enforce",
        "keep": [{"tags": ["*"]}],
        "untagged": {"delete_after": "3s"},
    },
    {
        "name": "api",
        "repositories": ["e2e/api-*"],
        "mode": "dry-run",
        "keep": [{"tags": ["keep-*"]}],
    },
    {
        "name": "race",
        "repositories": ["e2e/race-*"],
        "mode": "enforce",
        "keep": [{"tags": ["build-*"], "newest": 2}],
    },
    {
        "name": "deployed",
        "repositories": ["e2e/deployed-*"],
        "mode": "enforce",
        "keep": [{"tags": ["*"], "newest": 1}],
    },
    {
        "name": "within",
        "repositories": ["e2e/within-*"],
        "mode": "dry-run",
        "keep": [{"tags": ["*"], "pushed_within": "7d"}],
    },
]


class Stacks:
    """One running stack per registry version, started on first use: 2.8.2's on DB 11,
    3.x's on a private redis-server (both use the default key prefix)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._running: dict[str, s.Stack] = {}
        self._servers: list[RedisServer] = []

    def get(self, binary: RegistryBinary) -> s.Stack:
        if binary.version not in self._running:
            redis_url = s.REDIS_URL
            if binary != DISTRIBUTION_2:
                server = RedisServer(free_port())
                server.start()
                self._servers.append(server)
                redis_url = server.url
            running = s.Stack(
                self._factory.mktemp(f"e2e-{binary.version}"),
                POLICIES,
                worker_concurrency=2,
                worker_args=("--without-mingle", "--without-gossip"),
                redis_url=redis_url,
                binary=binary,
            )
            self._running[binary.version] = running
            running.start()
        return self._running[binary.version]

    def stop(self) -> None:
        for running in self._running.values():
            running.stop()
        for server in self._servers:
            server.stop()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    made = Stacks(tmp_path_factory)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest, stacks: Stacks) -> s.Stack:
    """The stack of the test's registry version (2.8.2 unless it takes ``registry_binary``)."""
    binary: RegistryBinary = DISTRIBUTION_2
    if "registry_binary" in request.fixturenames:
        binary = request.getfixturevalue("registry_binary")
    return stacks.get(binary)


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
def state(stack: s.Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    client.close()


def unique(kind: str) -> str:
    return f"e2e/{kind}-{uuid.uuid4().hex[:8]}"


def manifest_status(images: ImageBuilder, repository: str, reference: str) -> int:
    response = images.client.head(
        f"/v2/{repository}/manifests/{reference}", headers={"Accept": oci.MANIFEST_ACCEPT}
    )
    return response.status_code


def assert_intact(images: ImageBuilder, image: PushedImage) -> None:
    """The image's manifest and every blob it references still answer 200."""
    assert manifest_status(images, image.repository, image.digest) == 200
    for blob in (image.config_digest, *image.layer_digests):
        response = images.client.head(f"/v2/{image.repository}/blobs/{blob}")
        assert response.status_code == 200, blob


def wait_gone(images: ImageBuilder, repository: str, reference: str, stack: s.Stack) -> None:
    try:
        s.wait_for(lambda: manifest_status(images, repository, reference) == 404, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{repository}@{reference} still there\n{stack.logs()}") from exc


def indexed_tags(state: redis.Redis, repository: str) -> dict[str, str]:
    return state.hgetall(f"regsweep:idx:{repository}:tags")  # type: ignore[return-value]


def finished_job(http: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = http.get(f"/api/v1/jobs/{job_id}", headers=s.API_HEADERS).json()
        return job if job["state"] in ("succeeded", "failed") else None

    return s.wait_for(done, timeout=timeout, step=0.1)


def post_job(http: httpx.Client, **body: Any) -> str:
    response = http.post("/api/v1/jobs", json=body, headers=s.API_HEADERS)
    assert response.status_code == 202, response.text
    assert response.json()["status_url"] == f"/api/v1/jobs/{response.json()['job_id']}"
    return str(response.json()["job_id"])


@ON_BOTH
def test_moved_tag_leaves_old_digest_deleted(stack: s.Stack, images: ImageBuilder) -> None:
    """A tag pushed twice to new digests: the superseded digest goes, the new image stays whole."""
    repository = unique("moved")
    first = images.image(repository, "v1")
    second = images.image(repository, "v1")
    wait_gone(images, repository, first.digest, stack)
    assert_intact(images, second)
    assert manifest_status(images, repository, "v1") == 200


def test_superseded_digest_waits_for_its_grace_then_goes(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis
) -> None:
    """With `delete_after: 3s` the old digest survives the push's prune and goes once 3 s pass."""
    repository = unique("grace")
    first = images.image(repository, "v1")
    second = images.image(repository, "v1")
    moved = time.monotonic()
    s.wait_for(lambda: indexed_tags(state, repository).get("v1") == second.digest)
    time.sleep(1.0)
    assert manifest_status(images, repository, first.digest) == 200, "deleted before its grace"
    wait_gone(images, repository, first.digest, stack)
    assert time.monotonic() - moved >= 2.5
    assert_intact(images, second)


@ON_BOTH
def test_push_out_of_newest_prunes_right_after(stack: s.Stack, images: ImageBuilder) -> None:
    """The push that displaces a tag out of `newest: 2` gets the oldest build pruned."""
    repository = unique("newest")
    builds = [images.image(repository, f"build-{n}") for n in (1, 2)]
    assert manifest_status(images, repository, builds[0].digest) == 200
    third = images.image(repository, "build-3")
    wait_gone(images, repository, builds[0].digest, stack)
    assert manifest_status(images, repository, "build-1") == 404
    for kept in (builds[1], third):
        assert_intact(images, kept)


@ON_BOTH
def test_github_pull_request_closed_deletes_its_tags(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client, state: redis.Redis
) -> None:
    """A signed pull_request closed hook deletes `pr-{number}` only; a restore job puts it back."""
    repository = unique("ci")
    pr = images.image(repository, "pr-42")
    main = images.image(repository, "main")
    s.wait_for(lambda: {"pr-42", "main"} <= set(indexed_tags(state, repository)))
    body = payloads.github_pull_request("closed", merged=False, number=42)
    headers = payloads.github_headers(s.GITHUB_SECRET, body, "pull_request")
    response = http.post("/hooks/github", content=body, headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    wait_gone(images, repository, pr.digest, stack)
    assert manifest_status(images, repository, "pr-42") == 404
    assert_intact(images, main)
    job_id = post_job(http, kind="restore", repository=repository, digest=pr.digest)
    job = finished_job(http, job_id)
    assert job["state"] == "succeeded", job
    assert job["restored"][0]["tags"] == ["pr-42"]
    assert manifest_status(images, repository, "pr-42") == 200
    assert_intact(images, pr)


def test_gitlab_branch_delete_removes_branch_tags(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client, state: redis.Redis
) -> None:
    """A GitLab Push Hook whose `after` is all zeros deletes the `{branch}` tag."""
    repository = unique("ci")
    review = images.image(repository, "review")
    main = images.image(repository, "main")
    s.wait_for(lambda: {"review", "main"} <= set(indexed_tags(state, repository)))
    body = payloads.gitlab_push(ref="refs/heads/review")
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": s.GITLAB_TOKEN,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
    }
    response = http.post("/hooks/gitlab", content=body, headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    wait_gone(images, repository, review.digest, stack)
    assert_intact(images, main)


def test_api_prune_and_sweep_jobs_finish_with_counts(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client, state: redis.Redis
) -> None:
    """POST prune and sweep jobs → 202; each job ends succeeded with its plan and counts."""
    repository = unique("api")
    images.image(repository, "keep-1")
    drop = images.image(repository, "drop-1")
    s.wait_for(lambda: "drop-1" in indexed_tags(state, repository))
    prune = finished_job(http, post_job(http, kind="prune", repository=repository))
    assert prune["state"] == "succeeded", prune
    assert prune["repository"] == repository and prune["mode"] == "dry-run"
    assert prune["plan"]["tags_removed"] == 1 and prune["executed"] is False
    assert manifest_status(images, repository, drop.digest) == 200, "dry-run wrote nothing"
    sweep = finished_job(http, post_job(http, kind="sweep"), timeout=60)
    assert sweep["state"] == "succeeded", sweep
    assert repository in sweep["repositories"]
    assert sweep["counts"]["repositories"] == len(sweep["repositories"])
    assert sweep["counts"]["tags_planned"] >= 1
    assert len(sweep["children"]) == len(sweep["repositories"])


def test_transient_registry_outage_is_retried(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client
) -> None:
    """A prune that meets a stopped registry is retried, and succeeds once it is back; the
    succeeded job shows no error left from its retries."""
    assert stack.registry is not None
    repository = unique("api")
    images.image(repository, "keep-1")
    stack.registry.stop()
    try:
        job_id = post_job(http, kind="prune", repository=repository)

        def retrying() -> bool:
            response = http.get(f"/api/v1/jobs/{job_id}", headers=s.API_HEADERS)
            assert response.status_code == 200, response.text
            return any("retrying" in e for e in response.json().get("errors", []))

        s.wait_for(retrying, timeout=30, step=0.2)
    finally:
        stack.registry.start()
    job = finished_job(http, job_id, timeout=60)
    assert job["state"] == "succeeded", job
    assert job["plan"]["tags_kept"] == 1
    assert job["errors"] == [] and job["waiting"] is None, job


def test_metrics_include_worker_counters(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client
) -> None:
    """/metrics shows the workers' deletions, job states and registry latency next to events."""
    repository = unique("moved")
    first = images.image(repository, "v1")
    images.image(repository, "v1")
    wait_gone(images, repository, first.digest, stack)

    def scraped() -> str | None:
        text = http.get("/metrics").text
        return (
            text if 'regsweep_deletions_total{policy="moved",reason="untagged"}' in text else None
        )

    text = s.wait_for(scraped, timeout=10)
    assert 'regsweep_worker_jobs_total{kind="prune",state="succeeded"}' in text
    assert 'regsweep_registry_request_duration_seconds_bucket{le="+Inf",method="DELETE"' in text
    assert 'regsweep_events_total{outcome="accepted",source="registry"}' in text


def test_service_and_worker_log_json_without_secrets(stack: s.Stack) -> None:
    """serve and worker log JSON lines, and no configured secret appears in any log."""
    assert stack.service is not None and stack.worker is not None
    logs = {"serve": stack.service.log.read_text(), "worker": stack.worker.log()}
    for name, text in logs.items():
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert records, f"no JSON log lines from {name}"
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
        for secret in s.SECRETS:
            assert secret not in text
    service_log = stack.service.log.read_text()
    assert "/hooks/registry enabled" in service_log


def _quiet(state: redis.Redis, repository: str) -> bool:
    """No prune of ``repository`` waiting or running."""
    keys = (f"regsweep:pending:prune:{repository}", f"regsweep:lock:prune:{repository}")
    return not any(state.exists(k) for k in keys)


def _audited(state: redis.Redis, repository: str) -> set[str]:
    """Digests the workers' audit stream records a deletion intent for, in ``repository``."""
    found = set()
    entries = cast(list[tuple[str, dict[str, str]]], state.xrange("regsweep:audit"))
    for _, fields in entries:
        if "entry" in fields:
            entry = json.loads(fields["entry"])
            if entry["repository"] == repository:
                found.add(entry["digest"])
    return found


def test_back_to_back_pushes_never_cost_the_newest_builds(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis
) -> None:
    """Three builds pushed back to back, `newest: 2`, a worker taking events and prunes in
    one process: the oldest goes, and in no round is a newer one deleted, whatever order
    the events and prunes run in (once, a prune reading the registry live dated unrecorded
    tags by their build and deleted the middle one)."""
    for _ in range(5):
        repository = unique("race")
        builds = [images.image(repository, f"build-{n}") for n in (1, 2, 3)]
        wait_gone(images, repository, builds[0].digest, stack)
        s.wait_for(partial(_quiet, state, repository), timeout=30)
        for kept in builds[1:]:
            assert_intact(images, kept)
        assert _audited(state, repository) == {builds[0].digest}


def test_the_cli_decides_from_the_pushes_the_service_recorded(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis, tmp_path: Any
) -> None:
    """With redis.url set, `regsweep plan` uses the notified push times: an image built a month
    ago but pushed now is kept by `pushed_within: 7d`; one whose notified push is a month old
    is not. The plan names the source."""
    repository = unique("within")
    # ``old`` first, listed by the workers before ``pr-7`` exists: a month-old push time for
    # it must not contradict a listing of regsweep's that lacked it (such a time is doubted).
    images.image(repository, "old")
    s.wait_for(lambda: bool(state.sismember("regsweep:reconciled", repository)))
    s.wait_for(partial(_quiet, state, repository), timeout=30)
    images.image(repository, "pr-7", created=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    s.wait_for(lambda: {"pr-7", "old"} <= set(indexed_tags(state, repository)))
    month_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).timestamp()
    state.hset(f"regsweep:idx:{repository}:pushed", "old", repr(month_ago))
    result = subprocess.run(
        [s.REGSWEEP, "plan", repository, "--json"],
        capture_output=True,
        text=True,
        env=stack.env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (plan,) = json.loads(result.stdout)
    assert [k["tag"] for k in plan["kept"]] == ["pr-7"]
    assert plan["kept"][0]["pushed"]["source"] == "notification"
    assert [d["tags"] for d in plan["deletions"]] == [["old"]]
    assert plan["deletions"][0]["pushed"]["old"]["source"] == "notification"


@ON_BOTH
def test_an_index_pushed_by_digest_keeps_what_it_lists(
    stack: s.Stack, images: ImageBuilder, state: redis.Redis
) -> None:
    """A multi-arch index deployed by digest (no tag) lists the amd64 image whose own tag
    `newest: 1` removes: the notification of the digest-only push makes the worker keep the
    image (the tag goes as a tag only) and the index whole."""
    repository = unique("deployed")
    amd = images.image(repository, "amd64-v1")
    arm = images.image(repository, architecture="arm64")
    deployed = images.index(repository, [amd, arm])
    s.wait_for(lambda: state.hexists(f"regsweep:idx:{repository}:stored", deployed.digest))
    images.image(repository, "amd64-v2")
    s.wait_for(lambda: manifest_status(images, repository, "amd64-v1") == 404, timeout=30)
    s.wait_for(lambda: _quiet(state, repository), timeout=30)
    for part in (deployed.digest, amd.digest, arm.digest):
        assert manifest_status(images, repository, part) == 200, part


def test_a_tag_deleted_on_3x_is_notified_and_forgotten(
    registry_binary_3: RegistryBinary, stacks: Stacks
) -> None:
    """3.x deletes a tag alone (DELETE .../manifests/<tag>, by someone else than regsweep) and
    notifies it as a delete with the tag and no digest: the service accepts it and the
    workers' tag index forgets that tag, keeping the other tag on the same manifest."""
    stack = stacks.get(registry_binary_3)
    assert stack.registry is not None
    repository = unique("moved")
    state = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    with ImageBuilder.connect(stack.registry.url) as images:
        image = images.image(repository, ["a", "b"])
        s.wait_for(lambda: set(indexed_tags(state, repository)) == {"a", "b"})
        assert images.client.delete(f"/v2/{repository}/manifests/a").status_code == 202
        s.wait_for(
            lambda: set(indexed_tags(state, repository)) == {"b"},
            what="the tag index forgetting the deleted tag",
        )
        assert indexed_tags(state, repository)["b"] == image.digest
        assert_intact(images, image)
    state.close()


def test_healthz_shows_the_prune_a_real_worker_finished(
    stack: s.Stack, images: ImageBuilder, http: httpx.Client
) -> None:
    """After a worker's prune job succeeds, /healthz names it as the last successful prune,
    with Redis and the registry reachable."""
    repository = unique("api")
    images.image(repository, "keep-1")
    job_id = post_job(http, kind="prune", repository=repository)
    assert finished_job(http, job_id)["state"] == "succeeded"

    def shown() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get("/healthz").json()
        last = body["last_successful_prune"] or {}
        return body if last.get("job_id") == job_id else None

    body = s.wait_for(shown, timeout=10, step=0.2)
    assert body["last_successful_prune"]["repository"] == repository
    assert body["redis"]["ok"] is True and body["registry"]["ok"] is True
