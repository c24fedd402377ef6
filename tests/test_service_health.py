"""``/healthz`` and ``/readyz`` over real uvicorn: a real registry and real Redis, each up,
down and frozen, with bounded answers however the parts misbehave."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from service.app import create_app
from service.health import CHECK_TIMEOUT, HEALTH_INTERVAL
from tests.harness import service as h
from tests.harness import stack
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.sinks import RedisListSink
from worker.settings.model import Config, RegistrySettings
from worker.store.keys import Keys
from worker.store.state import State

#: A /healthz answer may take one bounded check plus scheduling slack, never more.
ANSWER_BOUND = CHECK_TIMEOUT + 1.5


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    made = RegistryProcess.create(tmp_path / "registry")
    made.start()
    yield made
    made.stop()


def serve(registry_url: str, redis_url: str, prefix: str) -> Any:
    """The service on ``registry_url`` and ``redis_url`` (real uvicorn, in a thread)."""
    config = Config(registry=RegistrySettings(url=registry_url))
    sink = RedisListSink(aioredis.Redis.from_url(redis_url), prefix=prefix)
    state = State.from_url(redis_url, prefix=prefix)
    return h.running(create_app(config, sink=sink, state=state))


def timed_get(url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(url, timeout=30)
    return response, time.monotonic() - started


def test_healthz_details_redis_registry_and_the_last_successful_prune(
    own_registry: RegistryProcess,
) -> None:
    """With both parts up, /healthz says so and shows the last prune a worker recorded as
    succeeded (and how long ago); with the registry stopped it still answers 200 (liveness)
    and says the registry is unreachable, while /readyz stays ready (Redis answers)."""
    prefix = h.unique_prefix()
    client = redis.Redis.from_url(h.REDIS_TEST_URL)
    record = {"time": "2026-01-02T03:04:05+00:00", "job_id": "j1", "repository": "team/web"}
    client.set(Keys(prefix).last_prune, json.dumps(record))
    client.set(Keys(prefix).maintenance_flag, "gc-job-7")
    try:
        with serve(own_registry.url, h.REDIS_TEST_URL, prefix) as url:
            body = httpx.get(f"{url}/healthz").json()
            assert body["ok"] is True
            assert body["redis"]["ok"] is True and body["registry"] == body["registry"] | {
                "ok": True,
                "status": 200,
            }
            last = body["last_successful_prune"]
            assert (last["job_id"], last["repository"]) == ("j1", "team/web")
            assert last["age_seconds"] > 0
            assert body["maintenance_job"] == "gc-job-7"

            own_registry.stop()
            # A check within HEALTH_INTERVAL of the last shares its answer: wait it out.
            down = wait_for_json(f"{url}/healthz", lambda b: not b["registry"]["ok"])
            assert down["ok"] is True and down["redis"]["ok"] is True
            assert "ConnectError" in down["registry"]["error"]
            assert own_registry.url not in json.dumps(down)
            assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        h.delete_prefix(client, prefix)
        client.close()


def wait_for_json(url: str, condition: Any, timeout: float = 15.0) -> dict[str, Any]:
    def matching() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(url, timeout=10).json()
        return body if condition(body) else None

    return stack.wait_for(matching, timeout, step=0.1, what=f"GET {url}")


def test_frozen_registry_and_frozen_redis_answer_within_the_bound(tmp_path: Path) -> None:
    """A registry that accepts connections and never answers, and a Redis server stopped with
    SIGSTOP: /healthz still answers 200 within its bound, naming both as unreachable, and
    /readyz answers 503."""
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)  # connections complete in the backlog; nothing ever reads them
    server = h.RedisServer(free_port())
    server.start()
    try:
        registry_url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        with serve(registry_url, server.url, h.unique_prefix()) as url:
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            response, took = timed_get(f"{url}/healthz")
            assert response.status_code == 200 and took < ANSWER_BOUND, took
            body = response.json()
            assert body["registry"]["ok"] is False and body["redis"]["ok"] is False
            assert body["last_successful_prune"] is None
            ready, took = timed_get(f"{url}/readyz")
            assert ready.status_code == 503 and took < ANSWER_BOUND, took
            os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        frozen.close()
        server.stop()


class CountingRegistry(BaseHTTPRequestHandler):
    """Answers ``GET /v2/`` with 401 as a registry that wants credentials does, and counts."""

    calls = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with CountingRegistry.lock:
            CountingRegistry.calls += 1
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="registry"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_flood_of_healthz_checks_the_registry_once_per_interval() -> None:
    """200 concurrent /healthz requests cost the registry one or two GET /v2/ (one check is
    shared by every request that comes while it runs or within the interval); a registry
    answering 401 counts as reachable."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), CountingRegistry)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    CountingRegistry.calls = 0
    try:
        registry_url = f"http://127.0.0.1:{receiver.server_address[1]}"
        with serve(registry_url, h.REDIS_TEST_URL, h.unique_prefix()) as url:
            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: httpx.get(f"{url}/healthz"), range(200)))
            flood = time.monotonic() - started
            assert {a.status_code for a in answers} == {200}
            registry_answers = [a.json()["registry"] for a in answers]
            assert all(r["ok"] is True and r["status"] == 401 for r in registry_answers)
            # At most one check per interval the flood lasted (on a loaded machine 200
            # requests can outlast one), plus the start-up's and the one it began in.
            most = math.ceil(flood / HEALTH_INTERVAL) + 2
            assert 1 <= CountingRegistry.calls <= most, (CountingRegistry.calls, flood)
    finally:
        receiver.shutdown()
        receiver.server_close()
