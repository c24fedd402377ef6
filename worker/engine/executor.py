"""The only code that deletes: carries out a :class:`~worker.engine.plan.Plan` safely.

Deletions run level by level: a deletion only after every deletion it depends
on (the deleted indexes that list it, the deleted subjects it refers to) has
removed its manifest, so a subject or index the live re-check spares keeps its
referrers and children. Within a level, work goes in waves; before each wave
the executor re-reads the live registry — the tag list, and a HEAD of every
tag the plan does not remove — and refuses any DELETE whose digest a kept or
newly pushed tag now needs, children of indexes included (invariant 5).

Every deletion is recorded in the audit log, durably, before its DELETE is
sent, and settled after (invariant 8): if the record cannot be written, the
run stops there and nothing more is deleted. 404 on DELETE is success; a lost
answer is settled by looking (invariant 6). A read-only registry stops the
run with everything left marked deferred, nothing half-done lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, NamedTuple

from worker.engine.plan import Action, Deletion, Plan, dependency_levels
from worker.errors import (
    DeletesDisabled,
    DeleteUnsettled,
    ManifestUnknown,
    RegistryError,
    RegistryReadOnly,
    RegistryUnavailable,
    SafetyViolation,
    StateError,
    TurnLost,
)
from worker.oci import Digest, Manifest
from worker.registry.client import RegistryClient, Removal
from worker.store.audit import AuditEntry, AuditLog, Outcome, Settlement

#: One line per deletion and one per job, at info: what an operator reads to learn what
#: went. The CLI shows this logger at info too.
deletions_log = logging.getLogger("regsweep.deletions")
log = logging.getLogger(__name__)

#: Deletions per wave, as a multiple of the registry concurrency: the live
#: re-check costs one tag list plus a HEAD per kept tag, paid once per wave.
WAVE_FACTOR: Final = 4
#: Waves whose DELETEs may be in flight at once: the one draining and the next.
MAX_WAVES_IN_FLIGHT: Final = 2
#: A live re-check younger than this is reused for the next wave. On a small
#: repository a wave of DELETEs takes a few milliseconds and re-reading every kept
#: tag per wave would cost more than the deletes; on a large one (2.8's DELETE reads
#: every tag link) a wave outlasts this and every wave is re-checked.
RECHECK_MAX_AGE: Final = 0.5


class RunOutcome(StrEnum):
    DONE = "done"
    #: The registry went read-only: what is left waits for the window's end.
    DEFERRED = "deferred"
    FAILED = "failed"


class Status(StrEnum):
    DELETED = "deleted"
    ALREADY_GONE = "already-gone"
    SKIPPED = "skipped"
    DEFERRED = "deferred"
    ERROR = "error"


#: How each status is settled in the audit.
_SETTLED: Final = {
    Status.DELETED: Outcome.DELETED,
    Status.ALREADY_GONE: Outcome.ALREADY_GONE,
    Status.SKIPPED: Outcome.NOT_DONE,
    Status.DEFERRED: Outcome.NOT_DONE,
    Status.ERROR: Outcome.NOT_DONE,
}
_GONE: Final = frozenset({Status.DELETED, Status.ALREADY_GONE})
#: What the report and the audit say of a removal that did not go plainly.
_REMOVAL_DETAIL: Final = {
    Removal.DELETED: "",
    Removal.DELETED_UNANSWERED: "answer lost; a HEAD shows it gone",
    Removal.PLACEHOLDER_LEFT: (
        "tag moved to a placeholder, which could not be deleted yet (the next run deletes it)"
    ),
}


class _Result(NamedTuple):
    """How one attempted deletion ended, and how its audit record is settled."""

    status: Status
    detail: str = ""
    #: None: as ``_SETTLED`` says for the status. PENDING for an error whose DELETE may
    #: have been carried out (an answer lost, no look possible): restorable, never "not done".
    outcome: Outcome | None = None
    #: An error because the registry could not be reached (connection, timeout, 5xx).
    transient: bool = False

    @property
    def settled(self) -> Outcome:
        return self.outcome or _SETTLED[self.status]


@dataclass
class ExecutionReport:
    repository: str
    job_id: str
    done: list[tuple[Deletion, Status, str]] = field(default_factory=list)
    #: A problem that stopped the run (said once, not per item): deletes disabled, or
    #: an audit that cannot be written.
    fatal: str | None = None
    #: How many of the errors came from a registry that could not be reached.
    unreachable: int = 0

    @property
    def retryable(self) -> bool:
        """Failed only because the registry could not be reached: a later run, planned
        afresh from the live registry, may do the rest (what this one did is not redone)."""
        errors = len(self.by_status(Status.ERROR))
        return self.fatal is None and errors > 0 and errors == self.unreachable

    def by_status(self, status: Status) -> list[Deletion]:
        return [d for d, s, _ in self.done if s is status]

    @property
    def outcome(self) -> RunOutcome:
        if self.fatal or self.by_status(Status.ERROR):
            return RunOutcome.FAILED
        if self.by_status(Status.DEFERRED):
            return RunOutcome.DEFERRED
        return RunOutcome.DONE

    def counts(self) -> dict[str, int]:
        return {s.value: len(self.by_status(s)) for s in Status}

    def errors(self) -> list[str]:
        """What went wrong, each thing once: the problem that stopped the run, then each
        deletion's own error (not the ones the stopping problem caused)."""
        own = [
            f"{d.digest}: {detail}"
            for d, s, detail in self.done
            if s is Status.ERROR and not (self.fatal and self.fatal in detail)
        ]
        return [self.fatal, *own] if self.fatal else own


