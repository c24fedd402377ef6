"""The installation's records as ``regsweep jobs`` and ``regsweep status`` read them.

The same Redis the service and the workers write (``redis.url`` or
``REGSWEEP_REDIS_URL``): job records, the audit stream, the tag index's holds.
Without ``redis.url`` there is nothing to read (a usage error, exit 2); a Redis
that does not answer is a run error (exit 1) whose message names it by its URL
without user, password or query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from worker.errors import ConfigError, StateError
from worker.settings.model import Config
from worker.store.audit import AuditEntry, AuditLog, AuditQuery
from worker.store.open import check_reachable, redis_audit, tag_index
from worker.store.redis import async_worker_client, shown_url
from worker.store.state import State
from worker.store.tagindex import TagIndex


@dataclass(frozen=True)
class Records:
    """Job records, the audit and the tag index over one connection to the installation's Redis."""

    state: State
    audit: AuditLog
    index: TagIndex
    #: The Redis URL as messages show it.
    location: str

    async def deletions(self, job: Mapping[str, Any]) -> list[AuditEntry]:
        """What the audit records ``job`` deleted (a sweep: its prunes did), oldest first."""
        entries: list[AuditEntry] = []
        for job_id in job_ids(job):
            entries += await self.audit.entries(AuditQuery(job_id=job_id))
        return sorted(entries, key=lambda e: (e.time, e.id))


def job_ids(job: Mapping[str, Any]) -> list[str]:
    """A job's id and, for a sweep, the ids of its per-repository prunes; for a prune parked
    during a window and run merged into another, that one's (the audit carries its id)."""
    children = job.get("children")
    own = [str(job["id"])] if "id" in job else []
    ran_with = [str(job["ran_with"])] if job.get("ran_with") else []
    return (
        own + ran_with + ([str(c) for c in children.values()] if isinstance(children, dict) else [])
    )


@asynccontextmanager
async def reading(config: Config, command: str) -> AsyncIterator[Records]:
    """The installation's records, Redis checked to answer first; StateError raised inside
    names the Redis URL (without secrets)."""
    if config.redis_url is None:
        raise ConfigError(
            f"regsweep {command} needs redis.url (or REGSWEEP_REDIS_URL): jobs, holds and the "
            "audit it reads are kept in the Redis the service and workers use"
        )
    location = shown_url(config.redis_url)
    client = async_worker_client(config.redis_url)
    try:
        state = State(client)
        await check_reachable(client, location)
        audit = redis_audit(client, config)
        records = Records(state, audit, tag_index(client, config), location)
        try:
            yield records
        except StateError as exc:
            raise StateError(f"Redis at {location}: {exc}") from exc
    finally:
        await client.aclose()


def public(entries: Sequence[AuditEntry]) -> list[dict[str, Any]]:
    """Audit records as ``--json`` shows them (as ``regsweep audit --json`` does)."""
    return [e.public() for e in entries]
