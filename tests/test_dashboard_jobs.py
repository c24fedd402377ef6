"""The dashboard's deletions and records, as the workers carry them out: real 2.8.2 registry,
Redis DB 8 (flushed at the start and end of the module), Celery tasks run in this process.

A dashboard deletion is a prune whose plan holds only its request (a tag by name, or every
tag on a digest), confirmed by the fingerprint of its preview; a policy's own plan is kept
as the repository's view for the pages and the read API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import redis

from tests.conftest import SessionRegistries
from tests.harness import redisdb
from tests.harness import stack as s
from tests.harness.images import ImageBuilder
from tests.harness.registry import DISTRIBUTION_2
from tests.harness.workers import tasks_in_process
from worker import oci
from worker.queue import parking, tasks
from worker.queue.messages import job_message
from worker.records import Hold
from worker.settings.load import load_config
from worker.settings.model import Config

REDIS_URL = redisdb.url(8)
POLICY = {
    "name": "ui",
    "repositories": ["d/**"],
    "mode": "dry-run",
    "protect": ["latest"],
    "keep": [{"tags": ["keep-*"]}],
}


@pytest.fixture(scope="module")
def config(
    tmp_path_factory: pytest.TempPathFactory, session_registries: SessionRegistries
) -> Config:
    registry = session_registries.get(DISTRIBUTION_2)
    path = s.policy_file(
        tmp_path_factory.mktemp("dashboard-jobs") / "regsweep.yaml",
        registry.url,
        [POLICY],
        REDIS_URL,
    )
    return load_config(path, {})


@pytest.fixture(scope="module")
def broker(config: Config) -> Iterator[redis.Redis]:
    """DB 8 (flushed), the tasks' Celery app and per-process context made for ``config``."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    client.flushdb()
    with tasks_in_process(config):
        yield client
    client.flushdb()
    client.close()


