"""A changed policy file takes effect in the workers and in beat, between tasks.

- Each pool process looks at the file before every task (``task_prerun``):
  a changed file that loads becomes that process's Config there and then
  (clients and the pruner made again from it; a task never changes policy
  half-way); one that does not load (or is being written) holds the task,
  unacknowledged and its job ``queued``, until the file loads, saying so in
  the log every minute. Nothing is run under a policy the file no longer
  holds, and nothing is lost. Only the maintenance recovery check runs
  anyway, on the policy it has: a registry left read-only must not wait for
  someone to fix a typo.
- The worker's main process looks every :data:`~worker.store.processes.REPORT_EVERY`
  on Celery's timer (pool processes it forks later start from what it found)
  and reports the policy it runs to Redis (``regsweep status``).
- beat (:class:`PolicyScheduler`) looks at each tick and merges the changed
  schedule (sweep interval, GC window) in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any, Final

from celery.beat import PersistentScheduler
from celery.signals import task_prerun, worker_init, worker_ready, worker_shutdown

from worker.errors import ConfigError, StateError
from worker.queue import process
from worker.queue.celery_app import beat_schedule
from worker.queue.names import TASK_MAINTENANCE_CHECK
from worker.queue.runtime import configure, configured
from worker.settings.model import Config
from worker.settings.watch import PolicyWatch, StalePolicy, wait_until_loaded
from worker.store.keys import Keys
from worker.store.processes import REPORT_EVERY, ProcessReport, report, withdraw
from worker.store.redis import RedisClient, sync_client

log = logging.getLogger("regsweep.policy")

#: Tasks that run on the policy they have while the file does not load.
NEVER_HELD: Final = frozenset({TASK_MAINTENANCE_CHECK})


class Reporter:
    """One process's policy watch and its report in Redis."""

    def __init__(self, role: str, config: Config, client: RedisClient | None) -> None:
        self.role = role
        self.watch = PolicyWatch(config)
        self.client = client
        self.keys = Keys()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.queues: tuple[str, ...] = ()

    def look(self) -> Config | None:
        """The reloaded Config, if the file changed and loads (never raises)."""
        try:
            return self.watch.check()
        except StalePolicy:
            return None  # logged by the watch; reported below

    def report(self) -> None:
        if self.client is None:
            return
        process = ProcessReport.of(self.role, self.watch, self.started, self.queues)
        try:
            report(self.client, self.keys, process)
        except StateError as exc:
            log.warning("%s not reported: %s", process.id, exc)

    def withdraw(self) -> None:
        if self.client is not None:
            process = ProcessReport.of(self.role, self.watch, self.started)
            with contextlib.suppress(StateError):  # else its report expires by itself
                withdraw(self.client, self.keys, process.id)


def reporter(role: str) -> Reporter | None:
    """A reporter for this process's configured policy file (None for an in-memory one)."""
    try:
        config = configured()
        client = sync_client(config.redis_url) if config.redis_url else None
        return Reporter(role, config, client)
    except ConfigError:
        return None


# --- the worker's main process ----------------------------------------------------------

_main: Reporter | None = None


@worker_init.connect
def _open(sender: Any = None, **_: Any) -> None:
    global _main  # noqa: PLW0603 - one per worker process, made at its start
    _main = reporter("worker")


@worker_ready.connect
def _start_reports(sender: Any = None, **_: Any) -> None:
    if _main is None or sender is None:
        return
    queues = getattr(getattr(sender.app.amqp, "queues", None), "consume_from", None) or {}
    _main.queues = tuple(sorted(queues))
    _main.report()
    sender.timer.call_repeatedly(REPORT_EVERY.total_seconds(), _main_round)


def _main_round() -> None:
    """On Celery's timer: never raises."""
    if _main is None:
        return
    try:
        new = _main.look()
        if new is not None:
            configure(new)  # pool processes forked from now on start from it
        _main.report()
    except Exception:  # the timer must keep calling
        log.warning("policy look failed; trying again", exc_info=True)


@worker_shutdown.connect
def _close(**_: Any) -> None:
    if _main is not None:
        _main.withdraw()


# --- each pool process, before each task -------------------------------------------------

_pool: tuple[int, PolicyWatch] | None = None


@task_prerun.connect
def _before_task(sender: Any = None, **_: Any) -> None:
    global _pool  # noqa: PLW0603 - one per pool process
    if _pool is None or _pool[0] != os.getpid():
        try:
            _pool = (os.getpid(), PolicyWatch(configured()))
        except ConfigError:
            return  # a Config made in memory (tests): nothing to watch
    watch = _pool[1]
    name = getattr(sender, "name", "")
    if name in NEVER_HELD:
        try:
            new = watch.check()
        except StalePolicy:
            return
    else:
        new = wait_until_loaded(watch)
    if new is not None:
        _switch(new)


def _switch(new: Config) -> None:
    """Run the next tasks of this process under ``new``."""
    configure(new)
    process.reopen_context()


# --- beat -------------------------------------------------------------------------------


class PolicyScheduler(PersistentScheduler):
    """beat's scheduler, with the schedule following a changed policy file."""

    #: At most one look at the file per second, however often beat ticks.
    LOOK_EVERY: Final = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._reporter = reporter("beat")
        self._looked = 0.0
        self._reported = 0.0
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if self._reporter is not None and now - self._looked >= self.LOOK_EVERY:
            self._looked = now
            self._look(self._reporter)
            if now - self._reported >= REPORT_EVERY.total_seconds():
                self._reported = now
                self._reporter.report()
        delay: float = super().tick(*args, **kwargs)
        return min(delay, REPORT_EVERY.total_seconds())

    def _look(self, reporter: Reporter) -> None:
        new = reporter.look()
        if new is None:
            return
        configure(new)
        schedule = beat_schedule(new)
        self.app.conf.beat_schedule = schedule
        self.merge_inplace(schedule)  # type: ignore[arg-type] # Celery takes the conf's form
        reporter.report()

    def close(self) -> None:
        if self._reporter is not None:
            self._reporter.withdraw()
        super().close()
