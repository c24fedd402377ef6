"""How Redis keeps its data across a restart, as it says itself (``INFO``, ``CONFIG GET``).

What lives only in Redis (queued work, holds, the audit stream) is lost with a restart when
it keeps no append-only file; ``regsweep check --online`` warns of it (docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis


@dataclass(frozen=True)
class Persistence:
    """Whether Redis appends every write to a file, and when it snapshots."""

    append_only: bool
    #: Its ``save`` setting ("" none); ``None`` when ``CONFIG`` is refused (managed Redis
    #: often renames it away), so the snapshots are unknown.
    snapshots: str | None


async def persistence(client: aioredis.Redis) -> Persistence | None:
    """How the Redis of ``client`` persists; ``None`` when it will not say (``INFO`` refused
    or failed)."""
    try:
        info = await client.info("persistence")
    except (redis.RedisError, OSError):
        return None
    if str(info.get("aof_enabled", "0")) == "1":
        return Persistence(append_only=True, snapshots=None)
    try:
        save: str | None = str((await client.config_get("save")).get("save", ""))
    except (redis.RedisError, OSError):
        save = None
    return Persistence(append_only=False, snapshots=save)
