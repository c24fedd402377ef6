"""The Redis tag index: push/delete bookkeeping that push times and untagged grace rest on."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from tests.harness import redisdb
from worker.errors import StateError
from worker.oci import Digest
from worker.records import Hold, Sighting
from worker.store.tagindex import TOMBSTONE_AGE, TagIndex

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)
A, B, C = (Digest(f"sha256:{c * 64}") for c in "abc")


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redisdb.url(6))
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


async def test_listing_adopts_live_state(index: TagIndex) -> None:
    """A live listing replaces stale entries, drops the notified time of a tag that moved, and
    marks digests nothing tags any more."""
    await index.record_push("r", "old", A, T0)
    await index.record_push("r", "keep", B, T0)
    await index.record_push("r", "moved", B, T0)
    later = T0 + timedelta(hours=2)
    await index.record_listing("r", {"keep": B, "moved": C, "new": C}, later, later)
    assert await index.tags("r") == {"keep": B, "moved": C, "new": C}
    assert await index.untagged_since("r") == {A: later}
    assert await index.pushed_at("r") == {"keep": T0}


async def test_listings_bound_when_each_tag_appeared(index: TagIndex) -> None:
    """The first listing knows only that its tags existed by its end; a tag that appears (or
    moves) by the next one was pushed after the first listing started."""
    first, first_end = T0, T0 + timedelta(seconds=2)
    await index.record_listing("r", {"a": A}, first, first_end)
    history = await index.snapshot("r")
    assert history.sightings == {"a": Sighting(A, None, first_end, first)}
    assert history.listed_at == first
    second, second_end = T0 + timedelta(hours=1), T0 + timedelta(hours=1, seconds=1)
    await index.record_listing("r", {"a": B, "b": C}, second, second_end)
    history = await index.snapshot("r")
    assert history.sightings == {
        "a": Sighting(B, first, second_end, second),
        "b": Sighting(C, first, second_end, second),
    }
    third = T0 + timedelta(hours=2)
    await index.record_listing("r", {"b": C}, third, third)
    assert (await index.snapshot("r")).sightings == {"b": Sighting(C, first, second_end, second)}


async def test_an_older_listing_finishing_late_changes_nothing(index: TagIndex) -> None:
    """Two listings overlap: the one that started first but finished last cannot move the
    evidence back (its view is older)."""
    newer = T0 + timedelta(minutes=5)
    await index.record_listing("r", {"a": A, "b": B}, newer, newer)
    await index.record_listing("r", {"a": A}, T0, newer + timedelta(seconds=1))
    history = await index.snapshot("r")
    assert set(history.sightings) == {"a", "b"}
    assert history.listed_at == newer


async def test_holds_are_kept_listed_and_ended(index: TagIndex) -> None:
    """A hold is in the repository's snapshot and in the list of all holds until unheld."""
    until = T0 + timedelta(days=7)
    await index.hold("r", Hold("pr-7", until, "restore of x"))
    assert (await index.snapshot("r")).holds == {"pr-7": Hold("pr-7", until, "restore of x")}
    assert await index.all_holds() == {"r": [Hold("pr-7", until, "restore of x")]}
    assert await index.unhold("r", "pr-7") is True
    assert await index.unhold("r", "pr-7") is False
    assert (await index.snapshot("r")).holds == {}


async def test_digest_only_index_is_remembered_until_deleted(index: TagIndex) -> None:
    """An index pushed by digest only is in the snapshot (it protects what it lists) until a
    delete of that digest is recorded."""
    await index.record_stored_index("r", A, T0)
    assert (await index.snapshot("r")).stored_indexes == {A}
    await index.record_delete("r", digest=A, tag=None, at=T0)
    assert (await index.snapshot("r")).stored_indexes == frozenset()


async def test_redis_down_is_a_state_error() -> None:
    """An unreachable Redis surfaces as StateError, never a redis exception."""
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        with pytest.raises(StateError):
            await TagIndex(client).tags("r")
    finally:
        await client.aclose()


async def test_a_push_notified_while_a_listing_is_read_survives_it(index: TagIndex) -> None:
    """A listing that started before a tag's notified push, and so lacks the tag (or shows it
    on its old digest), does not drop or move it in the index, nor mark its digest untagged."""
    listing = T0 + timedelta(hours=1)
    await index.record_push("r", "moved", A, T0)
    await index.record_push("r", "moved", B, listing + timedelta(seconds=1))
    await index.record_push("r", "new", C, listing + timedelta(seconds=2))
    await index.record_listing("r", {"moved": A}, listing, listing + timedelta(seconds=3))
    assert await index.tags("r") == {"moved": B, "new": C}
    assert B not in await index.untagged_since("r") and C not in await index.untagged_since("r")


async def test_a_stored_time_no_datetime_can_hold_is_skipped(
    index: TagIndex, redis_client: aioredis.Redis
) -> None:
    """A push time left by a poisoned event (year 10000, garbage) makes that one tag's time
    unknown; the repository's other times still read."""
    await index.record_push("r", "good", A, T0)
    await index.record_push("r", "bad", B, T0)
    pushed = index._keys("r")[1]
    await redis_client.hset(
        pushed, "bad", repr(datetime(9999, 12, 31, tzinfo=UTC).timestamp() * 10)
    )
    await redis_client.hset(pushed, "worse", "not a time")
    assert (await index.snapshot("r")).pushed_at == {"good": T0}


# --- registry events in their own order, whatever order they arrive in (issue 23) ----------

HOUR = timedelta(hours=1)


