"""What is told after the work: the last prune that succeeded (health), what a job
deleted, and the dead letters since the last notification."""

from __future__ import annotations

import logging
from typing import Any

from worker.notify.message import Deleted
from worker.queue.context import WorkerContext, records
from worker.store.audit import AuditQuery, Outcome

log = logging.getLogger(__name__)


async def prune_succeeded(ctx: WorkerContext, job_id: str, repository: str) -> None:
    """Record the last prune job that succeeded, for ``/healthz`` and its metric."""
    await records(ctx).prune_succeeded(job_id, repository)


async def deleted_by(ctx: WorkerContext, job_id: str) -> list[Deleted]:
    """What job ``job_id`` deleted, as its audit records say (outcome ``deleted``)."""
    entries = await ctx.audit.entries(AuditQuery(job_id=job_id))
    return [
        Deleted(e.repository, e.digest, e.tags, e.rule, e.action)
        for e in entries
        if e.outcome is Outcome.DELETED
    ]


async def new_dead_letters(ctx: WorkerContext) -> tuple[int, int, list[dict[str, Any]]] | None:
    """(new, total, the newest entries) when dead letters came since the last call."""
    seen, total = await records(ctx).dead_letters_seen()
    new = int(total) - int(seen)
    if new <= 0:
        return None
    return new, int(total), await ctx.state.dead_letters(min(new, 5))