ProgressCallback = Callable[[Deletion, Status], None]


@dataclass
class _Run:
    """One execution: what it works from, and whether something said stop."""

    plan: Plan
    manifests: Mapping[Digest, Manifest]
    job_id: str
    audit_location: str
    #: What happened to each digest this run deleted (or did not): dependents look here.
    statuses: dict[Digest, Status] = field(default_factory=dict)
    #: Set when the registry went read-only: the rest is deferred.
    read_only: bool = False
    #: Set when deletes are disabled or the audit cannot be written, said once.
    fatal: str | None = None
    #: Whether the placeholder's config blob was seen to (before the first tag removal).
    placeholder_ready: bool = False

    def blocked(self, deletion: Deletion) -> tuple[Status, str] | None:
        """Why ``deletion`` must not be attempted now, if it must not."""
        if self.fatal is not None:
            return Status.ERROR, "not attempted: " + self.fatal
        if self.read_only:
            return Status.DEFERRED, "registry refused writes"
        staying = [p for p in deletion.parents if self.statuses.get(p) not in _GONE]
        if staying:
            return Status.SKIPPED, f"{staying[0]}, which it depends on, was not deleted"
        return None


#: The tags of a repository held now (``regsweep hold``, a restore), read with each re-check.
HeldTags = Callable[[str], Awaitable[Collection[str]]]
#: Asked before each wave: raises (:class:`~worker.errors.TurnLost`) when the run must
#: delete nothing more because its repository's lock is no longer its own.
GoOn = Callable[[], Awaitable[None]]


