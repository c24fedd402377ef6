"""Window rules, the cluster-wide GC lock and crash recovery (real Redis, real registry)."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.harness.images import ImageBuilder
from tests.harness.maintenance import (
    REDIS_URL,
    ProcessRegistry,
    RedisSpace,
    image,
    job_record,
    make_maintenance,
    upload_status,
)
from worker.identity import ProcessIdentity
from worker.maintenance.job import GcRequest, SessionTrackedController, run_gc
from worker.maintenance.recovery import recover_crashed_window
from worker.maintenance.tasks import _gc_time_limits
from worker.maintenance.window import current_window, latest_window, may_start
from worker.queue.celery_app import CronSchedule, make_celery
from worker.queue.names import TASK_GC
from worker.settings.model import Config, MaintenanceSettings, RegistrySettings
from worker.store.gclock import GcLock, LockHolder
from worker.store.state import JobState

SUNDAY_3AM = "0 3 * * sun"
WINDOW = MaintenanceSettings(
    window_cron=SUNDAY_3AM, window_duration=timedelta(hours=2), window_margin=timedelta(minutes=10)
)
#: A Sunday.
START = datetime(2024, 1, 7, 3, 0, tzinfo=UTC)
JUST_BEFORE = timedelta(microseconds=1)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


@pytest.fixture
def process_registry(tmp_path: Path) -> Iterator[ProcessRegistry]:
    made = ProcessRegistry.create(tmp_path / "registry")
    made.start()
    with ImageBuilder.connect(made.url) as builder:
        image(builder, "gc/one", "t", 1)
    yield made
    made.stop()


# --------------------------------------------------------------------------- window rules


@pytest.mark.parametrize(
    ("now", "open_"),
    [
        (START, True),
        (START + timedelta(minutes=119), True),
        (START + timedelta(hours=2), False),
        (START - timedelta(seconds=1), False),
        (START + timedelta(days=3), False),
    ],
)
def test_current_window_is_cron_start_plus_duration(now: datetime, open_: bool) -> None:
    """The window is open from the cron's fire time (inclusive) for `duration` (exclusive)."""
    window = current_window(WINDOW, now)
    assert (window is not None) == open_
    if window is not None:
        assert (window.start, window.end) == (START, START + timedelta(hours=2))


def test_window_trigger_respects_the_margin_and_manual_runs_anywhere() -> None:
    """Beat's GC starts only with at least the margin left; a manual one starts outside any
    window (no deadline) and inside one (that window's end is its deadline)."""
    late = START + timedelta(minutes=111)
    assert may_start(WINDOW, "window", START + timedelta(minutes=5)).allowed
    refused = may_start(WINDOW, "window", late)
    assert not refused.allowed and "less than the margin" in refused.reason
    assert not may_start(WINDOW, "window", START + timedelta(days=1)).allowed
    outside = may_start(WINDOW, "cli", START + timedelta(days=1))
    assert outside.allowed and outside.deadline is None
    inside = may_start(WINDOW, "api", late)
    assert inside.allowed and inside.deadline == START + timedelta(hours=2)


@pytest.mark.parametrize(
    "cron", ["0 3 L * *", "0 3 * * sun#1", "0 3 1-7 * sun", "30 2 * * mon-fri", SUNDAY_3AM]
)
def test_beat_fires_exactly_when_a_window_opens(cron: str) -> None:
    """Beat's schedule for the window (made by make_celery from the config) and the window
    rules read the cron alike, ``L``, ``#`` and day-of-month with day-of-week included:
    over a year of beat ticks, every fire is the start of a window the rules call open,
    and no window start is missed."""
    settings = MaintenanceSettings(window_cron=cron, window_duration=timedelta(hours=1))
    config = Config(
        registry=RegistrySettings(url="http://x"), redis_url="redis://x", maintenance=settings
    )
    clock = [datetime(2025, 1, 1, tzinfo=UTC)]
    app = make_celery(config)
    schedule = app.conf.beat_schedule["gc-window"]["schedule"]
    beat = CronSchedule(schedule.expression, app=app, nowfun=lambda: clock[0])
    assert pickle.loads(pickle.dumps(beat)) == beat == schedule
    fired, last_run = [], clock[0]
    while clock[0] < datetime(2026, 1, 1, tzinfo=UTC):
        due, wait = beat.is_due(last_run)
        if due:
            fired.append(clock[0])
            last_run = clock[0]
        clock[0] += timedelta(seconds=wait)
    assert len(fired) >= 12
    for fire in fired:
        window = current_window(settings, fire)
        assert window is not None and window.start == fire
    for earlier, later in itertools.pairwise(fired):
        # No window started between two fires: the last one before `later` is `earlier`.
        assert latest_window(cron, settings.window_duration, later - JUST_BEFORE).start == earlier


# --------------------------------------------------------------------------- the lock


def test_second_acquire_gets_the_holders_job_and_the_watchdog_outlives_the_ttl(
    space: RedisSpace,
) -> None:
    """One holder at a time; the other learns its job id; the watchdog keeps a 1 s lock
    alive for 2.5 s, and releasing frees it."""
    first = GcLock(
        space.client, space.keys, ttl=timedelta(seconds=1), extend_every=timedelta(seconds=0.2)
    )
    assert first.acquire("job-1") is None
    with first.held():
        time.sleep(2.5)
        other = GcLock(space.client, space.keys).acquire("job-2")
        assert other is not None and other.job_id == "job-1"
        assert other.owner == ProcessIdentity.of()
        assert not first.lost.is_set()
    assert space.client.get(space.keys.gc_lock) is None


