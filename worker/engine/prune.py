"""Plan and prune repositories: inventory → plan → (executor), for one or many repositories.

This is the one core function the CLI and the Celery tasks call. Dry-run is
"don't call the executor" (invariant 7). One repository that cannot be read
(a manifest that is not JSON, a registry 5xx on one tag, a storage file it cannot read)
is reported with what went wrong and left alone; the others are planned and pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Final, NamedTuple, Protocol

from worker.engine.executor import (
    WAVE_FACTOR,
    ExecutionReport,
    Executor,
    ProgressCallback,
    RunOutcome,
    Status,
    deletions_log,
)
from worker.engine.inventory import CreatedCache, InventoryBuilder, ManifestCache
from worker.engine.model import Inventory
from worker.engine.names import repository_problem
from worker.engine.plan import Action, Deletion, Plan
from worker.engine.planner import TagRequest, plan
from worker.engine.policy import Mode, Policy
from worker.errors import PruneWaits, RegistryError, StateError, StorageError, UnknownRepository
from worker.oci import Digest, valid_repository
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage
from worker.store.audit import AuditLog
from worker.store.history import History

log = logging.getLogger(__name__)

#: Repositories planned at once in a multi-repository run; the registry
#: concurrency limit still caps requests in flight across all of them.
REPOSITORY_PARALLELISM: Final = 4

#: Told each plan before it is carried out; a coroutine it returns is awaited first, and
#: an error it raises stops the run before anything is deleted.
PlannedCallback = Callable[["RepositoryPlan"], Awaitable[None] | None]
#: (repository, deletion, status) after each deletion of a multi-repository run.
RepositoryProgress = Callable[[str, Deletion, Status], None]


class HeldTurn(Protocol):
    """A repository's turn while it is held (:class:`worker.store.locks.PruneLock`)."""

    async def still_ours(self) -> None:
        """Raise :class:`~worker.errors.TurnLost` once the turn is no longer this run's."""


#: A repository's turn to be pruned, held while it is (:class:`worker.store.locks.PruneTurns`).
Turn = Callable[[str], AbstractAsyncContextManager[HeldTurn]]


@dataclass(frozen=True)
class RepositoryPlan:
    inventory: Inventory
    plan: Plan
    policy: Policy

    @property
    def enforced(self) -> bool:
        return self.policy.mode is Mode.ENFORCE


class Pruned(NamedTuple):
    """One repository's prune: its plan, and the executor's report when the plan was
    carried out (``None``: dry-run, asked for or the policy's mode, or nothing to do)."""

    planned: RepositoryPlan
    report: ExecutionReport | None


@dataclass(frozen=True)
class RepositoryFailure:
    """A repository that could not be planned (nothing of it was deleted), and why."""

    repository: str
    error: str


class RegistryPlace(Protocol):
    """Where the registry is, as a prune needs it (``registry:`` in the policy file)."""

    @property
    def url(self) -> str: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def storage_path(self) -> str | None: ...


class PruneSettings(Protocol):
    """What a prune needs of the settings (:class:`worker.settings.model.Config` has it)."""

    @property
    def registry(self) -> RegistryPlace: ...
    def policy_for(self, repository: str) -> Policy | None: ...


