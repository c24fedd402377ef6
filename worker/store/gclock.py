"""One GC in the whole cluster: a Redis lock with an owner, a TTL and a watchdog.

The lock's value names its holder: the GC job's id and the process that runs
it (host, PID namespace, boot, pid, start time). So:

- a second GC request reads the running job's id instead of starting a GC;
- a crashed holder is noticed either when the TTL runs out (the watchdog that
  kept extending it died with the process) or, on the holder's own machine,
  at once: its pid is gone, or is another process now;
- the periodic check (:func:`worker.maintenance.recovery.recover_crashed_window`) can tell "a GC is
  running" from "a GC crashed and left the registry read-only".

Two beat processes firing the same window both send a GC; :meth:`GcLock.claim_window`
(``SET NX`` on a key named after the window's start) lets exactly one start it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Final

import redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from worker.identity import ProcessIdentity
from worker.store.keys import Keys
from worker.store.redis import wrapped

log = logging.getLogger("regsweep.gc")

#: A crashed GC holds the lock at most this long; the watchdog renews it well before.
LOCK_TTL: Final = timedelta(seconds=30)
EXTEND_EVERY: Final = timedelta(seconds=5)
#: A window's "GC started" claim outlives any window's retries of the beat message.
WINDOW_CLAIM_TTL: Final = timedelta(days=1)
UNKNOWN_JOB: Final = "unknown"

_DELETE_IF_VALUE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class LockHolder:
    """Who holds the GC lock: the job and the process running it."""

    job_id: str
    owner: ProcessIdentity
    nonce: str = ""
    #: The lock's value exactly as stored, for compare-and-delete.
    raw: str = ""

    def token(self) -> str:
        return json.dumps({"job_id": self.job_id, "owner": asdict(self.owner), "nonce": self.nonce})

    @classmethod
    def parse(cls, raw: bytes | str) -> LockHolder:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
            owner = ProcessIdentity.from_json(data["owner"])
            return cls(str(data["job_id"]), owner, str(data["nonce"]), text)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Unreadable: someone holds it, nobody can say who; the TTL will tell.
            return cls(UNKNOWN_JOB, ProcessIdentity(host="", pid=0), raw=text)


class GcLock:
    """The cluster-wide GC lock. Not reentrant; one instance per GC attempt."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        ttl: timedelta = LOCK_TTL,
        extend_every: timedelta = EXTEND_EVERY,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl.total_seconds()
        self._extend_every = extend_every.total_seconds()
        # thread_local=False: the watchdog thread extends with the token the task thread set.
        self._lock = Lock(client, keys.gc_lock, timeout=self._ttl, thread_local=False)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def acquire(self, job_id: str) -> LockHolder | None:
        """Take the lock for ``job_id``; ``None`` on success, else who holds it."""
        holder = LockHolder(job_id, ProcessIdentity.of(), uuid.uuid4().hex)
        with wrapped("cannot take the GC lock"):
            if self._lock.acquire(blocking=False, token=holder.token()):
                return None
        return self.holder() or LockHolder(UNKNOWN_JOB, ProcessIdentity(host="", pid=0))

    def holder(self) -> LockHolder | None:
        """Who holds the lock now; ``None`` when nobody does."""
        with wrapped("cannot read the GC lock"):
            raw = self._client.get(self._keys.gc_lock)
        return None if raw is None else LockHolder.parse(raw)

    def break_if_dead(self, holder: LockHolder) -> bool:
        """Delete the lock if ``holder`` (still) holds it and is provably dead."""
        if holder.owner.is_alive():
            return False
        with wrapped("cannot break the GC lock"):
            value = holder.raw or holder.token()
            deleted = self._client.eval(_DELETE_IF_VALUE, 1, self._keys.gc_lock, value)
        if deleted:
            log.warning("broke the GC lock of job %s: its process is gone", holder.job_id)
        return bool(deleted)

    def release(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=self._extend_every + 5)
        try:
            self._lock.release()
        except LockError:
            log.error("the GC lock had already expired or been taken over when released")
        except RedisError:
            log.exception("could not release the GC lock; it expires by itself")

    @contextlib.contextmanager
    def held(self) -> Iterator[GcLock]:
        """Keep the lock alive while the block runs; release it afterwards."""
        self._watchdog = threading.Thread(target=self._renew, name="regsweep-gc-lock", daemon=True)
        self._watchdog.start()
        try:
            yield self
        finally:
            self.release()

    def _renew(self) -> None:
        while not self._stop.wait(self._extend_every):
            try:
                self._lock.extend(self._ttl, replace_ttl=True)
            except LockError:
                log.error("lost the GC lock: another process may think this GC crashed")
                self.lost.set()
                return
            except RedisError:
                # Transient: the TTL leaves several more chances before the lock expires.
                log.warning("could not extend the GC lock; retrying", exc_info=True)

    def claim_window(self, window_key: str, job_id: str) -> str | None:
        """Claim the GC of one window occurrence; ``None`` when claimed, else the claimer's job."""
        key = self._keys.gc_window(window_key)
        with wrapped("cannot claim the window's GC"):
            if self._client.set(key, job_id, nx=True, ex=WINDOW_CLAIM_TTL):
                return None
            raw = self._client.get(key)
        return raw.decode() if isinstance(raw, bytes) else str(raw or UNKNOWN_JOB)
