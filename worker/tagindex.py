"""The tag index in Redis: what push notifications told regsweep about each repository.

Per repository it keeps tag → digest, when each tag was pushed as regsweep saw
it, and which digests lost their last tag and since when (the ``untagged``
grace starts there). Push events update it atomically with a Lua script, so
two workers applying events for one repository never lose an "untagged" mark.
It is the :class:`~worker.inventory.TagHistory` the planner's push times come
from, and the tag source of incremental (event-driven) plans.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.errors import StateError
from worker.model import Digest

DEFAULT_PREFIX: Final = "regsweep:"

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

# KEYS: tags, pushed, untagged; ARGV: digest ('' for none), tag ('' for none), now
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
end
return removed
"""


def _ts(moment: datetime) -> str:
    return repr(moment.timestamp())


def _dt(value: str | bytes) -> datetime:
    text = value.decode() if isinstance(value, bytes) else value
    return datetime.fromtimestamp(float(text), UTC)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TagIndex:
    """Async Redis tag index; every Redis failure surfaces as :class:`StateError`."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix
        self._push = redis.register_script(_PUSH)
        self._delete = redis.register_script(_DELETE)

    def _keys(self, repository: str) -> tuple[str, str, str]:
        base = f"{self._prefix}idx:{repository}:"
        return base + "tags", base + "pushed", base + "untagged"

    @property
    def _repos_key(self) -> str:
        return f"{self._prefix}idx:repos"

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except RedisError as exc:
            raise StateError(f"tag index: {exc}") from exc

    async def record_push(
        self, repository: str, tag: str, digest: str, at: datetime
    ) -> Digest | None:
        """Record ``tag`` → ``digest``; returns the digest the tag left, if it moved."""
        keys = [*self._keys(repository), self._repos_key]
        old = await self._call(self._push(keys=keys, args=[repository, tag, digest, _ts(at)]))
        if old is None or _text(old) == digest:
            return None
        return Digest(_text(old))

    async def record_delete(
        self, repository: str, *, digest: str | None, tag: str | None, at: datetime
    ) -> list[str]:
        """A manifest (all its tags) or one tag was deleted; returns the tags removed."""
        args = [digest or "", tag or "", _ts(at)]
        removed = await self._call(self._delete(keys=list(self._keys(repository)), args=args))
        return [_text(t) for t in removed]

    async def reconcile(self, repository: str, live: Mapping[str, Digest], at: datetime) -> None:
        """Make the index agree with the live registry after a sweep read it."""
        tags_key, pushed_key, untagged_key = self._keys(repository)
        known = await self.tags(repository)
        gone = [t for t in known if t not in live]
        left = {d for t, d in known.items() if t in gone or live.get(t) != d}
        orphaned = left - set(live.values())
        pipe = self._redis.pipeline(transaction=True)
        if gone:
            pipe.hdel(tags_key, *gone)
            pipe.hdel(pushed_key, *gone)
        if live:
            pipe.hset(tags_key, mapping={str(t): str(d) for t, d in live.items()})
            pipe.hdel(untagged_key, *set(live.values()))
        for digest in orphaned:
            pipe.hsetnx(untagged_key, digest, _ts(at))
        pipe.sadd(self._repos_key, repository)
        await self._call(pipe.execute())

    async def tags(self, repository: str) -> dict[str, Digest]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[0]))
        return {_text(k): Digest(_text(v)) for k, v in cast(dict[Any, Any], raw).items()}

    async def pushed_at(self, repository: str) -> Mapping[str, datetime]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[1]))
        return {_text(k): _dt(v) for k, v in cast(dict[Any, Any], raw).items()}

    async def untagged_since(self, repository: str) -> Mapping[Digest, datetime]:
        raw = await self._call(self._redis.hgetall(self._keys(repository)[2]))
        return {Digest(_text(k)): _dt(v) for k, v in cast(dict[Any, Any], raw).items()}

    async def forget_untagged(self, repository: str, digests: list[str]) -> None:
        """Drop untagged marks once those manifests are deleted (or found gone)."""
        if digests:
            await self._call(self._redis.hdel(self._keys(repository)[2], *digests))

    async def repositories(self) -> list[str]:
        raw = await self._call(self._redis.smembers(self._repos_key))
        return sorted(_text(r) for r in cast(set[Any], raw))

    async def knows(self, repository: str) -> bool:
        return bool(await self._call(self._redis.sismember(self._repos_key, repository)))
