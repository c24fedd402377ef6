"""The audit log: intents durable before they return, settled after, readable after faults."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.harness import redisdb
from tests.harness.mounts import fill, read_only, small_tmpfs
from worker.errors import StateError
from worker.store.audit import (
    AuditEntry,
    AuditQuery,
    JsonlAuditLog,
    Outcome,
    RedisAuditLog,
    Settlement,
)
from worker.store.keys import Keys

pytestmark = pytest.mark.anyio


def entry(n: int, *, job: str = "j", digest: str | None = None) -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC),
        repository=f"team/r{n % 3}",
        digest=digest or "sha256:" + f"{n:064x}",
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=n,
        tags=(f"t{n}",),
        action="manifest",
        policy="p",
        rule="keep[0]",
        reason="older than the newest 10",
        job_id=job,
        manifest=b'{"schemaVersion":2}' + bytes([n % 256]),
    )


class CountingLog(JsonlAuditLog):
    """Counts the writes (each one fsync) that reach the file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0

    def _append(self, text: str) -> None:
        self.writes += 1
        super()._append(text)


def _sizes(entries: list[AuditEntry]) -> list[int]:
    return sorted(e.size for e in entries)


async def test_concurrent_intents_share_fsyncs_and_all_land(tmp_path: Path) -> None:
    """200 intents at once: every one is on disk, and they took far fewer writes than records."""
    log = CountingLog(tmp_path / "audit.jsonl")
    entries = [entry(n) for n in range(200)]
    await asyncio.gather(*(log.intend([e]) for e in entries))
    assert {e.id: e for e in await log.entries()} == {e.id: e for e in entries}
    assert 1 <= log.writes <= 10, log.writes  # not one fsync per record
    in_r1 = await log.entries(AuditQuery(repository="team/r1"))
    assert _sizes(in_r1) == [n for n in range(200) if n % 3 == 1]


async def test_intent_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    """One at a time, each intent is already in the file when its call returns."""
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    for n in range(3):
        await log.intend([entry(n)])
        assert len(path.read_text().splitlines()) == n + 1


async def test_settlements_give_each_record_its_last_outcome(tmp_path: Path) -> None:
    """A record reads as pending until settled, then with the outcome and detail of its last
    settlement."""
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    first, second = entry(1), entry(2)
    await log.intend([first, second])
    assert {e.outcome for e in await log.entries()} == {Outcome.PENDING}
    await log.settle([Settlement.of(first, Outcome.DELETED, "answer lost; a HEAD shows it gone")])
    await log.settle([Settlement.of(second, Outcome.NOT_DONE, "registry is read-only")])
    outcomes = {e.id: (e.outcome, e.detail) for e in await log.entries()}
    assert outcomes == {
        first.id: (Outcome.DELETED, "answer lost; a HEAD shows it gone"),
        second.id: (Outcome.NOT_DONE, "registry is read-only"),
    }
    assert await log.deleted(first.repository, [first.digest, second.digest]) == {first.digest}
    unsettled = entry(3 * 7 + 1)  # same repository, never settled
    await log.intend([unsettled])
    asked = [first.digest, second.digest, unsettled.digest]
    assert await log.deleted(first.repository, asked) == {first.digest, unsettled.digest}


async def test_queries_filter_by_repository_digest_prefix_job_and_time(tmp_path: Path) -> None:
    """``audit`` filters: repository, a digest or its 12-digit prefix, job, since."""
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    digest = "sha256:" + "ab" * 32
    target = entry(4, job="job-a", digest=digest)
    await log.intend([target, entry(5, job="job-b"), entry(7, job="job-a")])
    assert [e.id for e in await log.entries(AuditQuery(digest="abababababab"))] == [target.id]
    assert [e.id for e in await log.entries(AuditQuery(digest=digest[:19]))] == [target.id]
    assert _sizes(await log.entries(AuditQuery(job_id="job-a"))) == [4, 7]
    both = AuditQuery(job_id="job-a", repository="team/r1")
    assert _sizes(await log.entries(both)) == [4, 7]
    later = AuditQuery(since=datetime.now(UTC) + timedelta(minutes=1))
    assert await log.entries(later) == []


async def test_a_torn_line_is_skipped_reported_and_the_next_append_starts_a_new_line(
    tmp_path: Path,
) -> None:
    """A half-written line (a full disk mid-append) spoils only itself: reading skips it and
    names its line number, and the next record does not glue onto it."""
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    await log.intend([entry(1)])
    with path.open("a") as fh:
        fh.write(entry(2).to_json()[:40])  # torn: no newline
    await log.intend([entry(3)])
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert _sizes(await log.entries()) == [1, 3]
    assert [p.line for p in log.problems] == [2]
    path.write_text(path.read_text() + "a line from someone else\n")
    assert _sizes(await log.entries()) == [1, 3]
    assert [p.line for p in log.problems] == [2, 4]


