"""What the hooks and the job API do once a request is verified and parsed.

At-least-once with dedup, and never a delivery swallowed: a delivery is
recorded as seen (its dedup keys, kept :data:`~worker.store.state.DEDUP_TTL`) only
together with its queued message. On the state store's own Redis, which is
where ``redis.url`` puts the broker, both happen in one atomic step
(:meth:`State.new_deliveries` with a push), so a failure at any point, an
answer lost on the way back included, leaves either both (the sender's retry
is a duplicate of something queued) or neither (the retry is processed). With
the broker elsewhere the message is published first and the delivery recorded
after it: a failure between the two makes the retry queue it a second time,
which is harmless (every task is idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from service.publish import EventSink
from worker.engine.events import CiEvent, RegistryEnvelope, RegistryEvent, excerpt
from worker.errors import StateError
from worker.queue.enqueue import JobSink
from worker.queue.messages import JobRequest
from worker.store.groupcommit import GroupCommit
from worker.store.state import JobState, Push, State

log = logging.getLogger("regsweep.service")

#: Carries a registry delivery's outcome (see :meth:`RegistryOutcome.header`).
OUTCOME_HEADER: Final = "Regsweep-Outcome"


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
    waits for Redis); alone, a delivery is committed at once. When the commit
    fails, every delivery in it gets the error (503); what the registry then
    retries is a duplicate only if it was queued (see the module's docstring).
    """

    def __init__(self, state: State, sink: EventSink) -> None:
        self.state = state
        self.sink = sink
        self._group: GroupCommit[tuple[RegistryEvent, ...], list[RegistryEvent]] = GroupCommit(
            self._commit_batch,
            max_weight=MAX_COMMIT_EVENTS,
            weight=len,
            # Redis just failed a commit after its timeouts: the deliveries that came
            # meanwhile get their 503 now rather than a second wait.
            shared_failure=lambda exc: isinstance(exc, StateError),
        )

    async def ingest(self, envelope: RegistryEnvelope, body: bytes) -> RegistryOutcome:
        """Dead-letter the unusable events, hand the new ones to the sink once each."""
        if envelope.dead_count:
            # One entry and one log line per delivery, however many events it spoils.
            summary = envelope.dead_summary()
            count = envelope.dead_count
            log.warning("registry delivery: %d events dead-lettered: %s", count, summary)
            await self.state.dead_letter("registry", summary, excerpt(body))
        fresh = await self._group.submit(envelope.events) if envelope.events else []
        return RegistryOutcome(
            accepted=len(fresh),
            duplicates=len(envelope.events) - len(fresh),
            ignored=envelope.ignored,
            dead_lettered=envelope.dead_count,
        )

    async def _commit_batch(
        self, batch: list[tuple[RegistryEvent, ...]]
    ) -> list[list[RegistryEvent]]:
        """Queue the new events of every delivery of ``batch``; the queued ones per delivery."""
        events = [event for delivery in batch for event in delivery]
        keys = [self.state.keys.delivery("registry", event.id) for event in events]

        def push(chosen: list[int]) -> Push | None:
            return self.sink.registry_push([events[i] for i in chosen])

        async def publish(chosen: list[int]) -> None:
            await self.sink.registry_events([events[i] for i in chosen])

        queued = await queue_new(self.state, keys, 1, push, publish)
        if len(queued) == len(events):
            return [list(delivery) for delivery in batch]
        return _split(batch, set(queued))


async def queue_new(
    state: State,
    keys: Sequence[str],
    per_delivery: int,
    push_for: Callable[[list[int]], Push | None],
    publish: Callable[[list[int]], Awaitable[None]],
) -> list[int]:
    """Queue the deliveries (``per_delivery`` dedup keys each) not seen before; their positions.

    ``push_for(positions)`` is the LPUSH that queues those deliveries on the state
    store's own Redis, if the sink has one; the deliveries are then recorded in the
    same atomic step, and when some turn out to be seen the rest are tried again
    alone. Otherwise ``publish(positions)`` queues them elsewhere and they are
    recorded after it (see the module's docstring).
    """
    pending = list(range(len(keys) // per_delivery))

    def keys_of(positions: list[int]) -> Sequence[str]:
        if len(positions) * per_delivery == len(keys):
            return keys  # all of them: the usual case
        return [keys[p * per_delivery + j] for p in positions for j in range(per_delivery)]

    while pending:
        push = push_for(pending)
        if push is not None and push.server != state.server:
            push = None  # the broker is another Redis: check here, publish there
        flags = await state.new_deliveries(keys_of(pending), per_delivery=per_delivery, push=push)
        new = [pending[i] for i in flags]
        if push is None:
            if new:
                await publish(new)
                await state.record_deliveries(keys_of(new))
            return new
        if len(new) == len(pending):
            return new
        pending = new
    return []


def _split(batch: list[tuple[RegistryEvent, ...]], queued: set[int]) -> list[list[RegistryEvent]]:
    """Per delivery, its events whose position in the whole batch is in ``queued``."""
    fresh: list[list[RegistryEvent]] = []
    position = 0
    for delivery in batch:
        fresh.append([e for i, e in enumerate(delivery, position) if i in queued])
        position += len(delivery)
    return fresh


async def ingest_ci(event: CiEvent, state: State, sink: EventSink, dedup: Sequence[str]) -> bool:
    """Queue a CI event; False when one of its ``dedup`` keys shows it was already queued."""

    async def publish(_: list[int]) -> None:
        await sink.ci_event(event)

    queued = await queue_new(state, dedup, len(dedup), lambda _: sink.ci_push(event), publish)
    return bool(queued)


async def submit_job(
    request: JobRequest, state: State, sink: JobSink, *, job_id: str | None = None
) -> str:
    """Record a job (under ``job_id`` when given) and enqueue it; the record is marked
    failed when enqueueing fails."""
    job_id = await state.create_job(request.kind.value, request.params, job_id=job_id)
    try:
        await sink.job(job_id, request.kind.value, request.params)
    except Exception:
        try:
            await state.update_job(job_id, state=JobState.FAILED.value, errors=["not enqueued"])
        except StateError:
            log.warning("job %s could not be marked failed after enqueueing failed", job_id)
        raise
    return job_id
