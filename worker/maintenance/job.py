"""The GC job: one maintenance window, from pausing prunes to the report.

    set the maintenance flag ─► prunes defer themselves (jobs.prune_repository)
    wait for the per-repository prune locks to drain (bounded)
    switch read-only ─► wait: reads answer, a write gets 405 ─┐
    [storage prune, when gc_grace is 0]                       │
    run garbage-collect, streaming its output                 │ finally:
    [storage prune, by default: GC collects it next window]   │
    switch read-write (retried with backoff, alerted) ◄───────┘
      └ this restart also empties the blob-descriptor cache, which would
        otherwise answer for swept blobs and break re-pushes (distribution#1803, #3743)
    wait: a write is accepted ─► clear the flag ─► release the deferred prunes
    report on the job and in metrics

Exactly one GC runs in the cluster (:class:`~worker.store.gclock.GcLock`).
Everything after the flag is set is undone in a ``finally``. When the switch
back fails every retry, the flag stays set (prunes keep deferring instead of
meeting 405s) and the recovery check (:mod:`worker.maintenance.recovery`)
keeps trying. ``dry_run`` runs ``garbage-collect --dry-run`` on the registry
as it is: it only reads, so nothing is paused or switched.

``--delete-untagged`` is never passed, on any version (docs/safety.md, invariant 3):
untagged manifests are deleted by the policies' ``untagged`` rule, audited and
restorable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Protocol

from worker.backoff import backoff
from worker.errors import ConfigError, ControllerError, RegsweepError, StateError
from worker.identity import ProcessIdentity
from worker.maintenance.controllers import (
    LineCallback,
    ProcessController,
    RegistryController,
    make_controller,
)
from worker.maintenance.gc import GcResult
from worker.maintenance.probe import RegistryProbe
from worker.maintenance.report import GcReport, MaintenanceMetrics
from worker.maintenance.storage_prune import StoragePrune
from worker.maintenance.window import WINDOW_TRIGGER, may_start
from worker.notify import message
from worker.notify.message import Notification
from worker.notify.runtime import make_notifier
from worker.settings.model import Config, GcGrace, MaintenanceSettings, ProcessControllerSettings
from worker.store.alerts import first_telling
from worker.store.gclock import EXTEND_EVERY, LOCK_TTL, GcLock
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.locks import held_repositories
from worker.store.redis import RedisClient, sync_client
from worker.store.state import JobState, SyncState
from worker.store.views import record_gc
from worker.store.window import pause_pruning, record_session, resume_pruning

log = logging.getLogger("regsweep.gc")

#: First line a process controller's GC prints: its session id, so a recovery can kill it.
SESSION_MARKER: Final = "regsweep-gc-session"


class GcStatus(StrEnum):
    """How a GC request ended (``busy``: another GC runs, or this window's was started)."""

    DONE = "done"
    FAILED = "failed"
    BUSY = "busy"
    SKIPPED = "skipped"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _no_notification(_: Notification | None) -> None:
    pass


@dataclass(frozen=True)
class Timing:
    """How long each wait of a window may last. Defaults for production; tests shorten them."""

    prune_drain: float = 300.0
    switch_timeout: float = 60.0
    switch_back_attempts: int = 5
    switch_back_backoff: float = 2.0
    lock_ttl: timedelta = LOCK_TTL
    lock_extend_every: timedelta = EXTEND_EVERY
    progress_every: float = 5.0
    poll: float = 0.5


class StoragePruneStep(Protocol):
    """The storage-level prune (:class:`~worker.maintenance.storage_prune.StoragePrune`)."""

    def run(self, report: GcReport, stop: threading.Event) -> None:
        """Prune on storage now, with the registry read-only; the outcome goes on ``report``."""

    def after_restart(self, report: GcReport) -> None:
        """The registry is read-write again (restarted): check what the prune removed."""


@dataclass
class Maintenance:
    """What a window works with, made once by the caller (a Celery task, the CLI, a test)."""

    redis: RedisClient
    state: SyncState
    controller: RegistryController
    probe: RegistryProbe
    settings: MaintenanceSettings
    keys: Keys = field(default_factory=Keys)
    #: Enqueues the prunes parked during the window; ``None``: the workers' tick does it.
    release_deferred: Callable[[], int] | None = None
    timing: Timing = field(default_factory=Timing)
    clock: Callable[[], datetime] = _utcnow
    sleep: Callable[[float], None] = time.sleep
    #: Queues a notification (:mod:`worker.notify`); never blocks, never raises.
    notify: Callable[[Notification | None], None] = _no_notification
    #: The storage-level prune the window runs read-only; ``None``: none.
    storage_prune: StoragePruneStep | None = None

    @property
    def metrics(self) -> MaintenanceMetrics:
        return MaintenanceMetrics(self.redis, self.keys)

    def lock(self) -> GcLock:
        t = self.timing
        return GcLock(self.redis, self.keys, ttl=t.lock_ttl, extend_every=t.lock_extend_every)


@contextmanager
def open_maintenance(
    config: Config,
    *,
    release_deferred: Callable[[], int] | None = None,
    prefix: str = DEFAULT_PREFIX,
    notify: Callable[[Notification | None], None] | None = None,
    storage_prune: bool = False,
) -> Iterator[Maintenance]:
    """The production :class:`Maintenance` for ``config``, closed afterwards. Without
    ``notify`` (the CLI, a worker's start-up check), notifications go through a notifier of
    its own, drained (for a bounded time) when the maintenance closes. The window prunes on
    storage when ``maintenance.storage_prune`` or ``storage_prune`` says so."""
    if config.redis_url is None:
        raise ConfigError(
            "GC needs Redis (redis.url or REGSWEEP_REDIS_URL): for the cluster-wide GC lock "
            "and the maintenance flag that pauses pruning"
        )
    client = sync_client(config.redis_url)
    keys = Keys(prefix)
    probe = RegistryProbe.from_settings(config.registry)
    own = make_notifier(config, prefix=prefix) if notify is None else None
    try:
        controller = controller_for(
            config.maintenance, on_switch=lambda pid: note_session(client, keys, pid)
        )
        wanted = storage_prune or config.maintenance.storage_prune
        step = StoragePrune(config, controller, probe, client, keys=keys, prefix=prefix)
        yield Maintenance(
            redis=client,
            state=SyncState(client, prefix=prefix),
            controller=controller,
            probe=probe,
            settings=config.maintenance,
            keys=keys,
            release_deferred=release_deferred,
            notify=own[0].publish if own is not None else notify or _no_notification,
            storage_prune=step if wanted else None,
        )
    finally:
        probe.close()
        client.close()
        if own is not None:
            own[0].close()
            if own[1] is not None:
                own[1].close()


def controller_for(
    settings: MaintenanceSettings, *, on_switch: Callable[[int], None] | None = None
) -> RegistryController:
    """The configured controller; a process controller's GC is made to name its session,
    and its switch commands' sessions are told to ``on_switch``."""
    if settings.controller is None:
        raise ConfigError(
            "maintenance.controller is not configured: regsweep cannot switch the registry "
            "read-only or run its garbage collector"
        )
    if isinstance(settings.controller, ProcessControllerSettings):
        return SessionTrackedController(settings.controller, on_switch=on_switch)
    return make_controller(settings.controller)


class SessionTrackedController:
    """A :class:`ProcessController` whose GC first prints its session id, and whose switch
    commands' sessions go to ``on_switch``.

    The GC and the switch commands run in sessions of their own and outlive a
    worker killed with SIGKILL; the recovery check kills the one that was
    running before it switches the registry back to read-write (a GC left
    sweeping would delete blobs pushed meanwhile; a read-only switch left
    running would restart the registry read-only under the recovery's feet).
    Version, switches and sizes come from the untouched commands (``--version``
    is asked of the GC command's first word).
    """

    def __init__(
        self,
        settings: ProcessControllerSettings,
        *,
        on_switch: Callable[[int], None] | None = None,
    ) -> None:
        self._plain = ProcessController(settings, on_switch=on_switch)
        command = f"echo {SESSION_MARKER} $$; {settings.gc_command}"
        self._marked = ProcessController(replace(settings, gc_command=command))

    def set_readonly(self, enabled: bool) -> None:
        self._plain.set_readonly(enabled)

    def is_readonly(self) -> bool:
        return self._plain.is_readonly()

    def run_gc(
        self,
        *,
        dry_run: bool,
        on_line: LineCallback | None = None,
        stop: threading.Event | None = None,
    ) -> GcResult:
        return self._marked.run_gc(dry_run=dry_run, on_line=on_line, stop=stop)

    def storage_bytes(self) -> int | None:
        return self._plain.storage_bytes()

    def registry_version(self) -> str | None:
        return self._plain.registry_version()


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class GcRequest:
    job_id: str
    dry_run: bool = False
    #: ``window`` (beat, at the window's start), ``api``, ``cli``.
    trigger: str = "api"


@dataclass(frozen=True)
class GcOutcome:
    """How a request ended. ``busy``: ``job_id`` is the GC already running (or started)."""

    status: GcStatus
    job_id: str
    reason: str = ""
    report: GcReport | None = None


def run_gc(m: Maintenance, request: GcRequest) -> GcOutcome:
    """One GC, if the window rules and the cluster-wide lock allow it now."""
    decision = may_start(m.settings, request.trigger, m.clock())
    if not decision.allowed:
        return _not_run(m, request, GcStatus.SKIPPED, request.job_id, decision.reason)
    lock = m.lock()
    if request.trigger == WINDOW_TRIGGER and decision.window is not None:
        claimer = lock.claim_window(decision.window.key, request.job_id)
        if claimer is not None:
            return _not_run(
                m, request, GcStatus.BUSY, claimer, "this window's GC was already started"
            )
    holder = lock.acquire(request.job_id)
    if holder is not None:
        return _not_run(m, request, GcStatus.BUSY, holder.job_id, "a GC is already running")
    with lock.held():
        report = _run_locked(m, request, decision.deadline, lock)
    status = GcStatus.DONE if report.ok else GcStatus.FAILED
    state = JobState.SUCCEEDED if report.ok else JobState.FAILED
    _update(m, request.job_id, state=state.value, **report.job_fields())
    _remember(m, request.job_id, report)
    m.metrics.job_state(state.value)
    m.metrics.window(report)
    if report.ok and not request.dry_run and report.covered_until is not None:
        coalesce(m, request.job_id, report.covered_until)
    log.info("GC job %s %s: %s", request.job_id, status, "; ".join(report.lines()[1:]))
    if not request.dry_run:
        m.notify(message.gc_finished(request.job_id, report.summary(), report.ok, report.errors))
    return GcOutcome(status, request.job_id, report=report)


def coalesce(m: Maintenance, job_id: str, covered_until: datetime) -> list[str]:
    """Settle every GC request still queued as ``skipped`` (``running_job_id`` this one):
    made while this window ran, or before it began, this window's GC has collected what
    they asked for. Five requests during one window make one window, not six (the ``gc``
    queue's one consumer would otherwise run each after the other). A request made after
    ``covered_until`` (the registry writable again, the parked prunes let go: their
    deletions are not collected) runs, and so does a dry run: it only reads. The ids
    skipped."""
    reason = f"GC job {job_id} ran while this request waited; its window covered it"
    skipped = []
    try:
        for queued, params in m.state.queued_jobs("gc", created_by=covered_until):
            if queued == job_id or params.get("dry_run"):
                continue
            if m.state.update_if_queued(
                queued, state=JobState.SKIPPED.value, reason=reason, running_job_id=job_id
            ):
                m.metrics.job_state(JobState.SKIPPED.value)
                skipped.append(queued)
    except StateError as exc:
        log.warning("GC requests queued during job %s not settled (each runs): %s", job_id, exc)
    if skipped:
        log.info("GC job %s covered %d queued requests: %s", job_id, len(skipped), skipped)
    return skipped


def _not_run(
    m: Maintenance, request: GcRequest, status: GcStatus, job_id: str, reason: str
) -> GcOutcome:
    log.info("GC job %s not run: %s (job %s)", request.job_id, reason, job_id)
    fields: dict[str, Any] = {"reason": reason}
    if status is GcStatus.BUSY:
        fields["running_job_id"] = job_id
    _update(m, request.job_id, state=JobState.SKIPPED.value, **fields)
    m.metrics.job_state(JobState.SKIPPED.value)
    return GcOutcome(status, job_id, reason)


def _run_locked(
    m: Maintenance, request: GcRequest, deadline: datetime | None, lock: GcLock
) -> GcReport:
    report = GcReport(request.job_id, request.trigger, request.dry_run, m.clock(), deadline)
    _update(m, request.job_id, state=JobState.RUNNING.value, started=report.started.isoformat())
    m.metrics.job_state(JobState.RUNNING.value)
    try:
        report.registry_version = registry_version(m)
        listener = GcListener(m, request.job_id, lock)
        if request.dry_run:
            report.gc = m.controller.run_gc(dry_run=True, on_line=listener, stop=listener.stop)
        else:
            _window(m, report, listener)
    except RegsweepError as exc:
        # GcLockLost stopped the GC; the finally blocks have switched back by now.
        log.error("GC job %s: %s", request.job_id, exc)
        report.errors.append(str(exc))
    if report.gc is not None and not report.gc.ok:
        report.errors.append(gc_failure(report.gc))
    report.finish(m.clock())
    return report


def _window(m: Maintenance, report: GcReport, listener: GcListener) -> None:
    """Pause pruning, GC read-only, resume; the pause always ends unless the registry is stuck."""
    set_flag(m, report.job_id)
    try:
        report.prunes_still_running = wait_for_prunes(m)
        _readonly_gc(m, report, listener)
    finally:
        if not report.left_readonly:
            report.deferred_released = end_pause(m)


def _readonly_gc(m: Maintenance, report: GcReport, listener: GcListener) -> None:
    started = time.monotonic()
    step = m.storage_prune
    # gc_grace 0: this window's GC collects what the prune removes. Otherwise GC comes
    # first and the prune's deletions stay restorable until the next window's GC.
    first = step if step is not None and m.settings.gc_grace is GcGrace.NONE else None
    try:
        m.controller.set_readonly(True)
        report.writes_while_readonly = m.probe.wait_readonly(m.timing.switch_timeout).value
        if first is not None:
            first.run(report, listener.stop)
        # Both sizes are taken while the registry refuses every write, so GC is the only
        # thing that changed the storage in between. Measured around the whole window, a
        # push before the switch or right after the switch back made the difference
        # negative (reports showed "bytes reclaimed: -24684").
        report.bytes_before = _storage_bytes(m)
        report.gc = m.controller.run_gc(dry_run=False, on_line=listener, stop=listener.stop)
        report.bytes_after = _storage_bytes(m)
        if step is not None and first is None:
            _prune_after_gc(report, step, listener)
        if report.storage_grew:
            note = "the storage grew while read-only: something besides the registry writes to it"
            log.warning("GC job %s: %s", report.job_id, note)
            report.warnings.append(note)
    finally:
        report.covered_until = datetime.now(UTC)
        writes = switch_back(m, report.warnings)
        report.readonly_seconds = time.monotonic() - started
        report.writes_after = writes
        report.left_readonly = writes is None
        if writes is None:
            report.errors.append("the registry is left read-only: every switch back failed")
            alert_left_read_only(m, report.job_id, report.warnings)
        elif step is not None:
            step.after_restart(report)


def _prune_after_gc(report: GcReport, step: StoragePruneStep, listener: GcListener) -> None:
    """The storage prune after a GC that went well (a failed one leaves storage alone)."""
    if report.gc is not None and report.gc.ok:
        step.run(report, listener.stop)
    else:
        report.errors.append("storage prune not run: the window's garbage-collect failed")


def switch_back(m: Maintenance, failures: list[str]) -> str | None:
    """Read-write again and accepting writes, retried with backoff; the write state, or None.

    Each failed attempt is appended to ``failures``. Never raises: it runs in
    ``finally`` blocks, and a failure here is the one thing that must not stay
    quiet (error log, metric, job field).
    """
    attempts = m.timing.switch_back_attempts
    for attempt in range(1, attempts + 1):
        try:
            m.controller.set_readonly(False)
            return m.probe.wait_writable(m.timing.switch_timeout).value
        except Exception as exc:  # any failure is retried, then alerted
            log.error(
                "switch back to read-write failed (attempt %d/%d): %s", attempt, attempts, exc
            )
            failures.append(f"switch back to read-write, attempt {attempt}: {exc}")
        if attempt < attempts:
            m.sleep(backoff(attempt, base=m.timing.switch_back_backoff))
    log.error(
        "ALERT: the registry is left read-only after %d attempts; the recovery check "
        "keeps trying, pruning stays paused",
        attempts,
    )
    m.metrics.alert("switch_back_failures")
    return None


# --------------------------------------------------------------------------- steps


def set_flag(m: Maintenance, job_id: str) -> None:
    pause_pruning(m.redis, m.keys, job_id)


def end_pause(m: Maintenance) -> int | None:
    """Clear the flag and let the parked prunes go; how many were released (None: by tick)."""
    try:
        resume_pruning(m.redis, m.keys)
    except StateError as exc:
        # The recovery check finds the flag without a lock owner and clears it.
        log.error("%s", exc)
        return None
    if m.release_deferred is None:
        return None
    try:
        return m.release_deferred()
    except RegsweepError as exc:
        log.warning("deferred prunes not released now (the next tick does it): %s", exc)
        return None


def wait_for_prunes(m: Maintenance) -> list[str]:
    """Wait (bounded) until no prune holds its repository; those still holding one.

    A prune still running when the wait ends meets the read-only registry's
    405 and defers the rest of its work: late, never lost.
    """
    deadline = time.monotonic() + m.timing.prune_drain
    while True:
        held = held_repositories(m.redis, m.keys)
        if not held or time.monotonic() >= deadline:
            if held:
                log.warning("%d prunes still running after %gs", len(held), m.timing.prune_drain)
            return held
        m.sleep(m.timing.poll)


def _storage_bytes(m: Maintenance) -> int | None:
    try:
        return m.controller.storage_bytes()
    except ControllerError as exc:
        log.warning("storage size not measured: %s", exc)
        return None


def registry_version(m: Maintenance) -> str | None:
    """For the report: from the controller (image label, ``--version``), else
    ``maintenance.registry_version``. Nothing is decided from it."""
    try:
        found = m.controller.registry_version()
    except RegsweepError as exc:
        log.warning("registry version not found by the controller: %s", exc)
        found = None
    return found or m.settings.registry_version


def gc_failure(result: GcResult) -> str:
    detail = result.error or (result.lines_tail[-1] if result.lines_tail else "no output")
    if not result.completed and result.exit_code == 0:
        return f"garbage-collect did not finish its mark phase: {detail}"
    return f"garbage-collect exited with {result.exit_code}: {detail}"


def _remember(m: Maintenance, job_id: str, report: GcReport) -> None:
    """The report's figures on the GC history (the dashboard's chart); best effort."""
    try:
        record_gc(m.redis, m.keys, job_id, report.summary())
    except StateError as exc:
        log.warning("GC job %s not added to the GC history: %s", job_id, exc)


def _update(m: Maintenance, job_id: str, **fields: Any) -> None:
    try:
        m.state.update_job(job_id, **fields)
    except StateError as exc:
        log.error("cannot record GC job %s: %s", job_id, exc)


# --------------------------------------------------------------------------- GC output


class GcListener:
    """Sees every GC output line: records its session, logs at debug and puts the progress
    on the job now and then. ``stop`` is the lock's ``lost`` event: the controller stops
    the GC (:class:`~worker.errors.GcLockLost`) at the first line after it is set."""

    def __init__(self, m: Maintenance, job_id: str, lock: GcLock) -> None:
        self._m = m
        self._job_id = job_id
        self.stop = lock.lost
        self.lines = 0
        self._last_progress = time.monotonic()

    def __call__(self, line: str) -> None:
        if line.startswith(SESSION_MARKER):
            self._record_session(line)
            return
        self.lines += 1
        log.debug("gc: %s", line)
        now = time.monotonic()
        if now - self._last_progress >= self._m.timing.progress_every:
            self._last_progress = now
            progress = {"gc_lines": self.lines, "last_line": line[-200:]}
            _update(self._m, self._job_id, progress=progress)

    def _record_session(self, line: str) -> None:
        _, _, pid = line.partition(" ")
        if pid.strip().isdigit():
            note_session(self._m.redis, self._m.keys, int(pid))


def note_session(client: RedisClient, keys: Keys, pid: int) -> None:
    """Name the session of the GC or switch command now running, for a recovery to kill."""
    try:
        record_session(client, keys, ProcessIdentity.of(pid))
    except StateError as exc:
        log.warning("session of the running maintenance command not recorded: %s", exc)


# --------------------------------------------------------------------------- alerts


def alert_left_read_only(m: Maintenance, job_id: str, failures: list[str]) -> None:
    """Tell that the registry is left read-only, once per window: the recovery check that
    retries every 30 s would otherwise repeat the alert as often."""
    try:
        first = first_telling(m.redis, m.keys, "left_read_only", job_id)
    except StateError:
        first = True  # better told twice than not at all
    if first:
        m.notify(message.left_read_only(job_id, failures))
