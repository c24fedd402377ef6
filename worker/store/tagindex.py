"""The tag index in Redis: what push notifications told regsweep about each repository.

Per repository it keeps tag → digest, when each tag was pushed as regsweep saw
it, and which digests lost their last tag and since when (the ``untagged``
grace starts there). Push events update it atomically with a Lua script, so
two workers applying events for one repository never lose an "untagged" mark.
It is the Redis :class:`~worker.store.history.History`: the push times, sightings,
holds and untagged marks plans decide on, for the workers and the CLI alike,
and the tag source of incremental (event-driven) plans.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis

from worker.engine.evidence import CLOCK_SKEW, Sighting
from worker.engine.model import Digest, Hold
from worker.store.history import RepositoryHistory
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.redis import text, wrapped

T = TypeVar("T")

# KEYS: tags, pushed, untagged, repos; ARGV: repository, tag, digest, now
_PUSH = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[1])
if old and old ~= ARGV[3] then
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    if v == old then return old end
  end
  redis.call('HSET', KEYS[3], old, ARGV[4])
end
return old
"""

# KEYS: tags, pushed, untagged, stored; ARGV: digest ('' for none), tag ('' for none), now
_DELETE = """
local removed = {}
if ARGV[2] ~= '' then
  local d = redis.call('HGET', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
  if d then
    local still = false
    for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
      if v == d then still = true end
    end
    if not still and d ~= ARGV[1] then redis.call('HSET', KEYS[3], d, ARGV[3]) end
  end
  table.insert(removed, ARGV[2])
end
if ARGV[1] ~= '' then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[1] then
      redis.call('HDEL', KEYS[1], all[i])
      redis.call('HDEL', KEYS[2], all[i])
      table.insert(removed, all[i])
    end
  end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return removed
"""

# A listing that started at ARGV[2] and finished at ARGV[3] showed the tag/digest pairs
# from ARGV[5] on. KEYS: tags, pushed, untagged, seen, listed, repos; ARGV[1]: repository.
# An older listing that finishes after a newer one changes nothing: the newer counted.
# A tag notified as pushed since ARGV[4] (the listing's start, less clock skew) may be
# missing from it or shown on its previous digest, pushed while the listing was read:
# the index keeps what the notification said.
_LISTING = """
local last = redis.call('GET', KEYS[5])
if last and tonumber(ARGV[2]) < tonumber(last) then return 0 end
local live, still = {}, {}
for i = 5, #ARGV, 2 do
  live[ARGV[i]] = ARGV[i + 1]
  still[ARGV[i + 1]] = true
end
local seen = redis.call('HGETALL', KEYS[4])
local known = {}
for i = 1, #seen, 2 do known[seen[i]] = string.match(seen[i + 1], '^([^|]*)') end
for tag, _ in pairs(known) do
  if not live[tag] then redis.call('HDEL', KEYS[4], tag) end
end
for tag, digest in pairs(live) do
  if known[tag] ~= digest then
    local since = digest .. '|' .. (last or '')
    redis.call('HSET', KEYS[4], tag, since .. '|' .. ARGV[3] .. '|' .. ARGV[2])
  end
end
local notified = redis.call('HGETALL', KEYS[2])
local fresh = {}
for i = 1, #notified, 2 do
  if tonumber(notified[i + 1]) >= tonumber(ARGV[4]) then fresh[notified[i]] = true end
end
local indexed = redis.call('HGETALL', KEYS[1])
for i = 1, #indexed, 2 do
  if fresh[indexed[i]] then still[indexed[i + 1]] = true end
end
for i = 1, #indexed, 2 do
  local tag, digest = indexed[i], indexed[i + 1]
  if fresh[tag] then
    -- pushed while the listing was read: the notification is the newer word
  elseif live[tag] ~= digest then
    redis.call('HDEL', KEYS[2], tag)
    if not live[tag] then redis.call('HDEL', KEYS[1], tag) end
    if not still[digest] then redis.call('HSETNX', KEYS[3], digest, ARGV[3]) end
  end
end
for tag, digest in pairs(live) do
  if not fresh[tag] then redis.call('HSET', KEYS[1], tag, digest) end
  redis.call('HDEL', KEYS[3], digest)
end
redis.call('SET', KEYS[5], ARGV[2])
redis.call('SADD', KEYS[6], ARGV[1])
return 1
"""