class Executor:
    def __init__(
        self,
        client: RegistryClient,
        audit: AuditLog,
        *,
        wave_size: int = 32,
        on_progress: ProgressCallback | None = None,
        held: HeldTags | None = None,
        go_on: GoOn | None = None,
    ) -> None:
        self._client = client
        self._audit = audit
        self._wave_size = max(1, wave_size)
        self._on_progress = on_progress
        self._held = held
        self._go_on = go_on

    async def run(
        self, plan: Plan, manifests: Mapping[Digest, Manifest], *, job_id: str
    ) -> ExecutionReport:
        report = ExecutionReport(plan.repository, job_id)
        run = _Run(plan, manifests, job_id, self._audit.location)
        guard = _LiveGuard(self._client, plan, self._held)
        for depth, level in enumerate(_levels(plan.deletions)):
            await self._run_level(run, guard.at(depth), level, report)
        report.fatal = run.fatal
        return report

    async def _run_level(
        self, run: _Run, guard: _LiveGuard, level: list[Deletion], report: ExecutionReport
    ) -> None:
        """One level's deletions, wave by wave. The next wave's re-check is sent while the
        current wave's DELETEs drain (the client's gate queues it behind them), so the
        registry never idles at a wave's tail; a wave never starts before its own re-check
        has answered."""
        in_flight: list[asyncio.Task[None]] = []
        for wave in _waves(level, self._wave_size):
            if run.fatal is not None or run.read_only:
                self._leave(run, wave, report)
                continue
            try:
                if self._go_on is not None:
                    await self._go_on()
                live = await guard.refresh()
            except (RegistryError, StateError) as exc:
                # A lost lock is retried as an unreachable registry is: planned afresh.
                transient = isinstance(exc, RegistryUnavailable | TurnLost)
                for deletion in wave:
                    detail = f"live re-check failed: {exc}"
                    self._note(run, report, deletion, Status.ERROR, detail, transient=transient)
                continue
            if not run.placeholder_ready and any(d.action is Action.UNTAG for d in wave):
                await self._prepare_placeholder(run)
            in_flight.append(asyncio.create_task(self._wave(run, wave, live, report)))
            if len(in_flight) > MAX_WAVES_IN_FLIGHT - 1:
                await in_flight.pop(0)
        await asyncio.gather(*in_flight)

    async def _prepare_placeholder(self, run: _Run) -> None:
        """Before the first wave with tag removals: the config blob of 2.8's placeholder
        manifests, uploaded once for the repository rather than by each removal at once
        (see :meth:`RegistryClient.prepare_placeholder`). Not needed where tags are deleted
        by reference (3.x). A failure here is no failure of the run: each removal's PUT
        uploads the blob again if it is still missing."""
        run.placeholder_ready = True
        try:
            # Probed here, not read: a new client has not asked yet, and 3.x needs no blob.
            if await self._client.tag_delete(run.plan.repository):
                return
            await self._client.prepare_placeholder(run.plan.repository)
        except RegistryReadOnly:
            run.read_only = True
        except RegistryError as exc:
            log.warning("%s: the placeholder's config blob: %s", run.plan.repository, exc)

    async def _wave(
        self, run: _Run, wave: list[Deletion], live: _Live, report: ExecutionReport
    ) -> None:
        """Record, delete, settle: the intents of the whole wave are made durable first."""
        attempted: list[tuple[Deletion, AuditEntry]] = []
        for deletion in wave:
            blocked = (
                run.blocked(deletion)
                or _needed(deletion, live.protected)
                or _held(deletion, live.held)
            )
            if blocked is not None:
                self._note(run, report, deletion, *blocked)
            else:
                attempted.append((deletion, _audit_entry(run, deletion)))
        if not attempted:
            return
        try:
            await self._audit.intend([entry for _, entry in attempted])
        except StateError as exc:
            run.fatal = f"the audit ({run.audit_location}) cannot be written: {exc}"
            for deletion, _ in attempted:
                self._note(run, report, deletion, Status.ERROR, "not deleted: " + run.fatal)
            return
        results = await asyncio.gather(*(self._one(run, d) for d, _ in attempted))
        settled = []
        for (deletion, entry), result in zip(attempted, results, strict=True):
            self._note(
                run, report, deletion, result.status, result.detail, transient=result.transient
            )
            settled.append(Settlement.of(entry, result.settled, result.detail))
        try:
            await self._audit.settle(settled)
        except StateError as exc:
            # The intents are durable (restore works from them); deleting more would not be.
            run.fatal = f"the audit ({run.audit_location}) cannot be written: {exc}"

    def _leave(self, run: _Run, wave: Sequence[Deletion], report: ExecutionReport) -> None:
        """A wave not attempted: the run was stopped (read-only registry, fatal problem)."""
        for deletion in wave:
            status, detail = run.blocked(deletion) or (Status.DEFERRED, "registry refused writes")
            self._note(run, report, deletion, status, detail)

    def _note(
        self,
        run: _Run,
        report: ExecutionReport,
        deletion: Deletion,
        status: Status,
        detail: str,
        *,
        transient: bool = False,
    ) -> None:
        if deletion.action is not Action.UNTAG:
            run.statuses[deletion.digest] = status
        report.done.append((deletion, status, detail))
        report.unreachable += transient
        _log_deletion(run, deletion, status, detail)
        if self._on_progress:
            self._on_progress(deletion, status)

    async def _one(self, run: _Run, deletion: Deletion) -> _Result:
        if run.read_only:
            return _Result(Status.DEFERRED, "registry refused writes")
        try:
            removal = await self._delete(run.plan, deletion)
        except SafetyViolation as exc:
            return _Result(Status.SKIPPED, str(exc))
        except RegistryReadOnly:
            run.read_only = True
            return _Result(Status.DEFERRED, "registry is read-only")
        except DeletesDisabled as exc:
            # Every DELETE of the wave in flight gets this answer: one message for all of
            # them, without the digest, so the run reports it once.
            run.fatal = run.fatal or f"the registry answers DELETE with 405 UNSUPPORTED: {exc.hint}"
            return _Result(Status.ERROR, run.fatal)
        except DeleteUnsettled as exc:
            detail = f"unknown whether deleted: {exc}"
            return _Result(Status.ERROR, detail, Outcome.PENDING, transient=True)
        except RegistryError as exc:
            return _Result(Status.ERROR, str(exc), transient=isinstance(exc, RegistryUnavailable))
        if removal is Removal.ABSENT:
            return _Result(Status.ALREADY_GONE)
        return _Result(Status.DELETED, _REMOVAL_DETAIL[removal])

    async def _delete(self, plan: Plan, deletion: Deletion) -> Removal:
        if deletion.action is Action.UNTAG:
            (tag,) = deletion.tags
            try:
                return await self._client.delete_tag(plan.repository, tag, deletion.digest)
            except ManifestUnknown:
                return Removal.ABSENT
        return await self._client.delete_manifest(plan.repository, deletion.digest)


