"""A job's record as the tasks keep it: marked running (saying when an earlier attempt died),
updated, ended; and work that failed for good kept as a dead letter for ``regsweep replay``.

Each write is best effort where a lost write only delays what a person sees (logged), and
patient where losing it would lose work (the dead letter).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from worker.engine.events import excerpt
from worker.engine.executor import RunOutcome
from worker.errors import StateError
from worker.queue.context import WorkerContext
from worker.queue.process import run, run_patiently
from worker.store.state import JobState

log = logging.getLogger("regsweep.worker")


def update(job_id: str, state: JobState, kind: str = "prune", **fields: Any) -> None:
    """Record ``job_id`` in ``state`` with ``fields`` (logged, not raised, when Redis is away)."""

    def record(ctx: WorkerContext) -> Coroutine[Any, Any, bool]:
        ctx.metrics.job(kind, state.value)
        return ctx.state.update_job(job_id, state=state.value, **fields)

    try:
        run(record)
    except StateError:
        log.exception("cannot record job %s as %s", job_id, state.value)


def start(job_id: str, kind: str = "prune") -> None:
    """Mark a job running; when it already was, an earlier attempt died mid-way: say so."""

    async def started(ctx: WorkerContext) -> None:
        ctx.metrics.job(kind, JobState.RUNNING.value)
        if await ctx.state.start_job(job_id) != JobState.RUNNING.value:
            return
        job = await ctx.state.get_job(job_id) or {}
        when = datetime.now(UTC).isoformat(timespec="seconds")
        note = f"{when}: an earlier attempt did not finish (its worker died); resumed"
        await ctx.state.update_job(job_id, interruptions=[*job.get("interruptions", []), note])

    try:
        run(started)
    except StateError:
        log.exception("cannot record job %s as running", job_id)


def failed(error: str) -> dict[str, Any]:
    """The summary of a job that failed with ``error``."""
    return {"errors": [error], "outcome": RunOutcome.FAILED.value}


def internal(exc: BaseException) -> str:
    """A bug, as a job's error says it."""
    return f"internal error: {type(exc).__name__}: {exc}"[:500]


def dead_letter_work(
    source: str, reason: str, body: dict[str, Any], replay: dict[str, Any]
) -> str | None:
    """Keep work that failed for good where ``status`` and notifications show it; its id."""
    log.warning("dead-lettered: %s", reason)
    excerpted = excerpt(json.dumps(body))

    async def keep(ctx: WorkerContext) -> str:
        letter = await ctx.state.dead_letter(source, reason[:2000], excerpted, replay=replay)
        return letter

    try:
        letter = run_patiently(keep)
    except StateError as exc:
        log.error("dead letter not kept: %s", exc)
        return None
    return str(letter)
