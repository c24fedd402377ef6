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

:class:`PruneTurns` is how every prune gets its turn, a worker's and ``regsweep
prune``'s alike: no maintenance window running (the flag a GC sets), then the
repository's lock. The CLI waits a while for a busy repository instead of giving up.
:func:`held_repositories` is what a maintenance window waits on: the repositories whose
prune holds its lock now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Final

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.backoff import backoff
from worker.errors import Deferred, RepositoryBusy, TurnLost
from worker.identity import ProcessIdentity
from worker.store.keys import Keys
from worker.store.redis import text, wrapped
from worker.store.window import window_running

log = logging.getLogger("regsweep.worker")

PRUNE_LOCK_TTL: Final = timedelta(seconds=30)
PRUNE_LOCK_RENEW_EVERY: Final = timedelta(seconds=5)
#: Between two looks at a busy repository's lock, while waiting for it (at most).
TURN_POLL_MAX: Final = timedelta(seconds=2)

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
    value = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        return ProcessIdentity.from_json(json.loads(value)["owner"])
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

    async def still_ours(self) -> None:
        """Raise :class:`TurnLost` unless the lock is still this one's: asked before each
        wave of deletions, so a lock taken over meanwhile stops the prune at once rather
        than at the next renewal. A Redis that does not answer is no proof of loss (the
        renewal keeps trying while the TTL lasts)."""
        if not self.lost:
            try:
                raw = await self._redis.get(self.key)
            except RedisError:
                return
            self.lost = raw is None or text(raw) != self._token
        if self.lost:
            raise TurnLost(
                f"lost {self.key} (it expired unrenewed, or Redis lost it): another prune of "
                "the repository may run now, so this one deletes nothing more"
            )

    async def release(self) -> None:
        try:
            await self._redis.eval(_DELETE_IF, 1, self.key, self._token)
        except RedisError as exc:
            log.warning("could not release %s; it expires by itself: %s", self.key, exc)


def held_repositories(client: redis.Redis, keys: Keys) -> list[str]:
    """The repositories whose prune lock is held now, sorted (one ``SCAN`` over the locks)."""
    prefix = keys.prune_locks.removesuffix("*")
    with wrapped("cannot list the prune locks"):
        held = [text(k) for k in client.scan_iter(match=keys.prune_locks, count=1000)]
    return sorted(k.removeprefix(prefix) for k in held)


def holder_text(raw: bytes | str | None) -> str:
    """Who holds a prune lock, as a message says it."""
    holder = None if raw is None else holder_of(raw)
    return "unknown holder" if holder is None else f"pid {holder.pid} on {holder.host}"


class PruneTurns:
    """A repository's turn to be pruned: no maintenance window, and its lock held.

    ``patience`` zero (a worker): a busy repository raises
    :class:`~worker.errors.RepositoryBusy` at once. Otherwise (``regsweep prune``)
    the lock is looked at again, with backoff, for up to ``patience``; ``on_wait``
    is told once (repository, holder) when the wait begins. A running window
    raises :class:`~worker.errors.Deferred`, before and after the wait, unless
    ``window`` is False (a dry run: reads only, which a read-only registry serves).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        patience: timedelta = timedelta(0),
        on_wait: Callable[[str, str], None] | None = None,
        window: bool = True,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._patience = patience.total_seconds()
        self._on_wait = on_wait
        self._window = window

    @contextlib.asynccontextmanager
    async def take(self, repository: str) -> AsyncIterator[PruneLock]:
        """Hold ``repository``'s lock (renewed) while the block runs."""
        await self._no_window(repository)
        lock = PruneLock(self._redis, self._keys.prune_lock(repository))
        await self._acquire(lock, repository)
        async with lock.held():
            # A window that began while this waited has waited for no lock of ours.
            await self._no_window(repository)
            yield lock

    async def _no_window(self, repository: str) -> None:
        if not self._window:
            return
        job = await window_running(self._redis, self._keys)
        if job is not None:
            raise Deferred(
                f"a maintenance window is running (GC job {job}): the registry is read-only "
                f"until it ends, and {repository} is not pruned before"
            )

    async def _acquire(self, lock: PruneLock, repository: str) -> None:
        deadline = time.monotonic() + self._patience
        attempt = 0
        while not await lock.acquire():
            with wrapped(f"cannot read {lock.key}"):
                holder = holder_text(await self._redis.get(lock.key))
            delay = backoff(attempt + 1, base=0.1, cap=TURN_POLL_MAX.total_seconds())
            if time.monotonic() + delay > deadline:
                raise RepositoryBusy(f"another prune holds {repository} ({holder})")
            if attempt == 0 and self._on_wait is not None:
                self._on_wait(repository, holder)
            attempt += 1
            await asyncio.sleep(delay)
            await self._no_window(repository)
