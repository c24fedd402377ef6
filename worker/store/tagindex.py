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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis

from worker.clock import CLOCK_SKEW
from worker.oci import Digest
from worker.records import EvidenceSummary, Hold, Sighting
from worker.store.history import RepositoryHistory
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.redis import text, wrapped

T = TypeVar("T")

#: A delete's tombstone (its event's time and id, for the tag) is kept this long after a
#: listing no longer shows the tag: a push event delivered later than that is older than any
#: retry and is applied as new (the next listing puts the index right again).
TOMBSTONE_AGE: Final = timedelta(days=7)
#: Tags and digests :meth:`TagIndex.forget` forgets in one script call.
FORGET_BATCH: Final = 10_000

# Events are applied in the order of their registry time, then id, whatever order they
# come in (the events worker runs several processes, and the registry retries): each tag
# keeps the "time|id" of the newest event applied to it in ``versions`` (tombstones for
# deletes), and an event no newer changes nothing of that tag. So a late push never makes
# a tag older, nor puts it back on an image it has left, nor back after its delete.
# Index entries from before ``versions`` existed count with their pushed time.
# KEYS[1] is the tags hash, KEYS[2] pushed, KEYS[5] versions.
_NEWER = """
local function held(tag)
  local version = redis.call('HGET', KEYS[5], tag)
  if not version then
    local pushed = redis.call('HGET', KEYS[2], tag)
    if pushed then version = pushed .. '|' end
  end
  if not version then return nil, nil end
  local sep = string.find(version, '|', 1, true)
  return string.sub(version, 1, sep - 1), string.sub(version, sep + 1)
end
local function stale(tag, at, id)
  local hat, hid = held(tag)
  hat = tonumber(hat)
  return hat ~= nil and (at < hat or (at == hat and id ~= '' and id <= hid))
end
local function tagged(digest)
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    if v == digest then return true end
  end
  return false
end
"""

# KEYS: tags, pushed, untagged, repos, versions; ARGV: repository, tag, digest, at, event id
_PUSH = (
    _NEWER
    + """
local tag, digest, at, id = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
redis.call('SADD', KEYS[4], ARGV[1])
if stale(tag, at, id) then
  -- delivered late: the tag has moved on since; an image it left may be untagged now
  if not tagged(digest) then redis.call('HSETNX', KEYS[3], digest, (held(tag))) end
  return false
end
local old = redis.call('HGET', KEYS[1], tag)
redis.call('HSET', KEYS[1], tag, digest)
redis.call('HSET', KEYS[2], tag, ARGV[4])
redis.call('HSET', KEYS[5], tag, ARGV[4] .. '|' .. id)
redis.call('HDEL', KEYS[3], digest)
if old and old ~= digest and not tagged(old) then
  redis.call('HSET', KEYS[3], old, ARGV[4])
end
return old
"""
)

# KEYS: tags, pushed, untagged, stored, versions; ARGV: digest ('' for none), tag ('' for
# none), at, event id ('' for regsweep's own deletes, on its own clock: never ordered, no
# tombstone; the registry's notification of the same delete leaves one).
_DELETE = (
    _NEWER
    + """
local at, id = tonumber(ARGV[3]), ARGV[4]
local function gone(tag)
  if id ~= '' and stale(tag, at, id) then return false end
  redis.call('HDEL', KEYS[1], tag)
  redis.call('HDEL', KEYS[2], tag)
  if id ~= '' then redis.call('HSET', KEYS[5], tag, ARGV[3] .. '|' .. id) end
  return true
end
local removed = {}
if ARGV[2] ~= '' then
  local d = redis.call('HGET', KEYS[1], ARGV[2])
  if gone(ARGV[2]) then
    if d and d ~= ARGV[1] and not tagged(d) then redis.call('HSET', KEYS[3], d, ARGV[3]) end
    table.insert(removed, ARGV[2])
  end
end
if ARGV[1] ~= '' then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[1] and gone(all[i]) then table.insert(removed, all[i]) end
  end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return removed
"""
)

