"""The production sink: verified events and jobs become Celery tasks on the Redis broker.

Celery's ``send_task`` blocks on the broker, so it runs in a worker thread
and the event loop keeps answering other deliveries meanwhile. A broker that
cannot take the message raises :class:`~worker.errors.StateError`: the
service answers 503, releases the dedup key, and the sender's retry is
processed later (the registry retries forever).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import anyio.to_thread
import redis
from celery import Celery
from kombu.exceptions import KombuError

from worker.celery_app import (
    EVENTS_QUEUE,
    TASK_CI_EVENT,
    TASK_REGISTRY_EVENTS,
    TaskMessage,
    job_message,
    make_celery,
)
from worker.errors import StateError
from worker.events import CiEvent, RegistryEvent
from worker.policy import Config


class CelerySink:
    """Sends ``regsweep.*`` tasks by name; the service never imports a task's code."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def from_config(cls, config: Config) -> CelerySink:
        return cls(make_celery(config))

    async def registry_events(self, events: list[RegistryEvent]) -> None:
        if events:
            payload = [e.to_dict() for e in events]
            await self.send(TaskMessage(TASK_REGISTRY_EVENTS, {"events": payload}, EVENTS_QUEUE))

    async def ci_event(self, event: CiEvent) -> None:
        await self.send(TaskMessage(TASK_CI_EVENT, {"event": event.to_dict()}, EVENTS_QUEUE))

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        await self.send(job_message(job_id, kind, params))

    async def send(self, message: TaskMessage) -> None:
        """Publish ``message`` from a worker thread; StateError when the broker refuses."""
        await anyio.to_thread.run_sync(partial(self.send_blocking, message))

    def send_blocking(self, message: TaskMessage) -> None:
        try:
            self.app.send_task(message.name, kwargs=message.kwargs, queue=message.queue)
        except (KombuError, redis.RedisError, OSError) as exc:
            raise StateError(f"broker refused {message.name}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.app.close()
