"""A prune job's whole arc, owned by one function (:func:`run_prune`).

Start every job of the work (its own and those merged into it), run the prune, and then one
of: park every job on :class:`~worker.errors.Deferred` (a maintenance window: released by the
tick once it ends); ask for a retry when the repository is busy or the registry unreachable
(:class:`Retry`), dead-lettering the work after the last attempt; settle every job (and each
sweep whose last prune it was), record and tell how it ended, and schedule the prune that
ends the next untagged grace. The Celery task only parses its arguments, calls
:func:`run_prune`, and turns a :class:`Retry` into Celery's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

from worker.backoff import backoff
from worker.engine.ci_requests import request_from_json
from worker.engine.executor import RunOutcome
from worker.errors import Deferred, RegistryUnavailable, RegsweepError, RepositoryBusy, StateError
from worker.notify import message
from worker.notify import runtime as notify_runtime
from worker.queue import news, parking, pushes, sweeps
from worker.queue.enqueue import enqueue_prune
from worker.queue.job_records import dead_letter_work, failed, internal, start, update
from worker.queue.process import run, run_patiently
from worker.queue.pruning import PruneJob, PruneSummary, prune_repository
from worker.queue.runtime import configured
from worker.store.state import JobState

log = logging.getLogger("regsweep.worker")

#: Transient registry errors (unreachable, timeouts, 5xx): retries with backoff (2 s,
#: doubling, at most RETRY_MAX_SECONDS: about 8 minutes in all), then the job fails and
#: is dead-lettered (``regsweep replay ID``).
MAX_REGISTRY_RETRIES: Final = 8
RETRY_BASE_SECONDS: Final = 2.0
RETRY_MAX_SECONDS: Final = 300.0
BUSY_RETRY_SECONDS: Final = 5.0


def retry_backoff(retries: int) -> float:
    """Before Celery retry ``retries + 1`` of work the registry failed: spread out."""
    return backoff(retries + 1, base=RETRY_BASE_SECONDS, cap=RETRY_MAX_SECONDS, jitter=0.5)


@dataclass(frozen=True)
class Retry:
    """Deliver the task again in ``countdown`` seconds (``cause`` is why)."""

    countdown: float
    cause: Exception


@dataclass(frozen=True)
class PruneWork:
    """One prune task's work: its own job, and the jobs of prunes of the same repository
    parked during a window and merged into it (:func:`worker.queue.parking.merge_parked`)."""

    repository: str
    job_id: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    incremental: bool = True
    trigger: str = "api"
    parent: str | None = None
    merged: list[dict[str, Any]] = field(default_factory=list)
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

    def prune_job(self) -> PruneJob:
        return PruneJob(
            self.repository,
            self.job_id,
            tuple(request_from_json(r) for r in self.requests),
            self.dry_run,
            self.incremental,
            self.requests_only,
            self.expect,
        )


def run_prune(work: PruneWork, *, retries: int) -> Retry | None:
    """Carry ``work`` through its whole arc (the module docstring); ``retries``: how often
    its task was retried already. A :class:`Retry` when the task must come back later."""
    _start_all(work)
    try:
        summary = run_patiently(lambda ctx: prune_repository(ctx, work.prune_job()))
    except Deferred as exc:
        _park(work, exc)
        return None
    except RepositoryBusy as exc:
        # Waits in the broker, not in a worker slot; the prune holding it may take long.
        update(work.job_id, JobState.QUEUED, waiting=str(exc))
        return Retry(BUSY_RETRY_SECONDS, exc)
    except RegistryUnavailable as exc:
        if retries + 1 <= MAX_REGISTRY_RETRIES:
            _retrying(work, exc, retries + 1)
            return Retry(retry_backoff(retries), exc)
        summary = _dead_lettered(work, exc, retries + 1)
    except RegsweepError as exc:
        summary = failed(str(exc))
    except Exception as exc:  # a bug: the job (and its sweep) must still end
        log.exception("prune of %s failed", work.repository)
        summary = failed(internal(exc))
    ended = _finish(work, {"repository": work.repository} | summary)
    if not work.dry_run and ended.enforced:
        _schedule_grace_prune(work.repository)
    return None


def _start_all(work: PruneWork) -> None:
    start(work.job_id)
    for job_id, _ in work.jobs()[1:]:
        update(job_id, JobState.RUNNING, ran_with=work.job_id)


def _park(work: PruneWork, exc: Deferred) -> None:
    """Park every job of the work until the window ends, each as its own entry."""
    for entry in [work.own(), *work.merged]:
        run_patiently(lambda ctx, e=entry: parking.defer(ctx, work.repository, e))
    for job_id, _ in work.jobs():
        update(job_id, JobState.DEFERRED, errors=[str(exc)], ran_with=None)


def _retrying(work: PruneWork, exc: RegistryUnavailable, attempt: int) -> None:
    for job_id, _ in work.jobs():
        note = f"retrying ({attempt}/{MAX_REGISTRY_RETRIES}): {exc}"
        update(job_id, JobState.QUEUED, errors=[note])


def _dead_lettered(work: PruneWork, exc: RegistryUnavailable, attempt: int) -> dict[str, Any]:
    """The failed job's summary after the last attempt, the work dead-lettered for
    ``regsweep replay``."""
    ids = ", ".join(job_id for job_id, _ in work.jobs())
    reason = (
        f"prune of {work.repository} ({work.trigger}; job {ids}) failed after "
        f"{attempt} attempts: {exc}"
    )
    letter = dead_letter_work("prune", reason, work.own(), work.replay())
    if letter is None:
        return failed(str(exc))
    # In the errors too: the prune.failed notification tells them.
    kept = f"dead-lettered: regsweep replay {letter}"
    return {"errors": [str(exc), kept], "outcome": RunOutcome.FAILED.value, "dead_letter": letter}


def _schedule_grace_prune(repository: str) -> None:
    """Come back when the next untagged digest's grace ends (instead of the next sweep)."""
    horizon = configured().maintenance.window_duration  # within the visibility timeout
    try:
        delay = run(lambda ctx: pushes.next_grace_prune(ctx, repository, horizon))
    except StateError:
        log.warning("cannot schedule the grace prune of %s; the sweep will", repository)
        return
    if delay is not None:
        enqueue_prune(repository, trigger="untagged grace", countdown=delay.total_seconds())


