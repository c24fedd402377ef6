"""No delivery is lost when Redis goes away in the middle of one.

Real uvicorn, a private ``redis-server`` and, between them, a TCP proxy that
cuts every connection at a chosen command (``tests/harness/faultproxy.py``):
either before the command reaches Redis or after Redis ran it and before its
answer comes back. Whatever the cut, the delivery is answered 503, and the
sender's retry (the registry's, or a GitHub redelivery with the same
``X-GitHub-Delivery``) either finds the event queued or queues it: a delivery
is never later taken for a duplicate of something that was not queued.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from service.app import create_app
from service.publish import CelerySink
from tests.harness import service as h
from tests.harness.faultproxy import FaultProxy
from tests.harness.registry import free_port
from worker.queue.names import EVENTS_QUEUE, TASK_CI_EVENT, TASK_REGISTRY_EVENTS
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import _DELIVER, State

TOKEN = "faults-token-Hq2"
GITHUB_SECRET = "faults-github-8Zt"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}
#: Every call of the dedup script carries its SHA1 (EVALSHA).
DELIVER_SCRIPT = hashlib.sha1(_DELIVER.encode()).hexdigest().encode()
UNAVAILABLE = {"error": "state store unavailable, retry later"}


@dataclass
class Rig:
    http: httpx.Client
    proxy: FaultProxy
    broker: redis.Redis

    def messages(self, task: str) -> list[dict[str, Any]]:
        """The kwargs of every ``task`` message on the broker's events queue."""
        raw: list[bytes] = self.broker.lrange(EVENTS_QUEUE, 0, -1)  # type: ignore[assignment]
        found = []
        for item in raw:
            message = json.loads(item)
            if message["headers"]["task"] == task:
                found.append(json.loads(base64.b64decode(message["body"]))[1])
        return found

    def registry_ids(self) -> list[str]:
        return sorted(e["id"] for m in self.messages(TASK_REGISTRY_EVENTS) for e in m["events"])

    def ci_deliveries(self) -> list[str]:
        return sorted(m["event"]["delivery_id"] for m in self.messages(TASK_CI_EVENT))


@pytest.fixture
def redis_server() -> Iterator[h.RedisServer]:
    server = h.RedisServer(free_port())
    server.start()
    yield server
    server.stop()


def _rig(redis_server: h.RedisServer, *, broker_behind_proxy: bool = True) -> Iterator[Rig]:
    """The service with state (and, by default, the Celery broker) behind the proxy."""
    proxy = FaultProxy(redis_server.port).start()
    broker_url = proxy.url() if broker_behind_proxy else redis_server.url
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        redis_url=broker_url,
        hooks=HookSettings(registry_token=Secret(TOKEN), github_secret=Secret(GITHUB_SECRET)),
        policies=(h.CI_POLICY,),
    )
    sink = CelerySink.from_config(config)
    app = create_app(config, sink=sink, state=State.from_url(proxy.url()))
    broker = redis.Redis.from_url(redis_server.url)
    try:
        with h.running(app) as url, httpx.Client(base_url=url, timeout=10) as http:
            rig = Rig(http, proxy, broker)
            warm = h.envelope(h.registry_event(event_id="warm-up"))
            # Loads the dedup script, so every later call is one EVALSHA.
            assert http.post("/hooks/registry", content=warm, headers=HEADERS).status_code == 202
            yield rig
    finally:
        sink.close()
        proxy.stop()
        broker.close()


@pytest.fixture
def rig(redis_server: h.RedisServer) -> Iterator[Rig]:
    yield from _rig(redis_server)


def _post(rig: Rig, *events: dict[str, Any]) -> httpx.Response:
    return rig.http.post("/hooks/registry", content=h.envelope(*events), headers=HEADERS)


@pytest.mark.parametrize("after", [False, True], ids=["before-redis-ran-it", "answer-lost"])
def test_registry_delivery_cut_mid_commit_is_queued_once_after_the_retry(
    rig: Rig, after: bool
) -> None:
    """Redis cut at the dedup-and-queue call, before it ran or after (answer lost): 503;
    the registry's retry is accepted, or a duplicate of the event already queued, and the
    event is queued exactly once either way."""
    event = h.registry_event(event_id="cut-1")
    rig.proxy.cut_at(DELIVER_SCRIPT, after=after)
    failed = _post(rig, event)
    assert failed.status_code == 503 and failed.json() == UNAVAILABLE
    assert rig.proxy.cuts == 1
    rig.proxy.restore()
    retry = _post(rig, event)
    assert retry.status_code == 202
    assert h.outcome(retry)["duplicates" if after else "accepted"] == 1
    assert rig.registry_ids() == ["cut-1", "warm-up"]


