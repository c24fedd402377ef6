"""/metrics behind a token, on its own address, and cheap under a flood of scrapes.

Real uvicorn (the bounded protocol, both listening sockets as ``serve`` binds
them) and real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.app import create_app
from service.metrics import ServiceMetrics
from tests.harness import service as h
from tests.harness.registry import free_port
from tests.harness.sinks import RedisListSink
from worker.settings.model import Config, HookSettings, RegistrySettings, Secret
from worker.store.state import State

TOKEN = "metrics-hook-Ts5"
METRICS_TOKEN = "metrics-scrape-Lq1"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": h.V1}


@contextmanager
def serving(hooks: HookSettings) -> Iterator[tuple[str, ServiceMetrics]]:
    prefix = h.unique_prefix()
    config = Config(
        registry=RegistrySettings(url="http://127.0.0.1:1"),
        hooks=hooks,
        redis_url=h.REDIS_TEST_URL,
    )
    sink = RedisListSink(aioredis.Redis.from_url(h.REDIS_TEST_URL), prefix=prefix)
    app = create_app(config, sink=sink, state=State.from_url(h.REDIS_TEST_URL, prefix=prefix))
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    try:
        with h.running(app, hooks) as url:
            yield url, app.state.metrics
    finally:
        h.delete_prefix(client, prefix)
        client.close()


def test_metrics_token_is_required_when_set() -> None:
    """With hooks.metrics_token_env set, /metrics wants that Bearer token: 401 without it or
    with another, the text with it."""
    hooks = HookSettings(registry_token=Secret(TOKEN), metrics_token=Secret(METRICS_TOKEN))
    with serving(hooks) as (url, _), httpx.Client(base_url=url) as http:
        assert http.get("/metrics").status_code == 401
        wrong = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert wrong.status_code == 401 and METRICS_TOKEN not in wrong.text
        good = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert good.status_code == 200 and "regsweep_events_total" in good.text


def test_metrics_token_configured_but_unset_turns_metrics_off() -> None:
    """A metrics_token_env whose variable is unset does not leave /metrics open: 404."""
    hooks = HookSettings(registry_token=Secret(TOKEN), unset=("hooks.metrics_token_env",))
    with serving(hooks) as (url, _):
        response = httpx.get(f"{url}/metrics")
    assert response.status_code == 404
    assert response.json() == {"error": "metrics disabled: hooks.metrics_token_env is not set"}


def test_metrics_listen_serves_metrics_there_only() -> None:
    """With hooks.metrics_listen, /metrics answers on that address and 404 on the hooks'
    port, and the hooks answer 404 on the metrics address."""
    metrics_port = free_port()
    hooks = HookSettings(registry_token=Secret(TOKEN), metrics_listen=f"127.0.0.1:{metrics_port}")
    body = h.envelope(h.registry_event(event_id="apart-metrics"))
    with serving(hooks) as (url, _):
        scrape_url = f"http://127.0.0.1:{metrics_port}"
        assert httpx.post(f"{url}/hooks/registry", content=body, headers=HEADERS).status_code == 202
        assert httpx.get(f"{url}/metrics").status_code == 404
        scraped = httpx.get(f"{scrape_url}/metrics")
        assert scraped.status_code == 200 and 'outcome="accepted"' in scraped.text
        hook_there = httpx.post(f"{scrape_url}/hooks/registry", content=body, headers=HEADERS)
        assert hook_there.status_code == 404
        assert httpx.get(f"{scrape_url}/healthz").status_code == 404


def test_a_flood_of_scrapes_renders_once_a_second_and_hooks_are_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three hundred concurrent scrapes alongside fifty deliveries: every scrape is
    answered, the metrics are rendered (and the workers' read from Redis) at most once per
    second the flood lasted (plus the first), and every delivery is accepted."""
    hooks = HookSettings(registry_token=Secret(TOKEN))
    renders: list[int] = []
    with serving(hooks) as (url, metrics):
        render = metrics.render

        def counted() -> bytes:
            renders.append(1)
            return render()

        monkeypatch.setattr(metrics, "render", counted)
        bodies = [h.envelope(h.registry_event(event_id=f"flood-{i}")) for i in range(50)]

        async def flood() -> tuple[list[httpx.Response], list[httpx.Response]]:
            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
                scrapes = [client.get("/metrics") for _ in range(300)]
                posts = [client.post("/hooks/registry", content=b, headers=HEADERS) for b in bodies]
                done = await asyncio.gather(*scrapes, *posts)
                return list(done[:300]), list(done[300:])

        started = time.monotonic()
        scraped, posted = asyncio.run(flood())
        lasted = time.monotonic() - started
    assert {r.status_code for r in scraped} == {200}
    assert 1 <= len(renders) <= 1 + int(lasted)
    assert [r.status_code for r in posted] == [202] * 50