def _finish(work: PruneWork, record: dict[str, Any]) -> PruneSummary:
    """Record the end of every job of the work, and of each sweep whose last prune it was."""
    summary = PruneSummary.of(record)
    merged = [job_id for job_id, _ in work.jobs()[1:]]
    for job_id, parent in work.jobs():
        also = {"ran_with": work.job_id} if job_id != work.job_id else {"ran_for": merged}
        _settle(job_id, PruneSummary.of(record | (also if merged else {})), parent)
    # Told once; by the sweep when every job of the work belongs to one.
    told_by_sweep = all(parent is not None for _, parent in work.jobs())
    _after_finish(work.job_id, summary, work.parent if told_by_sweep else None)
    return summary


def _settle(job_id: str, summary: PruneSummary, parent: str | None) -> None:
    """Record a prune job's end, and its sweep's end when it was the last one of it."""
    # What an earlier attempt left ("retrying: ...", a busy repository) ends with the job:
    # a prune that succeeded after a retry shows no error.
    final = {"errors": [], "waiting": None} | dict(summary.record)
    update(job_id, JobState.FAILED if summary.failed else JobState.SUCCEEDED, **final)
    if parent is None:
        return
    counts = sweeps.child_counts(summary)
    totals = run(lambda ctx: sweeps.child_finished(ctx, parent, job_id, counts))
    if totals is not None:
        state = JobState.FAILED if totals.get("failed") else JobState.SUCCEEDED
        update(parent, state, kind="sweep", counts=totals, bytes=totals.get("bytes", 0))
        notify_runtime.publish(configured(), message.sweep_finished(parent, totals))


def _after_finish(job_id: str, summary: PruneSummary, parent: str | None) -> None:
    """What follows a prune's recorded end: the health record and the notification (both
    best effort). A sweep's prunes are told together, when the sweep ends."""
    repository = summary.repository
    if not summary.failed:
        try:
            run(lambda ctx: news.prune_succeeded(ctx, job_id, repository))
        except StateError as exc:
            log.warning("last successful prune not recorded: %s", exc)
    if parent is not None:
        return
    record = summary.record
    if summary.failed:
        notify_runtime.publish(configured(), message.prune_failed(job_id, repository, record))
    elif summary.deleted > 0:
        try:
            deleted = run(lambda ctx: news.deleted_by(ctx, job_id))
        except StateError as exc:
            log.warning("the deletions of job %s not read for its notification: %s", job_id, exc)
            deleted = []
        notify_runtime.publish(configured(), message.prune_deleted(job_id, record, deleted))
