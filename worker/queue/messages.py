"""Jobs as the broker carries them: the work the API and ``--enqueue`` ask the workers for.

A :class:`JobRequest` is validated at the edge; :func:`job_message` turns a
recorded job into the task message that carries it out, by task name only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.errors import ConfigError
from worker.queue.names import GC_QUEUE, JOBS_QUEUE, TASK_GC, TASK_PRUNE, TASK_RESTORE, TASK_SWEEP


def follow_hint(job_id: str) -> str:
    """What ``--enqueue`` says after a job's id (on stderr: stdout stays the ids alone)."""
    return f"follow with: regsweep jobs {job_id} --follow"


class JobKind(StrEnum):
    PRUNE = "prune"
    SWEEP = "sweep"
    GC = "gc"
    RESTORE = "restore"


@dataclass(frozen=True)
class JobRequest:
    """A validated request for work; ``dry_run`` ``None`` means "as the policy's mode says"."""

    kind: JobKind
    repository: str | None = None
    dry_run: bool | None = None
    digest: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The job's parameters, without the ones left unset."""
        given = {"repository": self.repository, "dry_run": self.dry_run, "digest": self.digest}
        return {key: value for key, value in given.items() if value is not None}


@dataclass(frozen=True)
class TaskMessage:
    """A task to send by name: what the service and ``--enqueue`` put on a queue."""

    name: str
    kwargs: dict[str, Any]
    queue: str


def job_message(job_id: str, kind: str, params: Mapping[str, Any]) -> TaskMessage:
    """The task that carries out a job the API or the CLI recorded.

    A prune of one repository asked for by a person reads the live registry
    (``incremental=False``): the tag index may lag, and the point of asking is
    usually "look again". A prune without a repository is a sweep. A replayed prune
    (``regsweep replay``) carries the CI requests and the trigger of the one it replays.
    All go to the ``jobs`` queue, apart from the prunes pushes ask for.
    """
    dry_run = bool(params.get("dry_run", False))
    repository = params.get("repository")
    if kind == "prune" and repository:
        kwargs = {"repository": repository, "job_id": job_id, "dry_run": dry_run}
        kwargs |= {"incremental": False, "trigger": str(params.get("trigger") or "api")}
        if params.get("requests"):
            kwargs["requests"] = list(params["requests"])
        return TaskMessage(TASK_PRUNE, kwargs, JOBS_QUEUE)
    if kind in ("prune", "sweep"):
        kwargs = {"job_id": job_id, "repository": repository, "dry_run": dry_run}
        return TaskMessage(TASK_SWEEP, kwargs, JOBS_QUEUE)
    if kind == "gc":
        return TaskMessage(TASK_GC, {"job_id": job_id, "dry_run": dry_run}, GC_QUEUE)
    if kind == "restore":
        kwargs = {"job_id": job_id, "repository": repository, "digest": params.get("digest")}
        return TaskMessage(TASK_RESTORE, kwargs, JOBS_QUEUE)
    raise ConfigError(f"no task carries out jobs of kind {kind!r}")
