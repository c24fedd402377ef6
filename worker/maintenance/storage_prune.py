"""The storage-level prune: a maintenance window's step, with the registry read-only.

``maintenance.storage_prune: true`` (every window) or ``regsweep gc --storage-prune`` (one):

    guards ─► the registry refuses a write (the window switched it; probed again here)
             its config: filesystem driver, deletes enabled, no Redis blob-descriptor cache
             its version (2.8's DELETE clears a _layers link too; 3.x's does not; unknown:
             a manifest that is also a blob of its repository is left alone)
             the storage agrees with the API: catalog, tags, every tag's digest
    empty repositories (opt-in): _manifests, _layers, _uploads taken out, never the directory
    per repository a policy enforces: storage inventory ─► plan ─► storage executor
             (intent audited, files removed as the API's DELETE would, settled)
    after the switch back (a restart: its caches are gone): the removed manifests answer 404

When GC collects what it removed is ``maintenance.gc_grace``. By default the window
runs GC *before* the storage prune, so this window's deletions wait for the next
window's GC and ``regsweep restore`` puts them back meanwhile; with ``gc_grace: 0``
the prune comes first and this window's GC collects them (``docs/safety.md``).

A repository whose prune still holds its lock (it outlasted the window's wait) is left
to that prune, which meets the read-only registry and defers. A guard that refuses
stops the whole prune before anything is removed and fails the window's job, loudly:
the operator asked for it and it did not happen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from worker.engine.executor import ExecutionReport, Status
from worker.engine.plan import Action
from worker.engine.planner import plan
from worker.engine.policy import Mode
from worker.engine.storage_executor import (
    NOT_ATTEMPTED,
    STORAGE_WAVE,
    UNKNOWN_LAYER_LINK,
    StorageExecutor,
    empty_trash,
)
from worker.engine.storage_inventory import StorageInventoryBuilder
from worker.errors import (
    RegistryError,
    RegsweepError,
    StateError,
    StorageError,
    StoragePruneRefused,
)
from worker.maintenance.controllers import RegistryController
from worker.maintenance.probe import RegistryProbe, WriteState
from worker.maintenance.report import GcReport
from worker.maintenance.storage_guards import cross_check, read_registry_config
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage, layout_problem
from worker.settings.model import Config
from worker.store.history import History
from worker.store.keys import Keys
from worker.store.locks import held_repositories
from worker.store.open import Stores
from worker.store.redis import RedisClient

log = logging.getLogger("regsweep.gc")

T = TypeVar("T")

#: The write probe is asked again before a repository's removals, and before each wave of
#: them, once this much time has passed since it last answered "read-only".
REVERIFY_EVERY: Final = 1.0
#: Removals made durable in the audit, then carried out, at a time (one probe between waves).
WAVE: Final = STORAGE_WAVE
#: Repositories planned and pruned at once (as :mod:`worker.engine.prune` plans them).
REPOSITORY_PARALLELISM: Final = 4
#: Removed manifests asked for after the restart (each must answer 404).
RESTART_SAMPLE: Final = 50
#: What empties a repository takes out of it; never the directory, which may hold others.
EMPTY_PARTS: Final = ("_manifests", "_layers", "_uploads")


@dataclass
class StoragePruneResult:
    """What one storage prune did, for the window's report."""

    refused: str | None = None
    repositories: int = 0
    pruned: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(map(str, Status), 0))
    tags_removed: int = 0
    manifests_removed: int = 0
    #: Repositories left alone: no plan (unreadable), a prune holding them, a run that stopped.
    failures: list[str] = field(default_factory=list)
    empty_repositories_removed: list[str] = field(default_factory=list)
    check_seconds: float = 0.0
    prune_seconds: float = 0.0
    #: Emptying the trash (:class:`~worker.engine.storage_executor.Trash`), after the restart.
    trash_seconds: float = 0.0
    #: Manifests removed, a few, for the check after the restart.
    removed_sample: list[tuple[str, str]] = field(default_factory=list)
    still_served: list[str] = field(default_factory=list)

    def add(self, report: ExecutionReport) -> None:
        for deletion, status, detail in report.done:
            self.counts[str(status)] += 1
            if status is Status.ERROR and not (report.fatal and detail.startswith(NOT_ATTEMPTED)):
                self.failures.append(f"{report.repository}@{deletion.digest}: {detail}")
            if status is not Status.DELETED:
                continue
            self.tags_removed += len(deletion.tags)
            if deletion.action is not Action.UNTAG:
                self.manifests_removed += 1
                if len(self.removed_sample) < RESTART_SAMPLE:
                    self.removed_sample.append((report.repository, deletion.digest))
        if report.fatal:
            self.failures.append(f"{report.repository}: {report.fatal}")

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("removed_sample")
        data["pruned"] = sorted(self.pruned)
        data["check_seconds"] = round(self.check_seconds, 3)
        data["prune_seconds"] = round(self.prune_seconds, 3)
        data["trash_seconds"] = round(self.trash_seconds, 3)
        return data