class Pruner:
    def __init__(
        self,
        config: PruneSettings,
        client: RegistryClient,
        *,
        history: History | None = None,
        audit: AuditLog,
        manifest_cache: ManifestCache | None = None,
        created_cache: CreatedCache | None = None,
    ) -> None:
        self._config = config
        self._client = client
        self._audit = audit
        self._history = history
        storage_path = config.registry.storage_path
        self._inventory = InventoryBuilder(
            client,
            history=history,
            storage=RegistryStorage(storage_path) if storage_path else None,
            audit=audit,
            created_cache=created_cache or CreatedCache(),
            manifest_cache=manifest_cache,
        )

    async def repositories(self, requested: Sequence[str] = ()) -> list[str]:
        """The requested repositories, or every catalog entry some policy matches."""
        names = list(requested) or await self._client.catalog()
        return [n for n in names if self._config.policy_for(n) is not None]

    async def requested(self, names: Sequence[str]) -> list[str]:
        """``names``, each checked: raises :class:`UnknownRepository` naming every one that
        is not a repository name, that no policy governs, or that the registry lacks."""
        problems = [p for n in names if (p := repository_problem(n)) is not None]
        unruled = [n for n in names if valid_repository(n) and self._config.policy_for(n) is None]
        problems += [f"{n}: no policy's repositories match it; nothing to plan" for n in unruled]
        candidates = [n for n in names if valid_repository(n) and n not in unruled]
        found = await asyncio.gather(*(self._client.repository_exists(n) for n in candidates))
        url = self._config.registry.url
        problems += [
            f"{n}: no such repository in the registry at {url}"
            for n, exists in zip(candidates, found, strict=True)
            if not exists
        ]
        if problems:
            raise UnknownRepository([f"regsweep: {p}" for p in problems])
        return list(names)

    async def plan_one(
        self,
        repository: str,
        *,
        requests: Sequence[TagRequest] = (),
        now: datetime | None = None,
        known_tags: Mapping[str, Digest] | None = None,
        requests_only: bool = False,
    ) -> RepositoryPlan | None:
        """Plan one repository; ``known_tags`` (from the tag index) skips the tag walk;
        ``requests_only``: delete what ``requests`` ask for and nothing else
        (:func:`requests_only_policy`)."""
        policy = self._config.policy_for(repository)
        if policy is None:
            return None
        if requests_only:
            policy = requests_only_policy(policy)
        now = now or datetime.now(UTC)
        inventory = await self._inventory.take(repository, policy, now=now, known_tags=known_tags)
        return RepositoryPlan(inventory, plan(inventory, policy, now, requests), policy)

    async def plan_many(
        self, repositories: Sequence[str], *, on_done: Callable[[str], None] | None = None
    ) -> list[RepositoryPlan | RepositoryFailure]:
        """Plan several repositories concurrently, a few at a time, in the given order;
        ``on_done`` is told each repository as its planning ends."""
        gate = asyncio.Semaphore(REPOSITORY_PARALLELISM)

        async def one(name: str) -> RepositoryPlan | RepositoryFailure | None:
            async with gate:
                result = await self._plan_or_failure(name)
            if on_done:
                on_done(name)
            return result

        results = await asyncio.gather(*(one(n) for n in repositories))
        return [r for r in results if r is not None]

    async def _plan_or_failure(self, repository: str) -> RepositoryPlan | RepositoryFailure | None:
        try:
            return await self.plan_one(repository)
        except (RegistryError, StateError, StorageError) as exc:
            return RepositoryFailure(repository, str(exc))

    async def execute(
        self,
        planned: RepositoryPlan,
        *,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        turn: HeldTurn | None = None,
    ) -> ExecutionReport:
        """Carry out an enforced plan. Callers decide dry-run by not calling this. With
        ``turn`` (the repository's lock), each wave is sent only while the turn is held."""
        executor = Executor(
            self._client,
            self._audit,
            wave_size=self._config.registry.concurrency * WAVE_FACTOR,
            on_progress=on_progress,
            held=partial(_held_tags, self._history) if self._history is not None else None,
            go_on=turn.still_ours if turn is not None else None,
        )
        report = await executor.run(planned.plan, planned.inventory.manifests, job_id=job_id)
        if self._history is not None:
            await _forget(self._history, planned.plan.repository, report)
        return report

    async def run(
        self,
        repository: str,
        *,
        job_id: str,
        dry_run: bool = False,
        requests: Sequence[TagRequest] = (),
        known_tags: Mapping[str, Digest] | None = None,
        on_planned: PlannedCallback | None = None,
        on_progress: ProgressCallback | None = None,
        requests_only: bool = False,
        turn: HeldTurn | None = None,
    ) -> Pruned | None:
        """Plan one repository and, unless this is a dry run, carry the plan out: the one
        place that decides (invariant 7). ``None`` when no policy covers the repository.
        Either way, one summary line is logged for the job."""
        started = time.monotonic()
        planned = await self.plan_one(
            repository, requests=requests, known_tags=known_tags, requests_only=requests_only
        )
        if planned is None:
            return None
        if on_planned:
            told = on_planned(planned)
            if inspect.isawaitable(told):
                await told
        if dry_run or not planned.enforced or planned.plan.is_empty:
            pruned = Pruned(planned, None)
        else:
            report = await self.execute(planned, job_id=job_id, on_progress=on_progress, turn=turn)
            pruned = Pruned(planned, report)
        log_summary(pruned, job_id, time.monotonic() - started, dry_run=dry_run)
        return pruned

    async def prune_many(
        self,
        repositories: Sequence[str],
        *,
        dry_run: bool,
        job_id: str,
        on_planned: PlannedCallback | None = None,
        on_progress: RepositoryProgress | None = None,
        turn: Turn | None = None,
    ) -> list[Pruned | RepositoryFailure]:
        """:meth:`run` for several repositories, a few at a time, each during its ``turn``
        (planned too: a plan made beside another prune would see its work half done); a
        repository that cannot be read, or whose turn does not come, is a
        :class:`RepositoryFailure`, and the others go on."""
        gate = asyncio.Semaphore(REPOSITORY_PARALLELISM)

        async def one(name: str) -> Pruned | RepositoryFailure | None:
            progress = partial(on_progress, name) if on_progress else None
            async with gate:
                try:
                    async with turn(name) if turn else contextlib.nullcontext() as held:
                        return await self.run(
                            name,
                            job_id=job_id,
                            dry_run=dry_run,
                            on_planned=on_planned,
                            on_progress=progress,
                            turn=held,
                        )
                except (RegistryError, StateError, StorageError, PruneWaits) as exc:
                    return RepositoryFailure(name, str(exc))

        results = await asyncio.gather(*(one(n) for n in repositories))
        return [r for r in results if r is not None]


