"""Celery tasks: parse arguments, call one function of :mod:`worker.queue.jobs`, map errors.

Retries are for transient registry trouble only (connection errors, 5xx);
a read-only registry or a running maintenance window parks the prune until
the window ends (deferred), it never fails it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown

from worker.backoff import backoff
from worker.engine.ci_requests import request_from_json, request_to_json
from worker.engine.events import CiEvent, RegistryEvent, excerpt
from worker.engine.executor import RunOutcome
from worker.engine.restore import restore
from worker.errors import (
    BadEvent,
    Deferred,
    RegistryUnavailable,
    RegsweepError,
    RepositoryBusy,
    StateError,
)
from worker.notify import message
from worker.notify import runtime as notify_runtime
from worker.queue import jobs
from worker.queue.context import WorkerContext
from worker.queue.enqueue import enqueue, prune_message
from worker.queue.names import (
    TASK_CI_EVENT,
    TASK_PRUNE,
    TASK_REGISTRY_EVENTS,
    TASK_RESTORE,
    TASK_SWEEP,
    TASK_TICK,
)
from worker.queue.runtime import EventLoopThread, configured
from worker.store.state import JobState

T = TypeVar("T")
log = logging.getLogger("regsweep.worker")

#: Transient registry errors (unreachable, timeouts, 5xx): retries with backoff (2 s,
#: doubling, at most RETRY_MAX_SECONDS: about 8 minutes in all), then the job fails and
#: is dead-lettered (``regsweep replay ID``).
MAX_REGISTRY_RETRIES: Final = 8
RETRY_BASE_SECONDS: Final = 2.0
RETRY_MAX_SECONDS: Final = 300.0
BUSY_RETRY_SECONDS: Final = 5.0
#: How long a task waits in place for Redis (state and broker) to come back.
STATE_PATIENCE_SECONDS: Final = 120.0
STATE_RETRY_FIRST_SECONDS: Final = 0.25
STATE_RETRY_MAX_SECONDS: Final = 8.0

_loop: EventLoopThread | None = None
_ctx: WorkerContext | None = None


def _context() -> tuple[EventLoopThread, WorkerContext]:
    """This process's loop and clients, made on first use (or at worker_process_init)."""
    global _loop, _ctx  # noqa: PLW0603 - one per process by design
    if _loop is None or _ctx is None:
        _loop = EventLoopThread()
        _ctx = _loop.run(WorkerContext.open(configured()))
    return _loop, _ctx


def run(make: Any) -> Any:
    """Run ``make(ctx)`` (a coroutine factory) on this process's loop, then flush metrics."""
    loop, ctx = _context()
    return loop.run(_flushed(ctx, make(ctx)))


def run_patiently(make: Any, patience: float = STATE_PATIENCE_SECONDS) -> Any:
    """:func:`run`, retried in place while Redis is unreachable, for up to ``patience`` s.

    A Celery retry would need the broker, which is the same Redis: while it is
    away the task holds its (unacknowledged) message and waits instead.
    """
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            return run(make)
        except StateError as exc:
            attempt += 1
            delay = backoff(attempt, base=STATE_RETRY_FIRST_SECONDS, cap=STATE_RETRY_MAX_SECONDS)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("redis unavailable (%s); trying again in %.1fs", exc, delay)
            time.sleep(delay)


