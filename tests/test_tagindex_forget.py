"""``TagIndex.forget`` in one script per batch leaves the index as the per-item deletes did,
and stays linear (the storage-level prune forgets thousands of tags and digests at once)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import redisdb
from worker.oci import Digest
from worker.store.history import RepositoryHistory
from worker.store.tagindex import TagIndex

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIGESTS = [Digest(f"sha256:{c * 64}") for c in "abcdef"]
TAGS = [f"t{i}" for i in range(8)]


def _shape(history: RepositoryHistory) -> tuple[object, ...]:
    """The index without the moments things happened (each forget reads its own clock)."""
    return (
        dict(history.tags),
        dict(history.pushed_at),
        set(history.untagged_since),
        set(history.stored_indexes),
    )


async def _both(
    live: dict[str, Digest], stored: list[Digest], tags: list[str], digests: list[Digest]
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    client = aioredis.Redis.from_url(redisdb.url(1))
    prefix = f"test-forget-{uuid.uuid4().hex}:"
    try:
        shapes = []
        for way in ("each", "forget"):
            index = TagIndex(client, prefix=f"{prefix}{way}:")
            for tag, digest in live.items():
                await index.record_push("r", tag, digest, T0)
            for digest in stored:
                await index.record_stored_index("r", digest, T0)
            if way == "each":
                for tag in tags:
                    await index.record_delete("r", digest=None, tag=tag, at=T0)
                for digest in digests:
                    await index.record_delete("r", digest=digest, tag=None, at=T0)
            else:
                await index.forget("r", tags=tags, digests=digests)
            shapes.append(_shape(await index.snapshot("r")))
        return shapes[0], shapes[1]
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@given(
    live=st.dictionaries(st.sampled_from(TAGS), st.sampled_from(DIGESTS), max_size=8),
    stored=st.lists(st.sampled_from(DIGESTS), max_size=2, unique=True),
    tags=st.lists(st.sampled_from([*TAGS, "never-pushed"]), max_size=5, unique=True),
    digests=st.lists(st.sampled_from(DIGESTS), max_size=3, unique=True),
)
@settings(max_examples=60, deadline=None)
def test_forget_leaves_the_index_as_deleting_each_does(
    live: dict[str, Digest], stored: list[Digest], tags: list[str], digests: list[Digest]
) -> None:
    """Tags removed, digests and every tag still on them removed, a digest left with no tag
    marked untagged, a forgotten digest neither untagged nor a stored index: as one
    ``record_delete`` per tag, then per digest, leaves it."""
    each, forgot = asyncio.run(_both(live, stored, tags, digests))
    assert forgot == each


def test_forget_across_batches_leaves_only_what_stays() -> None:
    """10,000 tags and their digests forgotten in one call, more than one script's batch:
    only the kept tag is left, and nothing is marked untagged."""

    async def go() -> RepositoryHistory:
        client = aioredis.Redis.from_url(redisdb.url(1))
        prefix = f"test-forget-{uuid.uuid4().hex}:"
        index = TagIndex(client, prefix=prefix)
        live = {f"t{i}": Digest(f"sha256:{i:064x}") for i in range(10_001)}
        try:
            await index.record_listing("r", live, T0, T0)
            gone = [t for t in live if t != "t0"]
            await index.forget("r", tags=gone, digests=[live[t] for t in gone])
            return await index.snapshot("r")
        finally:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            await client.delete(*keys)
            await client.aclose()

    history = asyncio.run(go())
    assert dict(history.tags) == {"t0": Digest(f"sha256:{0:064x}")}
    assert not history.untagged_since
