"""The maintenance flag: while it is set (to the GC job's id), a window holds pruning paused.

The one module that reads and writes it; the GC job sets and clears it, the workers' prunes,
the tick, crash recovery and the CLI ask whether it is set (the health and metrics reads take
it in their own round trips, in :mod:`worker.store.status` and :mod:`worker.store.metrics`).
The window's session record lives here too: the maintenance command now running, named so
that a recovery can kill what a dead worker left behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import redis
import redis.asyncio as aioredis

from worker.identity import ProcessIdentity
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
    """Clear the flag and the window's session record (the caller logs a failure, and crash
    recovery clears a flag left behind)."""
    with wrapped("cannot clear the maintenance flag"):
        client.delete(keys.maintenance_flag, keys.gc_session)


def record_session(client: redis.Redis, keys: Keys, session: ProcessIdentity) -> None:
    """Name the session (its leader) of the GC or switch command now running."""
    with wrapped("cannot record the maintenance command's session"):
        client.set(keys.gc_session, json.dumps(asdict(session)))


def recorded_session(client: redis.Redis, keys: Keys) -> ProcessIdentity | None:
    """The session :func:`record_session` named last; ``None`` when none, or unreadable."""
    with wrapped("cannot read the GC session"):
        raw = client.get(keys.gc_session)
    if raw is None:
        return None
    try:
        return ProcessIdentity.from_json(json.loads(raw))
    except (ValueError, TypeError, AttributeError):
        return None
