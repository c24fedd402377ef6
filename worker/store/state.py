"""State in Redis: delivery dedup keys, the dead-letter list, job records and CI events.

Every key starts with one prefix (default ``regsweep:``) so several
installations, or tests, can share a Redis without touching each other.
:class:`State` wraps ``redis.asyncio`` for the service; :class:`SyncState` is
the same over the blocking client for Celery tasks. Both raise only
:class:`~worker.errors.StateError`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import redis
import redis.asyncio as aioredis

from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.redis import async_client, server_of, text, wrapped

DEDUP_TTL: Final = timedelta(days=7)


JOB_TTL: Final = timedelta(days=7)


DEAD_LETTER_CAP: Final = 1000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DEFERRED = "deferred"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: Not run: outside the window, too late in it, or another GC already running.
    SKIPPED = "skipped"
    #: Its worker died mid-run; the maintenance recovery put the registry back.
    INTERRUPTED = "interrupted"


#: The recent-jobs index (``regsweep jobs``) keeps the newest this many job ids, each
#: for at most :data:`JOB_TTL` after its job was created.
RECENT_JOBS_CAP: Final = 1000


# KEYS: the job, the recent-jobs index, the newest job of its kind; ARGV: ttl, the
# creation time (epoch seconds), the job id, the index's cap, then field/value pairs.
# Creates the record unless it exists and adds it to the index, trimmed by age and to its
# cap, in the same step: a job exists only when it is listed. The newest job of each kind
# is kept apart too: a weekly GC must not fall out of ``status`` behind a thousand prunes.
_CREATE_JOB: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[2]) - tonumber(ARGV[1])))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[1])
return 1
"""


# KEYS: the job; ARGV: ttl, then field/value pairs. The update_job script that also
# answers the state the job had before (nil when the job is unknown).
_START_JOB: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local before = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return before
"""


# KEYS: the job; ARGV: ttl, the state it must be in (JSON), then field/value pairs. An
# update that only happens while the job is still in that state.
_UPDATE_IF_STATE: Final = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


# Only the bare minimum on a job record is written by the service; workers add
# counts, bytes, errors and a plan summary through update_job.
_UPDATE_IF_EXISTS: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


# Which deliveries (PER keys each: a delivery id, and for GitHub also the body's
# hash) are new: none of their keys is recorded, nor taken by an earlier delivery
# of the same call. Answers one character per delivery, "1" new, "0" seen (one
# string, not a list: redis-py parses a RESP array element by element, which cost
# more than the rest of the call). Reads only, unless values follow: then, when
# every delivery is new, the values are LPUSHed onto the last key and every key
# is recorded, in this one atomic step; otherwise nothing is left written. A
# delivery is never recorded without its message queued, so an answer lost on the
# way back (503) leaves either both (the retry is a duplicate of something queued)
# or neither (the retry is new). With values, each key is claimed by one SET NX (a
# key set here is deleted again when the call does not push), and the list's type
# is checked first: an LPUSH that fails after the SETs would leave them behind.
_DELIVER: Final = """
local per = tonumber(ARGV[3])
local pushing = #ARGV > 3
local n = pushing and #KEYS - 1 or #KEYS
if pushing then
  local kind = redis.call('TYPE', KEYS[n + 1]).ok
  if kind ~= 'list' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[n + 1] .. ' is not a list')
  end
