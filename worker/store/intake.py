"""The bound on jobs ``POST /api/v1/jobs`` accepted and no worker has started yet.

Without it, whoever holds the API token can queue jobs as fast as Redis takes
them (10,000 in 3 s), every one kept and every one run. So each accepted
job's id goes into a sorted set of all queued API jobs and one of its API
client (the token, by its configuration key: never the token or a hash of
it), in one atomic step that first checks both sizes: past either bound the
request gets 429 and nothing is recorded.

A job leaves the sets lazily: when a set is full, the ids in it whose job is
no longer ``queued`` (a worker started it, it ended, its record expired, or
it was reserved and never recorded) are dropped, at most once a second per
set, so a flood at the bound costs one Redis call per request, not a scan.
A job a worker sends back to ``queued`` later (a busy repository, a retry) is
not counted again: the bound is on what the API lets in, and that job is in.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Final, cast

from worker.errors import QueueFull
from worker.store.redis import text, wrapped
from worker.store.state import JOB_TTL, JobState, State

#: What a 429 asks a client to wait (``Retry-After``): about what a few prunes take.
RETRY_AFTER_SECONDS: Final = 30
#: A set found full is cleaned of started jobs at most this often.
CLEAN_EVERY_SECONDS: Final = 1.0
#: An id reserved this long ago without a job record was never recorded (a failed submit).
RESERVATION_GRACE: Final = timedelta(seconds=30)

# KEYS: all queued API jobs, this client's; ARGV: bound of all, bound of the client, now,
# job id, ttl. Answers 0 when the id was added to both, else which bound was hit (1 the
# client's, 2 all) and how many it holds.
_RESERVE: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[5]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[5]))
local mine = redis.call('ZCARD', KEYS[2])
if mine >= tonumber(ARGV[2]) then return {1, mine} end
local all = redis.call('ZCARD', KEYS[1])
if all >= tonumber(ARGV[1]) then return {2, all} end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return {0, 0}
"""

_QUEUED: Final = json.dumps(JobState.QUEUED.value).encode()


class JobIntake:
    """Admits API jobs within ``total`` queued in all and ``per_client`` per API client."""

    def __init__(self, state: State, *, total: int, per_client: int) -> None:
        self.state = state
        self.total = total
        self.per_client = per_client
        self._reserve = state.client.register_script(_RESERVE)
        self._cleaned: dict[str, float] = {}

    async def admit(self, client: str) -> str:
        """A new job id, counted as queued; :class:`QueueFull` past a bound."""
        job_id = uuid.uuid4().hex
        hit, held = await self._try(client, job_id)
        if hit and await self._clean(client, hit):
            hit, held = await self._try(client, job_id)
        if hit == 1:
            raise QueueFull(
                f"{held} jobs of this API token are queued (at most {self.per_client}): "
                "retry once workers have started some",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if hit == 2:
            raise QueueFull(
                f"{held} jobs are queued (at most {self.total}): retry once workers have "
                "started some",
                retry_after=RETRY_AFTER_SECONDS,
            )
        return job_id

    async def release(self, client: str, job_id: str) -> None:
        """Uncount a job that was not queued after all (its submit failed)."""
        keys = self.state.keys
        with wrapped("cannot release a queued job's place"):
            pipe = self.state.client.pipeline(transaction=False)
            pipe.zrem(keys.queued_jobs, job_id)
            pipe.zrem(keys.queued_jobs_of(client), job_id)
            await pipe.execute()

    async def _try(self, client: str, job_id: str) -> tuple[int, int]:
        keys = self.state.keys
        args: list[str | int | float] = [
            self.total,
            self.per_client,
            time.time(),
            job_id,
            int(JOB_TTL.total_seconds()),
        ]
        with wrapped("cannot count the queued jobs"):
            hit, held = await self._reserve(
                keys=[keys.queued_jobs, keys.queued_jobs_of(client)], args=args
            )
        return int(hit), int(held)

    async def _clean(self, client: str, hit: int) -> bool:
        """Drop the ids of the full set whose job is no longer waiting; whether any went."""
        keys = self.state.keys
        key = keys.queued_jobs_of(client) if hit == 1 else keys.queued_jobs
        now = time.monotonic()
        if now - self._cleaned.get(key, float("-inf")) < CLEAN_EVERY_SECONDS:
            return False
        self._cleaned[key] = now
        with wrapped("cannot clean the queued jobs"):
            rows = cast(
                list[tuple[bytes, float]],
                await self.state.client.zrange(key, 0, -1, withscores=True),
            )
            ids = [text(member) for member, _ in rows]
            pipe = self.state.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job(job_id), "state")
            states = await pipe.execute()
            young = time.time() - RESERVATION_GRACE.total_seconds()
            done = [
                job_id
                for job_id, (_, score), state in zip(ids, rows, states, strict=True)
                if (state is None and score < young) or (state is not None and state != _QUEUED)
            ]
            if done:
                pipe = self.state.client.pipeline(transaction=False)
                pipe.zrem(keys.queued_jobs, *done)
                pipe.zrem(keys.queued_jobs_of(client), *done)
                await pipe.execute()
        return bool(done)
