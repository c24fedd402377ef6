"""The service where delivery timing matters: Redis going away and back, a real 2.8 registry.

Everything is real: uvicorn on a free port, a private ``redis-server`` that the
tests stop and start (never the shared one), Debian's registry 2.8.2 with
``notifications:`` pointing at the service.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.app import create_app
from tests.harness import service as h
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.sinks import RedisListSink
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import State

TOKEN = "live-registry-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}
UNAVAILABLE = {"error": "state store unavailable, retry later"}


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def private_redis() -> Iterator[h.RedisServer]:
    server = h.RedisServer(free_port())
    server.start()
    yield server
    server.stop()


def _config(redis_url: str) -> Config:
    return Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        redis_url=redis_url,
        hooks=HookSettings(registry_token=Secret(TOKEN)),
    )


def _events(client: redis.Redis, prefix: str = "regsweep:") -> list[dict[str, Any]]:
    raw: list[bytes] = client.lrange(f"{prefix}queue:events", 0, -1)  # type: ignore[assignment]
    return [json.loads(item)["event"] for item in reversed(raw)]


def test_redis_down_gives_503_then_recovers(
    private_redis: h.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped: the hook and readyz answer 503; Redis back: the same event is accepted."""
    caplog.set_level(logging.INFO, logger="regsweep.service")
    config = _config(private_redis.url)
    app = create_app(config, sink=RedisListSink.from_url(private_redis.url))
    body = h.envelope(h.registry_event(event_id="outage-1"))
    client = redis.Redis.from_url(private_redis.url)
    with h.running(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        private_redis.stop()
        started = time.monotonic()
        down = http.post("/hooks/registry", content=body, headers=HEADERS)
        elapsed = time.monotonic() - started
        assert down.status_code == 503 and down.json() == UNAVAILABLE
        assert elapsed < 3.0, "a 503 must come quickly so the registry's queue is not held"
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200
        private_redis.start()
        up = http.post("/hooks/registry", content=body, headers=HEADERS)
        assert up.status_code == 202 and h.outcome(up)["accepted"] == 1
        assert http.get("/readyz").status_code == 200
    assert [e["id"] for e in _events(client)] == ["outage-1"]
    client.close()
    # The lifespan said which hooks are off, naming the setting, never a secret.
    assert "/hooks/github disabled (answers 404): hooks.github_secret_env is not set" in caplog.text
    assert "/hooks/registry enabled" in caplog.text and TOKEN not in caplog.text


def test_sink_failure_records_no_dedup_key(private_redis: h.RedisServer) -> None:
    """A sink that cannot persist gives 503 and records no dedup key, so the retry counts."""
    prefix = h.unique_prefix()
    state = State.from_url(h.REDIS_TEST_URL, prefix=prefix)
    sink = RedisListSink(aioredis.Redis.from_url(private_redis.url, socket_connect_timeout=1))
    app = create_app(_config(h.REDIS_TEST_URL), sink=sink, state=state)
    shared = redis.Redis.from_url(h.REDIS_TEST_URL)
    body = h.envelope(h.registry_event(event_id="sinkfail-1"))
    dedup_key = f"{prefix}dedup:registry:sinkfail-1"
    try:
        with h.running(app) as url, httpx.Client(base_url=url, timeout=10) as http:
            private_redis.stop()
            failed = http.post("/hooks/registry", content=body, headers=HEADERS)
            assert failed.status_code == 503 and failed.json() == UNAVAILABLE
            assert shared.exists(dedup_key) == 0
            private_redis.start()
            retried = http.post("/hooks/registry", content=body, headers=HEADERS)
            assert retried.status_code == 202 and h.outcome(retried)["accepted"] == 1
            assert shared.exists(dedup_key) == 1
        private = redis.Redis.from_url(private_redis.url)
        assert [e["id"] for e in _events(private)] == ["sinkfail-1"]
        private.close()
    finally:
        h.delete_prefix(shared, prefix)
        shared.close()


def _registry_with_notifications(root: Path, hook_url: str) -> RegistryProcess:
    endpoint = {
        "name": "regsweep",
        "url": hook_url,
        "headers": {"Authorization": [f"Bearer {TOKEN}"]},
        "timeout": "2s",
        "threshold": 3,
        "backoff": "100ms",
        # As docs/webhooks.md suggests; proves 2.8 accepts it and still sends pushes.
        "ignore": {"actions": ["pull"]},
    }
    return RegistryProcess.create(root, {"notifications": {"endpoints": [endpoint]}})


def test_real_registry_push_reaches_sink_even_through_an_outage(
    tmp_path: Path, private_redis: h.RedisServer
) -> None:
    """A 2.8 registry's push reaches the sink; pushed while Redis is down, its retry does."""
    config = _config(private_redis.url)
    app = create_app(config, sink=RedisListSink.from_url(private_redis.url))
    with h.running(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        registry = _registry_with_notifications(tmp_path, f"{url}/hooks/registry")
        registry.start()
        try:
            with ImageBuilder.connect(registry.url) as builder:
                first = builder.image("team/web", "v1")
                client = redis.Redis.from_url(private_redis.url)
                tagged = wait_for(lambda: [e for e in _events(client) if e["tag"] == "v1"])
                assert tagged[0]["digest"] == first.digest
                assert tagged[0]["repository"] == "team/web"
                client.close()

                private_redis.stop()
                second = builder.image("team/web", "v2")
                wait_for(lambda: 'outcome="unavailable"' in http.get("/metrics").text)
                private_redis.start()
                client = redis.Redis.from_url(private_redis.url)
                tagged = wait_for(lambda: [e for e in _events(client) if e["tag"] == "v2"])
                assert [e["digest"] for e in tagged] == [second.digest]
                client.close()
        finally:
            registry.stop()
