"""One prune of one repository under its lock: plan, carry out, and the summary its job
record keeps. Safe to run twice: the tag index converges, deletes are idempotent (404 is
success), the per-repository lock has an owner and a TTL."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from worker.engine.executor import ExecutionReport, RunOutcome, Status
from worker.engine.plan import Action, Deletion
from worker.engine.planner import TagRequest
from worker.engine.policy import Mode
from worker.engine.prune import RepositoryPlan
from worker.engine.view import after_execution, plan_view
from worker.errors import (
    Deferred,
    PlanChanged,
    RegistryUnavailable,
    StateError,
    UnknownRepository,
)
from worker.oci import Digest
from worker.queue.context import WorkerContext, records
from worker.store.keys import Keys
from worker.store.locks import PruneLock, PruneTurns
from worker.store.views import save_view

log = logging.getLogger(__name__)

#: Deletions a job record lists (its plan's fingerprint and counts cover the rest).
LISTED_DELETIONS: Final = 200


def keys(ctx: WorkerContext) -> Keys:
    """The keys of this context's installation."""
    return ctx.state.keys


@dataclass(frozen=True)
class PruneJob:
    repository: str
    job_id: str
    requests: tuple[TagRequest, ...] = ()
    dry_run: bool = False
    #: Plan from the tag index (event-driven) rather than walking the live tag list.
    incremental: bool = True
    #: Delete what ``requests`` ask for and nothing else (the dashboard's deletions).
    requests_only: bool = False
    #: Carry the plan out only if its fingerprint is this one (its preview's).
    expect: str | None = None


async def prune_repository(ctx: WorkerContext, job: PruneJob) -> dict[str, Any]:
    """Plan and (when enforced) prune one repository under its lock; returns the job summary.

    Never waits for another prune of the repository (:class:`RepositoryBusy`: the task
    is retried later); a lock whose holder died is taken over (:mod:`worker.store.locks`).
    A running maintenance window raises :class:`Deferred`; a registry that could not be
    reached, before or during the deletions, :class:`RegistryUnavailable` (retried).
    """
    async with PruneTurns(ctx.redis, keys(ctx)).take(job.repository) as turn:
        # A push after this point must trigger a new prune, so the pending mark goes now.
        await records(ctx).clear_pending(job.repository)
        return await _prune_locked(ctx, job, turn)


async def _known_tags(ctx: WorkerContext, job: PruneJob) -> dict[str, Digest] | None:
    """The index's tags when an incremental plan can trust them, else None (read live).

    Only a repository read live once (a sweep, an API prune, its first push) is
    planned from the index: tags pushed before regsweep was listening are
    otherwise unknown to it and would not count toward ``newest``.
    """
    if not job.incremental:
        return None
    if not await records(ctx).reconciled(job.repository):
        return None
    return await ctx.index.tags(job.repository) or None


async def _prune_locked(ctx: WorkerContext, job: PruneJob, turn: PruneLock) -> dict[str, Any]:
    repository = job.repository
    known = await _known_tags(ctx, job)
    pruned = await ctx.pruner.run(
        repository,
        job_id=job.job_id,
        dry_run=job.dry_run,
        requests=job.requests,
        known_tags=known,
        requests_only=job.requests_only,
        on_planned=lambda planned: _planned(ctx, job, planned),
        turn=turn,
    )
    if pruned is None:
        return {"repository": repository, "skipped": "no policy matches"}
    planned, report = pruned
    await _check_exists(ctx, planned)
    if known is None:  # the inventory recorded its listing in the index
        await records(ctx).mark_reconciled(repository)
    if not job.requests_only:
        await _keep_view(ctx, job.job_id, planned, report)
    summary = plan_summary(planned) | {"incremental": known is not None}
    if report is None:
        return summary | {"executed": False}
    _count_deletions(ctx, planned.policy.name, report)
    summary |= report_summary(report)
    if report.outcome is RunOutcome.DEFERRED:
        raise Deferred(f"registry went read-only while pruning {repository}")
    if report.outcome is RunOutcome.FAILED and report.retryable:
        # Planned afresh on the retry: what this attempt deleted is gone from the plan.
        raise RegistryUnavailable(f"{repository}: {'; '.join(report.errors()[:3])}")
    return summary


async def _check_exists(ctx: WorkerContext, planned: RepositoryPlan) -> None:
    """A prune of a repository with nothing in it: fail it when the registry has no such
    repository (a typo in an API request must not end ``succeeded``). One request, only
    for an empty inventory."""
    inventory = planned.inventory
    if inventory.tags or inventory.manifests:
        return
    if not await ctx.client.repository_exists(inventory.repository):
        url = ctx.config.registry.url
        raise UnknownRepository(
            f"{inventory.repository}: no such repository in the registry at {url}"
        )


