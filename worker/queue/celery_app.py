"""The Celery application: queues, delivery guarantees, beat schedule, all from the Config.

Queues (DESIGN.md "Workers"):
- ``events``: cheap and many — apply registry/CI events to the tag index, fan out prunes;
- ``prune``: the prunes pushes ask for (and untagged graces), one repository per task,
  serialized per repository by a Redis lock;
- ``jobs``: the work people, the API, CI events and sweeps ask for (prunes, sweeps,
  restores): a flood of those never stands between a push and its prune;
- ``gc``: one consumer, concurrency 1 (``regsweep worker -Q gc -c 1``).

Every task is ``acks_late`` and idempotent; a worker lost mid-task means the
task is delivered again. The Redis visibility timeout is longer than the
longest job (the maintenance window), so a long GC is not redelivered while
it is still running.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

from celery import Celery
from celery.schedules import BaseSchedule, schedstate
from croniter import croniter
from kombu import Exchange, Queue

from worker.errors import ConfigError
from worker.queue import broker
from worker.queue.names import (
    EVENTS_QUEUE,
    QUEUES,
    ROUTES,
    TASK_GC,
    TASK_MAINTENANCE_CHECK,
    TASK_SWEEP,
    TASK_TICK,
)
from worker.queue.runtime import configure
from worker.settings.model import Config

#: Beyond the window, the time a redelivered message must wait: longer than any job.
VISIBILITY_MARGIN: Final = timedelta(hours=1)


#: How often workers look for deferred prunes to release and crashed windows to recover.
TICK_EVERY: Final = timedelta(seconds=30)


#: Broker socket timeouts: a publish that cannot reach Redis fails within seconds,
#: so a hook answers 503 and the sender retries; above kombu's 1 s BRPOP poll.
BROKER_SOCKET_TIMEOUT: Final = 5.0


BROKER_CONNECT_TIMEOUT: Final = 2.0


#: Publishing retries (kombu ``ensure``): a short blip is absorbed, an outage is not.
PUBLISH_RETRY_POLICY: Final = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.1,
    "interval_max": 0.2,
}


class CronSchedule(BaseSchedule):
    """A beat schedule that fires when a cron expression does, by croniter.

    The same engine computes the maintenance window (worker.maintenance.window)
    and validates ``maintenance.window.cron`` (worker.settings.load), so whatever
    check-config accepts, beat runs, with the same meaning. Celery's own
    ``crontab`` disagrees with croniter on ``L``, ``sun#1`` and on a day of
    month together with a day of week (croniter: either, like cron; crontab: both).
    """

    def __init__(
        self,
        expression: str,
        app: Celery | None = None,
        nowfun: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(nowfun=nowfun, app=app)
        self.expression = expression

    def next_fire(self, after: datetime) -> datetime:
        fire: datetime = croniter(self.expression, self.maybe_make_aware(after)).get_next(datetime)
        return fire

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return self.next_fire(last_run_at) - self.now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        """Due once the first fire time after the last run has come; then, when to look again."""
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        if remaining > 0:
            return schedstate(False, remaining)
        now = self.now()
        return schedstate(True, (self.next_fire(now) - now).total_seconds())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CronSchedule):
            return self.expression == other.expression
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.expression)

    def __reduce__(self) -> tuple[type[CronSchedule], tuple[str]]:
        # beat keeps its entries in a shelve file: pickled by expression.
        return (self.__class__, (self.expression,))

    def __repr__(self) -> str:
        return f"<cron {self.expression}>"


def beat_schedule(config: Config) -> dict[str, dict[str, Any]]:
    schedule: dict[str, dict[str, Any]] = {
        "sweep": {"task": TASK_SWEEP, "schedule": config.sweep_every.total_seconds()},
        "tick": {"task": TASK_TICK, "schedule": TICK_EVERY.total_seconds()},
        # Recovers a crashed maintenance window; a stale check is dropped, not queued up.
        "maintenance-check": {
            "task": TASK_MAINTENANCE_CHECK,
            "schedule": TICK_EVERY.total_seconds(),
            "options": {"expires": TICK_EVERY.total_seconds()},
        },
    }
    window = config.maintenance.window_cron
    if window:
        schedule["gc-window"] = {
            "task": TASK_GC,
            "schedule": CronSchedule(window),
            "kwargs": {"trigger": "window"},
        }
    return schedule


#: The modules whose tasks a worker registers when it starts (not when the service or
#: the CLI make an app to send tasks by name).
TASK_MODULES: Final = (
    "worker.queue.tasks",
    "worker.queue.leases",
    "worker.maintenance.tasks",
    "worker.queue.reload",
)


def make_celery(config: Config) -> Celery:
    """The app for ``config``. A worker imports :data:`TASK_MODULES` when it starts; the
    app itself imports no task code, so sending by name costs nothing more."""
    if config.redis_url is None:
        raise ConfigError("workers need Redis: set redis.url or REGSWEEP_REDIS_URL")
    configure(config)
    app = Celery(
        "regsweep", broker=config.redis_url, set_as_current=True, include=list(TASK_MODULES)
    )
    if config.redis_url.startswith("redis://"):
        # kombu's Redis transport plus a fix for surviving a Redis restart (worker.queue.broker).
        app.conf.broker_transport = broker.TRANSPORT
    visibility = config.maintenance.window_duration + VISIBILITY_MARGIN
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        # An exchange per queue: without one, Celery binds every queue to the
        # default exchange with the default key, and a message lands in all three.
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_default_queue=EVENTS_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        broker_transport_options={
            "visibility_timeout": int(visibility.total_seconds()),
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        },
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(config),
        # Follows a changed policy file (worker.queue.reload).
        beat_scheduler="worker.queue.reload:PolicyScheduler",
        worker_hijack_root_logger=False,
    )
    return app
