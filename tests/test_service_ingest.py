"""Group commit of registry deliveries (batched claims, one sink call per batch,
all-or-nothing) and the Celery sink's direct publish of registry events.

Real Redis (DB 9, keys under a unique prefix) and real uvicorn: the deliveries
must really overlap for a group commit to happen, so the sink below is the
real RedisListSink made slower, not a mock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.app import create_app
from service.publish import CelerySink, event_payload
from tests.harness import redisdb
from tests.harness import service as h
from tests.harness.registry import free_port
from tests.harness.sinks import RedisListSink
from worker.engine.events import RegistryEvent
from worker.errors import StateError
from worker.queue.messages import TaskMessage
from worker.queue.names import EVENTS_QUEUE, TASK_REGISTRY_EVENTS
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import Push, State

REDIS_URL = redisdb.url(9)
TOKEN = "ingest-token-Rt5"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}
CONCURRENT = 24


class SlowSink(RedisListSink):
    """The real Redis-list sink, 50 ms slower per call, counting its calls; can be made to fail."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, fail: bool = False) -> None:
        super().__init__(client, prefix=prefix)
        self.calls: list[int] = []
        self.fail = fail

    async def registry_events(self, events: list[RegistryEvent]) -> None:
        self.calls.append(len(events))
        await asyncio.sleep(0.05)
        if self.fail:
            raise StateError("broker refused regsweep.registry_events")
        await super().registry_events(events)


@pytest.fixture
def prefix() -> Iterator[str]:
    value = h.unique_prefix()
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    h.delete_prefix(client, value)
    client.close()


def _keys(prefix: str, pattern: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}{pattern}"))
    finally:
        client.close()


