"""kombu's Redis transport, with one fix so a worker survives Redis restarting.

Celery 5.7.0 (``Consumer.on_connection_error_after_connected``) collects the
broken connection, which detaches its channel from the transport, and then
closes it. Closing the channel restores the messages it had delivered but not
acknowledged (``acks_late`` tasks in flight), and a task that finishes later
acknowledges on the same channel; both build a Redis client from the detached
channel and die with ``AttributeError: 'NoneType' object has no attribute
'hostname'`` (or ``'client'``): an "Unrecoverable error" that stops the whole
worker. Seen with celery 5.7.0, kombu 5.7.0, redis-py 8.1.

Here a detached channel raises Redis' ``ConnectionError`` instead, which
kombu and Celery already treat as a lost connection (logged, not fatal).
Nothing is lost: the unacknowledged messages are still in Redis's
``unacked`` hash and the transport puts them back on their queue once the
visibility timeout passes (``restore_visible``); every task is idempotent,
so a late redelivery is safe.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

#: How Celery's ``broker_transport`` names this module's transport.
TRANSPORT = "worker.queue.broker:Transport"


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise RedisConnectionError("broker channel is closed (connection lost)")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]


class Transport(kombu_redis.Transport):
    Channel = Channel
