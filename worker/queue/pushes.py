"""What registry and CI events do: the tag index updated, and the prunes they ask for
(coalesced per repository; a prune for the end of an untagged grace)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from worker.engine.ci_requests import request_for
from worker.engine.events import CiEvent, RegistryEvent, RegistryEventKind
from worker.engine.planner import TagRequest
from worker.oci import INDEX_TYPES
from worker.queue.context import WorkerContext, records

log = logging.getLogger(__name__)

#: A prune scheduled for the end of an ``untagged`` grace runs this much later,
#: so the digest is surely due (clocks, rounding).
GRACE_SLACK: Final = timedelta(seconds=1)


async def apply_registry_events(ctx: WorkerContext, events: Sequence[RegistryEvent]) -> list[str]:
    """Apply pushes and deletes to the tag index; the repositories a push may let shrink.

    Each carries its registry time and id: the index applies them in that order, whatever
    order they come in (several event workers, redeliveries), so a late one never makes a
    tag older or moves it back."""
    touched: list[str] = []
    for event in events:
        kind = event.kind
        if kind is RegistryEventKind.MANIFEST_PUSH and event.tag and event.digest:
            await ctx.index.record_push(
                event.repository, event.tag, event.digest, event.timestamp, event.id
            )
            touched.append(event.repository)
        elif kind is RegistryEventKind.MANIFEST_PUSH and event.digest and _is_index(event):
            # Pushed by digest only (deployed by digest): it protects what it lists.
            await ctx.index.record_stored_index(event.repository, event.digest, event.timestamp)
        elif kind in (RegistryEventKind.MANIFEST_DELETE, RegistryEventKind.TAG_DELETE):
            await ctx.index.record_delete(
                event.repository,
                digest=event.digest,
                tag=event.tag,
                at=event.timestamp,
                event_id=event.id,
            )
    return [r for r in dict.fromkeys(touched) if ctx.config.policy_for(r) is not None]


def _is_index(event: RegistryEvent) -> bool:
    return event.media_type in INDEX_TYPES


async def claim_prune(ctx: WorkerContext, repository: str) -> bool:
    """True when no prune of ``repository`` is already waiting: coalesces bursts of pushes."""
    return await records(ctx).claim_pending(repository)


async def ci_requests(ctx: WorkerContext, event: CiEvent) -> dict[str, TagRequest]:
    """Repositories (known to the tag index) each policy fed by ``event`` covers."""
    known = await ctx.index.repositories()
    out: dict[str, TagRequest] = {}
    for repository in known:
        policy = ctx.config.policy_for(repository)
        request = request_for(policy, event) if policy else None
        if request is not None:
            out[repository] = request
    return out


async def next_grace_prune(
    ctx: WorkerContext, repository: str, horizon: timedelta
) -> timedelta | None:
    """When to prune ``repository`` again so an untagged digest goes once its grace ends.

    None when no untagged digest is waiting, when one is already scheduled, or
    when the grace ends beyond ``horizon`` (the sweep picks those up): a
    delayed Celery message waits in a worker and must not outlive the broker's
    visibility timeout.
    """
    policy = ctx.config.policy_for(repository)
    grace = policy.untagged_delete_after if policy else None
    if grace is None:
        return None
    now = datetime.now(UTC)
    waits = [since + grace - now for since in (await ctx.index.untagged_since(repository)).values()]
    upcoming = [w for w in waits if timedelta(0) < w <= horizon]
    if not upcoming:
        return None
    delay = min(upcoming) + GRACE_SLACK
    return delay if await records(ctx).schedule_grace(repository, delay) else None
