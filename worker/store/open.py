"""The installation's history and audit, wherever the config says they are.

With ``redis.url`` set, both live in Redis: the tag index (push times,
sightings, holds) and the audit stream the service and workers write, so the
CLI decides from, and records into, the same ones. Without it, the CLI keeps
both in files: the JSONL audit at ``audit.path`` (by default beside the policy
file) and its state directory next to it. With both, ``audit.path`` is a second copy
of the audit and the holds (:mod:`worker.store.mirror`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis
import redis.asyncio as aioredis

from worker.errors import StateError
from worker.store.audit import AuditLog, JsonlAuditLog, RedisAuditLog
from worker.store.history import STATE_DIRECTORY, History, LocalHistory
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.mirror import MirroredAuditLog, MirroredTagIndex
from worker.store.redis import async_worker_client, shown_url
from worker.store.tagindex import TagIndex


class StoreSettings(Protocol):
    """What the stores need of the settings (:class:`worker.settings.model.Config` has it)."""

    @property
    def redis_url(self) -> str | None: ...
    @property
    def audit_file(self) -> str: ...
    @property
    def audit_mirror(self) -> str | None: ...


def audit_file(config: StoreSettings) -> Path:
    """The JSONL audit file of a configuration without Redis."""
    return Path(config.audit_file)


def state_directory(config: StoreSettings) -> Path:
    """The CLI's state (history and holds without Redis), beside the audit file."""
    return audit_file(config).with_name(STATE_DIRECTORY)


def tag_index(
    client: aioredis.Redis, config: StoreSettings, *, prefix: str = DEFAULT_PREFIX
) -> TagIndex:
    """The tag index in Redis; its holds mirrored to ``audit.path`` when that is set."""
    if config.audit_mirror is None:
        return TagIndex(client, prefix=prefix)
    return MirroredTagIndex(client, JsonlAuditLog(config.audit_mirror), prefix=prefix)


def redis_audit(
    client: aioredis.Redis, config: StoreSettings, *, prefix: str = DEFAULT_PREFIX
) -> AuditLog:
    """The audit stream in Redis; every record also appended to ``audit.path`` when set."""
    primary = RedisAuditLog(client, keys=Keys(prefix))
    if config.audit_mirror is None:
        return primary
    return MirroredAuditLog(primary, JsonlAuditLog(config.audit_mirror))


async def check_reachable(client: aioredis.Redis, location: str) -> None:
    """That the Redis at ``location`` (its URL as messages show it) answers ``PING``;
    StateError naming it and the setting that points there when it does not."""
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StateError(
            f"cannot reach Redis at {location} (redis.url or REGSWEEP_REDIS_URL): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


@dataclass
class Stores:
    history: History
    audit: AuditLog
    redis: aioredis.Redis | None = None
    keys: Keys = field(default_factory=Keys)
    #: Where the Redis is, as messages say it (no user, password or query); None: files.
    location: str | None = None

    @classmethod
    def open(cls, config: StoreSettings, *, prefix: str = DEFAULT_PREFIX) -> Stores:
        if config.redis_url is None:
            return cls(LocalHistory(state_directory(config)), JsonlAuditLog(audit_file(config)))
        client = async_worker_client(config.redis_url)
        return cls(
            tag_index(client, config, prefix=prefix),
            redis_audit(client, config, prefix=prefix),
            client,
            Keys(prefix),
            shown_url(config.redis_url),
        )

    async def check(self) -> None:
        """With Redis configured, that it answers (StateError naming it if not): a CLI
        run must not mistake a Redis that is down for an empty history."""
        if self.redis is not None:
            await check_reachable(self.redis, str(self.location))

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
