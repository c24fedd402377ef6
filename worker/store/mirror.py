"""The audit and the holds kept in a file too, so that losing Redis's data does not lose them.

With ``redis.url`` and ``audit.path`` both set, every audit record (intents
and settlements) is appended, fsynced, to the JSONL file before it goes to
the Redis stream, and so is every hold put or ended. Redis stays the audit
everything reads; the file is read when Redis has nothing:

- :class:`MirroredAuditLog`: a query Redis answers with no record (a Redis
  restarted without persistence, or flushed) is answered from the file, so
  ``restore`` (API, CLI or worker) still finds the deletion and its bytes; a
  query for a digest reads both (deletions of it before and after a loss);
- :class:`MirroredTagIndex`: when the ``installation`` key is missing (set
  once, never expiring: Redis lost its data, or this is its first use), the
  holds still in force are put back from the file before any plan reads
  them, so a tag ``restore`` put back is not deleted again.

What is not rebuilt is said in docs/operations.md ("What lives only in Redis").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import redis.asyncio as aioredis

from worker.records import Hold
from worker.store.audit import (
    AuditEntry,
    AuditProblem,
    AuditQuery,
    JsonlAuditLog,
    RedisAuditLog,
    Restoration,
    Settlement,
)
from worker.store.history import RepositoryHistory
from worker.store.keys import DEFAULT_PREFIX
from worker.store.redis import wrapped
from worker.store.tagindex import TagIndex

log = logging.getLogger("regsweep.audit")

EVERYTHING: Final = AuditQuery()
HOLD: Final = "hold"
UNHOLD: Final = "unhold"


class MirroredAuditLog:
    """The Redis audit, with every record appended to the JSONL file first."""

    def __init__(self, primary: RedisAuditLog, mirror: JsonlAuditLog) -> None:
        self.primary = primary
        self.mirror = mirror
        self.location = f"{primary.location} and {mirror.location}"

    @property
    def problems(self) -> list[AuditProblem]:
        return self.mirror.problems

    async def intend(self, entries: Sequence[AuditEntry]) -> None:
        # Both durable before any DELETE: the file first, so a record Redis took is always
        # in the file too.
        await self.mirror.intend(entries)
        await self.primary.intend(entries)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        await self.mirror.settle(settlements)
        await self.primary.settle(settlements)

    async def mark_restored(self, restorations: Sequence[Restoration]) -> None:
        # In the file too: after a Redis loss, the next restore of the digest must not put
        # back again what this one already did.
        await self.mirror.mark_restored(restorations)
        await self.primary.mark_restored(restorations)

    async def entries(self, query: AuditQuery = EVERYTHING) -> list[AuditEntry]:
        found = await self.primary.entries(query)
        if found and query.digest is None:
            return found
        # Nothing in Redis: never recorded, or Redis lost it. The file knows which. For a
        # digest (what restore asks) both, always: a digest deleted again after a Redis
        # loss has its earlier deletions in the file only, and restore puts back the tags
        # of every one. A record in both is taken from the file, written first.
        kept = await self.mirror.entries(query)
        ids = {entry.id for entry in kept}
        return kept + [entry for entry in found if entry.id not in ids]

    async def deleted(self, repository: str, digests: Iterable[str]) -> set[str]:
        # Only Redis: a referrer whose subject's deletion Redis forgot is kept, never
        # deleted on evidence that would take a read of the whole file per plan.
        return await self.primary.deleted(repository, digests)


class MirroredTagIndex(TagIndex):
    """The tag index, its holds also appended to the audit file and rebuilt from it."""

    def __init__(
        self, redis: aioredis.Redis, mirror: JsonlAuditLog, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        super().__init__(redis, prefix=prefix)
        self.mirror = mirror

    async def hold(self, repository: str, hold: Hold) -> None:
        record = {"record": HOLD, "time": _now(), "repository": repository, "tag": hold.tag}
        until = hold.until.isoformat()
        await self.mirror.note([record | {"until": until, "reason": hold.reason}])
        await super().hold(repository, hold)

    async def unhold(self, repository: str, tag: str) -> bool:
        record = {"record": UNHOLD, "time": _now(), "repository": repository, "tag": tag}
        await self.mirror.note([record])
        return await super().unhold(repository, tag)

    async def snapshot(self, repository: str) -> RepositoryHistory:
        await self.ensure_holds()
        return await super().snapshot(repository)

    async def all_holds(self) -> dict[str, list[Hold]]:
        await self.ensure_holds()
        return await super().all_holds()

    async def ensure_holds(self) -> int:
        """Put back the holds in force from the file when Redis lost its data; how many."""
        marker = self.keys.installation
        with wrapped("cannot read the installation mark"):
            if await self._redis.exists(marker):
                return 0
        if not await asyncio.to_thread(self.mirror.path.exists):
            # Nothing to rebuild from here: a process that cannot see the file must not mark
            # the holds rebuilt for the ones that can (it is written at the first hold).
            return 0
        holds = held_in(await asyncio.to_thread(self.mirror.notes, frozenset({HOLD, UNHOLD})))
        for (repository, _), hold in sorted(holds.items()):
            await super().hold(repository, hold)
        mark = json.dumps({"since": _now(), "holds_rebuilt": len(holds)})
        with wrapped("cannot set the installation mark"):
            await self._redis.set(marker, mark, nx=True)
        if holds:
            log.warning(
                "Redis had no installation mark (it lost its data, or is new): %d holds in "
                "force put back from %s",
                len(holds),
                self.mirror.location,
            )
        return len(holds)


def held_in(
    records: Sequence[dict[str, Any]], now: datetime | None = None
) -> dict[tuple[str, str], Hold]:
    """The holds that ``records`` (hold and unhold, oldest first) leave in force at ``now``."""
    now = now or datetime.now(UTC)
    held: dict[tuple[str, str], Hold] = {}
    for record in records:
        try:
            key = (str(record["repository"]), str(record["tag"]))
            if record.get("record") == UNHOLD:
                held.pop(key, None)
                continue
            until = datetime.fromisoformat(str(record["until"]))
            held[key] = Hold(key[1], until, str(record.get("reason", "")))
        except (KeyError, ValueError, TypeError):
            continue  # not a record this version wrote; the audit read reports such lines
    return {key: hold for key, hold in held.items() if hold.active(now)}


def _now() -> str:
    return datetime.now(UTC).isoformat()
