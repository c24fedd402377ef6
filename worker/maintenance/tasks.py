"""Celery tasks of the maintenance window: parse, call one function, log the outcome.

``regsweep.gc`` (queue ``gc``, one consumer, concurrency 1)
    Beat sends it at the window's start with ``trigger="window"``; the API and
    ``regsweep gc --enqueue`` send it with the ``job_id`` they recorded. A
    redelivery of a job that had already started (``acks_late``: its worker
    died mid-window) is never run again: it recovers the window instead.

``regsweep.maintenance_check`` (queue ``events``, every ~30 s from beat)
    Recovers a crashed window (:mod:`worker.maintenance.recovery`). The same
    check runs once when a worker starts (``worker_ready``).

The GC task's time limits are set when the worker starts, from the window's
duration: longer than the window (an overrunning GC may finish) and shorter
than the broker's visibility timeout (a running GC is never redelivered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

from celery import shared_task
from celery.signals import worker_init, worker_ready

from worker.errors import ConfigError, RegsweepError
from worker.maintenance.job import GcRequest, open_maintenance, run_gc
from worker.maintenance.recovery import recover_crashed_window
from worker.notify import runtime as notify_runtime
from worker.notify.message import Notification
from worker.queue import tasks as worker_tasks
from worker.queue.names import TASK_GC, TASK_MAINTENANCE_CHECK
from worker.queue.runtime import configured
from worker.settings.model import Config
from worker.store.keys import Keys
from worker.store.redis import sync_client
from worker.store.state import JobState
from worker.store.window import running_window

log = logging.getLogger("regsweep.gc")

#: Hard limit beyond the window; below celery_app.VISIBILITY_MARGIN (1 h).
GC_TIME_MARGIN: Final = timedelta(minutes=40)
#: The soft limit comes first, so the ``finally`` blocks switch the registry back.
SOFT_LIMIT_LEAD: Final = timedelta(minutes=10)


def release_deferred() -> int:
    """What ``tick`` does: enqueue the prunes parked during the window; how many."""
    return worker_tasks.release_parked()


def _publish(note: Notification | None) -> None:
    """This worker process's notifier: it outlives the task (no drain wait at the task's end)."""
    notify_runtime.publish(configured(), note)


@shared_task(name=TASK_GC, acks_late=True)
def gc(
    job_id: str | None = None,
    dry_run: bool = False,
    trigger: str = "api",
    storage_prune: bool = False,
) -> None:
    with open_maintenance(
        configured(),
        release_deferred=release_deferred,
        notify=_publish,
        storage_prune=storage_prune,
    ) as m:
        if job_id is None:
            job_id = m.state.create_job("gc", {"dry_run": dry_run, "trigger": trigger})
        else:
            job = m.state.get_job(job_id)
            if job is not None and job.get("state") == JobState.SKIPPED.value:
                # Covered by a window that ran while this request waited (job.coalesce).
                log.info("GC job %s skipped: %s", job_id, job.get("reason"))
                return
            if job is not None and job.get("state") != JobState.QUEUED.value:
                log.warning("GC job %s was delivered again (state %s)", job_id, job.get("state"))
                recover_crashed_window(m)
                return
        try:
            outcome = run_gc(m, GcRequest(job_id, dry_run, trigger))
        except Exception as exc:  # a bug or a time limit: the window is undone, end the job
            log.exception("GC job %s failed", job_id)
            error = f"internal error: {type(exc).__name__}: {exc}"[:500]
            m.state.update_job(job_id, state=JobState.FAILED.value, errors=[error])
            return
    log.info("GC job %s: %s %s", job_id, outcome.status, outcome.reason)


@shared_task(name=TASK_MAINTENANCE_CHECK, acks_late=True)
def maintenance_check() -> None:
    check(configured(), release=release_deferred, notify=_publish)


def check(
    config: Config,
    *,
    release: Callable[[], int] | None = None,
    notify: Callable[[Notification | None], None] | None = None,
) -> None:
    """Recover a crashed window, if there is one; never raises (it runs on a timer)."""
    if config.redis_url is None:
        return
    try:
        client = sync_client(config.redis_url)
        try:
            pending = running_window(client, Keys())
        finally:
            client.close()
        if pending is None:
            return
        with open_maintenance(config, release_deferred=release, notify=notify) as m:
            recovered = recover_crashed_window(m)
        if recovered is not None and not recovered.registry_writable:
            log.error("recovery of GC job %s failed: %s", recovered.job_id, recovered.errors)
    except ConfigError as exc:
        log.warning("maintenance check skipped: %s", exc)
    except RegsweepError as exc:
        log.error("maintenance check failed: %s", exc)


@worker_init.connect
def _gc_time_limits(sender: Any = None, **_: Any) -> None:
    try:
        window = configured().maintenance.window_duration
    except ConfigError:
        return
    task = sender.app.tasks.get(TASK_GC) if sender is not None else None
    if task is not None:
        task.time_limit = (window + GC_TIME_MARGIN).total_seconds()
        task.soft_time_limit = (window + GC_TIME_MARGIN - SOFT_LIMIT_LEAD).total_seconds()


@worker_ready.connect
def _recover_on_start(**_: Any) -> None:
    try:
        config = configured()
    except ConfigError:
        return
    # Parked prunes are left to tick here: this is the worker's main process.
    check(config)
