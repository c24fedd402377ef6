"""The names the service, the CLI and the workers share: queues, task names, routes.

Sending a task needs only its name and queue (:mod:`service.publish`), so the
edge never imports a task's code.
"""

from __future__ import annotations

from typing import Final

EVENTS_QUEUE: Final = "events"


#: The prunes pushes ask for (and untagged graces): never behind a flood of jobs.
PRUNE_QUEUE: Final = "prune"


#: What people, the API, CI events and sweeps ask for: prunes, sweeps, restores.
JOBS_QUEUE: Final = "jobs"


GC_QUEUE: Final = "gc"


QUEUES: Final = (EVENTS_QUEUE, PRUNE_QUEUE, JOBS_QUEUE, GC_QUEUE)


#: Prune triggers that come from the registry's own pushes: the ``prune`` queue.
PUSH_TRIGGERS: Final = frozenset({"push", "untagged grace"})


def prune_queue(trigger: str) -> str:
    """The queue of a prune asked for by ``trigger``: ``prune`` for a push's (and the
    untagged grace it schedules), ``jobs`` for everything else."""
    return PRUNE_QUEUE if trigger in PUSH_TRIGGERS else JOBS_QUEUE


TASK_REGISTRY_EVENTS: Final = "regsweep.registry_events"


TASK_CI_EVENT: Final = "regsweep.ci_event"


TASK_PRUNE: Final = "regsweep.prune"


TASK_SWEEP: Final = "regsweep.sweep"


TASK_GC: Final = "regsweep.gc"


TASK_RESTORE: Final = "regsweep.restore"


TASK_TICK: Final = "regsweep.tick"


TASK_MAINTENANCE_CHECK: Final = "regsweep.maintenance_check"


ROUTES: Final = {
    TASK_REGISTRY_EVENTS: EVENTS_QUEUE,
    TASK_CI_EVENT: EVENTS_QUEUE,
    TASK_TICK: EVENTS_QUEUE,
    TASK_PRUNE: PRUNE_QUEUE,
    TASK_SWEEP: JOBS_QUEUE,
    TASK_RESTORE: JOBS_QUEUE,
    TASK_GC: GC_QUEUE,
}
