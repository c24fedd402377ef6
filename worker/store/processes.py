"""Which long-running processes are alive, and the policy each runs: what ``status`` lists.

Every ``serve``, ``worker`` and ``beat`` process writes a report of itself
(:class:`ProcessReport`) every :data:`REPORT_EVERY`, kept :data:`REPORT_TTL`:
a process that stops reporting (stopped, killed, cut off from Redis) drops
out of ``status`` on its own. Beside the reports, a set of their ids lets
``status`` find them without scanning the keyspace; an id whose report
expired is dropped from it when read.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import redis
import redis.asyncio as aioredis

from worker.store.keys import Keys
from worker.store.redis import text, wrapped

REPORT_EVERY: Final = timedelta(seconds=15)
REPORT_TTL: Final = timedelta(seconds=60)


class PolicyWatch(Protocol):
    """What a report says of the process's policy (:class:`worker.settings.watch.PolicyWatch`)."""

    @property
    def digest(self) -> str | None: ...
    @property
    def problem(self) -> str | None: ...
    @property
    def restart_needed(self) -> tuple[str, ...]: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ProcessReport:
    """One process as ``status`` shows it."""

    role: str
    host: str
    pid: int
    #: The digest of the policy file content the process runs.
    policy: str | None
    #: Why the process is not running what the file now says (it does not load), if so.
    problem: str | None = None
    #: Changed settings it applies only after a restart.
    restart_needed: tuple[str, ...] = ()
    #: A worker's queues.
    queues: tuple[str, ...] = ()
    started: str = field(default_factory=_now)
    reported: str = field(default_factory=_now)

    @property
    def id(self) -> str:
        return f"{self.role}@{self.host}:{self.pid}"

    @classmethod
    def of(
        cls, role: str, watch: PolicyWatch, started: str, queues: tuple[str, ...] = ()
    ) -> ProcessReport:
        """This process (``role``), as its policy watch sees it."""
        return cls(
            role,
            socket.gethostname(),
            os.getpid(),
            watch.digest,
            watch.problem,
            watch.restart_needed,
            queues,
            started,
        )

    def dumps(self) -> str:
        return json.dumps(asdict(self) | {"id": self.id})


def report(client: redis.Redis, keys: Keys, process: ProcessReport) -> None:
    """Write (renew) ``process``'s report; raises StateError."""
    ttl = int(REPORT_TTL.total_seconds())
    with wrapped("cannot report this process"):
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.process(process.id), process.dumps(), ex=ttl)
        pipe.sadd(keys.processes, process.id)
        pipe.execute()


async def report_async(client: aioredis.Redis, keys: Keys, process: ProcessReport) -> None:
    """:func:`report` over the asyncio client (the service)."""
    ttl = int(REPORT_TTL.total_seconds())
    with wrapped("cannot report this process"):
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.process(process.id), process.dumps(), ex=ttl)
        pipe.sadd(keys.processes, process.id)
        await pipe.execute()


def withdraw(client: redis.Redis, keys: Keys, process_id: str) -> None:
    """A process that stops takes its report away (else it expires)."""
    with wrapped("cannot withdraw this process's report"):
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.process(process_id))
        pipe.srem(keys.processes, process_id)
        pipe.execute()


async def withdraw_async(client: aioredis.Redis, keys: Keys, process_id: str) -> None:
    """:func:`withdraw` over the asyncio client (the service)."""
    with wrapped("cannot withdraw this process's report"):
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.process(process_id))
        pipe.srem(keys.processes, process_id)
        await pipe.execute()


async def queue_lengths(client: aioredis.Redis, queues: Sequence[str]) -> list[int]:
    """How many messages wait on each of ``queues`` (the broker's lists), in one round trip."""
    with wrapped("cannot read the queues' lengths"):
        pipe = client.pipeline(transaction=False)
        for name in queues:
            pipe.llen(name)
        return [int(n) for n in await pipe.execute()]


async def reports(client: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The reports alive, by role and id; ids whose report expired are dropped."""
    with wrapped("cannot read the processes' reports"):
        ids = sorted(text(i) for i in await client.smembers(keys.processes))
        raw = await client.mget([keys.process(i) for i in ids]) if ids else []
        gone = [i for i, value in zip(ids, raw, strict=True) if value is None]
        if gone:
            await client.srem(keys.processes, *gone)
    found = [json.loads(value) for value in raw if value is not None]
    return sorted(found, key=lambda r: (str(r.get("role")), str(r.get("id"))))
