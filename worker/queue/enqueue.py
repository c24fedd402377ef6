"""One way to put work on a queue: every task regsweep sends, it sends by :func:`enqueue`.

The service (:class:`service.publish.CelerySink`, where the broker is not plain Redis), the
CLI (``prune --enqueue``, ``gc --enqueue``, ``replay``: :class:`Enqueuer`) and the tasks
themselves (a push's prune, the untagged grace's prune, a sweep's children, the prunes parked
during a window) all send a :class:`~worker.queue.messages.TaskMessage` by task name through
Celery. A broker that cannot take it raises :class:`~worker.errors.StateError` naming the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import partial
from typing import Any, Protocol

from celery import Celery, current_app
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from worker.engine.events import CiEvent
from worker.errors import StateError
from worker.queue.celery_app import make_celery
from worker.queue.messages import TaskMessage, ci_message, job_message
from worker.queue.names import TASK_PRUNE, prune_queue
from worker.settings.model import Config


def enqueue(
    app: Celery,
    message: TaskMessage,
    *,
    countdown: float | None = None,
    kwargsrepr: str | None = None,
) -> None:
    """Send ``message`` by name (after ``countdown`` seconds); ``kwargsrepr`` replaces the
    repr Celery would compute (``saferepr`` over every argument: half the cost of
    ``send_task`` for a group-committed batch of events)."""
    try:
        app.send_task(
            message.name,
            kwargs=message.kwargs,
            queue=message.queue,
            countdown=countdown,
            argsrepr="()" if kwargsrepr is not None else None,
            kwargsrepr=kwargsrepr,
        )
    except (KombuError, RedisError, OSError) as exc:
        raise StateError(f"broker refused {message.name}: {type(exc).__name__}: {exc}") from exc


def prune_message(repository: str, **kwargs: Any) -> TaskMessage:
    """A prune of ``repository``, on the queue its ``trigger`` (default ``api``) belongs to."""
    queue = prune_queue(str(kwargs.get("trigger", "api")))
    return TaskMessage(TASK_PRUNE, {"repository": repository, **kwargs}, queue)


def enqueue_prune(repository: str, *, countdown: float | None = None, **kwargs: Any) -> None:
    """A worker's prune of ``repository``, sent through the process's Celery app."""
    enqueue(current_app, prune_message(repository, **kwargs), countdown=countdown)


class JobSink(Protocol):
    """What hands recorded jobs and CI events to the workers (the service's sink, or
    :class:`Enqueuer`)."""

    async def ci_event(self, event: CiEvent) -> None: ...

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None: ...


class Enqueuer:
    """The CLI's :class:`JobSink`: each message sent by :func:`enqueue` from a thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def from_config(cls, config: Config) -> Enqueuer:
        return cls(make_celery(config))

    async def ci_event(self, event: CiEvent) -> None:
        await asyncio.to_thread(enqueue, self.app, ci_message(event))

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        await asyncio.to_thread(partial(enqueue, self.app, job_message(job_id, kind, params)))

    def close(self) -> None:
        self.app.close()
