"""The names the service, the CLI and the workers share: queues, task names, routes.

Sending a task needs only its name and queue (:mod:`service.publish`), so the
edge never imports a task's code.
"""

from __future__ import annotations

from typing import Final

EVENTS_QUEUE: Final = "events"


PRUNE_QUEUE: Final = "prune"


GC_QUEUE: Final = "gc"


QUEUES: Final = (EVENTS_QUEUE, PRUNE_QUEUE, GC_QUEUE)


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
    TASK_SWEEP: PRUNE_QUEUE,
    TASK_RESTORE: PRUNE_QUEUE,
    TASK_GC: GC_QUEUE,
}