def test_a_lock_taken_away_is_noticed(space: RedisSpace) -> None:
    """When the lock vanishes under its holder (expired, broken), the watchdog says so."""
    lock = GcLock(
        space.client, space.keys, ttl=timedelta(seconds=5), extend_every=timedelta(seconds=0.1)
    )
    assert lock.acquire("job-1") is None
    with lock.held():
        space.client.delete(space.keys.gc_lock)
        assert lock.lost.wait(2.0)


def test_only_a_provably_dead_holder_is_broken(space: RedisSpace) -> None:
    """A holder whose pid is gone on this machine is broken at once; a live one, or one on
    another machine, is left to its TTL."""
    sleeper = subprocess.Popen(["sleep", "30"])
    dead_identity = ProcessIdentity.of(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    lock = GcLock(space.client, space.keys)
    for owner, broken in (
        (ProcessIdentity.of(), False),
        (ProcessIdentity("elsewhere", 1, "1", "pid:[1]", "boot"), False),
        (dead_identity, True),
    ):
        holder = LockHolder("job-x", owner, "n")
        space.client.set(space.keys.gc_lock, holder.token(), ex=60)
        found = lock.holder()
        assert found is not None and found.job_id == "job-x"
        assert lock.break_if_dead(found) is broken
        assert (space.client.get(space.keys.gc_lock) is None) is broken


# --------------------------------------------------------------------------- the window's GC


def test_two_beats_firing_one_window_start_one_gc(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """The second `trigger=window` message of the same window is answered with the first
    job's id instead of a second GC."""
    now = START + timedelta(minutes=1)
    m = make_maintenance(
        space,
        SessionTrackedController(process_registry.settings),
        process_registry.url,
        settings=WINDOW,
        clock=lambda: now,
    )
    first, second = (space.state.create_job("gc", {}) for _ in range(2))
    assert run_gc(m, GcRequest(first, trigger="window")).status == "done"
    again = run_gc(m, GcRequest(second, trigger="window"))
    assert (again.status, again.job_id) == ("busy", first)
    assert job_record(space.state, second)["state"] == JobState.SKIPPED.value


def test_too_late_in_the_window_nothing_is_switched(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """With less than the margin left, beat's GC is skipped: no flag, no switch, no lock;
    one that runs past its deadline finishes and is reported as overrunning."""
    late = START + timedelta(minutes=115)
    m = make_maintenance(
        space,
        SessionTrackedController(process_registry.settings),
        process_registry.url,
        settings=WINDOW,
        clock=lambda: late,
    )
    job = space.state.create_job("gc", {})
    skipped = run_gc(m, GcRequest(job, trigger="window"))
    assert skipped.status == "skipped" and skipped.report is None
    assert space.client.get(space.keys.maintenance_flag) is None
    assert space.client.get(space.keys.gc_lock) is None
    assert job_record(space.state, job)["state"] == JobState.SKIPPED.value

    times = iter([late, late, START + timedelta(hours=2, minutes=1)])
    m.clock = lambda: next(times)
    manual = run_gc(m, GcRequest(space.state.create_job("gc", {}), trigger="api"))
    assert manual.status == "done" and manual.report is not None
    assert manual.report.overran and manual.report.summary()["overran_window"] is True


# --------------------------------------------------------------------------- crash recovery


def test_recovery_after_a_dead_gc_switches_back_and_resumes(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """A flag whose lock holder died: the check kills nothing it cannot prove, switches the
    registry read-write, clears the flag, releases parked prunes and marks the job
    interrupted; while the holder lives, it does nothing."""
    released: list[int] = []
    m = make_maintenance(
        space,
        SessionTrackedController(process_registry.settings),
        process_registry.url,
        release=lambda: released.append(1) or 1,  # type: ignore[func-returns-value]
    )
    job_id = space.state.create_job("gc", {})
    space.state.update_job(job_id, state=JobState.RUNNING.value)
    m.controller.set_readonly(True)
    m.probe.wait_readonly()
    space.client.set(space.keys.maintenance_flag, job_id)

    alive = LockHolder(job_id, ProcessIdentity.of(), "n")
    space.client.set(space.keys.gc_lock, alive.token(), ex=60)
    assert recover_crashed_window(m) is None
    assert upload_status(process_registry.url) == 405

    sleeper = subprocess.Popen(["sleep", "30"])
    dead = LockHolder(job_id, ProcessIdentity.of(sleeper.pid), "n")
    sleeper.kill()
    sleeper.wait()
    space.client.set(space.keys.gc_lock, dead.token(), ex=60)
    recovered = recover_crashed_window(m)
    assert recovered is not None and recovered.registry_writable
    assert upload_status(process_registry.url) == 202
    assert space.client.get(space.keys.maintenance_flag) is None
    assert space.client.get(space.keys.gc_lock) is None
    assert released == [1]
    assert job_record(space.state, job_id)["state"] == JobState.INTERRUPTED.value
    assert recover_crashed_window(m) is None


def test_gc_task_limits_outlast_the_window_but_not_the_visibility_timeout() -> None:
    """The GC task's soft and hard time limits, set at worker start, fall between the window's
    end and the broker's redelivery of an unacknowledged GC."""
    config = Config(registry=RegistrySettings(url="http://127.0.0.1:1"), maintenance=WINDOW)
    app = make_celery(replace(config, redis_url=REDIS_URL))
    _gc_time_limits(sender=SimpleNamespace(app=app))
    task = app.tasks[TASK_GC]
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert task.soft_time_limit is not None and task.time_limit is not None
    assert 2 * 3600 < task.soft_time_limit < task.time_limit < visibility
