"""Jobs as the broker carries them: the work the API and ``--enqueue`` ask the workers for.

A :class:`JobRequest` is validated at the edge; :func:`job_message` turns a
recorded job into the task message that carries it out, by task name only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from worker.engine.events import CiEvent
from worker.errors import ConfigError
from worker.queue.names import (
    EVENTS_QUEUE,
    GC_QUEUE,
    JOBS_QUEUE,
    TASK_CI_EVENT,
    TASK_GC,
    TASK_PRUNE,
    TASK_RESTORE,
    TASK_SWEEP,
)


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


#: The dashboard's deletions: a job of this kind deletes the tags and digests it names, and
#: nothing else (``params``: repository, tags, digests, dry_run, expect, by).
DELETE_KIND: Final = "delete"
#: The rule a dashboard deletion's plan rows and audit records name.
DELETE_RULE: Final = "ui"


def delete_request(params: Mapping[str, Any]) -> dict[str, Any]:
    """A delete job's request, as :func:`worker.engine.ci_requests.request_from_json`
    reads it: each tag by its exact name (tag names hold no glob characters), each digest's
    tags whatever they are when the worker plans."""
    tags = [str(t) for t in params.get("tags") or ()]
    digests = [str(d) for d in params.get("digests") or ()]
    return {
        "patterns": tags,
        "digests": digests,
        "rule": DELETE_RULE,
        "detail": f"asked for in the dashboard by {params.get('by') or 'an admin'}",
    }


def job_message(job_id: str, kind: str, params: Mapping[str, Any]) -> TaskMessage:
    """The task that carries out a job the API or the CLI recorded.

    A prune of one repository asked for by a person reads the live registry
    (``incremental=False``): the tag index may lag, and the point of asking is
    usually "look again". A prune without a repository is a sweep. A replayed prune
    (``regsweep replay``) carries the CI requests and the trigger of the one it replays.
    A dashboard deletion is a prune of its repository whose plan holds only its request.
    All go to the ``jobs`` queue, apart from the prunes pushes ask for.
    """
    dry_run = bool(params.get("dry_run", False))
    repository = params.get("repository")
    if kind == DELETE_KIND and repository:
        kwargs = {
            "repository": repository,
            "job_id": job_id,
            "dry_run": dry_run,
            "incremental": False,
            "trigger": "dashboard",
            "requests": [delete_request(params)],
            "requests_only": True,
            "expect": params.get("expect"),
        }
        return TaskMessage(TASK_PRUNE, kwargs, JOBS_QUEUE)
    if kind == "prune" and repository:
        kwargs = {"repository": repository, "job_id": job_id, "dry_run": dry_run}
        kwargs |= {"incremental": False, "trigger": str(params.get("trigger") or "api")}
        if params.get("requests"):
            kwargs["requests"] = list(params["requests"])
        if params.get("expect"):  # the dashboard's "run" of a previewed prune
            kwargs["expect"] = params["expect"]
        if params.get("requests_only"):  # a replayed dashboard deletion
            kwargs["requests_only"] = True
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


def ci_message(event: CiEvent) -> TaskMessage:
    """The task that applies a CI event's requests."""
    return TaskMessage(TASK_CI_EVENT, {"event": event.to_dict()}, EVENTS_QUEUE)