# regsweep removed tags and manifests (no registry event to order them by): the tags
# ARGV[3 .. 2 + ARGV[2]], then the digests after them and every tag still on one. A tag's
# digest left with no tag is marked untagged (ARGV[1]: the time), as _DELETE marks it; a
# forgotten digest leaves untagged and stored. One scan of the tags in all, where _DELETE
# per tag and per digest scans them each time (quadratic: 2,000 of each took a second).
# KEYS: tags, pushed, untagged, stored.
_FORGET = """
local n = tonumber(ARGV[2])
local forgotten, left, tagged = {}, {}, {}
for i = 3 + n, #ARGV do forgotten[ARGV[i]] = true end
for i = 3, 2 + n do
  local d = redis.call('HGET', KEYS[1], ARGV[i])
  if d then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    left[d] = true
  end
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if forgotten[all[i + 1]] then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], all[i])
  else
    tagged[all[i + 1]] = true
  end
end
for d in pairs(left) do
  if not forgotten[d] and not tagged[d] then redis.call('HSET', KEYS[3], d, ARGV[1]) end
end
for d in pairs(forgotten) do
  redis.call('HDEL', KEYS[3], d)
  redis.call('HDEL', KEYS[4], d)
end
return 1
"""

# A listing that started at ARGV[2] and finished at ARGV[3] showed the tag/digest pairs
# from ARGV[6] on. KEYS: tags, pushed, untagged, seen, listed, repos, versions; ARGV[1]:
# repository; ARGV[5]: the versions of tags neither live nor indexed (delete tombstones)
# older than this are forgotten (an event that late is older than any retry).
# An older listing that finishes after a newer one changes nothing: the newer counted.
# A tag notified as pushed since ARGV[4] (the listing's start, less clock skew) may be
# missing from it or shown on its previous digest, pushed while the listing was read:
# the index keeps what the notification said.
_LISTING = """
local last = redis.call('GET', KEYS[5])
if last and tonumber(ARGV[2]) < tonumber(last) then return 0 end
local live, still = {}, {}
for i = 6, #ARGV, 2 do
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
local versions = redis.call('HGETALL', KEYS[7])
for i = 1, #versions, 2 do
  local tag = versions[i]
  local at = tonumber(string.match(versions[i + 1], '^([^|]*)'))
  if not live[tag] and redis.call('HEXISTS', KEYS[1], tag) == 0
      and (at == nil or at < tonumber(ARGV[5])) then
    redis.call('HDEL', KEYS[7], tag)
  end
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


def _json_object(value: str | bytes | None) -> dict[str, Any] | None:
    try:
        data = json.loads(value) if value is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


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
        self._forget = redis.register_script(_FORGET)
        self._listing = redis.register_script(_LISTING)

    def _keys(self, repository: str) -> tuple[str, str, str]:
        """The tag index proper: ``tags``, ``pushed``, ``untagged``."""
        index = self.keys.index
        return index(repository, "tags"), index(repository, "pushed"), index(repository, "untagged")

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        with wrapped("tag index"):
            return await awaitable

    async def record_push(
        self, repository: str, tag: str, digest: str, at: datetime, event_id: str = ""
    ) -> Digest | None:
        """Record ``tag`` → ``digest`` pushed at ``at`` (the registry's time of the event
        ``event_id``); returns the digest the tag left, if it moved. An event older than
        the newest applied to the tag changes nothing (see ``_NEWER``)."""
        keys = [*self._keys(repository), self.keys.indexed_repositories, self._versions(repository)]
        args = [repository, tag, digest, _ts(at), event_id]
        old = await self._call(self._push(keys=keys, args=args))
        if not old or text(old) == digest:
            return None
        return Digest(text(old))

    async def record_delete(
        self,
        repository: str,
        *,
        digest: str | None,
        tag: str | None,
        at: datetime,
        event_id: str = "",
    ) -> list[str]:
        """A manifest (all its tags) or one tag was deleted; returns the tags removed. With
        ``event_id`` (a registry event), a tag pushed by a newer event stays."""
        args = [digest or "", tag or "", _ts(at), event_id]
        keys = [
            *self._keys(repository),
            self.keys.index(repository, "stored"),
            self._versions(repository),
        ]
        removed = await self._call(self._delete(keys=keys, args=args))
        return [text(t) for t in removed]

    def _versions(self, repository: str) -> str:
        return self.keys.index(repository, "versions")

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
            self._versions(repository),
        ]
        fresh, forgotten = started - CLOCK_SKEW, started - TOMBSTONE_AGE
        args = [repository, _ts(started), _ts(finished), _ts(fresh), _ts(forgotten)]
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
        for the registry's own delete notifications (one script per batch, :data:`_FORGET`).
        Their sightings end too (as the file history's do): a tag pushed again, or put back
        by a restore, before the next listing is a new push, not the one that listing saw."""
        now = _ts(datetime.now(UTC))
        tags_key, pushed_key, untagged_key = self._keys(repository)
        keys = [tags_key, pushed_key, untagged_key, self.keys.index(repository, "stored")]
        gone_tags, gone_digests = list(tags), list(digests)
        for start in range(0, max(len(gone_tags), len(gone_digests)), FORGET_BATCH):
            batch = gone_tags[start : start + FORGET_BATCH]
            args: list[str | float] = [now, len(batch), *batch]
            args += gone_digests[start : start + FORGET_BATCH]
            await self._call(self._forget(keys=keys, args=args))
        await self._end_sightings(repository, set(gone_tags), set(gone_digests))

    async def _end_sightings(self, repository: str, tags: set[str], digests: set[str]) -> None:
        seen_key = self.keys.index(repository, "seen")
        seen = await self._call(self._redis.hgetall(seen_key))
        ended = [
            tag
            for tag, value in ((text(k), text(v)) for k, v in seen.items())
            if tag in tags or value.partition("|")[0] in digests
        ]
        if ended:
            await self._call(self._redis.hdel(seen_key, *ended))

    async def record_evidence(self, summary: EvidenceSummary) -> None:
        """The registry's clock as the plan measured it, and what it doubted of the
        repository's registry times (an entry only while something is doubted)."""
        pipe = self._redis.pipeline(transaction=False)
        if summary.skew is not None:
            skew = summary.skew
            clock = {
                "low_seconds": skew.low.total_seconds(),
                "high_seconds": skew.high.total_seconds(),
                "measured_at": skew.measured_at.isoformat(),
            }
            pipe.set(self.keys.evidence_clock, json.dumps(clock))
        if summary.refused or summary.doubted:
            doubts = {
                "refused": summary.refused,
                "doubted": summary.doubted,
                "time": summary.at.isoformat(),
            }
            pipe.hset(self.keys.evidence_doubts, summary.repository, json.dumps(doubts))
        else:
            pipe.hdel(self.keys.evidence_doubts, summary.repository)
        await self._call(pipe.execute())

    async def evidence(self) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        """What :meth:`record_evidence` kept: the clock, and the doubts by repository (the
        unreadable entries left out)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self.keys.evidence_clock)
        pipe.hgetall(self.keys.evidence_doubts)
        clock, doubts = await self._call(pipe.execute())
        return _json_object(clock), {
            text(k): parsed for k, v in doubts.items() if (parsed := _json_object(v)) is not None
        }

    async def knows(self, repository: str) -> bool:
        """Whether the index has recorded anything of ``repository``."""
        known = self._redis.sismember(self.keys.indexed_repositories, repository)
        return bool(await self._call(known))

    async def repository_count(self) -> int:
        """How many repositories the index has recorded anything of (a set that only grows,
        so a reader can tell from it whether :meth:`repositories` changed)."""
        return int(await self._call(self._redis.scard(self.keys.indexed_repositories)))

    async def sizes(self, repositories: Sequence[str]) -> list[tuple[int, int]]:
        """(tags, holds) the index counts for each of ``repositories``, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for repository in repositories:
            pipe.hlen(self.keys.index(repository, "tags"))
            pipe.hlen(self.keys.hold(repository))
        counts = await self._call(pipe.execute())
        return [(int(t), int(h)) for t, h in zip(counts[::2], counts[1::2], strict=True)]

    async def repositories(self) -> list[str]:
        raw = await self._call(self._redis.smembers(self.keys.indexed_repositories))
        return sorted(text(r) for r in cast(set[Any], raw))
