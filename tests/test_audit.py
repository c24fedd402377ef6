"""The JSONL audit log: every record durable before ``record`` returns, written in group commits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.audit import AuditEntry, JsonlAuditLog
from worker.errors import StateError

pytestmark = pytest.mark.anyio


def entry(n: int) -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC),
        repository=f"team/r{n % 3}",
        digest="sha256:" + f"{n:064x}",
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=n,
        tags=(f"t{n}",),
        action="manifest",
        policy="p",
        rule="keep[0]",
        reason="older than the newest 10",
        job_id="j",
        manifest=b'{"schemaVersion":2}' + bytes([n % 256]),
    )


class CountingLog(JsonlAuditLog):
    """Counts the writes (each one fsync) that reach the file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0

    def _append(self, lines: str) -> None:
        self.writes += 1
        super()._append(lines)


async def test_concurrent_records_share_fsyncs_and_all_land_in_order(tmp_path: Path) -> None:
    """200 records at once: every one is on disk, in the order ``record`` was called, and
    they took far fewer writes than records."""
    log = CountingLog(tmp_path / "audit.jsonl")
    entries = [entry(n) for n in range(200)]
    await asyncio.gather(*(log.record(e) for e in entries))
    assert await log.entries() == entries
    assert 1 <= log.writes <= 10, log.writes  # not one fsync per record
    assert await log.entries(repository="team/r1") == [e for e in entries if e.size % 3 == 1]


async def test_each_record_is_written_before_it_returns(tmp_path: Path) -> None:
    """One at a time, each record is already in the file when its call returns."""
    path = tmp_path / "audit.jsonl"
    log = JsonlAuditLog(path)
    for n in range(3):
        await log.record(entry(n))
        assert len(path.read_text().splitlines()) == n + 1


async def test_a_failed_write_fails_every_record_of_its_batch_and_the_log_recovers(
    tmp_path: Path,
) -> None:
    """The log's path is a directory: every waiting record raises StateError (none is
    reported written); once the path is usable, the next records are written."""
    path = tmp_path / "audit.jsonl"
    path.mkdir()
    log = JsonlAuditLog(path)
    results = await asyncio.gather(
        *(log.record(entry(n)) for n in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, StateError) for r in results), results
    assert "cannot write audit log" in str(results[0])
    path.rmdir()
    await asyncio.gather(*(log.record(entry(n)) for n in range(20, 25)))
    assert [e.size for e in await log.entries()] == [20, 21, 22, 23, 24]


async def test_a_cancelled_caller_does_not_stop_the_others(tmp_path: Path) -> None:
    """A record whose caller is cancelled mid-write is still written, and the records
    waiting with it are answered."""
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    first = asyncio.create_task(log.record(entry(0)))
    others = [asyncio.create_task(log.record(entry(n))) for n in range(1, 5)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(*others)
    assert [e.size for e in await log.entries()] == [0, 1, 2, 3, 4]