class StoragePrune:
    """The window's storage-level prune (see the module docstring), which
    :func:`worker.maintenance.job.open_maintenance` gives the window when it is asked for."""

    def __init__(
        self,
        config: Config,
        controller: RegistryController,
        probe: RegistryProbe,
        redis_client: RedisClient,
        *,
        keys: Keys,
        prefix: str,
    ) -> None:
        self._config = config
        self._controller = controller
        self._probe = probe
        self._redis = redis_client
        self._keys = keys
        self._prefix = prefix
        self.result = StoragePruneResult()
        self._last_verified = 0.0
        self._probing = threading.Lock()

    # -- the window's two calls ---------------------------------------------------------

    def run(self, report: GcReport, stop: threading.Event) -> None:
        """Prune on storage now (the registry is read-only); the outcome goes on ``report``."""
        started = time.monotonic()
        try:
            layers = self._guard(report)
            _in_thread(self._prune(report.job_id, layers, stop))
        except StoragePruneRefused as exc:
            self.result.refused = str(exc)
            report.errors.append(f"storage prune refused: {exc}")
            log.error("GC job %s: storage prune refused: %s", report.job_id, exc)
        except RegsweepError as exc:
            report.errors.append(f"storage prune stopped: {exc}")
            log.error("GC job %s: storage prune stopped: %s", report.job_id, exc)
        finally:
            self.result.prune_seconds = time.monotonic() - started - self.result.check_seconds
            report.storage_prune = self.result.summary()
        failures = self.result.failures
        if failures and self.result.refused is None:
            report.errors.append(f"storage prune: {len(failures)} problems: {failures[0]}")

    def after_restart(self, report: GcReport) -> None:
        """The registry restarted read-write: what the prune removed must answer 404 (an
        in-memory cache would still answer for it; a restart empties it). Then the tag
        directories the prune moved out of the registry's tree are removed for good."""
        self._empty_trash()
        report.storage_prune = self.result.summary()
        sample = self.result.removed_sample
        if not sample:
            return
        try:
            served = _in_thread(self._still_served(sample))
        except RegistryError as exc:
            report.warnings.append(f"what the storage prune removed was not asked for: {exc}")
            return
        self.result.still_served = served
        report.storage_prune = self.result.summary()
        if served:
            report.errors.append(
                f"after the restart the registry still serves {len(served)} manifests the "
                f"storage prune removed ({', '.join(served[:3])}): it was not restarted, or a "
                "cache answers for them; restart it"
            )

    # -- guards -------------------------------------------------------------------------

    def _guard(self, report: GcReport) -> bool | None:
        """Refuse unless everything holds that the prune needs; whether a manifest's
        ``_layers`` link goes with it (2.8), stays (3.x), or is unknown (None)."""
        if report.writes_while_readonly != WriteState.READ_ONLY.value:
            raise StoragePruneRefused(
                f"read-only is not verified (the write probe answered "
                f"{report.writes_while_readonly or 'nothing'}): regsweep's registry account "
                "needs push rights on regsweep/write-probe for the probe to tell"
            )
        if self._config.registry.storage_path is None:
            raise StoragePruneRefused("registry.storage_path is not set")
        layout = layout_problem(self._config.registry.storage_path)
        if layout is not None:
            raise StoragePruneRefused(f"registry.storage_path {layout}")
        settings = self._config.maintenance.controller
        problem = read_registry_config(settings, self._controller).problem()
        if problem is not None:
            raise StoragePruneRefused(problem)
        major = (report.registry_version or "").split(".")[0]
        if not major.isdigit():
            log.warning(
                "GC job %s: the registry's version is unknown: %s",
                report.job_id,
                UNKNOWN_LAYER_LINK,
            )
            return None
        return int(major) < 3

    def _verify_readonly(self) -> None:
        """A write must be refused right now; asked again once :data:`REVERIFY_EVERY` passed
        (one probe at a time: repositories are pruned side by side)."""
        with self._probing:
            self._verify_readonly_locked()

    def _verify_readonly_locked(self) -> None:
        if time.monotonic() - self._last_verified < REVERIFY_EVERY:
            return
        state = self._probe.write_state()
        if state is not WriteState.READ_ONLY:
            raise StoragePruneRefused(
                f"the registry no longer refuses writes (the write probe answered {state}): "
                "the storage prune stopped before removing more"
            )
        self._last_verified = time.monotonic()

    # -- the prune ----------------------------------------------------------------------

    async def _prune(self, job_id: str, layers: bool | None, stop: threading.Event) -> None:
        config = self._config
        assert config.registry.storage_path is not None  # checked by _guard
        storage = RegistryStorage(config.registry.storage_path)
        await asyncio.to_thread(self._empty_trash)  # a crashed prune's, if any
        stores = Stores.open(config, prefix=self._prefix)
        try:
            async with RegistryClient.from_settings(config.registry) as client:
                await stores.check()
                await asyncio.to_thread(self._verify_readonly_now)
                repositories = await self._checked(client, storage)
                await asyncio.to_thread(self._remove_empty, storage, repositories)

                halted: list[str] = []

                async def halt() -> str | None:
                    """Before each repository's removals and each wave of them: the lock still
                    held, writes still refused. The first reason stops every repository."""
                    if not halted:
                        if stop.is_set():
                            halted.append("the maintenance window lost its lock")
                        else:
                            try:
                                await asyncio.to_thread(self._verify_readonly)
                            except RegsweepError as exc:  # refused, or the probe cannot ask
                                halted.append(str(exc))
                    return halted[0] if halted else None

                executor = StorageExecutor(
                    storage, stores.audit, layers_links=layers, wave_size=WAVE, halt=halt
                )
                gate = asyncio.Semaphore(REPOSITORY_PARALLELISM)

                async def one(repository: str) -> None:
                    async with gate:
                        builder = StorageInventoryBuilder(
                            client,
                            storage,
                            layers_count=bool(layers),
                            history=stores.history,
                            audit=stores.audit,
                        )
                        await self._one(
                            repository,
                            builder,
                            executor,
                            history=stores.history,
                            halt=halt,
                            job_id=job_id,
                        )

                # Every repository's run ends on its own: one failing never cancels another
                # between removing files and settling their audit records.
                runs = (one(r) for r in repositories)
                ended = await asyncio.gather(*runs, return_exceptions=True)
                for repository, outcome in zip(repositories, ended, strict=True):
                    if isinstance(outcome, RegsweepError):
                        self.result.failures.append(f"{repository}: {outcome}")
                    elif isinstance(outcome, BaseException):
                        raise outcome
                if halted:
                    raise StorageError(halted[0])
            await asyncio.to_thread(self._verify_readonly_now)
        finally:
            await stores.aclose()

    async def _checked(self, client: RegistryClient, storage: RegistryStorage) -> list[str]:
        """The repositories to prune (enforced by a policy, no prune holding them), once the
        storage is found to agree with the API."""
        started = time.monotonic()
        catalog = await client.catalog()
        governed = [r for r in sorted(catalog) if self._enforced(r)]
        await cross_check(client, storage, governed)
        self.result.check_seconds = time.monotonic() - started
        busy = await asyncio.to_thread(self._busy)
        for repository in sorted(busy.intersection(governed)):
            self.result.failures.append(f"{repository}: a prune still holds it; left to it")
        chosen = [r for r in governed if r not in busy]
        self.result.repositories = len(chosen)
        return chosen

    def _enforced(self, repository: str) -> bool:
        policy = self._config.policy_for(repository)
        return policy is not None and policy.mode is Mode.ENFORCE

    def _busy(self) -> set[str]:
        """Repositories whose prune lock is held now."""
        return set(held_repositories(self._redis, self._keys))

    async def _one(
        self,
        repository: str,
        builder: StorageInventoryBuilder,
        executor: StorageExecutor,
        *,
        history: History,
        halt: Callable[[], Awaitable[str | None]],
        job_id: str,
    ) -> None:
        policy = self._config.policy_for(repository)
        assert policy is not None  # only governed repositories get here
        now = datetime.now(UTC)
        try:
            inventory = await builder.take(repository, policy, now=now)
        except (RegistryError, StorageError, StateError) as exc:
            self.result.failures.append(f"{repository}: not planned: {exc}")
            return
        planned = plan(inventory, policy, now)
        if planned.is_empty:
            return
        reason = await halt()
        if reason is not None:
            self.result.failures.append(f"{repository}: not pruned: {reason}")
            return
        report = await executor.run(planned, inventory.manifests, job_id=job_id)
        self.result.pruned.append(repository)
        self.result.add(report)
        gone = [d for d, s, _ in report.done if s in (Status.DELETED, Status.ALREADY_GONE)]
        try:
            await history.forget(
                repository,
                tags=[t for d in gone if d.action is Action.UNTAG for t in d.tags],
                digests=[d.digest for d in gone if d.action is not Action.UNTAG],
            )
        except StateError as exc:
            log.warning("%s: history not updated after the storage prune: %s", repository, exc)

    def _empty_trash(self) -> None:
        path = self._config.registry.storage_path
        if path is None:
            return
        started = time.monotonic()
        try:
            empty_trash(Path(path))
        except OSError as exc:
            log.warning("the storage prune's trash is left (the next prune empties it): %s", exc)
        self.result.trash_seconds += time.monotonic() - started

    def _verify_readonly_now(self) -> None:
        self._last_verified = 0.0
        self._verify_readonly()

    def _remove_empty(self, storage: RegistryStorage, repositories: Sequence[str]) -> None:
        """Opt-in (``maintenance.remove_empty_repositories``): a repository with no tag and no
        manifest loses ``_manifests``, ``_layers`` and ``_uploads`` (the catalog stops
        listing it); its directory stays, nested repositories live in it. Emptied by an
        earlier window, or by prunes before this one: what this prune empties waits for
        the next window, so nothing restorable loses its ``_layers``."""
        if not self._config.maintenance.remove_empty_repositories:
            return
        for repository in repositories:
            if storage.tag_names(repository) or storage.revisions(repository):
                continue
            self._verify_readonly()
            base = storage.repository_path(repository)
            try:
                for part in EMPTY_PARTS:
                    _take_out(base / part)
            except OSError as exc:
                self.result.failures.append(f"{repository}: empty, not removed: {exc}")
                continue
            self.result.empty_repositories_removed.append(repository)
            log.info("empty repository %s: %s removed", repository, ", ".join(EMPTY_PARTS))

    async def _still_served(self, sample: Sequence[tuple[str, str]]) -> list[str]:
        async with RegistryClient.from_settings(self._config.registry) as client:
            heads = await asyncio.gather(*(client.head_manifest(r, d) for r, d in sample))
        return [f"{r}@{d[:19]}" for (r, d), head in zip(sample, heads, strict=True) if head]


def _in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on a loop of its own: the window is synchronous, and may itself be
    called from a running loop (``regsweep gc``)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage-prune") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _take_out(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
