"""Wrong tokens counted per client address, in Redis so that every service replica shares them.

A count lives ``ui:signin:<client>`` for a window that starts with its first wrong token
(the expiry is set once, not renewed by later guesses). :class:`service.access.SigninLimit`
decides from the count and its time left; this module only keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio as aioredis

from worker.store.keys import Keys
from worker.store.redis import wrapped


@dataclass(frozen=True)
class Failures:
    """Wrong tokens from one client within its window, and the seconds the window has left
    (Redis' ``TTL``: negative when there is no count)."""

    count: int
    ttl: int


class SigninFailures:
    """The counts of wrong tokens of one installation, over the service's client."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def of(self, client: str) -> Failures:
        """``client``'s count now (0 when none)."""
        key = self._keys.signin_failures(client)
        with wrapped("cannot read the sign-in failures"):
            pipe = self._client.pipeline(transaction=False)
            pipe.get(key)
            pipe.ttl(key)
            count, ttl = await pipe.execute()
        return Failures(0 if count is None else int(count), int(ttl))

    async def add(self, client: str, window: timedelta) -> Failures:
        """Count one more wrong token from ``client``; a new count lives ``window``."""
        key = self._keys.signin_failures(client)
        with wrapped("cannot count a failed sign-in"):
            pipe = self._client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, int(window.total_seconds()), nx=True)
            pipe.ttl(key)
            count, _, ttl = await pipe.execute()
        return Failures(int(count), int(ttl))