def _log_deletion(run: _Run, deletion: Deletion, status: Status, detail: str) -> None:
    """One line for a deletion carried out, found done, spared or failed on its own; what a
    stopped run left (deferred, or not attempted after a fatal problem) is in the job's
    summary line instead, once."""
    stopped = status is Status.DEFERRED or (run.fatal is not None and run.fatal in detail)
    if stopped:
        return
    plan = run.plan
    level = logging.WARNING if status is Status.ERROR else logging.INFO
    tags = ", ".join(deletion.tags) or "no tags"
    what = "tag" if deletion.action is Action.UNTAG else deletion.action.value
    message = (
        f"{status.value}: {plan.repository} {what} {deletion.digest} ({tags}): "
        f"{deletion.reason}; policy {plan.policy}, job {run.job_id}"
    )
    deletions_log.log(
        level,
        f"{message}: {detail}" if detail else message,
        extra={
            "repository": plan.repository,
            "job_id": run.job_id,
            "digest": deletion.digest,
            "tags": list(deletion.tags),
            "action": deletion.action.value,
            "policy": plan.policy,
            "rule": deletion.reason.rule,
            "reason": str(deletion.reason),
            "status": status.value,
        },
    )


def _levels(deletions: Sequence[Deletion]) -> list[list[Deletion]]:
    """Deletions grouped by dependency depth, in plan order within a level."""
    depth = dependency_levels(deletions)
    grouped: dict[int, list[Deletion]] = {}
    for deletion in deletions:
        grouped.setdefault(depth[deletion], []).append(deletion)
    return [grouped[n] for n in sorted(grouped)]


def _needed(deletion: Deletion, protected: frozenset[Digest]) -> tuple[Status, str] | None:
    """A digest deletion the live re-check found a kept tag needs (a tag-only removal is
    re-checked by the client: the tag must still be on the planned digest)."""
    if deletion.action is not Action.UNTAG and deletion.digest in protected:
        return Status.SKIPPED, f"{deletion.digest} is now needed by a kept tag; left alone"
    return None


def _held(deletion: Deletion, held: frozenset[str]) -> tuple[Status, str] | None:
    """A deletion that would remove a tag someone held since the plan was made."""
    tags = sorted(held.intersection(deletion.tags))
    if tags:
        return Status.SKIPPED, f"{', '.join(tags)} held since the plan was made; left alone"
    return None