def run_job(broker: redis.Redis, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Record a job as the service does, run its task here, return its record."""
    job_id = tasks.run(lambda ctx: ctx.state.create_job(kind, params))
    message = job_message(job_id, kind, params)
    tasks.prune.apply(kwargs=message.kwargs)
    return job(broker, job_id)


def job(broker: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = cast(dict[str, str], broker.hgetall(f"regsweep:job:{job_id}"))
    return {k: json.loads(v) for k, v in raw.items()}


def exists(images: ImageBuilder, repository: str, reference: str) -> bool:
    headers = {"Accept": oci.MANIFEST_ACCEPT}
    url = f"/v2/{repository}/manifests/{reference}"
    return images.client.head(url, headers=headers).status_code == 200


def audit_records(broker: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    ids = cast(list[str], broker.lrange(f"regsweep:audit:job:{job_id}", 0, -1))
    rows = [cast(list[Any], broker.xrange("regsweep:audit", i, i))[0] for i in ids]
    return [json.loads(row[1]["entry"]) for row in rows]


def test_deleting_one_of_two_tags_on_a_digest_removes_that_tag_only(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A delete of tag ``a`` whose digest ``b`` shares removes ``a`` as a tag only (audited,
    rule ``ui``), in a dry-run policy; ``b``, the image, and the tags retention alone would
    delete all stay."""
    repository = f"d/{repo_name}"
    shared = images.image(repository, ("a", "b"))
    other = images.image(repository, "drop-me")
    record = run_job(broker, "delete", {"repository": repository, "tags": ["a"], "by": "admin"})
    assert record["state"] == "succeeded", record
    assert record["counts"]["deleted"] == 1
    assert images.tags(repository) == ["b", "drop-me"]
    assert exists(images, repository, shared.digest) and exists(images, repository, other.digest)
    (entry,) = audit_records(broker, record["id"])
    assert (entry["action"], entry["tags"], entry["rule"]) == ("untag", ["a"], "ui")
    assert "dashboard by admin" in entry["reason"]


def test_deleting_a_digest_takes_every_tag_and_its_signature(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A delete of a digest removes the manifest with all its tags and its cosign signature;
    an image that is not asked for stays."""
    repository = f"d/{repo_name}"
    doomed = images.image(repository, ("x", "y"))
    signature = images.cosign(repository, doomed)
    kept = images.image(repository, "z")
    params = {"repository": repository, "digests": [doomed.digest]}
    record = run_job(broker, "delete", params)
    assert record["state"] == "succeeded", record
    assert not exists(images, repository, doomed.digest)
    assert not exists(images, repository, signature.digest)
    assert images.tags(repository) == ["z"] and exists(images, repository, kept.digest)
    actions = sorted(d["action"] for d in record["plan"]["listed"])
    assert actions == ["manifest", "referrer"]


def test_deleting_an_index_previews_then_takes_the_children_nothing_else_needs(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A multi-arch index asked for by digest: its preview (a dry run) lists the index and its
    own child, not the child a kept index shares, and deletes nothing; its run deletes what
    the preview listed, and every image the kept index needs stays whole."""
    repository = f"d/{repo_name}"
    shared = images.image(repository, architecture="arm64")
    own = images.image(repository)
    doomed = images.index(repository, [own, shared], "old")
    kept = images.index(repository, [images.image(repository), shared], "keep-new")
    params: dict[str, Any] = {"repository": repository, "digests": [doomed.digest]}
    preview = run_job(broker, "delete", params | {"dry_run": True})
    assert preview["state"] == "succeeded", preview
    listed = {(d["action"], d["digest"]) for d in preview["plan"]["listed"]}
    assert listed == {("manifest", doomed.digest), ("child", own.digest)}
    assert exists(images, repository, doomed.digest) and exists(images, repository, own.digest)
    record = run_job(broker, "delete", params)
    assert record["state"] == "succeeded", record
    assert {(d["action"], d["digest"]) for d in record["plan"]["listed"]} == listed
    assert not exists(images, repository, doomed.digest)
    assert not exists(images, repository, own.digest)
    assert exists(images, repository, shared.digest) and exists(images, repository, kept.digest)
    assert images.tags(repository) == ["keep-new"]


def test_protected_and_held_tags_are_kept_whatever_is_asked(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """Asked to delete a protected tag and a held one, the plan keeps both: nothing goes."""
    repository = f"d/{repo_name}"
    images.image(repository, "latest")
    images.image(repository, "pinned")
    hold = Hold("pinned", datetime(2999, 1, 1, tzinfo=UTC), "test")
    tasks.run(lambda ctx: ctx.index.hold(repository, hold))
    params = {"repository": repository, "tags": ["latest", "pinned"]}
    record = run_job(broker, "delete", params)
    assert record["state"] == "succeeded", record
    assert record["plan"]["deletions"] == 0
    assert images.tags(repository) == ["latest", "pinned"]


def test_a_run_whose_plan_changed_since_its_preview_deletes_nothing(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """The preview (a dry run) names a fingerprint; a tag pushed onto the digest before the
    run changes the plan, so the run fails saying so and deletes nothing; a run that matches
    its preview deletes."""
    repository = f"d/{repo_name}"
    image = images.image(repository, "x")
    params = {"repository": repository, "digests": [image.digest], "dry_run": True}
    preview = run_job(broker, "delete", params)
    assert preview["state"] == "succeeded" and preview["executed"] is False
    fingerprint = preview["plan"]["fingerprint"]
    images.tag(repository, image, "x2")
    changed = run_job(broker, "delete", params | {"dry_run": False, "expect": fingerprint})
    assert changed["state"] == "failed"
    assert "changed since its preview" in changed["errors"][0]
    assert exists(images, repository, image.digest)
    again = run_job(broker, "delete", params)
    run = run_job(
        broker, "delete", params | {"dry_run": False, "expect": again["plan"]["fingerprint"]}
    )
    assert run["state"] == "succeeded" and not exists(images, repository, image.digest)


def test_a_deletion_parked_by_the_window_stays_that_deletion(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """Deferred by a running window, a dashboard deletion is parked with its request, its
    requests-only scope and its preview's fingerprint, so the release deletes the same tag
    and nothing that retention alone would."""
    repository = f"d/{repo_name}"
    images.image(repository, ("a", "b"))
    images.image(repository, "drop-me")
    params = {"repository": repository, "tags": ["a"], "expect": None}
    job_id = tasks.run(lambda ctx: ctx.state.create_job("delete", params))
    broker.set("regsweep:maintenance", "gc")
    try:
        tasks.prune.apply(kwargs=job_message(job_id, "delete", params).kwargs)
    finally:
        broker.delete("regsweep:maintenance")
    assert job(broker, job_id)["state"] == "deferred"
    parked = json.loads(broker.hget("regsweep:deferred", job_id) or "{}")
    assert parked["requests_only"] is True and parked["requests"][0]["patterns"] == ["a"]
    released = tasks.run(parking.parked_prunes).prunes
    assert [p["job_id"] for p in released] == [job_id] and released[0]["requests_only"]
    broker.delete("prune")
    tasks.prune.apply(kwargs=released[0])
    assert job(broker, job_id)["state"] == "succeeded"
    assert images.tags(repository) == ["b", "drop-me"]


def test_a_policy_plan_is_kept_as_the_repository_view(
    broker: redis.Redis, images: ImageBuilder, repo_name: str
) -> None:
    """A dry-run prune keeps the view (verdicts, reasons, push evidence, sizes, signature
    folded under its subject) and the summary; a dashboard deletion does not replace it."""
    repository = f"d/{repo_name}"
    kept = images.image(repository, "keep-1")
    signature = images.cosign(repository, kept)
    images.image(repository, "old")
    record = run_job(broker, "prune", {"repository": repository, "dry_run": True})
    view = json.loads(broker.get(f"regsweep:view:{repository}") or "null")
    rows = {row["tag"]: row for row in view["tags"]}
    assert rows["keep-1"]["verdict"] == "keep" and rows["keep-1"]["rule"] == "keep[0]"
    assert rows["old"]["verdict"] == "delete" and rows["old"]["rule"] == "retention"
    manifest = json.loads(kept.raw)
    blobs = [manifest["config"], *manifest["layers"]]
    assert rows["keep-1"]["size"] == sum(b["size"] for b in blobs)
    assert rows["keep-1"]["pushed"]["source"] in ("first seen", "notification", "storage")
    sig_tag = next(t for t in rows if t.endswith(".sig"))
    assert rows[sig_tag]["subject"] == kept.digest
    assert view["manifests"][kept.digest]["referrers"] == [signature.digest]
    assert view["job_id"] == record["id"] and view["executed"] is False
    summary = json.loads(broker.hget("regsweep:views", repository) or "null")
    assert summary["tags"] == 3 and summary["tags_removed"] == 1 and summary["policy"] == "ui"
    run_job(broker, "delete", {"repository": repository, "tags": ["old"]})
    assert json.loads(broker.get(f"regsweep:view:{repository}") or "null")["job_id"] == record["id"]
