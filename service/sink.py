"""Where the service hands verified, normalised events and jobs.

The service only ever talks to an :class:`EventSink`; what stands behind it
(Redis lists here, Celery later) is the worker side's business. A sink raises
:class:`~worker.errors.StateError` when it cannot persist, and the service
then answers 503 so the sender retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis

from worker.events import CiEvent, RegistryEvent
from worker.state import DEFAULT_PREFIX, Push, StateKeys, async_client, wrapped


class EventSink(Protocol):
    async def registry_events(self, events: list[RegistryEvent]) -> None:
        """Persist or enqueue manifest pushes and deletes; raise StateError when it cannot."""

    def registry_push(self, events: list[RegistryEvent]) -> Push | None:
        """The one LPUSH that :meth:`registry_events` would make for ``events``, for the
        state store to make together with the dedup claims; None when it is not one."""

    async def ci_event(self, event: CiEvent) -> None:
        """Persist or enqueue a CI event; raise StateError when it cannot."""

    def ci_push(self, event: CiEvent) -> Push | None:
        """The one LPUSH that :meth:`ci_event` would make, as :meth:`registry_push`."""

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        """Enqueue a job whose record already exists; raise StateError when it cannot."""


class RedisListSink:
    """LPUSHes JSON messages to ``<prefix>queue:events`` and ``<prefix>queue:jobs``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.keys = StateKeys(prefix)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisListSink:
        return cls(async_client(url), prefix=prefix)

    async def aclose(self) -> None:
        with wrapped("close"):
            await self.client.aclose()

    def registry_push(self, events: list[RegistryEvent]) -> Push | None:
        return None  # publishes through registry_events only (subclasses extend that)

    def ci_push(self, event: CiEvent) -> Push | None:
        return None

    async def registry_events(self, events: list[RegistryEvent]) -> None:
        messages = [json.dumps({"type": "registry", "event": e.to_dict()}) for e in events]
        if messages:
            with wrapped("LPUSH events"):
                await self.client.lpush(self.keys.events_queue, *messages)

    async def ci_event(self, event: CiEvent) -> None:
        message = json.dumps({"type": "ci", "event": event.to_dict()})
        with wrapped("LPUSH events"):
            await self.client.lpush(self.keys.events_queue, message)

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        message = json.dumps({"job_id": job_id, "kind": kind, "params": dict(params)})
        with wrapped("LPUSH jobs"):
            await self.client.lpush(self.keys.jobs_queue, message)