async def _planned(ctx: WorkerContext, job: PruneJob, planned: RepositoryPlan) -> None:
    """Before anything is carried out: a confirmed deletion whose plan is no longer its
    preview's stops here; otherwise the plan goes on the job record (a page following the
    job shows what is to come, and how far along it is)."""
    if job.expect is not None and planned.plan.fingerprint != job.expect:
        raise PlanChanged(
            f"the plan of {job.repository} changed since its preview (a push or another "
            "prune came between): nothing was deleted; preview it again"
        )
    await ctx.state.update_job(job.job_id, **plan_summary(planned))


async def _keep_view(
    ctx: WorkerContext, job_id: str, planned: RepositoryPlan, report: ExecutionReport | None
) -> None:
    """The dashboard's view of this plan, as the repository stands after the run."""
    inventory, plan = planned.inventory, planned.plan
    deleted = None
    if report is not None:
        gone = [d for d, s, _ in report.done if s in (Status.DELETED, Status.ALREADY_GONE)]
        gone_tags = {t for d in gone if d.action is Action.UNTAG for t in d.tags}
        gone_digests = {d.digest for d in gone if d.action is not Action.UNTAG}
        inventory, plan = after_execution(inventory, plan, gone_tags, gone_digests)
        deleted = sum(1 for _, s, _ in report.done if s is Status.DELETED)
    view = plan_view(inventory, plan, planned.policy, job_id=job_id, executed=report is not None)
    try:
        await save_view(ctx.redis, keys(ctx), view, deleted=deleted)
    except StateError as exc:  # the page shows the previous plan; the prune itself is done
        log.warning("%s: the dashboard's view of job %s not kept: %s", plan.repository, job_id, exc)


def _count_deletions(ctx: WorkerContext, policy: str, report: ExecutionReport) -> None:
    for deletion, status, _ in report.done:
        if status is Status.DELETED:
            ctx.metrics.deletion(policy, deletion.reason.rule)


def plan_summary(planned: RepositoryPlan) -> dict[str, Any]:
    """A plan on its job record: counts, fingerprint, and the first deletions in order."""
    plan = planned.plan
    return {
        "repository": plan.repository,
        "policy": plan.policy,
        "mode": planned.policy.mode.value,
        "plan": {
            "tags_removed": plan.tags_removed,
            "tags_kept": plan.tags_kept,
            "manifests_removed": plan.manifests_removed,
            "manifests_kept": plan.manifests_kept,
            "reclaimable_bytes": plan.reclaimable_bytes,
            "fingerprint": plan.fingerprint,
            "deletions": len(plan.deletions),
            "listed": [_planned_deletion(d) for d in plan.deletions[:LISTED_DELETIONS]],
        },
    }


def _planned_deletion(deletion: Deletion) -> dict[str, Any]:
    return {
        "action": deletion.action.value,
        "digest": deletion.digest,
        "media_type": deletion.media_type,
        "size": deletion.size,
        "tags": list(deletion.tags),
        "rule": deletion.reason.rule,
        "reason": deletion.reason.detail,
        "parents": list(deletion.parents),
    }


def report_summary(report: ExecutionReport) -> dict[str, Any]:
    errors = report.errors()
    deleted = [d for d, s, _ in report.done if s is Status.DELETED]
    return {
        "executed": True,
        "outcome": report.outcome.value,
        "counts": report.counts(),
        "bytes": sum(d.size for d in deleted if d.action is not Action.UNTAG),
        "errors": errors,
    }


@dataclass(frozen=True)
class PruneSummary:
    """How a prune job ended, typed where the workers decide from it; ``record`` is the summary
    as its job record, the API and the notifications carry it (its JSON shape unchanged)."""

    repository: str
    #: None when nothing was carried out (a dry run, a policy in dry-run mode, a skip).
    outcome: RunOutcome | None
    #: The policy's mode (``enforce``, ``dry-run``), None when no plan was made.
    mode: str | None
    tags_planned: int
    manifests_planned: int
    bytes: int
    #: Deletions by status (``deleted``, ``already_gone``, ...).
    counts: Mapping[str, int]
    record: Mapping[str, Any]

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> PruneSummary:
        plan = record.get("plan") or {}
        outcome = record.get("outcome")
        return cls(
            repository=str(record.get("repository", "")),
            outcome=next((o for o in RunOutcome if o.value == outcome), None),
            mode=record.get("mode"),
            tags_planned=int(plan.get("tags_removed", 0)),
            manifests_planned=int(plan.get("manifests_removed", 0)),
            bytes=int(record.get("bytes", 0)),
            counts={str(k): int(v) for k, v in (record.get("counts") or {}).items()},
            record=record,
        )

    @property
    def failed(self) -> bool:
        return self.outcome is RunOutcome.FAILED

    @property
    def enforced(self) -> bool:
        return self.mode == Mode.ENFORCE.value

    @property
    def deleted(self) -> int:
        return self.counts.get("deleted", 0)
