"""How regsweep talks to Redis: clients that give up quickly, errors wrapped, values decoded.

Every store (state, tag index, audit, locks, metrics) and the service make their
clients here, so a Redis that is down or frozen answers within seconds, and
redis' and the socket's exceptions surface as :class:`~worker.errors.StateError`.
Code outside the store never imports redis: it holds a client made here, annotated
:data:`RedisClient` or :data:`AsyncRedisClient`, and hands it to a store.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeAlias

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.errors import StateError

#: Workers' Redis calls: a task waits in place for Redis anyway (worker.queue.tasks).
SOCKET_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 1.0
RETRIES: Final = 2
#: The service's: a hook answers 503 within about a second when Redis is gone or
#: stalled (a SIGSTOPped server completes the TCP handshake and never answers), so
#: the sender retries instead of holding the registry's notification queue. Two
#: attempts of 0.35 s each, both for the connection and for every answer.
SERVICE_TIMEOUT: Final = 0.35


SERVICE_RETRIES: Final = 1

#: A blocking client (workers' tasks, the CLI), as code outside the store names it.
RedisClient: TypeAlias = redis.Redis
#: An event loop's client (the service, a worker's process context), likewise.
AsyncRedisClient: TypeAlias = aioredis.Redis


def server_of(client: aioredis.Redis) -> str:
    """Which Redis server and database ``client`` talks to, as one comparable string."""
    options = client.connection_pool.connection_kwargs
    where = options.get("path") or f"{options.get('host')}:{options.get('port')}"
    return f"{where}/{options.get('db', 0)}"


@contextmanager
def wrapped(what: str) -> Iterator[None]:
    """Turn redis' and the socket's exceptions into :class:`StateError` saying ``what`` failed
    (``"cannot read the maintenance flag"``), then why."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise StateError(f"{what}: {type(exc).__name__}: {exc}") from exc


def shown_url(url: str) -> str:
    """A Redis URL fit for a message: no user, password or query (which may hold one)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "(a redis URL that does not parse)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_options() -> dict[str, Any]:
    return {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}


def async_client(url: str) -> aioredis.Redis:
    """The service's ``redis.asyncio`` client: gives up within about a second."""
    retry = AsyncRetry(ExponentialBackoff(cap=0.05, base=0.01), SERVICE_RETRIES)
    return aioredis.Redis.from_url(
        url, retry=retry, socket_timeout=SERVICE_TIMEOUT, socket_connect_timeout=SERVICE_TIMEOUT
    )


def async_worker_client(url: str) -> aioredis.Redis:
    """A ``redis.asyncio`` client for a worker's event loop and the CLI: the workers'
    timeouts (a task waits in place for Redis anyway), no retries of the service's."""
    return aioredis.Redis.from_url(url, **redis_options())


def sync_client(url: str) -> redis.Redis:
    """A blocking client for workers and the CLI: gives up within a few seconds."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), RETRIES)
    return redis.Redis.from_url(url, retry=retry, **redis_options())
