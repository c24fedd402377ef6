"""worker.store.state against the real Redis (DB 13): dedup claims, dead letters, job records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis

from service.replay import Replayed, replay
from tests.harness.registry import free_port
from tests.harness.service import REDIS_TEST_URL, delete_prefix, unique_prefix
from tests.harness.sinks import RedisListSink
from worker.engine.events import CiEvent
from worker.errors import StateError
from worker.store.redis import sync_client
from worker.store.state import DEAD_LETTER_CAP, State, SyncState


@pytest.fixture
def prefix() -> Iterator[str]:
    value = unique_prefix()
    yield value
    client = redis.Redis.from_url(REDIS_TEST_URL)
    delete_prefix(client, value)
    client.close()


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_new_deliveries_reads_only_and_records_nothing_without_a_push(prefix: str) -> None:
    """Without a push the check writes nothing: asked twice, a delivery is new twice; once
    recorded (for 7 days) it is seen, and a delivery with two keys is seen if either is."""

    async def scenario() -> tuple[list[int], list[int], list[int], list[int], int]:
        state = State.from_url(REDIS_TEST_URL, prefix=prefix)
        keys = [state.keys.delivery("github", "d-1"), state.keys.delivery("github-body", "h")]
        first = await state.new_deliveries(keys[:1])
        again = await state.new_deliveries(keys[:1])
        await state.record_deliveries(keys[1:])
        pair = await state.new_deliveries(keys, per_delivery=2)
        repeated = await state.new_deliveries([keys[0], keys[0], "other"])
        ttl = await state.client.ttl(keys[1])
        await state.aclose()
        return first, again, pair, repeated, ttl

    first, again, pair, repeated, ttl = run(scenario())
    assert (first, again) == ([0], [0])
    assert pair == []
    assert repeated == [0, 2]
    assert 6 * 86400 < ttl <= 7 * 86400


def test_job_record_lifecycle(prefix: str) -> None:
    """A job is created queued with a 7-day TTL, updated in place, and unknown ids give None."""

    async def scenario() -> tuple[Any, ...]:
        state = State.from_url(REDIS_TEST_URL, prefix=prefix)
        job_id = await state.create_job("prune", {"repository": "team/web"})
        created = await state.get_job(job_id)
        updated = await state.update_job(job_id, state="succeeded", counts={"deleted": 3})
        after = await state.get_job(job_id)
        ttl = await state.client.ttl(state.keys.job(job_id))
        missing = await state.update_job("0" * 32, state="running")
        unknown = await state.get_job("0" * 32)
        await state.aclose()
        return created, updated, after, ttl, missing, unknown

    created, updated, after, ttl, missing, unknown = run(scenario())
    assert created["state"] == "queued" and created["params"] == {"repository": "team/web"}
    assert updated is True and after["state"] == "succeeded" and after["counts"] == {"deleted": 3}
    assert after["created"] == created["created"]
    assert 6 * 86400 < ttl <= 7 * 86400
    assert (missing, unknown) == (False, None)
    # The key must not have been created by the refused update.
    assert redis.Redis.from_url(REDIS_TEST_URL).exists(f"{prefix}job:{'0' * 32}") == 0


def test_sync_state_reads_what_async_wrote(prefix: str) -> None:
    """SyncState (for Celery) shares keys and encoding with State."""

    async def create() -> str:
        state = State.from_url(REDIS_TEST_URL, prefix=prefix)
        job_id = await state.create_job("gc", {})
        await state.aclose()
        return job_id

    job_id = run(create())
    sync = SyncState(sync_client(REDIS_TEST_URL), prefix=prefix)
    assert sync.update_job(job_id, state="running") is True
    assert (sync.get_job(job_id) or {})["state"] == "running"
    sync.client.close()


def test_dead_letters_are_capped(prefix: str) -> None:
    """The dead-letter list keeps the newest DEAD_LETTER_CAP entries only."""

    async def fill_then_newest() -> tuple[int, list[dict[str, Any]]]:
        state = State.from_url(REDIS_TEST_URL, prefix=prefix)
        for i in range(DEAD_LETTER_CAP + 5):
            await state.dead_letter("registry", f"reason {i}", "{}")
        kept = await state.client.llen(state.keys.dead_letters)
        entries = await state.dead_letters(limit=1)
        await state.aclose()
        return kept, entries

    kept, (entry,) = run(fill_then_newest())
    assert kept == DEAD_LETTER_CAP
    assert entry["reason"] == f"reason {DEAD_LETTER_CAP + 4}" and entry["source"] == "registry"


def test_unreachable_redis_raises_state_error() -> None:
    """With nothing listening, every operation raises StateError, quickly."""

    async def scenario() -> None:
        state = State.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            await state.new_deliveries([state.keys.delivery("github", "d")])
        finally:
            await state.client.aclose()

    with pytest.raises(StateError, match="check deliveries"):
        run(scenario())
    with pytest.raises(StateError):
        SyncState(sync_client(f"redis://127.0.0.1:{free_port()}/0")).get_job("x")


def test_replay_of_a_delivery_id_that_is_also_a_dead_letter_prefix_replays_the_delivery(
    prefix: str,
) -> None:
    """``regsweep replay ID`` where ID is exactly a recorded CI event's delivery id and only
    the beginning of a dead letter's id: the CI event is replayed (an exact name wins over
    a prefix), not the unrelated dead-lettered prune; the whole dead letter id still
    replays the dead letter."""

    async def scenario() -> tuple[Replayed, Replayed, list[dict[str, Any]]]:
        state = State.from_url(REDIS_TEST_URL, prefix=prefix)
        sink = RedisListSink.from_url(REDIS_TEST_URL, prefix=prefix)
        try:
            params = {"repository": "team/other", "dry_run": False, "requests": []}
            letter = await state.dead_letter(
                "prune", "failed", "{}", replay={"kind": "prune", "params": params}
            )
            event = CiEvent("gitlab", letter[:12], "acme/web", "pull_request_closed", number=7)
            await state.record_ci_event(event.delivery_id, event.to_dict())
            by_delivery = await replay(event.delivery_id, state, sink)
            by_letter = await replay(letter, state, sink)
            raw = await sink.client.lrange(f"{prefix}queue:events", 0, -1)
            return by_delivery, by_letter, [json.loads(m) for m in raw]
        finally:
            await sink.aclose()
            await state.aclose()

    by_delivery, by_letter, events = run(scenario())
    assert (by_delivery.kind, by_delivery.job_id) == ("ci_event", None)
    assert "#7" in by_delivery.detail
    assert by_letter.kind == "prune" and by_letter.id != by_delivery.id
    assert len(events) == 1, events
