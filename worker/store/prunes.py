"""What the prune queue keeps in Redis beside its messages: a repository's pending prune (pushes
coalesce into it), its scheduled grace prune, whether it was read live once, the prunes parked
while a maintenance window runs, each sweep's tally of its prunes, the last prune that
succeeded, and how far the dead letters have been told."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

import redis.asyncio as aioredis

from worker.store.keys import Keys
from worker.store.redis import text, wrapped

#: A queued prune marks its repository pending until it starts; pushes meanwhile
#: coalesce into it. Short, because a prune lost with Redis (its mark left behind)
#: would otherwise swallow the pushes that follow for this long.
PENDING_TTL: Final = timedelta(seconds=60)
#: How long a sweep's tally of its per-repository prunes is kept.
SWEEP_TTL: Final = timedelta(days=7)

# KEYS: tally, done set; ARGV: ttl, child id, then field/amount pairs.
# Idempotent per child: a redelivered prune does not count twice.
_CHILD_FINISHED: Final = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then return -1 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
local left = redis.call('HINCRBY', KEYS[1], 'remaining', -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return left
"""

# KEYS: the parked prunes; ARGV: field/value pairs as read. Forgets each entry that is
# still what was read: one parked again meanwhile (by a prune that met a new window)
# carries a new ``parked`` mark and stays.
_UNPARK: Final = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return gone
"""

# KEYS: the dead-letter counter, the notified mark. Moves the mark up to the counter and
# answers both, atomically: two ticks at once never tell the same dead letters twice.
_DEAD_LETTERS_SEEN: Final = """
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if total > seen then redis.call('SET', KEYS[2], total) end
return {seen, total}
"""


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


class PruneRecords:
    """The prune queue's records of one installation (``keys``) in Redis; every failure a
    :class:`~worker.errors.StateError` saying what could not be done."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def claim_pending(self, repository: str) -> bool:
        """True when no prune of ``repository`` is already waiting: coalesces bursts of pushes."""
        with wrapped("cannot mark a pending prune"):
            mark = self.keys.pending(repository)
            return bool(await self.client.set(mark, "1", nx=True, px=_ms(PENDING_TTL)))

    async def clear_pending(self, repository: str) -> None:
        with wrapped("redis clear pending failed"):
            await self.client.delete(self.keys.pending(repository))

    async def schedule_grace(self, repository: str, delay: timedelta) -> bool:
        """True when no grace prune of ``repository`` is scheduled yet (then one is, for
        ``delay``)."""
        with wrapped("redis SET NX scheduled failed"):
            mark = self.keys.scheduled(repository)
            return bool(await self.client.set(mark, "1", nx=True, px=_ms(delay)))

    async def reconciled(self, repository: str) -> bool:
        """Whether ``repository`` was read live once (its index then knows every tag)."""
        with wrapped("redis SISMEMBER failed"):
            return bool(await self.client.sismember(self.keys.reconciled, repository))

    async def mark_reconciled(self, repository: str) -> None:
        with wrapped("redis SADD failed"):
            await self.client.sadd(self.keys.reconciled, repository)

    async def park(self, field: str, entry: Mapping[str, object]) -> None:
        """Keep a parked prune under ``field`` (its job's id)."""
        with wrapped(f"cannot defer the prune of {entry.get('repository')}"):
            await self.client.hset(self.keys.deferred, field, json.dumps(entry))

    async def parked(self) -> dict[str, str]:
        """Every parked entry, as stored (field -> JSON)."""
        with wrapped("cannot read the deferred prunes"):
            raw = await self.client.hgetall(self.keys.deferred)
        return {text(f): text(v) for f, v in raw.items()}

    async def unpark(self, entries: Mapping[str, str]) -> None:
        """Forget parked entries that are still what was read (not parked anew since)."""
        if not entries:
            return
        args = [x for pair in entries.items() for x in pair]
        script = self.client.register_script(_UNPARK)
        with wrapped("redis forget parked prunes failed"):
            await script(keys=[self.keys.deferred], args=args)

    async def open_sweep(self, sweep_id: str, prunes: int) -> None:
        """Open the tally of a sweep whose ``prunes`` prunes are about to run."""
        tally = self.keys.sweep(sweep_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(tally, "remaining", prunes)
        pipe.expire(tally, SWEEP_TTL)
        with wrapped("redis open sweep tally failed"):
            await pipe.execute()

    async def sweep_prune_finished(
        self, sweep_id: str, child_id: str, counts: Mapping[str, int]
    ) -> dict[str, int] | None:
        """Add a finished prune to its sweep; the sweep's totals once the last one is in."""
        script = self.client.register_script(_CHILD_FINISHED)
        args: list[str | int] = [int(SWEEP_TTL.total_seconds()), child_id]
        for field, amount in counts.items():
            args += [field, amount]
        tally = [self.keys.sweep(sweep_id), self.keys.sweep_done(sweep_id)]
        with wrapped("redis tally failed"):
            left = await script(keys=tally, args=args)
        if int(left) != 0:
            return None
        with wrapped("redis HGETALL tally failed"):
            raw = await self.client.hgetall(self.keys.sweep(sweep_id))
        totals = {text(f): int(v) for f, v in raw.items()}
        totals.pop("remaining", None)
        return totals

    async def prune_succeeded(self, job_id: str, repository: str) -> None:
        """Record the last prune job that succeeded, for ``/healthz`` and its metric."""
        at = datetime.now(UTC).isoformat()
        record = {"time": at, "job_id": job_id, "repository": repository}
        with wrapped("redis SET last prune failed"):
            await self.client.set(self.keys.last_prune, json.dumps(record))

    async def dead_letters_seen(self) -> tuple[int, int]:
        """(dead letters told before, dead letters now), the mark moved up to now."""
        script = self.client.register_script(_DEAD_LETTERS_SEEN)
        keys = [self.keys.dead_letters_total, self.keys.notified_dead_letters]
        with wrapped("redis dead letters seen failed"):
            seen, total = await script(keys=keys)
        return int(seen), int(total)
