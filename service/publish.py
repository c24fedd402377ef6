"""The production sink: verified events and jobs become Celery tasks on the Redis broker.

On a plain ``redis://`` broker every message (registry events, CI events,
jobs) is LPUSHed from the event loop (:func:`redis_envelope`): no thread, no
kombu connection machinery, the service's short Redis timeouts, and a
fraction of ``send_task``'s cost on the hook's hot path; registry and CI
events go in the same atomic step as their dedup records when the broker is
the state store's own Redis (:mod:`service.ingest`). Any other broker gets
Celery's ``send_task``, run in a worker thread because it blocks. Registry
events arrive group-committed (:class:`service.ingest.RegistryIngest`): the
events of every delivery that waited for one commit go out in one
``regsweep.registry_events`` message. A broker that cannot take a message
raises :class:`~worker.errors.StateError`: the service answers 503 and the
sender's retry is processed later (the registry retries forever).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any, Final, Protocol

import anyio.to_thread
import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu.utils.json import dumps

from worker.engine.events import CiEvent, RegistryEvent
from worker.errors import StateError
from worker.queue.celery_app import make_celery
from worker.queue.enqueue import enqueue
from worker.queue.messages import TaskMessage, ci_message, job_message
from worker.queue.names import EVENTS_QUEUE, TASK_REGISTRY_EVENTS
from worker.settings.model import Config
from worker.store.redis import async_client, server_of, wrapped
from worker.store.state import Push

#: kombu's ``delivery_mode`` for a message Redis keeps (``PERSISTENT_DELIVERY_MODE``).
PERSISTENT: Final = 2
#: ``json.dumps`` separators without blanks.
COMPACT: Final = (",", ":")
#: Celery's own ``kwargsrepr`` is cut at 1024 characters too.
KWARGSREPR_LIMIT: Final = 1024


class CelerySink:
    """Sends ``regsweep.*`` tasks by name; the service never imports a task's code."""

    def __init__(self, app: Celery, broker_url: str | None = None) -> None:
        self.app = app
        #: Set when the broker is plain Redis: registry events are LPUSHed directly.
        self.broker_url = broker_url
        self._broker: aioredis.Redis | None = None
        self._broker_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, config: Config) -> CelerySink:
        url = config.redis_url
        direct = url if url is not None and url.startswith("redis://") else None
        return cls(make_celery(config), direct)

    async def registry_events(self, events: list[RegistryEvent]) -> None:
        """One ``regsweep.registry_events`` message for all ``events`` (group-committed
        by :class:`service.ingest.RegistryIngest`)."""
        if not events:
            return
        push = self.registry_push(events)
        if push is None:
            message, kwargsrepr = _registry_message(events)
            await self.send(message, kwargsrepr=kwargsrepr)
            return
        try:
            await self._broker_client().lpush(push.key, *push.values)
        except (redis.RedisError, OSError) as exc:
            raise StateError(
                f"broker refused {TASK_REGISTRY_EVENTS}: {type(exc).__name__}: {exc}"
            ) from exc

    def registry_push(self, events: list[RegistryEvent]) -> Push | None:
        """On a plain ``redis://`` broker: the LPUSH of the events' one message."""
        if self.broker_url is None:
            return None
        message, kwargsrepr = _registry_message(events)
        return self.push(message, kwargsrepr)

    def _broker_client(self) -> aioredis.Redis:
        """The asyncio client of the running loop (a client's connections belong to one)."""
        loop = asyncio.get_running_loop()
        if self._broker is None or self._broker_loop is not loop:
            assert self.broker_url is not None
            self._broker, self._broker_loop = async_client(self.broker_url), loop
        return self._broker

    async def aclose(self) -> None:
        """Close the event loop's broker client (the service's lifespan calls this)."""
        if self._broker is not None and self._broker_loop is asyncio.get_running_loop():
            await self._broker.aclose()
        self._broker = self._broker_loop = None

    async def ci_event(self, event: CiEvent) -> None:
        await self.publish(ci_message(event))

    def ci_push(self, event: CiEvent) -> Push | None:
        return self.push(ci_message(event))

    async def job(self, job_id: str, kind: str, params: Mapping[str, Any]) -> None:
        await self.publish(job_message(job_id, kind, params))

    def push(self, message: TaskMessage, kwargsrepr: str | None = None) -> Push | None:
        """On a plain ``redis://`` broker: the LPUSH that publishes ``message``."""
        if self.broker_url is None:
            return None
        envelope = redis_envelope(self.app, message, kwargsrepr or _kwargsrepr(message))
        return Push(server_of(self._broker_client()), message.queue, (envelope,))

    async def publish(self, message: TaskMessage) -> None:
        """LPUSH ``message`` from the event loop when the broker is plain Redis (the
        service's short timeouts apply), else :meth:`send` it through Celery."""
        push = self.push(message)
        if push is None:
            await self.send(message)
            return
        with wrapped(f"broker refused {message.name}"):
            await self._broker_client().lpush(push.key, *push.values)

    async def send(self, message: TaskMessage, *, kwargsrepr: str | None = None) -> None:
        """Publish ``message`` from a worker thread; StateError when the broker refuses."""
        await anyio.to_thread.run_sync(partial(self.send_blocking, message, kwargsrepr=kwargsrepr))

    def send_blocking(self, message: TaskMessage, *, kwargsrepr: str | None = None) -> None:
        """Publish ``message`` (:func:`worker.queue.enqueue.enqueue`)."""
        enqueue(self.app, message, kwargsrepr=kwargsrepr)

    def close(self) -> None:
        self.app.close()


