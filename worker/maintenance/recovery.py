"""Recover a crashed maintenance window: the registry is never left read-only.

A maintenance flag whose GC lock has no live owner means the window's worker
died (SIGKILL, OOM, a lost machine) after pausing pruning and, maybe, after
switching the registry read-only. The check runs when a worker starts and
every ~30 s (``regsweep.maintenance_check``); whichever process finds the
crash first takes the GC lock (so no GC starts meanwhile and no second
checker joins in) and:

1. kills the crashed window's command if it is still running on this
   machine, and waits until it is gone: a process controller's GC or switch
   command outlives its worker (a GC left running on a read-write registry
   would delete blobs pushed meanwhile; a read-only switch left running would
   restart the registry read-only while the recovery switches it back, and
   whichever lost the race for the port would leave the other one up) — and
   backs off when it ran on another machine, which only that one can check;
2. switches the registry read-write through the controller and waits until
   writes work (retried with backoff; on failure the flag stays and the next
   check tries again);
3. clears the flag and releases the deferred prunes;
4. marks the job ``interrupted``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from worker.errors import StateError
from worker.identity import ProcessIdentity
from worker.maintenance.job import (
    Maintenance,
    alert_left_read_only,
    end_pause,
    switch_back,
)
from worker.maintenance.session import kill_session
from worker.notify import message
from worker.store.state import JobState
from worker.store.window import recorded_session, running_window

log = logging.getLogger("regsweep.gc")

#: Job states a crash leaves behind; a job already finished keeps its state.
_UNFINISHED = frozenset({JobState.QUEUED.value, JobState.RUNNING.value, JobState.DEFERRED.value})


@dataclass(frozen=True)
class Recovery:
    """What one recovery did for the window of ``job_id``."""

    job_id: str
    registry_writable: bool
    killed_gc: bool = False
    errors: list[str] = field(default_factory=list)


def recover_crashed_window(m: Maintenance) -> Recovery | None:
    """Recover the window in progress if its GC is provably dead; ``None`` when nothing to do."""
    if running_window(m.redis, m.keys) is None:
        return None
    lock = m.lock()
    holder = lock.holder()
    if holder is not None and not lock.break_if_dead(holder):
        return None  # the GC runs (or its lock's TTL has not run out yet)
    job_id = running_window(m.redis, m.keys)
    if job_id is None or lock.acquire(job_id) is not None:
        return None  # finished meanwhile, or another checker is recovering it
    with lock.held():
        return _recover_locked(m)


def _recover_locked(m: Maintenance) -> Recovery | None:
    job_id = running_window(m.redis, m.keys)
    if job_id is None:
        return None
    orphan = _orphan_gc(m)
    if orphan is not None and not orphan.is_local():
        log.error(
            "crashed GC job %s ran on host %s; only a worker there can stop it and recover",
            job_id,
            orphan.host,
        )
        return None
    killed = orphan is not None and kill_session(orphan)
    errors: list[str] = []
    if switch_back(m, errors) is None:
        alert_left_read_only(m, job_id, errors)
        return Recovery(job_id, registry_writable=False, killed_gc=killed, errors=errors)
    released = end_pause(m)
    _mark_interrupted(m, job_id, errors)
    m.metrics.alert("recoveries")
    m.notify(message.recovered(job_id, killed, released))
    log.warning(
        "recovered the crashed maintenance window of GC job %s: registry read-write, "
        "pruning resumed (%s deferred prunes released)",
        job_id,
        "tick releases the" if released is None else released,
    )
    return Recovery(job_id, registry_writable=True, killed_gc=killed, errors=errors)


def _orphan_gc(m: Maintenance) -> ProcessIdentity | None:
    """The crashed GC's process group, as the GC recorded it (process controller only)."""
    return recorded_session(m.redis, m.keys)


def _mark_interrupted(m: Maintenance, job_id: str, errors: list[str]) -> None:
    now = datetime.now(UTC).isoformat()
    try:
        job = m.state.get_job(job_id)
        fields: dict[str, object] = {"recovered": now}
        if job is not None and job.get("state") in _UNFINISHED:
            note = "the GC worker died mid-window; recovery put the registry back read-write"
            fields |= {
                "state": JobState.INTERRUPTED.value,
                "errors": [*job.get("errors", []), note, *errors],
            }
            m.metrics.job_state(JobState.INTERRUPTED.value)
        m.state.update_job(job_id, **fields)
    except StateError as exc:
        log.error("cannot mark GC job %s interrupted: %s", job_id, exc)