async def test_a_late_push_of_the_same_image_never_makes_a_tag_older(index: TagIndex) -> None:
    """``x`` pushed at T0 and re-pushed an hour later (same image); the re-push's event is
    applied first: the push time stays the later one, and a redelivery changes nothing."""
    await index.record_push("r", "x", A, T0 + HOUR, "ev-2")
    await index.record_push("r", "x", A, T0, "ev-1")
    assert await index.pushed_at("r") == {"x": T0 + HOUR}
    await index.record_push("r", "x", A, T0 + HOUR, "ev-2")
    assert await index.pushed_at("r") == {"x": T0 + HOUR}


async def test_a_late_push_never_moves_a_tag_back_to_an_image_it_left(index: TagIndex) -> None:
    """``x`` moved from A to B; the event of the push to A comes last: ``x`` stays on B with
    B's push time, and A, left untagged by the later push, is marked so from then."""
    await index.record_push("r", "x", B, T0 + HOUR, "ev-2")
    assert await index.record_push("r", "x", A, T0, "ev-1") is None
    assert await index.tags("r") == {"x": B}
    assert await index.pushed_at("r") == {"x": T0 + HOUR}
    assert await index.untagged_since("r") == {A: T0 + HOUR}


async def test_push_events_in_any_order_leave_the_same_index(
    index: TagIndex, redis_client: aioredis.Redis
) -> None:
    """Four pushes of two tags (one moved, one re-pushed), applied in each of their 24 orders:
    tags, push times and untagged marks always end as the in-order application leaves them."""
    events = [
        ("x", A, T0, "e1"),
        ("y", B, T0 + HOUR, "e2"),
        ("x", C, T0 + 2 * HOUR, "e3"),
        ("y", B, T0 + 3 * HOUR, "e4"),
    ]
    outcomes = set()
    for n, order in enumerate(itertools.permutations(events)):
        repo = f"perm-{n}"
        for tag, digest, at, event_id in order:
            await index.record_push(repo, tag, digest, at, event_id)
        outcomes.add(
            (
                tuple(sorted((await index.tags(repo)).items())),
                tuple(sorted((await index.pushed_at(repo)).items())),
                tuple(sorted((await index.untagged_since(repo)).items())),
            )
        )
    assert outcomes == {
        (
            (("x", C), ("y", B)),
            (("x", T0 + 2 * HOUR), ("y", T0 + 3 * HOUR)),
            ((A, T0 + 2 * HOUR),),
        )
    }


async def test_a_late_push_never_brings_back_a_deleted_tag_and_a_late_delete_spares_a_newer_push(
    index: TagIndex,
) -> None:
    """A tag deleted at T0+1h whose push at T0 is applied after the delete stays gone (its
    tombstone is newer); a tag re-pushed at T0+2h whose delete at T0+1h comes last stays."""
    assert await index.record_delete("r", digest=None, tag="gone", at=T0 + HOUR, event_id="d1") == [
        "gone"
    ]
    await index.record_push("r", "gone", A, T0, "p0")
    await index.record_push("r", "back", B, T0 + 2 * HOUR, "p2")
    assert (
        await index.record_delete("r", digest=None, tag="back", at=T0 + HOUR, event_id="d2") == []
    )
    assert await index.record_delete("r", digest=B, tag=None, at=T0 + HOUR, event_id="d3") == []
    assert await index.tags("r") == {"back": B}
    assert await index.pushed_at("r") == {"back": T0 + 2 * HOUR}


async def test_regsweeps_own_deletes_are_never_ordered_against_events(index: TagIndex) -> None:
    """regsweep's own bookkeeping of what it deleted (no event id, on its own clock, here
    hours ahead of the registry's) leaves no tombstone: the tag's next push, on the registry's
    clock earlier than regsweep's "now", still applies."""
    await index.record_push("r", "x", A, T0 + HOUR, "p1")
    assert await index.record_delete("r", digest=None, tag="x", at=T0 + 5 * HOUR) == ["x"]
    await index.record_push("r", "x", B, T0 + 2 * HOUR, "p2")
    assert await index.tags("r") == {"x": B}


async def test_an_index_from_before_event_order_is_respected(
    index: TagIndex, redis_client: aioredis.Redis
) -> None:
    """An index written before events carried their order (a push time, no version): an
    event older than that push time is late and changes nothing."""
    tags_key, pushed_key, _ = index._keys("r")
    await redis_client.hset(tags_key, "x", B)
    await redis_client.hset(pushed_key, "x", repr((T0 + HOUR).timestamp()))
    await index.record_push("r", "x", A, T0, "old")
    assert await index.tags("r") == {"x": B}
    await index.record_push("r", "x", C, T0 + 2 * HOUR, "new")
    assert await index.tags("r") == {"x": C}


async def test_tombstones_are_forgotten_by_a_listing_a_week_on(
    index: TagIndex, redis_client: aioredis.Redis
) -> None:
    """A delete's tombstone outlives the tag for TOMBSTONE_AGE (late events stay late), and
    the first listing after that forgets it; a live tag's version is kept."""
    versions = index.keys.index("r", "versions")
    await index.record_push("r", "live", A, T0, "p")
    await index.record_delete("r", digest=None, tag="gone", at=T0, event_id="d")
    soon = T0 + timedelta(days=1)
    await index.record_listing("r", {"live": A}, soon, soon)
    assert await redis_client.hexists(versions, "gone")
    later = T0 + TOMBSTONE_AGE + HOUR
    await index.record_listing("r", {"live": A}, later, later)
    assert not await redis_client.hexists(versions, "gone")
    assert await redis_client.hexists(versions, "live")
