"""A test double for the service's event sink: JSON on plain Redis lists.

The service's own sink sends Celery messages; tests that want to read what the
service accepted, without a worker, give it this one instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from worker.engine.events import CiEvent, RegistryEvent
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.redis import async_client, wrapped
from worker.store.state import Push


class RedisListSink:
    """LPUSHes JSON messages to ``<prefix>queue:events`` and ``<prefix>queue:jobs``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)

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