def _kwargsrepr(message: TaskMessage) -> str:
    """What Celery would log for the message's arguments (its saferepr, kept short)."""
    return repr(message.kwargs)[:KWARGSREPR_LIMIT]


def _registry_message(events: list[RegistryEvent]) -> tuple[TaskMessage, str]:
    """The task message for ``events``, and the short ``kwargsrepr`` it is sent with."""
    payload = [event_payload(e) for e in events]
    message = TaskMessage(TASK_REGISTRY_EVENTS, {"events": payload}, EVENTS_QUEUE)
    return message, f"{{'events': <{len(payload)} events>}}"


def redis_envelope(app: Celery, message: TaskMessage, kwargsrepr: str) -> str:
    """What ``app.send_task`` would LPUSH for ``message`` through kombu's Redis transport.

    Celery builds the task message (protocol 2, its public ``create_task_message``,
    once per task name: see :func:`_protocol2`); the wrapping is
    ``kombu.transport.virtual.Channel.basic_publish`` for the anonymous exchange
    (``send_task(queue=name)`` publishes there): base64 body, a delivery tag, the queue
    as routing key, priority 0 so the key is the queue's own name. JSON without the
    blanks after separators: the consumer parses it the same, and every later step
    (base64, the envelope's JSON, the LPUSH) handles a tenth fewer bytes.
    ``tests/test_service_ingest.py`` compares it with a real ``send_task`` message.
    """
    task_id = str(uuid.uuid4())
    headers, properties, embed = _protocol2(app, message.name, app.thread_oid)
    body = ((), message.kwargs, embed)
    envelope = {
        "body": base64.b64encode(dumps(body, separators=COMPACT).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {**headers, "id": task_id, "root_id": task_id, "kwargsrepr": kwargsrepr},
        "properties": {
            **properties,
            "correlation_id": task_id,
            "delivery_mode": PERSISTENT,
            "delivery_info": {"exchange": "", "routing_key": message.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return str(dumps(envelope, separators=COMPACT))


@functools.lru_cache(maxsize=16)
def _protocol2(
    app: Celery, name: str, reply_to: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Celery's headers, properties and body ``embed`` for a task sent by ``name`` with
    no parent, no ETA and no expiry: only the task id (and ``root_id``, which is the
    task id) and ``kwargsrepr`` differ from one message to the next, so
    ``create_task_message`` (and the host-name lookup in its ``origin``) runs once."""
    headers, properties, body, _ = app.amqp.create_task_message(
        "template",
        name,
        (),
        {},
        reply_to=reply_to,
        ignore_result=None,
        argsrepr="()",
        kwargsrepr="",
    )
    return dict(headers), dict(properties), dict(body[2])


def event_payload(event: RegistryEvent) -> dict[str, Any]:
    """``event.to_dict()`` without ``dataclasses.asdict``'s deep copy (every field is a
    str, int, None or the timestamp), which cost more than the rest of the hook."""
    return {**vars(event), "timestamp": event.timestamp.isoformat()}


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