async def _flushed(ctx: WorkerContext, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        await ctx.metrics.flush(ctx.redis)


@worker_process_init.connect
def _open_clients(**_: Any) -> None:
    _context()


@worker_process_shutdown.connect
def _close_clients(**_: Any) -> None:
    global _loop, _ctx  # noqa: PLW0603
    notify_runtime.close()
    if _loop is not None and _ctx is not None:
        _loop.run(_ctx.aclose())
        _loop.close()
    _loop = _ctx = None


def reopen_context() -> None:
    """Close this process's clients; the next task opens them from the Config configured now
    (a policy file reloaded between tasks: :mod:`worker.queue.reload`)."""
    global _loop, _ctx  # noqa: PLW0603
    if _loop is not None and _ctx is not None:
        _loop.run(_ctx.aclose())
        _loop.close()
    _loop = _ctx = None


def _backoff(retries: int) -> float:
    """Before Celery retry ``retries + 1`` of a prune the registry failed: spread out."""
    return backoff(retries + 1, base=RETRY_BASE_SECONDS, cap=RETRY_MAX_SECONDS, jitter=0.5)


def enqueue_prune(repository: str, *, countdown: float | None = None, **kwargs: Any) -> None:
    """Queue a prune of ``repository`` (:func:`worker.queue.enqueue.enqueue`)."""
    enqueue(prune.app, prune_message(repository, **kwargs), countdown=countdown)


@shared_task(name=TASK_REGISTRY_EVENTS, acks_late=True)
def registry_events(events: list[dict[str, Any]]) -> None:
    parsed = _usable_events(events)
    try:
        repositories = run_patiently(lambda ctx: jobs.apply_registry_events(ctx, parsed))
    except StateError:
        raise  # Redis stayed away: the message is delivered again
    except Exception:  # some event of the batch: the others must not go with it
        log.exception("applying %d registry events failed; applying them one by one", len(parsed))
        repositories = _apply_one_by_one(parsed)
    for repository in repositories:
        if run_patiently(lambda ctx, r=repository: jobs.claim_prune(ctx, r)):
            enqueue_prune(repository, trigger="push")


def _usable_events(events: list[dict[str, Any]]) -> list[RegistryEvent]:
    """The events of a message that parse; the others dead-lettered (one entry for all).

    The service validated them, but a message may be older than its checks."""
    parsed: list[RegistryEvent] = []
    bad: list[str] = []
    for raw in events:
        try:
            parsed.append(RegistryEvent.from_dict(raw))
        except (BadEvent, ValueError, TypeError, KeyError, OverflowError) as exc:
            bad.append(f"{str(raw.get('id'))[:100] if isinstance(raw, dict) else '?'}: {exc}")
    if bad:
        _dead_letter(f"{len(bad)} queued events unusable: {'; '.join(bad[:5])}", events)
    return parsed


def _apply_one_by_one(events: list[RegistryEvent]) -> list[str]:
    """Apply each event alone, dead-lettering the ones that fail: one bad event never
    keeps the others (or its repository's later events) from the tag index."""
    repositories: list[str] = []
    for event in events:
        try:
            repositories += run_patiently(lambda ctx, e=event: jobs.apply_registry_events(ctx, [e]))
        except StateError:
            raise  # Redis stayed away: the message is delivered again
        except Exception as exc:
            _dead_letter(f"event {event.id} not applied: {type(exc).__name__}: {exc}", [])
    return list(dict.fromkeys(repositories))


def _dead_letter(reason: str, raw: object) -> None:
    log.warning("registry events dead-lettered: %s", reason)
    try:
        run(lambda ctx: ctx.state.dead_letter("registry", reason[:2000], excerpt(json.dumps(raw))))
    except StateError as exc:
        log.error("dead letter not kept: %s", exc)


@shared_task(name=TASK_CI_EVENT, acks_late=True)
def ci_event(event: dict[str, Any]) -> None:
    parsed = CiEvent.from_dict(event)
    # Kept for `regsweep replay DELIVERY`: the sender's redelivery is a duplicate for days.
    run_patiently(lambda ctx: ctx.state.record_ci_event(parsed.delivery_id, event))
    requests = run_patiently(lambda ctx: jobs.ci_requests(ctx, parsed))
    for repository, request in requests.items():
        enqueue_prune(repository, requests=[request_to_json(request)], trigger=parsed.kind)
    log.info("ci event %s %s: %d repositories", parsed.source, parsed.kind, len(requests))


@dataclass(frozen=True)
class _Work:
    """One prune task's work: its own job, and the jobs of prunes of the same repository
    parked during a window and merged into it (:func:`jobs.merge_parked`)."""

    repository: str
    job_id: str
    requests: list[dict[str, Any]]
    dry_run: bool
    incremental: bool
    trigger: str
    parent: str | None
    merged: list[dict[str, Any]]
    #: A dashboard deletion: its request only, and only on the plan its preview showed.
    requests_only: bool = False
    expect: str | None = None

    def own(self) -> dict[str, Any]:
        """This task's own job as a parked entry keeps it."""
        return {
            "repository": self.repository,
            "job_id": self.job_id,
            "requests": self.requests,
            "dry_run": self.dry_run,
            "incremental": self.incremental,
            "trigger": self.trigger,
            "parent": self.parent,
            "requests_only": self.requests_only,
            "expect": self.expect,
        }

    def jobs(self) -> list[tuple[str, str | None]]:
        """(job id, its sweep) of every job this work settles, its own first."""
        others = [(str(m["job_id"]), m.get("parent")) for m in self.merged if m.get("job_id")]
        return [(self.job_id, self.parent), *others]

    def replay(self) -> dict[str, Any]:
        """What ``regsweep replay`` runs again: the same prune, as a job of its own."""
        params = {"repository": self.repository, "dry_run": self.dry_run}
        params |= {"requests": self.requests}
        if self.requests_only:  # a dashboard deletion stays that deletion, re-planned
            params |= {"requests_only": True}
        return {"kind": "prune", "params": params}


@shared_task(name=TASK_PRUNE, bind=True, acks_late=True, max_retries=None)
def prune(
    self: Task[Any, Any],
    repository: str,
    *,
    job_id: str | None = None,
    requests: list[dict[str, Any]] | None = None,
    dry_run: bool = False,
    incremental: bool = True,
    trigger: str = "api",
    parent: str | None = None,
    merged: list[dict[str, Any]] | None = None,
    requests_only: bool = False,
    expect: str | None = None,
) -> None:
    if job_id is None:
        # One record per task, however often it is delivered: a redelivery resumes it.
        own = _job_id_of(self)
        params = {"repository": repository, "dry_run": dry_run, "trigger": trigger}
        job_id = run_patiently(lambda ctx: ctx.state.create_job("prune", params, job_id=own))
    work = _Work(
        repository,
        job_id,
        requests or [],
        dry_run,
        incremental,
        trigger,
        parent,
        merged or [],
        requests_only,
        expect,
    )
    job = jobs.PruneJob(
        repository,
        job_id,
        tuple(request_from_json(r) for r in work.requests),
        dry_run,
        incremental,
        requests_only,
        expect,
    )
    _start_all(work)
    try:
        summary = run_patiently(lambda ctx: jobs.prune_repository(ctx, job))
    except Deferred as exc:
        _park(work, exc)
        return
    except RepositoryBusy as exc:
        # Waits in the broker, not in a worker slot; the prune holding it may take long.
        _update(job_id, JobState.QUEUED, waiting=str(exc))
        raise self.retry(countdown=BUSY_RETRY_SECONDS, exc=exc) from exc
    except RegistryUnavailable as exc:
        summary = _retry_or_fail(self, work, exc)
    except RegsweepError as exc:
        summary = _failed(str(exc))
    except Exception as exc:  # a bug: the job (and its sweep) must still end
        log.exception("prune of %s failed", repository)
        summary = _failed(_internal(exc))
    _finish(work, {"repository": repository} | summary)
    if not dry_run and summary.get("mode") == "enforce":
        _schedule_grace_prune(repository)


def _failed(error: str) -> dict[str, Any]:
    return {"errors": [error], "outcome": RunOutcome.FAILED.value}


def _park(work: _Work, exc: Deferred) -> None:
    """Park every job of the work until the window ends, each as its own entry."""
    for entry in [work.own(), *work.merged]:
        run_patiently(lambda ctx, e=entry: jobs.defer(ctx, work.repository, e))
    for job_id, _ in work.jobs():
        _update(job_id, JobState.DEFERRED, errors=[str(exc)], ran_with=None)


def _start_all(work: _Work) -> None:
    _start(work.job_id)
    for job_id, _ in work.jobs()[1:]:
        _update(job_id, JobState.RUNNING, ran_with=work.job_id)


def _schedule_grace_prune(repository: str) -> None:
    """Come back when the next untagged digest's grace ends (instead of the next sweep)."""
    horizon = configured().maintenance.window_duration  # within the visibility timeout
    try:
        delay = run(lambda ctx: jobs.next_grace_prune(ctx, repository, horizon))
    except StateError:
        log.warning("cannot schedule the grace prune of %s; the sweep will", repository)
        return
    if delay is not None:
        enqueue_prune(repository, trigger="untagged grace", countdown=delay.total_seconds())


def _finish(work: _Work, summary: dict[str, Any]) -> None:
    """Record the end of every job of the work, and of each sweep whose last prune it was."""
    failed = summary.get("outcome") == RunOutcome.FAILED
    merged = [job_id for job_id, _ in work.jobs()[1:]]
    for job_id, parent in work.jobs():
        also = {"ran_with": work.job_id} if job_id != work.job_id else {"ran_for": merged}
        _settle(job_id, summary | (also if merged else {}), failed, parent)
    # Told once; by the sweep when every job of the work belongs to one.
    told_by_sweep = all(parent is not None for _, parent in work.jobs())
    _after_finish(work.job_id, summary, failed, work.parent if told_by_sweep else None)


def _settle(job_id: str, summary: dict[str, Any], failed: bool, parent: str | None) -> None:
    """Record a prune job's end, and its sweep's end when it was the last one of it."""
    # What an earlier attempt left ("retrying: ...", a busy repository) ends with the job:
    # a prune that succeeded after a retry shows no error.
    final = {"errors": [], "waiting": None} | summary
    _update(job_id, JobState.FAILED if failed else JobState.SUCCEEDED, **final)
    if parent is None:
        return
    counts = jobs.child_counts(summary, failed)
    totals = run(lambda ctx: jobs.child_finished(ctx, parent, job_id, counts))
    if totals is not None:
        state = JobState.FAILED if totals.get("failed") else JobState.SUCCEEDED
        _update(parent, state, kind="sweep", counts=totals, bytes=totals.get("bytes", 0))
        notify_runtime.publish(configured(), message.sweep_finished(parent, totals))


def _job_id_of(task: Task[Any, Any]) -> str | None:
    """The job id a task without one keeps across deliveries: its task id's hex."""
    try:
        return uuid.UUID(str(task.request.id)).hex
    except ValueError:
        return None


def _internal(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"[:500]


def _start(job_id: str, kind: str = "prune") -> None:
    """Mark a job running; when it already was, an earlier attempt died mid-way: say so."""

    async def start(ctx: WorkerContext) -> None:
        ctx.metrics.job(kind, JobState.RUNNING.value)
        if await ctx.state.start_job(job_id) != JobState.RUNNING.value:
            return
        job = await ctx.state.get_job(job_id) or {}
        when = datetime.now(UTC).isoformat(timespec="seconds")
        note = f"{when}: an earlier attempt did not finish (its worker died); resumed"
        await ctx.state.update_job(job_id, interruptions=[*job.get("interruptions", []), note])

    try:
        run(start)
    except StateError:
        log.exception("cannot record job %s as running", job_id)


def _retry_or_fail(task: Task[Any, Any], work: _Work, exc: RegistryUnavailable) -> dict[str, Any]:
    """Retry later (raises); after the last attempt, the failed job's summary, the work
    dead-lettered for ``regsweep replay``."""
    attempt = task.request.retries + 1
    if attempt <= MAX_REGISTRY_RETRIES:
        for job_id, _ in work.jobs():
            _update(
                job_id,
                JobState.QUEUED,
                errors=[f"retrying ({attempt}/{MAX_REGISTRY_RETRIES}): {exc}"],
            )
        raise task.retry(countdown=_backoff(task.request.retries), exc=exc)
    ids = ", ".join(job_id for job_id, _ in work.jobs())
    reason = (
        f"prune of {work.repository} ({work.trigger}; job {ids}) failed after "
        f"{attempt} attempts: {exc}"
    )
    letter = _dead_letter_work("prune", reason, work.own(), work.replay())
    if letter is None:
        return _failed(str(exc))
    # In the errors too: the prune.failed notification tells them.
    kept = f"dead-lettered: regsweep replay {letter}"
    return {"errors": [str(exc), kept], "outcome": RunOutcome.FAILED.value, "dead_letter": letter}


def _dead_letter_work(
    source: str, reason: str, body: dict[str, Any], replay: dict[str, Any]
) -> str | None:
    """Keep work that failed for good where ``status`` and notifications show it; its id."""
    log.warning("dead-lettered: %s", reason)
    excerpted = excerpt(json.dumps(body))

    async def keep(ctx: WorkerContext) -> str:
        letter = await ctx.state.dead_letter(source, reason[:2000], excerpted, replay=replay)
        return letter

    try:
        letter = run_patiently(keep)
    except StateError as exc:
        log.error("dead letter not kept: %s", exc)
        return None
    return str(letter)


def _update(job_id: str, state: JobState, kind: str = "prune", **fields: Any) -> None:
    def record(ctx: WorkerContext) -> Coroutine[Any, Any, bool]:
        ctx.metrics.job(kind, state.value)
        return ctx.state.update_job(job_id, state=state.value, **fields)

    try:
        run(record)
    except StateError:
        log.exception("cannot record job %s as %s", job_id, state.value)


@shared_task(name=TASK_SWEEP, bind=True, acks_late=True, max_retries=None)
def sweep(
    self: Task[Any, Any],
    job_id: str | None = None,
    repository: str | None = None,
    dry_run: bool = False,
) -> None:
    """Reconcile every policy-covered repository with the live registry: one prune each."""
    if job_id is None:
        job_id = run(lambda ctx: ctx.state.create_job("sweep", {"trigger": "beat"}))
    _update(job_id, JobState.RUNNING, kind="sweep")
    try:
        names = run(lambda ctx: ctx.pruner.repositories([repository] if repository else []))
        children = run(lambda ctx: _child_jobs(ctx, job_id, names, dry_run))
    except RegistryUnavailable as exc:
        _sweep_unavailable(self, job_id, repository, dry_run, exc)
        return
    except RegsweepError as exc:
        _update(job_id, JobState.FAILED, kind="sweep", errors=[str(exc)])
        return
    except Exception as exc:  # a bug: the job must still end
        log.exception("sweep %s failed", job_id)
        _update(job_id, JobState.FAILED, kind="sweep", errors=[_internal(exc)])
        return
    if not children:
        _update(job_id, JobState.SUCCEEDED, kind="sweep", repositories=[], counts={})
        return
    _update(job_id, JobState.RUNNING, kind="sweep", repositories=names, children=children)
    for name, child in children.items():
        enqueue_prune(
            name,
            job_id=child,
            incremental=False,
            dry_run=dry_run,
            trigger=f"sweep {job_id}",
            parent=job_id,
        )


def _sweep_unavailable(
    task: Task[Any, Any],
    job_id: str,
    repository: str | None,
    dry_run: bool,
    exc: RegistryUnavailable,
) -> None:
    """A sweep that could not list the registry: retried (raises), then dead-lettered."""
    attempt = task.request.retries + 1
    if attempt <= MAX_REGISTRY_RETRIES:
        note = f"retrying ({attempt}/{MAX_REGISTRY_RETRIES}): {exc}"
        _update(job_id, JobState.QUEUED, kind="sweep", errors=[note])
        kwargs = {"job_id": job_id, "repository": repository, "dry_run": dry_run}
        raise task.retry(kwargs=kwargs, countdown=_backoff(task.request.retries), exc=exc)
    params = {"repository": repository, "dry_run": dry_run}
    reason = f"sweep {job_id} failed after {attempt} attempts: {exc}"
    letter = _dead_letter_work("sweep", reason, params, {"kind": "sweep", "params": params})
    errors = [str(exc), *([f"dead-lettered: regsweep replay {letter}"] if letter else [])]
    _update(job_id, JobState.FAILED, kind="sweep", errors=errors, dead_letter=letter)


async def _child_jobs(
    ctx: WorkerContext, sweep_id: str, names: list[str], dry_run: bool
) -> dict[str, str]:
    """A job record per repository of a sweep (repository -> job id), and the sweep's tally."""
    children: dict[str, str] = {}
    for name in names:
        params = {"repository": name, "dry_run": dry_run, "parent": sweep_id}
        children[name] = await ctx.state.create_job("prune", params)
    if children:
        await jobs.start_sweep(ctx, sweep_id, children)
    return children


@shared_task(name=TASK_RESTORE, acks_late=True)
def restore_task(job_id: str, repository: str, digest: str) -> None:
    _update(job_id, JobState.RUNNING, kind="restore")
    try:
        restored = run(
            lambda ctx: restore(
                ctx.client,
                ctx.audit,
                ctx.index,
                repository,
                digest,
                hold_for=ctx.config.restore_hold,
                job_id=job_id,
            )
        )
    except RegsweepError as exc:
        _update(job_id, JobState.FAILED, kind="restore", errors=[str(exc)])
        return
    except Exception as exc:  # a bug: the job must still end
        log.exception("restore job %s failed", job_id)
        _update(job_id, JobState.FAILED, kind="restore", errors=[_internal(exc)])
        return
    items = [
        {"digest": r.digest, "tags": list(r.tags), "action": r.action, "pushed": r.pushed}
        for r in restored
    ]
    _update(
        job_id, JobState.SUCCEEDED, kind="restore", restored=items, counts={"restored": len(items)}
    )


@shared_task(name=TASK_TICK, acks_late=True)
def tick() -> None:
    """Periodic: release prunes parked during a window that has ended; tell of new dead
    letters (one notification per tick at most, however many came)."""
    release_parked()
    _notify_dead_letters()


def release_parked() -> int:
    """Queue the prunes parked during a window that has ended, merged per repository, then
    forget them (a worker dying in between leaves them parked for the next tick); how many
    prunes were queued."""
    parked: jobs.Parked = run(jobs.parked_prunes)
    for kwargs in parked.prunes:
        enqueue_prune(**kwargs)
    run(lambda ctx: jobs.unpark(ctx, parked.entries))
    return len(parked.prunes)


def _notify_dead_letters() -> None:
    config = configured()
    if not config.notify.targets:
        return
    try:
        news = run(jobs.new_dead_letters)
    except StateError as exc:
        log.warning("dead letters not checked for notifications: %s", exc)
        return
    if news is not None:
        notify_runtime.publish(config, message.dead_letters(*news))


def _after_finish(job_id: str, summary: dict[str, Any], failed: bool, parent: str | None) -> None:
    """What follows a prune's recorded end: the health record and the notification (both
    best effort). A sweep's prunes are told together, when the sweep ends."""
    repository = str(summary.get("repository", ""))
    if not failed:
        try:
            run(lambda ctx: jobs.prune_succeeded(ctx, job_id, repository))
        except StateError as exc:
            log.warning("last successful prune not recorded: %s", exc)
    if parent is not None:
        return
    if failed:
        notify_runtime.publish(configured(), message.prune_failed(job_id, repository, summary))
    elif int((summary.get("counts") or {}).get("deleted", 0)) > 0:
        try:
            deleted = run(lambda ctx: jobs.deleted_by(ctx, job_id))
        except StateError as exc:
            log.warning("the deletions of job %s not read for its notification: %s", job_id, exc)
            deleted = []
        notify_runtime.publish(configured(), message.prune_deleted(job_id, summary, deleted))