def _ts(moment: datetime) -> str:
    return repr(moment.timestamp())


def _dt(value: str | bytes) -> datetime:
    text = value.decode() if isinstance(value, bytes) else value
    return datetime.fromtimestamp(float(text), UTC)


def _times(raw: Mapping[Any, Any]) -> dict[str, datetime]:
    """A hash of timestamps, without the values that are no time a datetime can hold (a
    poisoned event once stored year 10000): skipping one keeps its tag unknown, and
    unknown keeps; failing on it would stop every prune of the repository."""
    out: dict[str, datetime] = {}
    for key, value in raw.items():
        try:
            out[text(key)] = _dt(value)
        except (ValueError, OverflowError, OSError):
            continue
    return out


def _parsed(raw: Mapping[Any, Any], parse: Callable[[str, Any], T]) -> dict[str, T]:
    """Each entry of a hash parsed, the unreadable ones left out (as :func:`_times`)."""
    out: dict[str, T] = {}
    for key, value in raw.items():
        try:
            out[text(key)] = parse(text(key), value)
        except (ValueError, KeyError, TypeError, OverflowError, OSError):
            continue
    return out


def _sighting(value: str | bytes) -> Sighting:
    """``digest|earliest|latest|shown`` (``earliest`` empty: no earlier listing)."""
    digest, earliest, latest, *shown = text(value).split("|")
    return Sighting(
        Digest(digest),
        _dt(earliest) if earliest else None,
        _dt(latest),
        _dt(shown[0]) if shown and shown[0] else None,
    )


def _hold(tag: str, value: str | bytes) -> Hold:
    data = json.loads(value)
    return Hold(tag, _dt(str(data["until"])), str(data.get("reason", "")))


