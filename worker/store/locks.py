"""The per-repository prune lock: an owner, a short TTL, a renewal, dead owners broken.

A prune holds ``<prefix>lock:prune:<repository>`` while it plans and deletes.
The lock's value names the process holding it (:class:`ProcessIdentity`);
while the prune runs, a task on the worker's event loop renews the 30 s TTL
every 5 s. So when the worker dies (SIGKILL, OOM, a lost machine):

- on the same machine, the next prune of the repository sees the holder's
  pid gone (or reused) and breaks the lock at once;
- elsewhere, the lock expires within the TTL of the last renewal.

A prune that finds the repository held by a live prune does not wait for it:
it raises :class:`~worker.errors.RepositoryBusy` and its task is retried with a
countdown, so no worker slot is held waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import timedelta
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.identity import ProcessIdentity
from worker.store.redis import wrapped

log = logging.getLogger("regsweep.worker")

PRUNE_LOCK_TTL: Final = timedelta(seconds=30)
PRUNE_LOCK_RENEW_EVERY: Final = timedelta(seconds=5)

_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_DELETE_IF: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def holder_of(raw: bytes | str) -> ProcessIdentity | None:
    """The process a lock value names; ``None`` when unreadable (then only the TTL tells)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        return ProcessIdentity.from_json(json.loads(text)["owner"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class PruneLock:
    """One attempt at one repository's lock. Not reentrant."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        *,
        ttl: timedelta = PRUNE_LOCK_TTL,
        renew_every: timedelta = PRUNE_LOCK_RENEW_EVERY,
    ) -> None:
        self._redis = redis
        self.key = key
        self._ttl_ms = int(ttl.total_seconds() * 1000)
        self._renew_every = renew_every.total_seconds()
        self._token = json.dumps({"owner": asdict(ProcessIdentity.of()), "nonce": uuid.uuid4().hex})
        #: Set when a renewal found the lock no longer ours (expired and maybe taken).
        self.lost = False

    async def acquire(self) -> bool:
        """Take the lock; breaks it first when its holder is provably dead. False: held."""
        with wrapped(f"cannot take {self.key}"):
            if await self._redis.set(self.key, self._token, nx=True, px=self._ttl_ms):
                return True
            raw = await self._redis.get(self.key)
            if raw is None or not self._dead(raw):
                return False
            if await self._redis.eval(_DELETE_IF, 1, self.key, raw):
                log.warning("broke the prune lock %s: its process is gone", self.key)
            return bool(await self._redis.set(self.key, self._token, nx=True, px=self._ttl_ms))

    @staticmethod
    def _dead(raw: bytes | str) -> bool:
        holder = holder_of(raw)
        return holder is not None and not holder.is_alive()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[PruneLock]:
        """Renew the lock while the block runs; release it afterwards."""
        renewal = asyncio.create_task(self._renew())
        try:
            yield self
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await self.release()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                renewed = await self._redis.eval(_RENEW, 1, self.key, self._token, self._ttl_ms)
            except RedisError as exc:
                # Transient: the TTL leaves several more tries before the lock expires.
                log.warning("could not renew %s (retrying): %s", self.key, exc)
                continue
            if not renewed:
                self.lost = True
                log.error("lost %s: another prune of the repository may run now", self.key)
                return

    async def release(self) -> None:
        try:
            await self._redis.eval(_DELETE_IF, 1, self.key, self._token)
        except RedisError as exc:
            log.warning("could not release %s; it expires by itself: %s", self.key, exc)
