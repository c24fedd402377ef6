"""The work behind each Celery task, as plain async functions over a WorkerContext.

Tasks (worker.queue.tasks) only parse arguments, call one of these and map errors.
Everything here is safe to run twice: the tag index converges, deletes are
idempotent (404 is success), the per-repository lock has an owner and a TTL.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from worker.engine.ci_requests import request_for
from worker.engine.events import CiEvent, RegistryEvent, RegistryEventKind
from worker.engine.executor import ExecutionReport, RunOutcome, Status
from worker.engine.plan import Action, Deletion
from worker.engine.planner import TagRequest
from worker.engine.prune import RepositoryPlan
from worker.engine.view import after_execution, plan_view
from worker.errors import (
    Deferred,
    PlanChanged,
    RegistryUnavailable,
    StateError,
    UnknownRepository,
)
from worker.notify.message import Deleted
from worker.oci import INDEX_TYPES, Digest
from worker.queue.context import WorkerContext
from worker.store.audit import AuditQuery, Outcome
from worker.store.keys import Keys
from worker.store.locks import PruneTurns, window_running
from worker.store.redis import text, wrapped
from worker.store.views import save_view

T = TypeVar("T")
log = logging.getLogger(__name__)

#: A prune scheduled for the end of an ``untagged`` grace runs this much later,
#: so the digest is surely due (clocks, rounding).
GRACE_SLACK: Final = timedelta(seconds=1)
#: How long a sweep's tally of its per-repository prunes is kept.
SWEEP_TTL: Final = timedelta(days=7)
#: A queued prune marks its repository pending until it starts; pushes meanwhile
#: coalesce into it. Short, because a prune lost with Redis (its mark left behind)
#: would otherwise swallow the pushes that follow for this long.
PENDING_TTL: Final = timedelta(seconds=60)
#: Deletions a job record lists (its plan's fingerprint and counts cover the rest).
LISTED_DELETIONS: Final = 200


# KEYS: tally, done set; ARGV: ttl, child id, then field/amount pairs.
# Idempotent per child: a redelivered prune does not count twice.
_CHILD_FINISHED = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then return -1 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
local left = redis.call('HINCRBY', KEYS[1], 'remaining', -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return left
"""


def keys(ctx: WorkerContext) -> Keys:
    """The keys of this context's installation."""
    return ctx.state.keys


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
    with wrapped("cannot mark a pending prune"):
        return bool(
            await ctx.redis.set(keys(ctx).pending(repository), "1", nx=True, px=_ms(PENDING_TTL))
        )


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


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
    mark = ctx.redis.set(keys(ctx).scheduled(repository), "1", nx=True, px=_ms(delay))
    return delay if await _redis(mark, "SET NX scheduled") else None


async def maintenance_active(ctx: WorkerContext) -> bool:
    return await window_running(ctx.redis, keys(ctx)) is not None