async def test_records_written_before_intents_existed_read_as_deletions(tmp_path: Path) -> None:
    """Old records (written after their DELETE, with one ``parent``) still read, as deleted."""
    path = tmp_path / "audit.jsonl"
    old = json.loads(entry(1).to_json())
    for key in ("record", "id", "parents"):
        old.pop(key)
    old["parent"] = "sha256:" + "cd" * 32
    path.write_text(json.dumps(old) + "\n")
    (read,) = await JsonlAuditLog(path).entries()
    assert read.outcome is Outcome.DELETED
    assert read.parents == ("sha256:" + "cd" * 32,)
    assert read.manifest == entry(1).manifest


async def test_a_failed_write_fails_every_intent_of_its_batch_and_the_log_recovers(
    tmp_path: Path,
) -> None:
    """The log's path is a directory: every waiting intent raises StateError naming the file;
    once the path is usable, the next intents are written."""
    path = tmp_path / "audit.jsonl"
    path.mkdir()
    log = JsonlAuditLog(path)
    results = await asyncio.gather(
        *(log.intend([entry(n)]) for n in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, StateError) for r in results), results
    assert str(path) in str(results[0])
    path.rmdir()
    await asyncio.gather(*(log.intend([entry(n)]) for n in range(20, 25)))
    assert _sizes(await log.entries()) == [20, 21, 22, 23, 24]


async def test_a_full_disk_refuses_the_intent_and_the_file_stays_readable(tmp_path: Path) -> None:
    """On a real full file system (a tiny tmpfs) an intent raises StateError and leaves nothing
    of itself behind (no record of a deletion never attempted); what was written before stays
    readable, and once there is room again the next intent is written."""
    with small_tmpfs(tmp_path / "disk") as disk:
        log = JsonlAuditLog(disk / "audit.jsonl")
        await log.intend([entry(1)])
        fill(disk)
        big = entry(2)
        with pytest.raises(StateError, match=r"audit\.jsonl"):
            await log.intend([big] * 20)
        assert 1 in _sizes(await log.entries())
        (disk / "filler").unlink()
        await log.intend([entry(3)])
        assert _sizes(await log.entries()) == [1, 3]


async def test_a_read_only_directory_refuses_the_first_intent(tmp_path: Path) -> None:
    """A read-only audit directory (as root too) refuses the intent with the path named."""
    with read_only(tmp_path / "ro") as directory:
        log = JsonlAuditLog(directory / "audit.jsonl")
        with pytest.raises(StateError, match="Read-only file system"):
            await log.intend([entry(1)])
        assert not os.path.exists(directory / "audit.jsonl")


async def test_a_cancelled_caller_does_not_stop_the_others(tmp_path: Path) -> None:
    """An intent whose caller is cancelled mid-write is still written, and the intents
    waiting with it are answered."""
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    first = asyncio.create_task(log.intend([entry(0)]))
    others = [asyncio.create_task(log.intend([entry(n)])) for n in range(1, 5)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(*others)
    assert _sizes(await log.entries()) == [0, 1, 2, 3, 4]


# --- the Redis stream ------------------------------------------------------------------


@pytest.fixture
async def redis_log() -> AsyncIterator[RedisAuditLog]:
    client = aioredis.Redis.from_url(redisdb.url(12))
    prefix = f"test-audit-{uuid.uuid4().hex}:"
    yield RedisAuditLog(client, keys=Keys(prefix))
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_redis_audit_round_trips_and_settles(redis_log: RedisAuditLog) -> None:
    """Intents come back intact (raw bytes included), then with their settled outcomes, by a
    full read, by job and by digest prefix; ``deleted`` answers from the settled ones."""
    done = entry(1, job="job-1", digest="sha256:" + "d1" * 32)
    spared, other = entry(4, job="job-1"), entry(7, job="job-2")
    await redis_log.intend([done, spared])
    await redis_log.intend([other])
    await redis_log.settle(
        [Settlement.of(done, Outcome.DELETED), Settlement.of(spared, Outcome.NOT_DONE)]
    )
    everything = {e.id: e for e in await redis_log.entries()}
    assert everything[done.id].manifest == done.manifest
    assert everything[done.id].outcome is Outcome.DELETED
    assert everything[other.id].outcome is Outcome.PENDING
    by_job = await redis_log.entries(AuditQuery(job_id="job-1"))
    assert {(e.id, e.outcome) for e in by_job} == {
        (done.id, Outcome.DELETED),
        (spared.id, Outcome.NOT_DONE),
    }
    prefix = done.digest.partition(":")[2][:12]
    found = await redis_log.entries(AuditQuery(repository=done.repository, digest=prefix))
    assert [(e.id, e.outcome) for e in found] == [(done.id, Outcome.DELETED)]
    asked = [done.digest, spared.digest, other.digest]
    # ``other`` was set out to be deleted and never settled: evidence too, once it is gone.
    assert await redis_log.deleted(done.repository, asked) == {done.digest, other.digest}
    assert await redis_log.entries(AuditQuery(since=datetime.now(UTC) + timedelta(minutes=1))) == []


async def test_redis_audit_down_refuses_the_intent() -> None:
    """An unreachable Redis refuses the intent with StateError naming the stream."""
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        with pytest.raises(StateError, match="redis stream regsweep:audit"):
            await RedisAuditLog(client).intend([entry(1)])
    finally:
        await client.aclose()
