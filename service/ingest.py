"""What the hooks and the job API do once a request is verified and parsed.

At-least-once with dedup: a delivery id is claimed (``SET NX EX``) before the
event goes to the sink, and released again when the sink fails for any
reason, so the sender's retry is processed instead of swallowed as a
duplicate (a rare double delivery is harmless; a lost one is not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from service.sink import EventSink
from worker.errors import StateError
from worker.events import (
    REGISTRY_EVENTS_V1,
    REGISTRY_EVENTS_V2,
    CiEvent,
    DeadLetter,
    JobRequest,
    RegistryEnvelope,
    RegistryEvent,
    excerpt,
    parse_registry_envelope,
)
from worker.state import JobState, State

log = logging.getLogger("regsweep.service")

REGISTRY_MEDIA_TYPES: Final = frozenset(
    {REGISTRY_EVENTS_V1, REGISTRY_EVENTS_V2, "application/json"}
)


@dataclass(frozen=True)
class RegistryOutcome:
    accepted: int
    duplicates: int
    ignored: int
    dead_lettered: int

    def as_dict(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "ignored": self.ignored,
            "dead_lettered": self.dead_lettered,
        }

    def metric_counts(self) -> dict[str, int]:
        """Counts under the ``outcome`` label values of ``regsweep_events_total``."""
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicates,
            "ignored": self.ignored,
            "dead_letter": self.dead_lettered,
        }


def read_registry_delivery(media_type: str, body: bytes) -> RegistryEnvelope:
    """Parse a registry delivery; a content type it cannot be in makes it one dead letter."""
    if media_type not in REGISTRY_MEDIA_TYPES:
        reason = f"unsupported content type {media_type[:100]!r}"
        return RegistryEnvelope((), 0, (DeadLetter(None, reason, excerpt(body)),))
    return parse_registry_envelope(body)


async def ingest_registry(
    envelope: RegistryEnvelope, state: State, sink: EventSink
) -> RegistryOutcome:
    """Dead-letter the unusable events, hand the new ones to the sink once each."""
    for dead in envelope.dead:
        log.warning("registry event %s dead-lettered: %s", dead.event_id, dead.reason)
        await state.dead_letter("registry", dead.reason, dead.excerpt)
    claimed = await _claim_all(state, "registry", [e.id for e in envelope.events])
    fresh = _first_of_each(envelope.events, claimed)
    if fresh:
        try:
            await sink.registry_events(fresh)
        except Exception:
            await _release_all(state, "registry", claimed)
            raise
    return RegistryOutcome(
        accepted=len(fresh),
        duplicates=len(envelope.events) - len(fresh),
        ignored=envelope.ignored,
        dead_lettered=len(envelope.dead),
    )


async def ingest_ci(event: CiEvent, state: State, sink: EventSink) -> bool:
    """Hand a CI event to the sink; False when its delivery id was already processed."""
    if not await state.claim_delivery(event.source, event.delivery_id):
        return False
    try:
        await sink.ci_event(event)
    except Exception:
        await _release_all(state, event.source, [event.delivery_id])
        raise
    return True


async def submit_job(request: JobRequest, state: State, sink: EventSink) -> str:
    """Record a job and enqueue it; the record is marked failed when enqueueing fails."""
    job_id = await state.create_job(request.kind.value, request.params)
    try:
        await sink.job(job_id, request.kind.value, request.params)
    except Exception:
        try:
            await state.update_job(job_id, state=JobState.FAILED.value, errors=["not enqueued"])
        except StateError:
            log.warning("job %s could not be marked failed after enqueueing failed", job_id)
        raise
    return job_id


def _first_of_each(events: Iterable[RegistryEvent], ids: set[str]) -> list[RegistryEvent]:
    chosen: dict[str, RegistryEvent] = {}
    for event in events:
        if event.id in ids:
            chosen.setdefault(event.id, event)
    return list(chosen.values())


async def _claim_all(state: State, source: str, delivery_ids: Iterable[str]) -> set[str]:
    claimed: set[str] = set()
    try:
        for delivery_id in delivery_ids:
            if delivery_id not in claimed and await state.claim_delivery(source, delivery_id):
                claimed.add(delivery_id)
    except StateError:
        await _release_all(state, source, claimed)
        raise
    return claimed


async def _release_all(state: State, source: str, delivery_ids: Iterable[str]) -> None:
    for delivery_id in delivery_ids:
        try:
            await state.release_delivery(source, delivery_id)
        except StateError:
            # Redis itself is away: the claim may outlive this request and the
            # retry will look like a duplicate until the key expires.
            log.error("dedup key %s:%s could not be released", source, delivery_id)
