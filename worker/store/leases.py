"""The workers' leases in Redis: which worker holds which broker message, and who is alive.

One hash, ``leases``: a delivery tag -> the lease (JSON, written and read by
:mod:`worker.queue.leases`), kept :data:`LEASES_TTL` after its last write; and one
liveness key per worker, ``worker:<id>``, that expires unless its worker renews it.
Every call raises :class:`~worker.errors.StateError` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Final

import redis

from worker.store.keys import Keys
from worker.store.redis import text, wrapped

#: A lease outlives any message it can describe (the visibility timeout is hours).
LEASES_TTL: Final = timedelta(days=2)


class LeaseRecords:
    """The lease hash and the liveness keys of one installation, over the blocking client."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    def record(self, tag: str, lease: str) -> None:
        """Record ``lease`` for the message ``tag``; the hash lives on :data:`LEASES_TTL`."""
        with wrapped("cannot record a lease"):
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(self._keys.leases, tag, lease)
            pipe.expire(self._keys.leases, LEASES_TTL)
            pipe.execute()

    def leases(self) -> dict[str, bytes | str]:
        """Every lease recorded: delivery tag -> the lease as written."""
        with wrapped("cannot read the leases"):
            raw = self._client.hgetall(self._keys.leases)
        return {text(tag): value for tag, value in raw.items()}

    def forget(self, tags: Sequence[str]) -> None:
        """Drop the leases of ``tags`` (acknowledged, unreadable or given back)."""
        if tags:
            with wrapped("cannot forget leases"):
                self._client.hdel(self._keys.leases, *tags)

    def unacknowledged(self, unacked_key: str, tags: Sequence[str]) -> set[str]:
        """Which of ``tags`` the broker still holds unacknowledged in its hash ``unacked_key``
        (kombu's, on the same Redis), in one round trip."""
        with wrapped("cannot read the broker's unacknowledged messages"):
            pipe = self._client.pipeline(transaction=False)
            for tag in tags:
                pipe.hexists(unacked_key, tag)
            answers = pipe.execute()
        return {tag for tag, held in zip(tags, answers, strict=True) if held}

    def beat(self, worker_id: str, identity: str, ttl: timedelta) -> None:
        """Keep worker ``worker_id`` (its process ``identity``, JSON) alive for ``ttl``."""
        with wrapped("cannot renew the worker's liveness"):
            self._client.set(self._keys.worker(worker_id), identity, ex=ttl)

    def alive(self, worker_id: str) -> bool:
        """Whether worker ``worker_id``'s liveness key has not expired."""
        with wrapped("cannot read a worker's liveness"):
            return bool(self._client.exists(self._keys.worker(worker_id)))

    def withdraw(self, worker_id: str) -> None:
        """Drop worker ``worker_id``'s liveness key (it stops)."""
        with wrapped("cannot withdraw the worker's liveness"):
            self._client.delete(self._keys.worker(worker_id))