def _waves(deletions: Sequence[Deletion], size: int) -> list[list[Deletion]]:
    """Chunks of at most ``size``."""
    return [list(deletions[i : i + size]) for i in range(0, len(deletions), size)]


def _audit_entry(run: _Run, deletion: Deletion) -> AuditEntry:
    plan = run.plan
    manifest = run.manifests.get(deletion.digest)
    return AuditEntry(
        time=datetime.now(UTC),
        repository=plan.repository,
        digest=deletion.digest,
        media_type=deletion.media_type,
        size=deletion.size,
        tags=deletion.tags,
        action=deletion.action.value,
        policy=plan.policy,
        rule=deletion.reason.rule,
        reason=deletion.reason.detail,
        job_id=run.job_id,
        manifest=manifest.raw if manifest else b"",
        parents=deletion.parents,
    )


class _Live(NamedTuple):
    """What a re-check found: digests kept images need now, and the tags held now."""

    protected: frozenset[Digest]
    held: frozenset[str]


class _LiveGuard:
    """What the live registry says kept images need, re-read before every wave.

    Every tag the plan keeps, and any pushed since the plan, is HEADed; one that
    moved or is new has its manifest graph read, and all of it is protected. A
    tag the plan removes may go with its digest, so it is not re-read while its
    own removal is pending; once its level has run it should be gone, and one
    still listed then (pushed again since the plan, onto another image) is a new
    push like any other: the children and referrers the later levels delete are
    checked against it.
    """

    def __init__(self, client: RegistryClient, plan: Plan, held: HeldTags | None) -> None:
        self._client = client
        self._plan = plan
        self._held = held
        depth = dependency_levels(plan.deletions)
        #: Each removed tag: the digest the plan removes it with, and that removal's level.
        self._removed = {t: (d.digest, depth[d]) for d in plan.deletions for t in d.tags}
        self._known = {k.tag: k.digest for k in plan.kept}
        self._graphs: dict[Digest, frozenset[Digest]] = {}
        self._level = 0
        self._last: tuple[float, int, _Live] | None = None

    def at(self, level: int) -> _LiveGuard:
        """The guard for the waves of dependency level ``level`` (re-read afresh)."""
        self._level = level
        return self

    async def refresh(self) -> _Live:
        """The protected set as the registry says now, and the holds as the state store
        says; reused within a level while under RECHECK_MAX_AGE (a new level's removed
        tags are to be looked at again)."""
        now = time.monotonic()
        last = self._last
        if last is not None and last[1] == self._level and now - last[0] < RECHECK_MAX_AGE:
            return last[2]
        held = await self._held(self._plan.repository) if self._held is not None else ()
        live = _Live(await self._read_live(), frozenset(held))
        self._last = (now, self._level, live)
        return live

    async def _read_live(self) -> frozenset[Digest]:
        repo = self._plan.repository
        pending = {t for t, (_, level) in self._removed.items() if level >= self._level}
        live = [t for t in await self._client.tags(repo) if t not in pending]
        refs = await asyncio.gather(*(self._client.head_manifest(repo, t) for t in live))
        protected = set(self._plan.protected_digests)
        for tag, ref in zip(live, refs, strict=True):
            if ref is None:
                continue
            if tag in self._removed and ref.digest == self._removed[tag][0]:
                continue  # its removal was skipped or failed: still condemned, not kept
            protected.add(ref.digest)
            if self._known.get(tag) != ref.digest:
                protected |= await self._graph(Digest(ref.digest))
        return frozenset(protected)

    async def _graph(self, digest: Digest) -> frozenset[Digest]:
        """``digest`` and every manifest below it (children of indexes, recursively)."""
        if digest not in self._graphs:
            seen: set[Digest] = set()
            todo = [digest]
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                try:
                    manifest = await self._client.get_manifest(self._plan.repository, current)
                except ManifestUnknown:
                    continue
                todo.extend(c.digest for c in manifest.children)
            self._graphs[digest] = frozenset(seen)
        return self._graphs[digest]
