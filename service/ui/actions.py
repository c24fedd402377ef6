"""What the dashboard's buttons do: every change is a job, previewed first where it deletes.

A deletion (a tag, a digest), a prune and a GC start as a preview: a dry-run
job of the same planner the workers always use, whose record lists what it
would delete. Running it is a second, separate request naming that preview:
the new job repeats the preview's parameters and carries the plan's
fingerprint, and the worker deletes only while the plan is still the one
shown (:class:`~worker.errors.PlanChanged`). A restore, a hold and an unhold
are jobs too, so each action shows up among the jobs with who asked for it.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from service.publish import EventSink
from service.replay import REPLAY_ID, Replayed, replay
from worker.errors import BadEvent, NothingToReplay, StateError
from worker.queue.messages import DELETE_KIND
from worker.records import Hold
from worker.store.state import JobState, State
from worker.store.tagindex import TagIndex

log = logging.getLogger("regsweep.service")

#: What a preview may be, by the form's ``action``: the job kind it makes.
PREVIEWS: Final = {
    "delete-tag": DELETE_KIND,
    "delete-digest": DELETE_KIND,
    "prune": "prune",
    "gc": "gc",
}
#: Kinds a preview's "run" may start (their dry run shows what the run will do).
RUNNABLE: Final = frozenset(PREVIEWS.values())
HOLD_KIND: Final = "hold"
UNHOLD_KIND: Final = "unhold"
#: How long a hold made in the dashboard lasts unless the form says.
DEFAULT_HOLD: Final = timedelta(days=30)
HELD_BY: Final = "held in the dashboard"


async def enqueue(
    state: State, sink: EventSink, kind: str, params: Mapping[str, Any], job_id: str | None = None
) -> str:
    """Record a job and hand it to the workers; the record is marked failed when the hand-off
    fails. (``POST /api/v1/jobs`` does the same through :func:`service.ingest.submit_job`.)"""
    job_id = await state.create_job(kind, params, job_id=job_id)
    try:
        await sink.job(job_id, kind, params)
    except Exception:
        try:
            await state.update_job(job_id, state=JobState.FAILED.value, errors=["not enqueued"])
        except StateError:
            log.warning("job %s could not be marked failed after enqueueing failed", job_id)
        raise
    return job_id


def preview_params(action: str, fields: Mapping[str, str], by: str) -> tuple[str, dict[str, Any]]:
    """The kind and parameters of the dry-run job that previews ``action``."""
    kind = PREVIEWS.get(action)
    if kind is None:
        raise BadEvent(f"unknown action {action[:40]!r}")
    params: dict[str, Any] = {"dry_run": True, "by": by}
    if action == "delete-tag":
        params |= {"repository": _need(fields, "repository"), "tags": [_need(fields, "tag")]}
    elif action == "delete-digest":
        digest = _need(fields, "digest")
        params |= {"repository": _need(fields, "repository"), "digests": [digest]}
    elif action == "prune":
        params |= {"repository": _need(fields, "repository")}
    return kind, params


def _need(fields: Mapping[str, str], key: str) -> str:
    if key not in fields:
        raise BadEvent(f"the form has no {key}")
    return fields[key]


def run_params(preview: Mapping[str, Any], by: str) -> tuple[str, dict[str, Any]]:
    """The job that carries out ``preview`` (a finished dry run): its parameters again, not
    a dry run, bound to its plan's fingerprint; BadEvent when it cannot be run."""
    kind = str(preview.get("kind"))
    params = dict(preview.get("params") or {})
    if kind not in RUNNABLE or params.get("dry_run") is not True:
        raise BadEvent("only a preview (a dry run of a deletion, a prune or a GC) can be run")
    if preview.get("state") != JobState.SUCCEEDED.value:
        raise BadEvent("the preview has not succeeded: nothing to run")
    run = params | {"dry_run": False, "by": by, "preview": preview.get("id")}
    if kind != "gc":
        plan = preview.get("plan") or {}
        fingerprint = plan.get("fingerprint")
        if not isinstance(fingerprint, str) or not plan.get("deletions"):
            raise BadEvent("the preview deletes nothing: nothing to run")
        run["expect"] = fingerprint
    return kind, run


async def run_once(state: State, sink: EventSink, preview: Mapping[str, Any], by: str) -> str:
    """Carry out ``preview`` (:func:`run_params`): the job that does. A preview runs once: its
    run asked for again (a double click, a resent form, the back button) is the same job,
    never a second deletion of what the preview showed, re-pushed meanwhile or not."""
    kind, params = run_params(preview, by)
    job_id, preview_id = uuid.uuid4().hex, str(preview.get("id"))
    earlier = await state.claim_preview_run(preview_id, job_id)
    if earlier is not None:
        return earlier
    try:
        return await enqueue(state, sink, kind, params, job_id)
    except BaseException:
        with contextlib.suppress(StateError):
            await state.release_preview_run(preview_id)
        raise


async def hold(
    state: State, index: TagIndex, repository: str, tag: str, *, days: int, by: str
) -> str:
    """Hold ``tag`` for ``days`` (every plan keeps it); recorded as a finished job."""
    until = datetime.now(UTC) + timedelta(days=days)
    await index.hold(repository, Hold(tag, until, HELD_BY))
    params = {"repository": repository, "tag": tag, "until": until.isoformat(), "by": by}
    return await _done(state, HOLD_KIND, params)


async def unhold(state: State, index: TagIndex, repository: str, tag: str, by: str) -> str:
    ended = await index.unhold(repository, tag)
    params = {"repository": repository, "tag": tag, "by": by}
    return await _done(state, UNHOLD_KIND, params, ended=ended)


async def _done(state: State, kind: str, params: Mapping[str, Any], **fields: Any) -> str:
    job_id = await state.create_job(kind, params)
    await state.update_job(job_id, state=JobState.SUCCEEDED.value, **fields)
    return job_id


async def replay_dead_letter(state: State, sink: EventSink, letter: str) -> Replayed:
    """Run a dead letter's work again, once, exactly as ``regsweep replay ID`` and
    ``POST /api/v1/dead-letters/{id}/replay`` do; BadEvent when it names nothing to replay."""
    if not REPLAY_ID.fullmatch(letter):
        raise BadEvent("not a dead letter id")
    try:
        return await replay(letter, state, sink)
    except NothingToReplay as exc:
        raise BadEvent(str(exc)) from exc