def _queued_ids(prefix: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw: list[bytes] = client.lrange(f"{prefix}queue:events", 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    return sorted(json.loads(item)["event"]["id"] for item in raw)


def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
            posts = [client.post("/hooks/registry", content=b, headers=HEADERS) for b in bodies]
            return list(await asyncio.gather(*posts))

    return asyncio.run(post_all())


def _serve(prefix: str) -> tuple[Config, State]:
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=HookSettings(registry_token=Secret(TOKEN)),
    )
    return config, State.from_url(REDIS_URL, prefix=prefix)


def test_concurrent_deliveries_share_sink_calls(prefix: str) -> None:
    """Deliveries that overlap are committed together (fewer sink calls than deliveries),
    each answered 202 as accepted, each event enqueued exactly once."""
    sink = SlowSink(aioredis.Redis.from_url(REDIS_URL), prefix=prefix)
    config, state = _serve(prefix)
    ids = [f"ev-{i}" for i in range(CONCURRENT)]
    bodies = [h.envelope(h.registry_event(event_id=i, tag=f"t{n}")) for n, i in enumerate(ids)]
    with h.running(create_app(config, sink=sink, state=state)) as url:
        responses = _post_all(url, bodies)
    assert [r.status_code for r in responses] == [202] * CONCURRENT
    assert all(h.outcome(r)["accepted"] == 1 for r in responses)
    assert _queued_ids(prefix) == sorted(ids)
    assert sum(sink.calls) == CONCURRENT and len(sink.calls) < CONCURRENT


def test_one_event_id_in_concurrent_deliveries_is_accepted_once(prefix: str) -> None:
    """The same event id delivered many times at once is accepted by exactly one
    delivery and enqueued once; every other delivery is a 202 duplicate."""
    sink = SlowSink(aioredis.Redis.from_url(REDIS_URL), prefix=prefix)
    config, state = _serve(prefix)
    body = h.envelope(h.registry_event(event_id="same"))
    with h.running(create_app(config, sink=sink, state=state)) as url:
        responses = _post_all(url, [body] * 8)
    assert [r.status_code for r in responses] == [202] * 8
    assert sorted(h.outcome(r)["accepted"] for r in responses) == [0] * 7 + [1]
    assert _queued_ids(prefix) == ["same"]


def test_failed_commit_answers_503_to_every_delivery_and_records_none(prefix: str) -> None:
    """When the sink fails, every delivery of the commit gets 503 and no dedup key is
    left behind, so the registry's retries are processed, not swallowed."""
    sink = SlowSink(aioredis.Redis.from_url(REDIS_URL), prefix=prefix, fail=True)
    config, state = _serve(prefix)
    bodies = [h.envelope(h.registry_event(event_id=f"lost-{i}")) for i in range(CONCURRENT)]
    with h.running(create_app(config, sink=sink, state=state)) as url:
        responses = _post_all(url, bodies)
        sink.fail = False
        retry = httpx.post(f"{url}/hooks/registry", content=bodies[0], headers=HEADERS)
    assert [r.status_code for r in responses] == [503] * CONCURRENT
    assert retry.status_code == 202 and h.outcome(retry)["accepted"] == 1
    assert _queued_ids(prefix) == ["lost-0"]
    assert _keys(prefix, "dedup:*") == [f"{prefix}dedup:registry:lost-0"]


# --- the Celery sink's direct publish -------------------------------------------------

#: Per-message ids, and the repr the direct publish writes short on purpose.
VOLATILE_HEADERS = ("id", "root_id", "kwargsrepr")
VOLATILE_PROPERTIES = ("correlation_id", "delivery_tag")


def _comparable(raw: bytes) -> dict[str, Any]:
    """A broker message with its per-message ids removed and its body decoded."""
    message: dict[str, Any] = json.loads(raw)
    for name in VOLATILE_HEADERS:
        message["headers"].pop(name)
    for name in VOLATILE_PROPERTIES:
        message["properties"].pop(name)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def _push_event(sink: CelerySink) -> None:
    event = RegistryEvent(
        id="e1",
        action="push",
        repository="a/b",
        digest=h.digest_of("a/b:v1"),
        tag="v1",
        media_type=h.OCI_MANIFEST,
        size=528,
        timestamp=datetime(2025, 3, 1, 10, 0, tzinfo=UTC),
    )

    async def push() -> None:
        try:
            await sink.registry_events([event])
        finally:
            await sink.aclose()

    anyio.run(push)
    kwargs = {"events": [event_payload(event)]}
    sink.send_blocking(TaskMessage(TASK_REGISTRY_EVENTS, kwargs, EVENTS_QUEUE))


def test_direct_publish_matches_send_task_message() -> None:
    """The registry-events message LPUSHed from the event loop is, ids aside, the one
    Celery's send_task puts on the same queue (so a kombu upgrade that changes the
    wire format fails here, not in production)."""
    client = redis.Redis.from_url(REDIS_URL)
    queue = EVENTS_QUEUE
    client.delete(queue)
    sink = CelerySink.from_config(
        Config(registry=RegistrySettings(url="http://x"), redis_url=REDIS_URL)
    )
    try:
        assert sink.broker_url == REDIS_URL
        _push_event(sink)
        raw: list[bytes] = client.lrange(queue, 0, -1)  # type: ignore[assignment]
        newer, older = raw
    finally:
        sink.close()
        # send_task also leaves kombu's queue bindings behind.
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()
    assert _comparable(older) == _comparable(newer)
    assert json.loads(older)["headers"]["kwargsrepr"] == "{'events': <1 events>}"


def test_direct_publish_with_broker_down_raises_state_error_quickly() -> None:
    """The direct publish to a broker that is not there is a StateError within seconds."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    sink = CelerySink.from_config(Config(registry=RegistrySettings(url="http://x"), redis_url=url))
    started = time.monotonic()
    with pytest.raises(StateError, match=r"broker refused regsweep\.registry_events"):
        _push_event(sink)
    assert time.monotonic() - started < 5
    sink.close()


# --- claim and publish in one round trip ----------------------------------------------


def _celery_serve(prefix: str, state_url: str = REDIS_URL) -> tuple[Config, State, CelerySink]:
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=HookSettings(registry_token=Secret(TOKEN)),
        redis_url=REDIS_URL,
    )
    return config, State.from_url(state_url, prefix=prefix), CelerySink.from_config(config)


def _queued_celery_ids() -> list[str]:
    """Event ids in the Celery ``events`` queue of REDIS_URL, every message decoded."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw: list[bytes] = client.lrange(EVENTS_QUEUE, 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    ids = []
    for item in raw:
        message = _comparable(item)
        assert message["headers"]["task"] == TASK_REGISTRY_EVENTS
        ids += [event["id"] for event in message["body"][1]["events"]]
    return sorted(ids)


@pytest.fixture
def events_queue() -> Iterator[None]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(EVENTS_QUEUE)
    yield
    client.delete(EVENTS_QUEUE)
    client.close()


async def _deliver_then_push(prefix: str) -> tuple[list[int], list[int], list[bytes | str]]:
    state = State.from_url(REDIS_URL, prefix=prefix)
    key = f"{prefix}list"
    dedup = [state.keys.delivery("registry", i) for i in "abcd"]
    try:
        push = Push(state.server, key, ("m1",))
        first = await state.new_deliveries(dedup[:2], push=push)
        again = await state.new_deliveries(dedup[1:3], push=push)
        elsewhere = Push("elsewhere/0", key, ("m",))
        with pytest.raises(ValueError, match="not on"):
            await state.new_deliveries(dedup[3:], push=elsewhere)
        pushed: list[bytes | str] = await state.client.lrange(key, 0, -1)
        return first, again, pushed
    finally:
        await state.aclose()


def test_deliveries_are_recorded_only_with_their_push(prefix: str) -> None:
    """All deliveries new: recorded and pushed in one call. One already recorded: nothing
    is written at all (the caller pushes the new ones alone). A push for another Redis
    server is refused."""
    first, again, pushed = asyncio.run(_deliver_then_push(prefix))
    assert first == [0, 1]
    assert again == [1]
    assert pushed == [b"m1"]
    assert _keys(prefix, "dedup:*") == [f"{prefix}dedup:registry:{i}" for i in "ab"]


def test_celery_sink_commits_claims_and_message_together(prefix: str, events_queue: None) -> None:
    """With the broker on the state store's Redis, concurrent deliveries are claimed and
    published by the same calls: every event queued once, every delivery 202 accepted;
    a replay is a duplicate and queues nothing."""
    config, state, sink = _celery_serve(prefix)
    ids = [f"fused-{i}" for i in range(CONCURRENT)]
    bodies = [h.envelope(h.registry_event(event_id=i, tag=f"t{n}")) for n, i in enumerate(ids)]
    try:
        with h.running(create_app(config, sink=sink, state=state)) as url:
            responses = _post_all(url, bodies)
            replay = httpx.post(f"{url}/hooks/registry", content=bodies[0], headers=HEADERS)
    finally:
        sink.close()
    assert [r.status_code for r in responses] == [202] * CONCURRENT
    assert all(h.outcome(r)["accepted"] == 1 for r in responses)
    assert replay.status_code == 202 and h.outcome(replay)["duplicates"] == 1
    assert _queued_celery_ids() == sorted(ids)
    assert len(_keys(prefix, "dedup:registry:fused-*")) == CONCURRENT


def test_celery_sink_publishes_only_fresh_events_of_a_mixed_delivery(
    prefix: str, events_queue: None
) -> None:
    """A delivery holding an event already seen and a new one: the fused call pushes
    nothing, then only the new event is published."""
    config, state, sink = _celery_serve(prefix)
    seen = h.registry_event(event_id="seen")
    new = h.registry_event(event_id="new", tag="v2")
    try:
        with h.running(create_app(config, sink=sink, state=state)) as url:
            first = httpx.post(f"{url}/hooks/registry", content=h.envelope(seen), headers=HEADERS)
            mixed = httpx.post(
                f"{url}/hooks/registry", content=h.envelope(seen, new), headers=HEADERS
            )
    finally:
        sink.close()
    assert h.outcome(first)["accepted"] == 1
    assert mixed.status_code == 202
    assert h.outcome(mixed) == {"accepted": 1, "duplicates": 1, "ignored": 0, "dead_lettered": 0}
    assert _queued_celery_ids() == ["new", "seen"]


def test_celery_sink_with_state_on_another_database_claims_and_publishes_apart(
    prefix: str, events_queue: None
) -> None:
    """State store and broker on different databases: claims go to one, the message to
    the other (two round trips, same outcome)."""
    other = redisdb.url(3)
    config, state, sink = _celery_serve(prefix, state_url=other)
    body = h.envelope(h.registry_event(event_id="apart"))
    try:
        with h.running(create_app(config, sink=sink, state=state)) as url:
            response = httpx.post(f"{url}/hooks/registry", content=body, headers=HEADERS)
    finally:
        sink.close()
        client = redis.Redis.from_url(other)
        claimed = [k.decode() for k in client.scan_iter(match=f"{prefix}dedup:*")]
        h.delete_prefix(client, prefix)
        client.close()
    assert response.status_code == 202 and h.outcome(response)["accepted"] == 1
    assert _queued_celery_ids() == ["apart"]
    assert claimed == [f"{prefix}dedup:registry:apart"]
    assert _keys(prefix, "dedup:*") == []


def test_failed_fused_commit_answers_503_and_leaves_no_claim(
    prefix: str, events_queue: None
) -> None:
    """The broker list cannot take the message (here: the key holds a string, so the
    LPUSH inside the claim script fails): 503, no dedup key left, and once the broker
    is fixed the sender's retry is accepted, not swallowed as a duplicate."""
    client = redis.Redis.from_url(REDIS_URL)
    client.set(EVENTS_QUEUE, "not a list")
    config, state, sink = _celery_serve(prefix)
    body = h.envelope(h.registry_event(event_id="retried"))
    try:
        with h.running(create_app(config, sink=sink, state=state)) as url:
            refused = httpx.post(f"{url}/hooks/registry", content=body, headers=HEADERS)
            left = _keys(prefix, "dedup:*")
            client.delete(EVENTS_QUEUE)
            retry = httpx.post(f"{url}/hooks/registry", content=body, headers=HEADERS)
    finally:
        sink.close()
        client.close()
    assert refused.status_code == 503
    assert refused.json() == {"error": "state store unavailable, retry later"}
    assert left == []
    assert retry.status_code == 202 and h.outcome(retry)["accepted"] == 1
    assert _queued_celery_ids() == ["retried"]
