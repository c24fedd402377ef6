"""What ``/healthz`` reports: Redis and the registry reachable, the last successful prune.

``/healthz`` is liveness: it answers 200 whenever the process serves requests,
with details an operator (or a dashboard) reads. ``/readyz`` is readiness: 503
when Redis does not answer, because a hook can then record nothing. Neither
depends on the registry's answer: the service never calls the registry on the
request path, and deliveries are still recorded while it is down (the workers
retry). The registry's reachability is a detail here, for people.

The checks cost one Redis round trip and one ``GET /v2/``, each bounded
(:data:`CHECK_TIMEOUT`), made at most once per :data:`HEALTH_INTERVAL` however
many requests come (they share the one in flight), so an unauthenticated
flood of ``/healthz`` never becomes a flood on the registry.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, Final

import httpx

from worker.errors import StateError
from worker.settings.model import RegistrySettings
from worker.store.state import State
from worker.store.status import health_records

#: Each check gives up after this long (the answer then says ``timeout``).
CHECK_TIMEOUT: Final = 2.0
#: A ``/healthz`` within this long of the last check gets that check's answer.
HEALTH_INTERVAL: Final = 2.0
#: ``GET /v2/`` answers these when a registry is there (401: it wants credentials).
REGISTRY_ANSWERS: Final = frozenset({200, 401})


def registry_client(settings: RegistrySettings) -> httpx.AsyncClient:
    """The client ``/healthz`` reaches the registry with: its TLS settings, no credentials
    (``GET /v2/`` answering 401 is an answer), short timeouts, one connection."""
    return httpx.AsyncClient(
        base_url=settings.url,
        verify=settings.ca_file or True,
        timeout=httpx.Timeout(CHECK_TIMEOUT),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        follow_redirects=False,
    )


class Health:
    """The ``/healthz`` document, made at most once per ``interval``."""

    def __init__(
        self,
        state: State,
        registry: httpx.AsyncClient,
        *,
        interval: float = HEALTH_INTERVAL,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.state = state
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self._document: dict[str, Any] = {}
        self._made = -math.inf
        self._making: asyncio.Future[dict[str, Any]] | None = None

    async def document(self) -> dict[str, Any]:
        if time.monotonic() - self._made < self.interval:
            return self._document
        if self._making is None:
            self._making = asyncio.ensure_future(self._make())
            self._making.add_done_callback(self._made_one)
        return await asyncio.shield(self._making)

    def _made_one(self, _: asyncio.Future[dict[str, Any]]) -> None:
        self._making = None

    async def _make(self) -> dict[str, Any]:
        redis_check, registry_check = await asyncio.gather(
            self._timed(self._redis()), self._timed(self._registry())
        )
        details = await self._details() if redis_check["ok"] else {}
        self._document = {
            "ok": True,
            "redis": redis_check,
            "registry": registry_check,
            "last_successful_prune": details.get("last_prune"),
            "maintenance_job": details.get("maintenance"),
        }
        self._made = time.monotonic()
        return self._document

    async def _timed(self, check: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(check, self.timeout)
        except TimeoutError:
            answer = {"ok": False, "error": f"no answer within {self.timeout:g}s"}
        return answer | {"seconds": round(time.perf_counter() - started, 4)}

    async def _redis(self) -> dict[str, Any]:
        try:
            await self.state.ping()
        except StateError as exc:
            return {"ok": False, "error": str(exc)[:300]}
        return {"ok": True}

    async def _registry(self) -> dict[str, Any]:
        try:
            response = await self.registry.get("/v2/")
        except httpx.HTTPError as exc:
            # Only the exception's class and text: no URL (it may name an internal host).
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        ok = response.status_code in REGISTRY_ANSWERS
        answer: dict[str, Any] = {"ok": ok, "status": response.status_code}
        if not ok:
            answer["error"] = f"GET /v2/ answered {response.status_code}: not a registry's answer"
        return answer

    async def _details(self) -> dict[str, Any]:
        try:
            records = await asyncio.wait_for(health_records(self.state), self.timeout)
        except (StateError, TimeoutError):
            return {}
        return {"last_prune": records.last_prune, "maintenance": records.maintenance_job}
