"""The production sink: verified events and jobs become Celery tasks on the Redis broker.

Celery's ``send_task`` blocks on the broker, so it runs in a worker thread
and the event loop keeps answering other deliveries meanwhile. Registry
events are group-committed: deliveries that arrive while one publish is in
flight go out together in the next ``regsweep.registry_events`` message, and
each delivery is answered once the message carrying it is on the broker.
Building and sending a Celery message costs far more than one event, so
under load this is what keeps the hook fast; alone, a delivery is sent at
once (no timer, no added latency). A broker that
cannot take the message raises :class:`~worker.errors.StateError`: the
service answers 503, releases the dedup key, and the sender's retry is
processed later (the registry retries forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

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

#: Most events in one ``regsweep.registry_events`` message.
MAX_BATCH_EVENTS: Final = 256


@dataclass
class _Waiting:
    events: list[dict[str, Any]]
    done: asyncio.Future[None]


class CelerySink:
    """Sends ``regsweep.*`` tasks by name; the service never imports a task's code."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._waiting: list[_Waiting] = []
        self._publishing = False

    @classmethod
    def from_config(cls, config: Config) -> CelerySink:
        return cls(make_celery(config))

    async def registry_events(self, events: list[RegistryEvent]) -> None:
        if not events:
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting([event_payload(e) for e in events], done))
        if not self._publishing:
            self._publishing = True
            asyncio.create_task(self._publish_waiting())  # noqa: RUF006 - awaited via futures
        await done

    async def _publish_waiting(self) -> None:
        """Publish what waits, batch after batch, until nothing does."""
        try:
            while self._waiting:
                batch = self._take_batch()
                payload = [event for waiting in batch for event in waiting.events]
                message = TaskMessage(TASK_REGISTRY_EVENTS, {"events": payload}, EVENTS_QUEUE)
                try:
                    await self.send(message)
                except Exception as exc:  # every waiting request must get an answer
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
        finally:
            self._publishing = False

    def _take_batch(self) -> list[_Waiting]:
        taken: list[_Waiting] = []
        size = 0
        while self._waiting and (
            not taken or size + len(self._waiting[0].events) <= MAX_BATCH_EVENTS
        ):
            waiting = self._waiting.pop(0)
            taken.append(waiting)
            size += len(waiting.events)
        return taken

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


def event_payload(event: RegistryEvent) -> dict[str, Any]:
    """``event.to_dict()`` without ``dataclasses.asdict``'s deep copy (every field is a
    str, int, None or the timestamp), which cost more than the rest of the hook."""
    return {**vars(event), "timestamp": event.timestamp.isoformat()}


def _settle(batch: list[_Waiting], error: Exception | None) -> None:
    for waiting in batch:
        if waiting.done.done():  # the delivery's request went away meanwhile
            continue
        if error is None:
            waiting.done.set_result(None)
        else:
            waiting.done.set_exception(error)