end
local flags = {}
local taken = {}
local set = {}
local fresh = 0
for i = 1, n, per do
  local new = true
  for j = i, i + per - 1 do
    if pushing then
      if redis.call('SET', KEYS[j], ARGV[2], 'NX', 'EX', ARGV[1]) then
        set[#set + 1] = KEYS[j]
      else
        new = false
      end
    else
      if taken[KEYS[j]] or redis.call('EXISTS', KEYS[j]) == 1 then new = false end
      taken[KEYS[j]] = true
    end
  end
  if new then fresh = fresh + 1 end
  flags[#flags + 1] = new and '1' or '0'
end
if pushing then
  if fresh == #flags then
    redis.call('LPUSH', KEYS[n + 1], unpack(ARGV, 4))
  elseif #set > 0 then
    redis.call('DEL', unpack(set))
  end
end
return table.concat(flags)
"""


@dataclass(frozen=True)
class Push:
    """Values to LPUSH onto one list of one Redis server (named by :func:`server_of`)."""

    server: str
    key: str
    values: tuple[str, ...]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _dead_letter_entry(
    source: str, reason: str, body_excerpt: str, replay: Mapping[str, Any] | None
) -> tuple[str, str]:
    """A new dead letter's id and its JSON. ``replay`` (``{"kind", "params"}``) is the work
    ``regsweep replay ID`` asks for again; without it there is nothing to replay."""
    letter_id = uuid.uuid4().hex
    entry: dict[str, Any] = {
        "id": letter_id,
        "time": _now(),
        "source": source,
        "reason": reason,
        "body": body_excerpt,
    }
    if replay is not None:
        entry["replay"] = dict(replay)
    return letter_id, json.dumps(entry)


def _create_job_call(
    keys: Keys, kind: str, params: Mapping[str, Any], job_id: str | None = None
) -> tuple[str, list[str], list[str]]:
    """A new job's id, and the keys and arguments of the :data:`_CREATE_JOB` call."""
    created = datetime.now(UTC)
    job_id, fields = _new_job(kind, params, created, job_id)
    ttl = int(JOB_TTL.total_seconds())
    args = [str(ttl), repr(created.timestamp()), job_id, str(RECENT_JOBS_CAP)]
    args += [x for pair in fields.items() for x in pair]
    return job_id, [keys.job(job_id), keys.recent_jobs, keys.newest_job(kind)], args


def _new_job(
    kind: str, params: Mapping[str, Any], created: datetime, job_id: str | None = None
) -> tuple[str, dict[str, str]]:
    job_id = job_id or uuid.uuid4().hex
    now = created.isoformat()
    record = {
        "id": job_id,
        "kind": kind,
        "params": dict(params),
        "state": JobState.QUEUED.value,
        "created": now,
        "updated": now,
        "counts": {},
        "bytes": 0,
        "errors": [],
    }
    return job_id, _encode_fields(record)


def _encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in fields.items()}


def _decode_job(raw: Mapping[Any, Any]) -> dict[str, Any] | None:
    if not raw:
        return None
    return {text(key): json.loads(value) for key, value in raw.items()}


def _texts(values: Iterable[Any]) -> list[str]:
    return [text(v) for v in values]


def _update_args(fields: Mapping[str, Any]) -> list[str]:
    encoded = _encode_fields({**fields, "updated": _now()})
    flat = [item for pair in encoded.items() for item in pair]
    return [str(int(JOB_TTL.total_seconds())), *flat]


class State:
    """Dedup keys, dead letters and job records over ``redis.asyncio``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._update_job = client.register_script(_UPDATE_IF_EXISTS)
        self._create_job = client.register_script(_CREATE_JOB)
        self._start_job = client.register_script(_START_JOB)
        self._deliver = client.register_script(_DELIVER)
        self.server = server_of(client)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> State:
        return cls(async_client(url), prefix=prefix)

    async def aclose(self) -> None:
        with wrapped("redis close failed"):
            await self.client.aclose()

    async def ping(self) -> None:
        with wrapped("redis PING failed"):
            await self.client.ping()

    async def new_deliveries(
        self, keys: Sequence[str], *, per_delivery: int = 1, push: Push | None = None
    ) -> list[int]:
        """Positions (0-based) of the deliveries none of whose dedup keys is recorded.

        ``keys`` holds ``per_delivery`` keys (:meth:`StateKeys.delivery`) for each
        delivery; a key repeated in ``keys`` counts for its first delivery only.
        With ``push`` (for this state's own server): when every delivery is new,
        ``push`` is LPUSHed and every key recorded for :data:`DEDUP_TTL`, in one
        atomic step (the answer then lists every position); otherwise nothing is
        written and the caller publishes the new ones itself.
        """
        if not keys:
            return []
        args: list[str | int] = [int(DEDUP_TTL.total_seconds()), _now(), per_delivery]
        operation = "check deliveries"
        if push is not None:
            if push.server != self.server:
                raise ValueError(f"{push.key} is on {push.server}, not on {self.server}")
            if not push.values:
                raise ValueError(f"nothing to push onto {push.key}")
            keys = [*keys, push.key]
            args.extend(push.values)
            operation = "record deliveries and LPUSH"
        with wrapped(operation):
            flags = await self._deliver(keys=keys, args=args)
        if isinstance(flags, bytes):
            flags = flags.decode()
        return [position for position, flag in enumerate(flags) if flag == "1"]

    async def record_deliveries(self, keys: Iterable[str]) -> None:
        """Record deliveries whose messages went to a broker elsewhere (after they did)."""
        pipe = self.client.pipeline(transaction=True)
        for key in keys:
            pipe.set(key, _now(), ex=DEDUP_TTL)
        with wrapped("redis record deliveries failed"):
            await pipe.execute()

    async def dead_letter(
        self,
        source: str,
        reason: str,
        body_excerpt: str,
        *,
        replay: Mapping[str, Any] | None = None,
    ) -> str:
        """Keep an unusable delivery, or work that failed for good, for a person to look at
        (newest first, capped); its id (``regsweep replay ID`` when ``replay`` is given)."""
        letter_id, entry = _dead_letter_entry(source, reason, body_excerpt, replay)
        with wrapped("redis LPUSH dead letter failed"):
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(self.keys.dead_letters, entry)
            pipe.ltrim(self.keys.dead_letters, 0, DEAD_LETTER_CAP - 1)
            pipe.incr(self.keys.dead_letters_total)
            await pipe.execute()
        return letter_id

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with wrapped("redis LRANGE dead letters failed"):
            raw = await self.client.lrange(self.keys.dead_letters, 0, limit - 1)
        return [json.loads(item) for item in raw]

    async def find_dead_letters(self, given: str) -> list[dict[str, Any]]:
        """The kept dead letters whose id is ``given`` or starts with it (older entries,
        written before dead letters had ids, match nothing)."""
        found = [e for e in await self.dead_letters(DEAD_LETTER_CAP) if isinstance(e, dict)]
        exact = [e for e in found if e.get("id") == given]
        return exact or [e for e in found if str(e.get("id") or "").startswith(given)]

    async def claim_replay(self, letter_id: str, job_id: str) -> str | None:
        """Mark dead letter ``letter_id`` replayed as ``job_id``: None when this call did,
        else the job an earlier replay made (a request sent twice replays once)."""
        key = self.keys.replayed(letter_id)
        with wrapped("redis SET NX replay claim failed"):
            if await self.client.set(key, job_id, nx=True, ex=DEDUP_TTL):
                return None
            earlier = await self.client.get(key)
        return None if earlier is None else text(earlier)

    async def release_replay(self, letter_id: str) -> None:
        """Undo :meth:`claim_replay` when the replay could not be queued."""
        with wrapped("redis DEL replay claim failed"):
            await self.client.delete(self.keys.replayed(letter_id))

    async def claim_preview_run(self, preview_id: str, job_id: str) -> str | None:
        """Mark the dashboard's preview ``preview_id`` run as ``job_id``: None when this call
        did, else the job an earlier run made (``job_id`` itself when that claim is gone)."""
        key = self.keys.preview_run(preview_id)
        with wrapped("redis SET NX preview run claim failed"):
            if await self.client.set(key, job_id, nx=True, ex=JOB_TTL):
                return None
            earlier = await self.client.get(key)
        return job_id if earlier is None else text(earlier)

    async def release_preview_run(self, preview_id: str) -> None:
        """Undo :meth:`claim_preview_run` when the run could not be queued."""
        with wrapped("redis DEL preview run claim failed"):
            await self.client.delete(self.keys.preview_run(preview_id))

    async def record_ci_event(self, delivery_id: str, event: Mapping[str, Any]) -> None:
        """Keep a CI event as the workers received it, for ``regsweep replay DELIVERY``, as
        long as its delivery's dedup key (GitHub's and GitLab's redeliveries are duplicates
        meanwhile)."""
        record = json.dumps({"time": _now(), "event": dict(event)})
        with wrapped("redis SET CI event failed"):
            await self.client.set(self.keys.ci_event(delivery_id), record, ex=DEDUP_TTL)

    async def ci_event(self, delivery_id: str) -> dict[str, Any] | None:
        """The CI event recorded for ``delivery_id``, or None."""
        with wrapped("redis GET CI event failed"):
            raw = await self.client.get(self.keys.ci_event(delivery_id))
        record = None if raw is None else json.loads(raw)
        return record if isinstance(record, dict) else None

    async def create_job(
        self, kind: str, params: Mapping[str, Any], *, job_id: str | None = None
    ) -> str:
        """A new job record; with ``job_id``, the existing one when there is one (a task
        delivered again keeps the record of its first delivery)."""
        job_id, keys, args = _create_job_call(self.keys, kind, params, job_id)
        with wrapped("redis create job failed"):
            await self._create_job(keys=keys, args=args)
        return job_id

    async def start_job(self, job_id: str, **fields: Any) -> str | None:
        """Mark a job running (with ``fields``); the state it had before, None if unknown."""
        with wrapped("redis start job failed"):
            before = await self._start_job(
                keys=[self.keys.job(job_id)],
                args=_update_args({**fields, "state": JobState.RUNNING.value}),
            )
        return None if before is None else str(json.loads(before))

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        with wrapped("redis HGETALL job failed"):
            raw = await self.client.hgetall(self.keys.job(job_id))
        return _decode_job(raw)

    async def newest_job(self, kind: str) -> dict[str, Any] | None:
        """The newest job of ``kind`` still recorded, whatever the recent-jobs index holds."""
        with wrapped("redis GET newest job failed"):
            job_id = await self.client.get(self.keys.newest_job(kind))
        return None if job_id is None else await self.get_job(text(job_id))

    async def recent_jobs(
        self, limit: int = RECENT_JOBS_CAP, *, fields: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs first, from the recent-jobs index: whole records, or only
        ``fields`` (and ``id``). Ids whose record expired are skipped and dropped from the
        index."""
        wanted = ["id", *(f for f in fields if f != "id")] if fields else []
        found: dict[str, dict[str, Any]] = {}
        # Paged by score (creation time), not rank: ids removed or added meanwhile (by this
        # read or another) shift ranks, never scores.
        below: str = "+inf"
        while len(found) < limit:
            with wrapped("redis ZREVRANGEBYSCORE recent jobs failed"):
                rows = await self.client.zrevrangebyscore(
                    self.keys.recent_jobs, below, "-inf", 0, limit - len(found), withscores=True
                )
            if not rows:
                break
            ids = _texts(row[0] for row in rows)
            records = await self._jobs(ids, wanted)
            gone = [i for i, record in zip(ids, records, strict=True) if record is None]
            if gone:
                with wrapped("redis ZREM expired jobs failed"):
                    await self.client.zrem(self.keys.recent_jobs, *gone)
            found |= {i: r for i, r in zip(ids, records, strict=True) if r is not None}
            below = f"({float(rows[-1][1])!r}"
        return list(found.values())

    async def _jobs(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any] | None]:
        """The records of ``ids`` (only ``fields`` of each, when given); None where expired."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            if fields:
                pipe.hmget(self.keys.job(job_id), list(fields))
            else:
                pipe.hgetall(self.keys.job(job_id))
        with wrapped("redis read jobs failed"):
            answers = await pipe.execute()
        if not fields:
            return [_decode_job(raw) for raw in answers]
        return [
            None
            if values[0] is None
            else {f: json.loads(v) for f, v in zip(fields, values, strict=True) if v is not None}
            for values in answers
        ]

    async def job_ids_starting(self, prefix: str) -> list[str]:
        """The ids in the recent-jobs index that start with ``prefix`` (an abbreviated id)."""
        with wrapped("redis ZRANGE recent jobs failed"):
            ids = _texts(await self.client.zrange(self.keys.recent_jobs, 0, -1))
        return [i for i in ids if i.startswith(prefix)]

    async def update_job(self, job_id: str, **fields: Any) -> bool:
        """Set fields of an existing job and renew its TTL; False when the job is unknown."""
        with wrapped("redis update job failed"):
            result = await self._update_job(keys=[self.keys.job(job_id)], args=_update_args(fields))
        return bool(result)


class SyncState:
    """The same state over the blocking client, for Celery tasks."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._update_job = client.register_script(_UPDATE_IF_EXISTS)
        self._create_job = client.register_script(_CREATE_JOB)
        self._update_if_state = client.register_script(_UPDATE_IF_STATE)

    def queued_jobs(
        self, kind: str, *, created_by: datetime | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """(id, params) of the jobs of ``kind`` still queued, among the recent-jobs index's
        (those created by ``created_by`` only, when given)."""
        latest = "+inf" if created_by is None else repr(created_by.timestamp())
        with wrapped("redis read queued jobs failed"):
            ids = _texts(self.client.zrangebyscore(self.keys.recent_jobs, "-inf", latest))
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), ["kind", "state", "params"])
            rows = pipe.execute()
        wanted = (json.dumps(kind), json.dumps(JobState.QUEUED.value))
        return [
            (job_id, json.loads(params) if params else {})
            for job_id, (kind_, state, params) in zip(ids, rows, strict=True)
            if (text(kind_) if kind_ else None, text(state) if state else None) == wanted
        ]

    def update_if_queued(self, job_id: str, **fields: Any) -> bool:
        """:meth:`update_job` only while the job is still queued (not yet taken up)."""
        args = _update_args(fields)
        args.insert(1, json.dumps(JobState.QUEUED.value))
        with wrapped("redis update queued job failed"):
            return bool(self._update_if_state(keys=[self.keys.job(job_id)], args=args))

    def create_job(self, kind: str, params: Mapping[str, Any]) -> str:
        job_id, keys, args = _create_job_call(self.keys, kind, params)
        with wrapped("redis create job failed"):
            self._create_job(keys=keys, args=args)
        return job_id

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with wrapped("redis HGETALL job failed"):
            raw = self.client.hgetall(self.keys.job(job_id))
        return _decode_job(raw)

    def update_job(self, job_id: str, **fields: Any) -> bool:
        with wrapped("redis update job failed"):
            result = self._update_job(keys=[self.keys.job(job_id)], args=_update_args(fields))
        return bool(result)
