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
from worker.groupcommit import GroupCommit
from worker.state import JobState, State

log = logging.getLogger("regsweep.service")

#: Carries a registry delivery's outcome (see :meth:`RegistryOutcome.header`).
OUTCOME_HEADER: Final = "Regsweep-Outcome"

REGISTRY_MEDIA_TYPES: Final = frozenset(
    {REGISTRY_EVENTS_V1, REGISTRY_EVENTS_V2, "application/json"}
)


@dataclass(frozen=True)
class RegistryOutcome:
    accepted: int
    duplicates: int
    ignored: int
    dead_lettered: int

    def header(self) -> str:
        """The ``Regsweep-Outcome`` header (an RFC 8941 dictionary): the registry
        ignores the answer's body, and an empty one costs the server one socket
        write less per delivery."""
        return ", ".join(f"{key}={count}" for key, count in self.as_dict().items())

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


#: Most events claimed and handed on in one group commit.
MAX_COMMIT_EVENTS: Final = 256


class RegistryIngest:
    """Claims and hands on registry events, group-committing concurrent deliveries.

    One commit is in flight at a time. A delivery that arrives meanwhile
    waits for the next one, which claims every waiting event in one Redis
    round trip and hands the fresh ones to the sink in one call; each
    delivery is answered once that call returned. Under load this is what
    keeps the hook fast (a round trip and a broker publish cost far more
    than one event; the event loop parses the next deliveries while a commit
    waits for Redis); alone, a delivery is committed at once. When the sink
    fails, every claim of the commit is released and every delivery in it
    gets the error (503), so the registry's retries are processed, not
    swallowed as duplicates.
    """

    def __init__(self, state: State, sink: EventSink) -> None:
        self.state = state
        self.sink = sink
        self._group: GroupCommit[tuple[RegistryEvent, ...], list[RegistryEvent]] = GroupCommit(
            self._commit_batch, max_weight=MAX_COMMIT_EVENTS, weight=len
        )

    async def ingest(self, envelope: RegistryEnvelope) -> RegistryOutcome:
        """Dead-letter the unusable events, hand the new ones to the sink once each."""
        for dead in envelope.dead:
            log.warning("registry event %s dead-lettered: %s", dead.event_id, dead.reason)
            await self.state.dead_letter("registry", dead.reason, dead.excerpt)
        fresh = await self._group.submit(envelope.events) if envelope.events else []
        return RegistryOutcome(
            accepted=len(fresh),
            duplicates=len(envelope.events) - len(fresh),
            ignored=envelope.ignored,
            dead_lettered=len(envelope.dead),
        )

    async def _commit_batch(
        self, batch: list[tuple[RegistryEvent, ...]]
    ) -> list[list[RegistryEvent]]:
        """Claim every event of ``batch``, publish the fresh ones; the fresh per delivery.

        When the sink's publish is one LPUSH to the state store's own Redis, it
        goes in the claim's round trip, taken back out of it only when some
        event turns out to be a duplicate (then the fresh ones go in a second).
        """
        events = [event for delivery in batch for event in delivery]
        ids = [event.id for event in events]
        push = self.sink.registry_push(events)
        if push is not None and push.server != self.state.server:
            push = None  # the broker is another Redis: claim here, publish there
        try:
            if push is None:
                claimed = await self.state.claim_deliveries("registry", ids)
            else:
                claimed = await self.state.claim_deliveries_then_push("registry", ids, push)
        except StateError:
            # Redis may have done it all and only the answer was lost: forget every
            # claim, so the sender's retry is processed (at worst twice), not
            # swallowed as a duplicate.
            await _release_all(self.state, "registry", ids)
            raise
        if push is not None and len(claimed) == len(ids):
            return [list(delivery) for delivery in batch]
        fresh = _split(batch, set(claimed))
        published = [event for chosen in fresh for event in chosen]
        if published:
            try:
                await self.sink.registry_events(published)
            except BaseException:
                await _release_all(self.state, "registry", [e.id for e in published])
                raise
        return fresh


def _split(batch: list[tuple[RegistryEvent, ...]], claimed: set[int]) -> list[list[RegistryEvent]]:
    """Per delivery, its events whose position in the whole batch is in ``claimed``."""
    fresh: list[list[RegistryEvent]] = []
    position = 0
    for delivery in batch:
        fresh.append([e for i, e in enumerate(delivery, position) if i in claimed])
        position += len(delivery)
    return fresh


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


async def _release_all(state: State, source: str, delivery_ids: Iterable[str]) -> None:
    try:
        await state.release_deliveries(source, delivery_ids)
    except StateError:
        # Redis itself is away: the claims may outlive this request and the
        # retries will look like duplicates until the keys expire.
        log.error("%s dedup keys could not be released", source)
