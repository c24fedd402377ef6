"""The maintenance flag: while it is set (to the GC job's id), a window holds pruning paused.

The one module that reads and writes it; the GC job sets and clears it, the workers' prunes,
the tick, crash recovery and the CLI ask whether it is set (the health and metrics reads take
it in their own round trips, in :mod:`worker.store.status` and :mod:`worker.store.metrics`).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from worker.store.keys import Keys
from worker.store.redis import text, wrapped


def running_window(client: redis.Redis, keys: Keys) -> str | None:
    """The job id of the window in progress (or crashed), ``None`` when pruning runs freely."""
    with wrapped("cannot read the maintenance flag"):
        raw = client.get(keys.maintenance_flag)
    return None if raw is None else text(raw)


async def window_running(client: aioredis.Redis, keys: Keys) -> str | None:
    """:func:`running_window`, from an event loop."""
    with wrapped("cannot read the maintenance flag"):
        raw = await client.get(keys.maintenance_flag)
    return None if raw is None else text(raw)


def pause_pruning(client: redis.Redis, keys: Keys, job_id: str) -> None:
    """Set the flag: GC job ``job_id``'s window holds pruning paused."""
    with wrapped("cannot set the maintenance flag"):
        client.set(keys.maintenance_flag, job_id)


def resume_pruning(client: redis.Redis, keys: Keys) -> None:
    """Clear the flag and the window's session record (redis' errors raised as they are: the
    caller logs them, and crash recovery clears a flag left behind)."""
    client.delete(keys.maintenance_flag, keys.gc_session)