# KEYS: the parked prunes; ARGV: field/value pairs as read. Forgets each entry that is
# still what was read: one parked again meanwhile (by a prune that met a new window)
# carries a new ``parked`` mark and stays.
_UNPARK = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return gone
"""


async def defer(ctx: WorkerContext, repository: str, params: Mapping[str, Any]) -> None:
    """Park a prune until the window ends, one entry per job: several prunes of one
    repository are all kept, and merged when released (:func:`parked_prunes`)."""
    # Orders the entries (the first parked leads the merged prune) and tells a re-parked
    # entry from the one read before it (:func:`unpark`).
    mark = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    entry = {**params, "repository": repository, "parked": mark}
    field = str(params.get("job_id") or entry["parked"])
    with wrapped(f"cannot defer the prune of {repository}"):
        await ctx.redis.hset(keys(ctx).deferred, field, json.dumps(entry))


@dataclass(frozen=True)
class Parked:
    """The prunes parked during a window, merged per repository (task kwargs), and the
    entries they came from, to forget once those prunes are queued (:func:`unpark`)."""

    prunes: list[dict[str, Any]]
    entries: dict[str, str]


async def parked_prunes(ctx: WorkerContext) -> Parked:
    """What to queue again once no maintenance window runs (nothing while one does).

    Read, not taken: the entries stay until :func:`unpark`, after the prunes are
    queued, so a worker dying in between leaves them for the next tick (a prune
    queued twice runs twice, harmlessly: its job records are settled again).
    """
    if await maintenance_active(ctx):
        return Parked([], {})
    with wrapped("cannot read the deferred prunes"):
        raw = await ctx.redis.hgetall(keys(ctx).deferred)
    entries = {text(f): text(v) for f, v in raw.items()}
    return Parked(merge_parked(_parsed(entries.values())), entries)


async def unpark(ctx: WorkerContext, entries: Mapping[str, str]) -> None:
    """Forget parked entries that have been queued again (those not parked anew since)."""
    if not entries:
        return
    args = [x for pair in entries.items() for x in pair]
    script = ctx.redis.register_script(_UNPARK)
    await _redis(script(keys=[keys(ctx).deferred], args=args), "forget parked prunes")


def _parsed(values: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for value in values:
        try:
            entry = json.loads(value)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("repository"), str):
            out.append(entry)
    return out


#: What a parked prune keeps of its own when it runs merged into another one.
_OWN: Final = (
    "job_id",
    "parent",
    "trigger",
    "requests",
    "incremental",
    "dry_run",
    "repository",
    "requests_only",
    "expect",
)


def _merge_key(repository: str, one: Mapping[str, Any]) -> tuple[str, bool, str | None]:
    """Which parked prunes run as one: per repository and dry-run flag; a dashboard
    deletion (``requests_only``, bound to its preview's plan) only ever with itself."""
    alone = str(one.get("job_id")) if one.get("requests_only") else None
    return repository, bool(one.get("dry_run", False)), alone


def merge_parked(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One prune per repository (and dry-run flag) for the parked ``entries``: the union of
    their CI requests, a live read if any asked for one, the first job's id and trigger, the
    others' jobs in ``merged`` (each settled when the merged prune ends). A prune that was
    itself merged brings its own merged jobs along. A dashboard deletion stays alone, with
    its request and the fingerprint of the plan its person confirmed."""
    groups: dict[tuple[str, bool, str | None], list[dict[str, Any]]] = {}
    for entry in sorted(entries, key=lambda e: str(e.get("parked", ""))):
        for one in [entry, *(entry.get("merged") or [])]:
            key = _merge_key(str(entry["repository"]), one)
            groups.setdefault(key, []).append(
                {k: one.get(k) for k in _OWN} | {"repository": key[0]}
            )
    return [
        _merged_prune(repository, dry_run, group)
        for (repository, dry_run, _), group in groups.items()
    ]


def _merged_prune(repository: str, dry_run: bool, group: list[dict[str, Any]]) -> dict[str, Any]:
    unique = list({str(g.get("job_id")): g for g in group}.values())
    first, rest = unique[0], unique[1:]
    requests = {json.dumps(r, sort_keys=True): r for g in unique for r in (g.get("requests") or [])}
    return {
        "repository": repository,
        "job_id": first.get("job_id"),
        "dry_run": dry_run,
        "requests": list(requests.values()),
        "incremental": all(g.get("incremental", True) is not False for g in unique),
        "trigger": first.get("trigger") or "deferred",
        "parent": first.get("parent"),
        "merged": rest,
        "requests_only": bool(first.get("requests_only")),
        "expect": first.get("expect"),
    }


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
    async with PruneTurns(ctx.redis, keys(ctx)).take(job.repository):
        # A push after this point must trigger a new prune, so the pending mark goes now.
        await _redis(ctx.redis.delete(keys(ctx).pending(job.repository)), "clear pending")
        return await _prune_locked(ctx, job)


async def _redis(awaitable: Awaitable[T], what: str) -> T:
    with wrapped(f"redis {what} failed"):
        return await awaitable


async def _known_tags(ctx: WorkerContext, job: PruneJob) -> dict[str, Digest] | None:
    """The index's tags when an incremental plan can trust them, else None (read live).

    Only a repository read live once (a sweep, an API prune, its first push) is
    planned from the index: tags pushed before regsweep was listening are
    otherwise unknown to it and would not count toward ``newest``.
    """
    if not job.incremental:
        return None
    reconciled = await _redis(
        ctx.redis.sismember(keys(ctx).reconciled, job.repository), "SISMEMBER"
    )
    if not reconciled:
        return None
    return await ctx.index.tags(job.repository) or None


async def _prune_locked(ctx: WorkerContext, job: PruneJob) -> dict[str, Any]:
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
    )
    if pruned is None:
        return {"repository": repository, "skipped": "no policy matches"}
    planned, report = pruned
    await _check_exists(ctx, planned)
    if known is None:  # the inventory recorded its listing in the index
        await _redis(ctx.redis.sadd(keys(ctx).reconciled, repository), "SADD")
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


# --- sweeps: one prune per repository, tallied into the sweep's job record ------------


async def start_sweep(ctx: WorkerContext, job_id: str, children: Mapping[str, str]) -> None:
    """Open the tally of a sweep whose prunes (repository -> child job id) are about to run."""
    tally = keys(ctx).sweep(job_id)
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.hset(tally, "remaining", len(children))
    pipe.expire(tally, SWEEP_TTL)
    await _redis(pipe.execute(), "open sweep tally")


def child_counts(summary: Mapping[str, Any], failed: bool) -> dict[str, int]:
    """What one repository's prune adds to its sweep's counts."""
    plan = summary.get("plan", {})
    counts = {
        "repositories": 1,
        "failed": int(failed),
        "tags_planned": int(plan.get("tags_removed", 0)),
        "manifests_planned": int(plan.get("manifests_removed", 0)),
        "bytes": int(summary.get("bytes", 0)),
    }
    for status, amount in summary.get("counts", {}).items():
        counts[status] = int(amount)
    return counts


async def child_finished(
    ctx: WorkerContext, sweep_id: str, child_id: str, counts: Mapping[str, int]
) -> dict[str, int] | None:
    """Add a finished prune to its sweep; the sweep's totals once the last one is in."""
    k = keys(ctx)
    script = ctx.redis.register_script(_CHILD_FINISHED)
    args: list[str | int] = [int(SWEEP_TTL.total_seconds()), child_id]
    for field, amount in counts.items():
        args += [field, amount]
    left = await _redis(
        script(keys=[k.sweep(sweep_id), k.sweep_done(sweep_id)], args=args), "tally"
    )
    if int(left) != 0:
        return None
    raw = await _redis(ctx.redis.hgetall(k.sweep(sweep_id)), "HGETALL tally")
    totals = {text(f): int(v) for f, v in raw.items()}
    totals.pop("remaining", None)
    return totals


# --- health: the last prune that succeeded ----------------------------------------------


async def prune_succeeded(ctx: WorkerContext, job_id: str, repository: str) -> None:
    """Record the last prune job that succeeded, for ``/healthz`` and its metric."""
    record = {"time": datetime.now(UTC).isoformat(), "job_id": job_id, "repository": repository}
    await _redis(ctx.redis.set(keys(ctx).last_prune, json.dumps(record)), "SET last prune")


# --- notifications: what a job deleted, dead letters since the last notification --------

# KEYS: the dead-letter counter, the notified mark. Moves the mark up to the counter and
# answers both, atomically: two ticks at once never tell the same dead letters twice.
_DEAD_LETTERS_SEEN = """
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if total > seen then redis.call('SET', KEYS[2], total) end
return {seen, total}
"""


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
    k = keys(ctx)
    script = ctx.redis.register_script(_DEAD_LETTERS_SEEN)
    seen, total = await _redis(
        script(keys=[k.dead_letters_total, k.notified_dead_letters]), "dead letters seen"
    )
    new = int(total) - int(seen)
    if new <= 0:
        return None
    return new, int(total), await ctx.state.dead_letters(min(new, 5))