class TagIndex:
    """Async Redis tag index; every Redis failure surfaces as :class:`StateError`."""

    notified = True

    def __init__(self, redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self.keys = Keys(prefix)
        self._push = redis.register_script(_PUSH)
        self._delete = redis.register_script(_DELETE)
        self._listing = redis.register_script(_LISTING)

    def _keys(self, repository: str) -> tuple[str, str, str]:
        """The tag index proper: ``tags``, ``pushed``, ``untagged``."""
        index = self.keys.index
        return index(repository, "tags"), index(repository, "pushed"), index(repository, "untagged")

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        with wrapped("tag index"):
            return await awaitable

    async def record_push(
        self, repository: str, tag: str, digest: str, at: datetime
    ) -> Digest | None:
        """Record ``tag`` → ``digest``; returns the digest the tag left, if it moved."""
        keys = [*self._keys(repository), self.keys.indexed_repositories]
        old = await self._call(self._push(keys=keys, args=[repository, tag, digest, _ts(at)]))
        if old is None or text(old) == digest:
            return None
        return Digest(text(old))

    async def record_delete(
        self, repository: str, *, digest: str | None, tag: str | None, at: datetime
    ) -> list[str]:
        """A manifest (all its tags) or one tag was deleted; returns the tags removed."""
        args = [digest or "", tag or "", _ts(at)]
        keys = [*self._keys(repository), self.keys.index(repository, "stored")]
        removed = await self._call(self._delete(keys=keys, args=args))
        return [text(t) for t in removed]

    async def record_stored_index(self, repository: str, digest: str, at: datetime) -> None:
        """An index pushed by digest only: it protects what it lists until it is deleted."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.keys.index(repository, "stored"), digest, _ts(at))
        pipe.sadd(self.keys.indexed_repositories, repository)
        await self._call(pipe.execute())

    async def record_listing(
        self, repository: str, live: Mapping[str, Digest], started: datetime, finished: datetime
    ) -> None:
        """A live listing: new sightings, the index made to agree with it (tags gone dropped,
        moved tags' notified times dropped, digests left without a tag marked untagged)."""
        tags_key, pushed_key, untagged_key = self._keys(repository)
        keys = [
            tags_key,
            pushed_key,
            untagged_key,
            self.keys.index(repository, "seen"),
            self.keys.index(repository, "listed"),
            self.keys.indexed_repositories,
        ]
        args = [repository, _ts(started), _ts(finished), _ts(started - CLOCK_SKEW)]
        for tag, digest in live.items():
            args += [tag, digest]
        await self._call(self._listing(keys=keys, args=args))

    async def snapshot(self, repository: str) -> RepositoryHistory:
        """Everything remembered of ``repository``, in one round trip."""
        tags_key, pushed_key, untagged_key = self._keys(repository)
        pipe = self._redis.pipeline(transaction=False)
        for key in (tags_key, pushed_key, untagged_key, self.keys.index(repository, "seen")):
            pipe.hgetall(key)
        pipe.hkeys(self.keys.index(repository, "stored"))
        pipe.hgetall(self.keys.hold(repository))
        pipe.get(self.keys.index(repository, "listed"))
        tags, pushed, untagged, seen, stored, holds, listed = await self._call(pipe.execute())
        return RepositoryHistory(
            tags={text(k): Digest(text(v)) for k, v in tags.items()},
            pushed_at=_times(pushed),
            sightings=_parsed(seen, lambda _, v: _sighting(v)),
            untagged_since={Digest(k): v for k, v in _times(untagged).items()},
            stored_indexes=frozenset(Digest(text(d)) for d in stored),
            holds=_parsed(holds, _hold),
            listed_at=_dt(listed) if listed else None,
        )

    async def hold(self, repository: str, hold: Hold) -> None:
        value = json.dumps({"until": _ts(hold.until), "reason": hold.reason})
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.keys.hold(repository), hold.tag, value)
        pipe.sadd(self.keys.held_repositories, repository)
        await self._call(pipe.execute())

    async def unhold(self, repository: str, tag: str) -> bool:
        return bool(await self._call(self._redis.hdel(self.keys.hold(repository), tag)))

    async def holds_of(self, repository: str) -> list[Hold]:
        """The holds recorded on ``repository`` (ended ones included), by tag."""
        raw = await self._call(self._redis.hgetall(self.keys.hold(repository)))
        held = _parsed(cast(dict[Any, Any], raw), _hold)
        return [held[tag] for tag in sorted(held)]

    async def all_holds(self) -> dict[str, list[Hold]]:
        repos = sorted(
            text(r) for r in await self._call(self._redis.smembers(self.keys.held_repositories))
        )
        out: dict[str, list[Hold]] = {}
        for repository in repos:
            raw = await self._call(self._redis.hgetall(self.keys.hold(repository)))
            held = sorted((_hold(text(k), v) for k, v in raw.items()), key=lambda h: h.tag)
            if held:
                out[repository] = held
        return out

    async def tags(self, repository: str) -> dict[str, Digest]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[0]))
        return {text(k): Digest(text(v)) for k, v in cast(dict[Any, Any], raw).items()}

    async def pushed_at(self, repository: str) -> Mapping[str, datetime]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[1]))
        return _times(cast(dict[Any, Any], raw))

    async def untagged_since(self, repository: str) -> Mapping[Digest, datetime]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[2]))
        return {Digest(k): v for k, v in _times(cast(dict[Any, Any], raw)).items()}

    async def forget(self, repository: str, *, tags: Iterable[str], digests: Iterable[str]) -> None:
        """regsweep removed these tags and manifests: keep the index in step without waiting
        for the registry's own delete notifications."""
        now = datetime.now(UTC)
        for tag in tags:
            await self.record_delete(repository, digest=None, tag=tag, at=now)
        for digest in digests:
            await self.record_delete(repository, digest=digest, tag=None, at=now)

    async def repositories(self) -> list[str]:
        raw = await self._call(self._redis.smembers(self.keys.indexed_repositories))
        return sorted(text(r) for r in cast(set[Any], raw))