@pytest.mark.parametrize("after", [False, True], ids=["before-redis-ran-it", "answer-lost"])
def test_registry_batch_of_a_repeated_and_a_new_event_loses_neither(rig: Rig, after: bool) -> None:
    """A retry mixing an event already queued and a new one: the first call finds the
    repeat, the second (the new event alone) is cut. 503; the retry queues the new event
    (or finds it queued) and the repeated one stays queued once."""
    seen, new = h.registry_event(event_id="seen"), h.registry_event(event_id="new", tag="v2")
    assert h.outcome(_post(rig, seen))["accepted"] == 1
    # The first call holds both ids; it goes through, the second (holding "new" alone) is cut.
    rig.proxy.cut_at(b"dedup:registry:new", after=after, skip=1)
    failed = _post(rig, seen, new)
    assert failed.status_code == 503 and failed.json() == UNAVAILABLE
    rig.proxy.restore()
    retry = _post(rig, seen, new)
    assert retry.status_code == 202
    expected = {"accepted": 0 if after else 1, "duplicates": 2 if after else 1}
    assert {k: h.outcome(retry)[k] for k in expected} == expected
    assert rig.registry_ids() == ["new", "seen", "warm-up"]


@pytest.mark.parametrize("after", [False, True], ids=["before-redis-ran-it", "answer-lost"])
def test_github_redelivery_after_a_cut_is_not_taken_for_a_duplicate_of_nothing(
    rig: Rig, after: bool
) -> None:
    """A GitHub delivery cut at its dedup-and-queue call gets 503; redelivered with the
    same X-GitHub-Delivery it is accepted, or a duplicate of the message already queued,
    and one message is queued."""
    body = h.github_pull_request(number=11)
    headers = h.github_headers(GITHUB_SECRET, body, "pull_request", delivery="gh-cut-1")
    rig.proxy.cut_at(DELIVER_SCRIPT, after=after)
    failed = rig.http.post("/hooks/github", content=body, headers=headers)
    assert failed.status_code == 503 and failed.json() == UNAVAILABLE
    rig.proxy.restore()
    again = rig.http.post("/hooks/github", content=body, headers=headers)
    assert (again.status_code, again.json()["status"]) == (
        (200, "duplicate") if after else (202, "accepted")
    )
    assert rig.ci_deliveries() == ["gh-cut-1"]


@pytest.mark.parametrize("after", [False, True], ids=["record-never-ran", "answer-lost"])
def test_broker_elsewhere_cut_after_the_publish_queues_again_never_swallows(
    redis_server: h.RedisServer, after: bool
) -> None:
    """With the broker on another connection than the state store, the message goes first
    and the delivery is recorded after it. A cut at the record: 503; the retry queues the
    event a second time when the record never ran (harmless), or is a duplicate when it
    ran and only the answer was lost. Never zero messages."""
    for rig in _rig(redis_server, broker_behind_proxy=False):
        rig.proxy.cut_at(b"EXEC", after=after)
        event = h.registry_event(event_id="apart-1")
        failed = _post(rig, event)
        assert failed.status_code == 503 and failed.json() == UNAVAILABLE
        rig.proxy.restore()
        retry = _post(rig, event)
        assert retry.status_code == 202
        assert h.outcome(retry)["duplicates" if after else "accepted"] == 1
        queued = [i for i in rig.registry_ids() if i == "apart-1"]
        assert len(queued) == (1 if after else 2)


def test_frozen_redis_answers_503_promptly_and_the_retry_after_thaw_is_queued_once(
    redis_server: h.RedisServer,
) -> None:
    """Redis SIGSTOPped (connections accepted, nothing answered): twenty concurrent
    deliveries and /readyz are all answered 503 well within the client's 5 s patience
    (the service's Redis timeouts); after SIGCONT the registry's retries are queued, each
    event once."""
    for rig in _rig(redis_server):
        assert redis_server.proc is not None
        bodies = [h.envelope(h.registry_event(event_id=f"frozen-{i}")) for i in range(20)]
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            answers = _post_concurrently(rig.http.base_url, bodies, timeout=5.0)
            ready = rig.http.get("/readyz", timeout=5.0)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert [a.status_code for a in answers] == [503] * 20
        assert ready.status_code == 503
        retries = _post_concurrently(rig.http.base_url, bodies, timeout=5.0)
        assert [r.status_code for r in retries] == [202] * 20
        assert rig.registry_ids() == sorted([f"frozen-{i}" for i in range(20)] + ["warm-up"])


def _post_concurrently(url: httpx.URL, bodies: list[bytes], timeout: float) -> list[httpx.Response]:
    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            posts = [client.post("/hooks/registry", content=b, headers=HEADERS) for b in bodies]
            return list(await asyncio.gather(*posts))

    return asyncio.run(post_all())