def requests_only_policy(policy: Policy) -> Policy:
    """``policy`` for a deletion a person asked for (the dashboard's delete a tag, delete a
    digest): no retention and no untagged grace, so only the requests delete, with what
    goes along with them (referrers, children, a tag-only removal where the digest is
    shared); ``protect`` and holds still keep. Enforced whatever the policy's mode: the
    mode governs what regsweep decides on its own, and this was confirmed after a preview."""
    return replace(policy, keep=None, untagged_delete_after=None, mode=Mode.ENFORCE)


def not_executed(planned: RepositoryPlan, dry_run: bool) -> str:
    """Why a plan was not carried out."""
    if dry_run:
        return "dry run"
    if not planned.enforced:
        return f"policy {planned.policy.name} is dry-run"
    return "nothing to delete"


def log_summary(pruned: Pruned, job_id: str, seconds: float, *, dry_run: bool) -> None:
    """The job's one summary line: what was planned, what became of it, how long it took,
    and the problem that stopped it, once."""
    planned, report = pruned
    plan = planned.plan
    head = f"prune job {job_id}: {plan.repository} (policy {plan.policy})"
    wanted = f"planned {plan.tags_removed} tags, {plan.manifests_removed} manifests to remove"
    if report is None:
        outcome, counts = "planned", {}
        message = f"{head}: {wanted}; not carried out ({not_executed(planned, dry_run)})"
    else:
        outcome, counts = report.outcome.value, {k: v for k, v in report.counts().items() if v}
        done = ", ".join(f"{n} {status}" for status, n in counts.items()) or "nothing done"
        message = f"{head}: {outcome}: {wanted}; {done}"
        if report.fatal:
            message += f"; {report.fatal}"
    failed = report is not None and report.outcome is RunOutcome.FAILED
    deletions_log.log(
        logging.WARNING if failed else logging.INFO,
        f"{message} ({seconds:.2f}s)",
        extra={
            "repository": plan.repository,
            "job_id": job_id,
            "policy": plan.policy,
            "outcome": outcome,
            "counts": counts,
            "seconds": round(seconds, 3),
        },
    )


async def _held_tags(history: History, repository: str) -> set[str]:
    """Tags held now: a hold made after the plan (``regsweep hold`` while the prune runs)
    still keeps its tag."""
    now = datetime.now(UTC)
    return {hold.tag for hold in await history.holds_of(repository) if hold.active(now)}


async def _forget(history: History, repository: str, report: ExecutionReport) -> None:
    """Keep the history in step without waiting for the registry's delete notifications
    (or the next listing): no untagged grace to wait out for what is gone. Best effort: a
    store that fails here (the one that may just have stopped the run) must not hide the
    report, and the next listing puts the history right anyway."""
    gone = [d for d, s, _ in report.done if s in (Status.DELETED, Status.ALREADY_GONE)]
    try:
        await history.forget(
            repository,
            tags=[t for d in gone if d.action is Action.UNTAG for t in d.tags],
            digests=[d.digest for d in gone if d.action is not Action.UNTAG],
        )
    except StateError as exc:
        log.warning("%s: history not updated after the prune: %s", repository, exc)
