"""The Redis tag index: push/delete bookkeeping that push times and untagged grace rest on."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from tests.harness import redisdb
from worker.audit import AuditEntry, RedisAuditLog
from worker.errors import StateError
from worker.model import Digest
from worker.tagindex import TagIndex

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)
A, B, C = (Digest(f"sha256:{c * 64}") for c in "abc")


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redisdb.url(12))
    yield client
    await client.aclose()


@pytest.fixture
async def index(redis_client: aioredis.Redis) -> AsyncIterator[TagIndex]:
    prefix = f"test-{uuid.uuid4().hex}:"
    yield TagIndex(redis_client, prefix=prefix)
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


async def test_push_records_tag_and_push_time(index: TagIndex) -> None:
    """A push maps the tag to its digest and remembers when regsweep saw it."""
    assert await index.record_push("r", "v1", A, T0) is None
    assert await index.tags("r") == {"v1": A}
    assert await index.pushed_at("r") == {"v1": T0}
    assert await index.repositories() == ["r"]


async def test_moved_tag_marks_old_digest_untagged_only_when_no_tag_is_left(
    index: TagIndex,
) -> None:
    """Moving a tag leaves its old digest untagged, unless another tag still points at it."""
    await index.record_push("r", "latest", A, T0)
    await index.record_push("r", "v1", A, T0)
    assert await index.record_push("r", "latest", B, T0 + timedelta(minutes=1)) == A
    assert await index.untagged_since("r") == {}
    await index.record_push("r", "v1", C, T0 + timedelta(minutes=2))
    assert await index.untagged_since("r") == {A: T0 + timedelta(minutes=2)}


async def test_repush_of_untagged_digest_clears_the_mark(index: TagIndex) -> None:
    """A digest tagged again is no longer a candidate for untagged deletion."""
    await index.record_push("r", "t", A, T0)
    await index.record_push("r", "t", B, T0)
    await index.record_push("r", "u", A, T0 + timedelta(seconds=5))
    assert await index.untagged_since("r") == {}


async def test_delete_by_digest_removes_every_tag_on_it(index: TagIndex) -> None:
    """A manifest delete drops all its tags, as the registry does, and its untagged mark."""
    await index.record_push("r", "a", A, T0)
    await index.record_push("r", "b", A, T0)
    await index.record_push("r", "c", B, T0)
    removed = await index.record_delete("r", digest=A, tag=None, at=T0)
    assert sorted(removed) == ["a", "b"]
    assert await index.tags("r") == {"c": B}


async def test_tag_delete_without_digest_marks_last_tag_untagged(index: TagIndex) -> None:
    """A 3.x tag delete (no digest in the event) leaves the digest untagged if it was the last."""
    await index.record_push("r", "only", A, T0)
    await index.record_delete("r", digest=None, tag="only", at=T0 + timedelta(hours=1))
    assert await index.untagged_since("r") == {A: T0 + timedelta(hours=1)}


async def test_reconcile_adopts_live_state(index: TagIndex) -> None:
    """A sweep's live view replaces stale entries and marks digests nothing tags any more."""
    await index.record_push("r", "old", A, T0)
    await index.record_push("r", "keep", B, T0)
    await index.reconcile("r", {"keep": B, "new": C}, T0 + timedelta(hours=2))
    assert await index.tags("r") == {"keep": B, "new": C}
    assert await index.untagged_since("r") == {A: T0 + timedelta(hours=2)}
    assert "old" not in await index.pushed_at("r")


async def test_redis_down_is_a_state_error() -> None:
    """An unreachable Redis surfaces as StateError, never a redis exception."""
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        with pytest.raises(StateError):
            await TagIndex(client).tags("r")
    finally:
        await client.aclose()


async def test_redis_audit_stream_round_trips(redis_client: aioredis.Redis) -> None:
    """Audit entries, raw manifest bytes included, come back from the stream intact."""
    key = f"test-audit-{uuid.uuid4().hex}"
    log = RedisAuditLog(redis_client, key=key)
    entry = AuditEntry(
        time=datetime.now(UTC),
        repository="r",
        digest=A,
        media_type="m",
        size=3,
        tags=("x",),
        action="manifest",
        policy="p",
        rule="keep[0]",
        reason="old",
        job_id="j",
        manifest=b"\x00{}",
    )
    try:
        await log.record(entry)
        assert await log.entries(repository="r") == [entry]
        assert await log.entries(repository="other") == []
        assert await log.entries(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    finally:
        await redis_client.delete(key)
