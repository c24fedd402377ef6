"""The only code that deletes: carries out a :class:`~worker.plan.Plan` safely.

Order: referrers, tag-only removals, manifests, orphaned children (the plan is
already sorted that way). Work goes in waves; before each wave the executor
re-reads the live registry — the tag list, and a HEAD of every tag the plan
does not remove — and refuses any DELETE whose digest a kept or newly pushed
tag now needs, children of indexes included (invariant 5). 404 on DELETE is
success (invariant 6); a read-only registry stops the run with everything
left marked deferred, nothing half-done lost; every deletion is audited with
its raw manifest bytes (invariant 8).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from worker.audit import AuditEntry, AuditLog
from worker.errors import (
    DeletesDisabled,
    ManifestUnknown,
    RegistryError,
    RegistryReadOnly,
    SafetyViolation,
)
from worker.model import Digest, Manifest
from worker.plan import Action, Deletion, Plan
from worker.registry.client import RegistryClient

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


class Outcome(StrEnum):
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


@dataclass
class ExecutionReport:
    repository: str
    job_id: str
    done: list[tuple[Deletion, Status, str]] = field(default_factory=list)
    #: A configuration problem that stopped the run (said once, not per item).
    fatal: str | None = None

    def by_status(self, status: Status) -> list[Deletion]:
        return [d for d, s, _ in self.done if s is status]

    @property
    def outcome(self) -> Outcome:
        if self.fatal or self.by_status(Status.ERROR):
            return Outcome.FAILED
        if self.by_status(Status.DEFERRED):
            return Outcome.DEFERRED
        return Outcome.DONE

    def counts(self) -> dict[str, int]:
        return {s.value: len(self.by_status(s)) for s in Status}


ProgressCallback = Callable[[Deletion, Status], None]


@dataclass
class _Run:
    """One execution: what it works from, and whether the registry said stop."""

    plan: Plan
    manifests: Mapping[Digest, Manifest]
    job_id: str
    #: Set when the registry went read-only: the rest is deferred.
    read_only: bool = False
    #: Set when deletes are disabled: a configuration error, said once.
    fatal: str | None = None

    @property
    def stopped(self) -> bool:
        return self.read_only or self.fatal is not None


class Executor:
    def __init__(
        self,
        client: RegistryClient,
        audit: AuditLog,
        *,
        wave_size: int = 32,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self._client = client
        self._audit = audit
        self._wave_size = max(1, wave_size)
        self._on_progress = on_progress

    async def run(
        self, plan: Plan, manifests: Mapping[Digest, Manifest], *, job_id: str
    ) -> ExecutionReport:
        report = ExecutionReport(plan.repository, job_id)
        run = _Run(plan, manifests, job_id)
        guard = _LiveGuard(self._client, plan)
        for group in _by_action(plan.deletions):
            await self._run_group(run, guard, group, report)
        report.fatal = run.fatal
        return report

    async def _run_group(
        self, run: _Run, guard: _LiveGuard, group: list[Deletion], report: ExecutionReport
    ) -> None:
        """One action's deletions, wave by wave. The next wave's re-check is sent while the
        current wave's DELETEs drain (the client's gate queues it behind them), so the
        registry never idles at a wave's tail; a wave never starts before its own re-check
        has answered. Actions never overlap: referrers finish before subjects start."""
        in_flight: list[asyncio.Task[None]] = []
        for wave in _waves(group, self._wave_size):
            if run.stopped:
                self._mark(report, wave, Status.DEFERRED, "registry refused writes")
                continue
            try:
                protected = await guard.refresh()
            except RegistryError as exc:
                self._mark(report, wave, Status.ERROR, f"live re-check failed: {exc}")
                continue
            in_flight.append(asyncio.create_task(self._wave(run, wave, protected, report)))
            if len(in_flight) > MAX_WAVES_IN_FLIGHT - 1:
                await in_flight.pop(0)
        await asyncio.gather(*in_flight)

    async def _wave(
        self, run: _Run, wave: list[Deletion], protected: frozenset[Digest], report: ExecutionReport
    ) -> None:
        results = await asyncio.gather(*(self._one(run, d, protected) for d in wave))
        for deletion, (status, detail) in zip(wave, results, strict=True):
            self._note(report, deletion, status, detail)

    def _mark(
        self, report: ExecutionReport, wave: Sequence[Deletion], status: Status, detail: str
    ) -> None:
        for deletion in wave:
            self._note(report, deletion, status, detail)

    def _note(
        self, report: ExecutionReport, deletion: Deletion, status: Status, detail: str
    ) -> None:
        report.done.append((deletion, status, detail))
        if self._on_progress:
            self._on_progress(deletion, status)

    async def _one(
        self, run: _Run, deletion: Deletion, protected: frozenset[Digest]
    ) -> tuple[Status, str]:
        if run.stopped:
            return Status.DEFERRED, "registry refused writes"
        try:
            status = await self._delete(run.plan, deletion, protected)
        except SafetyViolation as exc:
            return Status.SKIPPED, str(exc)
        except RegistryReadOnly:
            run.read_only = True
            return Status.DEFERRED, "registry is read-only"
        except DeletesDisabled as exc:
            run.fatal = f"the registry has deletes disabled (storage.delete.enabled): {exc}"
            return Status.ERROR, run.fatal
        except RegistryError as exc:
            return Status.ERROR, str(exc)
        if status is Status.DELETED:
            await self._audit.record(_audit_entry(run, deletion))
        return status, ""

    async def _delete(self, plan: Plan, deletion: Deletion, protected: frozenset[Digest]) -> Status:
        if deletion.action is Action.UNTAG:
            (tag,) = deletion.tags
            try:
                removed = await self._client.delete_tag(plan.repository, tag, deletion.digest)
            except ManifestUnknown:
                removed = False
            return Status.DELETED if removed else Status.ALREADY_GONE
        if deletion.digest in protected:
            raise SafetyViolation(f"{deletion.digest} is now needed by a kept tag; left alone")
        deleted = await self._client.delete_manifest(plan.repository, deletion.digest)
        return Status.DELETED if deleted else Status.ALREADY_GONE


def _by_action(deletions: Sequence[Deletion]) -> list[list[Deletion]]:
    """Runs of one action, in plan order: referrers, untags, manifests, children."""
    groups: list[list[Deletion]] = []
    for deletion in deletions:
        if groups and groups[-1][0].action is deletion.action:
            groups[-1].append(deletion)
        else:
            groups.append([deletion])
    return groups


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
        parent=deletion.parent,
    )


class _LiveGuard:
    """What the live registry says kept images need, re-read before every wave.

    Tags the plan removes are not re-read: a tag the policy condemned may go
    with its digest. Every other tag — the kept ones and any pushed since the
    plan — is HEADed; one that moved or is new has its manifest graph read,
    and all of it is protected.
    """

    def __init__(self, client: RegistryClient, plan: Plan) -> None:
        self._client = client
        self._plan = plan
        self._removed_tags = {t for d in plan.deletions for t in d.tags}
        self._known = {k.tag: k.digest for k in plan.kept}
        self._graphs: dict[Digest, frozenset[Digest]] = {}
        self._last: tuple[float, frozenset[Digest]] | None = None
        # Referrers the plan deletes with their subject: if the subject turns out to
        # be needed after all, its signatures and attestations must stay too.
        self._referrers: dict[Digest, set[Digest]] = {}
        for d in plan.deletions:
            if d.action is Action.REFERRER and d.parent:
                self._referrers.setdefault(d.parent, set()).add(d.digest)

    async def refresh(self) -> frozenset[Digest]:
        """The protected set as the registry says now; reused while under RECHECK_MAX_AGE."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < RECHECK_MAX_AGE:
            return self._last[1]
        protected = await self._read_live()
        self._last = (now, protected)
        return protected

    async def _read_live(self) -> frozenset[Digest]:
        repo = self._plan.repository
        live = [t for t in await self._client.tags(repo) if t not in self._removed_tags]
        refs = await asyncio.gather(*(self._client.head_manifest(repo, t) for t in live))
        protected = set(self._plan.protected_digests)
        for tag, ref in zip(live, refs, strict=True):
            if ref is None:
                continue
            protected.add(ref.digest)
            if self._known.get(tag) != ref.digest:
                protected |= await self._graph(Digest(ref.digest))
        return frozenset(self._with_referrers(protected))

    def _with_referrers(self, protected: set[Digest]) -> set[Digest]:
        todo = [d for d in protected if d in self._referrers]
        while todo:
            for referrer in self._referrers.get(todo.pop(), ()):
                if referrer not in protected:
                    protected.add(referrer)
                    todo.append(referrer)
        return protected

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
