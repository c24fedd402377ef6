"""Celery tasks: parse arguments, call one function, map errors.

A prune's whole arc is :func:`worker.queue.prune_job.run_prune`; its task maps the retry it
asks for to Celery's.

Retries are for transient registry trouble only (connection errors, 5xx);
a read-only registry or a running maintenance window parks the prune until
the window ends (deferred), it never fails it.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, TypeVar

from celery import Task, shared_task

from worker.engine.ci_requests import request_to_json
from worker.engine.events import CiEvent, RegistryEvent, excerpt
from worker.engine.restore import restore
from worker.errors import (
    BadEvent,
    RegistryUnavailable,
    RegsweepError,
    StateError,
)
from worker.notify import message
from worker.notify import runtime as notify_runtime
from worker.queue import news, parking, pushes, sweeps
from worker.queue.context import WorkerContext
from worker.queue.enqueue import enqueue_prune
from worker.queue.job_records import dead_letter_work, internal, update
from worker.queue.names import (
    TASK_CI_EVENT,
    TASK_PRUNE,
    TASK_REGISTRY_EVENTS,
    TASK_RESTORE,
    TASK_SWEEP,
    TASK_TICK,
)
from worker.queue.process import _close_clients, reopen_context, run, run_patiently
from worker.queue.prune_job import MAX_REGISTRY_RETRIES, PruneWork, retry_backoff, run_prune
from worker.queue.runtime import configured
from worker.store.state import JobState

__all__ = ["MAX_REGISTRY_RETRIES", "_close_clients", "reopen_context", "run", "run_patiently"]

T = TypeVar("T")
log = logging.getLogger("regsweep.worker")


@shared_task(name=TASK_REGISTRY_EVENTS, acks_late=True)
def registry_events(events: list[dict[str, Any]]) -> None:
    parsed = _usable_events(events)
    try:
        repositories = run_patiently(lambda ctx: pushes.apply_registry_events(ctx, parsed))
    except StateError:
        raise  # Redis stayed away: the message is delivered again
    except Exception:  # some event of the batch: the others must not go with it
        log.exception("applying %d registry events failed; applying them one by one", len(parsed))
        repositories = _apply_one_by_one(parsed)
    for repository in repositories:
        if run_patiently(lambda ctx, r=repository: pushes.claim_prune(ctx, r)):
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
            repositories += run_patiently(
                lambda ctx, e=event: pushes.apply_registry_events(ctx, [e])
            )
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
    requests = run_patiently(lambda ctx: pushes.ci_requests(ctx, parsed))
    for repository, request in requests.items():
        enqueue_prune(repository, requests=[request_to_json(request)], trigger=parsed.kind)
    log.info("ci event %s %s: %d repositories", parsed.source, parsed.kind, len(requests))


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
    work = PruneWork(
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
    retry = run_prune(work, retries=self.request.retries)
    if retry is not None:
        raise self.retry(countdown=retry.countdown, exc=retry.cause) from retry.cause


def _job_id_of(task: Task[Any, Any]) -> str | None:
    """The job id a task without one keeps across deliveries: its task id's hex."""
    try:
        return uuid.UUID(str(task.request.id)).hex
    except ValueError:
        return None


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
    update(job_id, JobState.RUNNING, kind="sweep")
    try:
        names = run(lambda ctx: ctx.pruner.repositories([repository] if repository else []))
        children = run(lambda ctx: _child_jobs(ctx, job_id, names, dry_run))
    except RegistryUnavailable as exc:
        _sweep_unavailable(self, job_id, repository, dry_run, exc)
        return
    except RegsweepError as exc:
        update(job_id, JobState.FAILED, kind="sweep", errors=[str(exc)])
        return
    except Exception as exc:  # a bug: the job must still end
        log.exception("sweep %s failed", job_id)
        update(job_id, JobState.FAILED, kind="sweep", errors=[internal(exc)])
        return
    if not children:
        update(job_id, JobState.SUCCEEDED, kind="sweep", repositories=[], counts={})
        return
    update(job_id, JobState.RUNNING, kind="sweep", repositories=names, children=children)
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
        update(job_id, JobState.QUEUED, kind="sweep", errors=[note])
        kwargs = {"job_id": job_id, "repository": repository, "dry_run": dry_run}
        raise task.retry(kwargs=kwargs, countdown=retry_backoff(task.request.retries), exc=exc)
    params = {"repository": repository, "dry_run": dry_run}
    reason = f"sweep {job_id} failed after {attempt} attempts: {exc}"
    letter = dead_letter_work("sweep", reason, params, {"kind": "sweep", "params": params})
    errors = [str(exc), *([f"dead-lettered: regsweep replay {letter}"] if letter else [])]
    update(job_id, JobState.FAILED, kind="sweep", errors=errors, dead_letter=letter)


async def _child_jobs(
    ctx: WorkerContext, sweep_id: str, names: list[str], dry_run: bool
) -> dict[str, str]:
    """A job record per repository of a sweep (repository -> job id), and the sweep's tally."""
    children: dict[str, str] = {}
    for name in names:
        params = {"repository": name, "dry_run": dry_run, "parent": sweep_id}
        children[name] = await ctx.state.create_job("prune", params)
    if children:
        await sweeps.start_sweep(ctx, sweep_id, children)
    return children


@shared_task(name=TASK_RESTORE, acks_late=True)
def restore_task(job_id: str, repository: str, digest: str) -> None:
    update(job_id, JobState.RUNNING, kind="restore")
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
        update(job_id, JobState.FAILED, kind="restore", errors=[str(exc)])
        return
    except Exception as exc:  # a bug: the job must still end
        log.exception("restore job %s failed", job_id)
        update(job_id, JobState.FAILED, kind="restore", errors=[internal(exc)])
        return
    items = [
        {"digest": r.digest, "tags": list(r.tags), "action": r.action, "pushed": r.pushed}
        for r in restored
    ]
    update(
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
    parked: parking.Parked = run(parking.parked_prunes)
    for kwargs in parked.prunes:
        enqueue_prune(**kwargs)
    run(lambda ctx: parking.unpark(ctx, parked.entries))
    return len(parked.prunes)


def _notify_dead_letters() -> None:
    config = configured()
    if not config.notify.targets:
        return
    try:
        told = run(news.new_dead_letters)
    except StateError as exc:
        log.warning("dead letters not checked for notifications: %s", exc)
        return
    if told is not None:
        notify_runtime.publish(config, message.dead_letters(*told))
