"""``regsweep replay ID`` and ``POST /api/v1/dead-letters/{id}/replay``: work again.

ID names a dead letter (its id or a unique prefix of one, as ``regsweep status``
shows it) or a CI event the workers received (its delivery id: ``X-GitHub-Delivery``,
GitLab's ``X-Gitlab-Event-UUID`` or ``Idempotency-Key``). A dead letter that holds work
(a prune or a sweep that failed for good, after its retries) is run again as a new
job, once: asking twice answers the job the first replay made. A CI event is queued
again as it was received; the sender's own redelivery of it is a duplicate for as
long as its dedup record lives, which is what this is for.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Final

from worker.engine.events import CiEvent
from worker.errors import NothingToReplay, StateError
from worker.queue.enqueue import JobSink
from worker.store.state import JobState, State

log = logging.getLogger("regsweep.service")

#: A dead letter's id (or a prefix of one), or a CI delivery's id, as replay takes them.
REPLAY_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{3,127}")
#: A dead letter's id prefix shorter than this is not looked up.
MIN_PREFIX: Final = 4
#: What a dead letter's ``replay`` may ask for.
REPLAYABLE: Final = ("prune", "sweep")


@dataclass(frozen=True)
class Replayed:
    """What a replay did: ``kind`` ``prune``, ``sweep`` or ``ci_event``; the new job (none
    for a CI event: its prunes get theirs when it runs); ``again`` when an earlier replay
    of the dead letter made ``job_id`` and nothing was queued now."""

    id: str
    kind: str
    job_id: str | None = None
    again: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def replay(given: str, state: State, sink: JobSink) -> Replayed:
    """Run again the dead letter or the CI event ``given`` names; NothingToReplay if none.
    A name given whole wins over a prefix: a dead letter's id, then a CI event's delivery
    id, then the beginning of a dead letter's id."""
    letters = await state.find_dead_letters(given) if len(given) >= MIN_PREFIX else []
    exact = [e for e in letters if e.get("id") == given]
    record = None if exact else await state.ci_event(given)
    if record is None and len(letters) > 1:
        ids = ", ".join(str(e.get("id")) for e in letters[:5])
        raise NothingToReplay(f"{len(letters)} dead letters start with {given}: {ids}")
    if record is None and letters:
        return await _replay_letter(letters[0], state, sink)
    if record is None:
        raise NothingToReplay(
            f"no dead letter and no recorded CI event {given} (CI events are kept as long "
            "as their delivery's dedup record, 7 days; dead letters the newest 1,000)"
        )
    try:
        event = CiEvent.from_dict(record["event"])
    except (KeyError, TypeError) as exc:
        raise NothingToReplay(f"CI event {given} is recorded unreadably: {exc}") from exc
    await sink.ci_event(event)
    what = f"{event.source} {event.kind} {event.project}"
    what += f" #{event.number}" if event.number is not None else f" {event.branch}"
    log.info("CI event %s replayed (%s)", given, what)
    return Replayed(given, "ci_event", detail=what)


async def _replay_letter(letter: dict[str, Any], state: State, sink: JobSink) -> Replayed:
    letter_id = str(letter["id"])
    work = letter.get("replay")
    if not isinstance(work, dict) or work.get("kind") not in REPLAYABLE:
        raise NothingToReplay(
            f"dead letter {letter_id} ({letter.get('source')}) holds nothing to run again: "
            f"{str(letter.get('reason'))[:200]}"
        )
    kind = str(work["kind"])
    given = work.get("params")
    params = {k: v for k, v in (given or {}).items() if v is not None}
    params["trigger"] = f"replay of dead letter {letter_id}"
    job_id = uuid.uuid4().hex
    earlier = await state.claim_replay(letter_id, job_id)
    if earlier is not None:
        return Replayed(letter_id, kind, earlier, again=True)
    try:
        await state.create_job(kind, params, job_id=job_id)
        await sink.job(job_id, kind, params)
    except Exception:
        await _undo(state, letter_id, job_id)
        raise
    log.info("dead letter %s replayed as %s job %s", letter_id, kind, job_id)
    return Replayed(letter_id, kind, job_id)


async def _undo(state: State, letter_id: str, job_id: str) -> None:
    """A replay that could not be queued: the dead letter may be replayed again."""
    try:
        await state.release_replay(letter_id)
        await state.update_job(job_id, state=JobState.FAILED.value, errors=["not enqueued"])
    except StateError:
        log.warning("replay of dead letter %s not undone after enqueueing failed", letter_id)
