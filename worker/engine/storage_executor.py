"""The only code that deletes on the registry's filesystem: a plan carried out on storage.

Inside a maintenance window, with the registry verified read-only
(:mod:`worker.maintenance.storage_prune`), a plan is carried out by doing to the
storage what the registry's own DELETE does (distribution 2.8.2 and 3.1.0,
``registry/handlers/manifests.go`` and ``registry/storage/``; compared file by file
on both binaries in ``tests/test_storage_prune.py``):

- a manifest deleted by digest loses its revision's ``link`` (the directory stays,
  as the registry leaves it: ``linkedBlobStatter.Clear`` removes the file), on 2.8 its
  ``_layers`` link too where one exists (2.8's manifest store clears both, because
  2.1.0 linked manifests into ``_layers``), and then every tag directory whose
  ``current/link`` holds the digest (``tagStore.Lookup`` then ``Untag``);
- a tag-only removal (invariant 2) removes that one tag directory: 3.x's
  ``DELETE /v2/<name>/manifests/<tag>``, and what 2.8's placeholder method leaves
  in the registry's view (the placeholder itself never exists here).

A tag directory is removed by moving it out of the registry's tree in one rename
(:class:`Trash`), emptied later.

A digest the registry would answer 404 for is left as the API leaves it (its tags
included): already gone.

Safety as on the API path (:mod:`worker.engine.executor`): before the first removal
every tag link of the repository is read again, and a tag the plan neither keeps
nor removes, or a kept tag on another digest, stops the whole run (something writes
to a storage that should be read-only); a digest a remaining tag needs is never
removed; deletions go level by level, a child or referrer only after its parent's
removal succeeded. Every deletion's audit record is made durable before its files
are touched and settled after, so ``regsweep restore`` puts it back like any other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NamedTuple

from worker.engine.executor import ExecutionReport, Status, deletions_log
from worker.engine.plan import Action, Deletion, Plan, dependency_levels
from worker.errors import StateError
from worker.oci import Digest, Manifest
from worker.registry.storage import RegistryStorage
from worker.store.audit import AuditEntry, AuditLog, Outcome, Settlement

log = logging.getLogger(__name__)

#: Deletions recorded, removed and settled together: one durable audit write for each.
STORAGE_WAVE: Final = 1000
#: How a deletion left because the run stopped before it is reported (then its reason).
NOT_ATTEMPTED: Final = "not attempted: "
#: At the storage root, beside ``docker/``: the tag directories removed, until emptied.
TRASH: Final = "regsweep-trash"
#: Said in each settled record, so the audit tells a storage deletion from an API one.
REMOVED_FROM_STORAGE: Final = "removed from storage (storage-level prune)"

ProgressCallback = Callable[[Deletion, Status], None]
#: Why a manifest that is also a blob of its repository stays when the version is unknown.
UNKNOWN_LAYER_LINK: Final = (
    "its digest is also a blob of the repository (a _layers link), which 2.8's DELETE removes "
    "and 3.x's keeps; the registry's version is unknown (maintenance.registry_version), so "
    "it is left for a prune through the API"
)


class _Result(NamedTuple):
    status: Status
    detail: str = ""
    #: Where it is not the status's own: files half removed are restorable, never "not done".
    outcome: Outcome | None = None

    @property
    def settled(self) -> Outcome:
        if self.outcome is not None:
            return self.outcome
        if self.status is Status.DELETED:
            return Outcome.DELETED
        if self.status is Status.ALREADY_GONE:
            return Outcome.ALREADY_GONE
        return Outcome.NOT_DONE


_GONE: Final = frozenset({Status.DELETED, Status.ALREADY_GONE})


@dataclass
class _Tags:
    """The repository's tags as its links say now, both ways, kept in step with removals."""

    by_tag: dict[str, Digest]
    by_digest: dict[Digest, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tag, digest in self.by_tag.items():
            self.by_digest.setdefault(digest, set()).add(tag)

    def removed(self, tag: str) -> None:
        digest = self.by_tag.pop(tag, None)
        if digest is not None:
            self.by_digest.get(digest, set()).discard(tag)


@dataclass
class _Run:
    plan: Plan
    manifests: Mapping[Digest, Manifest]
    job_id: str
    tags: _Tags
    protected: frozenset[Digest]
    trash: Trash
    statuses: dict[Digest, Status] = field(default_factory=dict)
    fatal: str | None = None

    def blocked(self, deletion: Deletion) -> tuple[Status, str] | None:
        if self.fatal is not None:
            return Status.ERROR, NOT_ATTEMPTED + self.fatal
        staying = [p for p in deletion.parents if self.statuses.get(p) not in _GONE]
        if staying:
            return Status.SKIPPED, f"{staying[0]}, which it depends on, was not deleted"
        if deletion.action is not Action.UNTAG and deletion.digest in self.protected:
            return Status.SKIPPED, f"{deletion.digest} is needed by a remaining tag; left alone"
        return None


class StorageExecutor:
    """Carries out plans on ``storage``. ``layers_links``: the registry is distribution 2.8,
    whose DELETE also removes a ``_layers`` link of the manifest's digest (True), or 3.x,
    whose DELETE leaves it (False). Unknown (None): a manifest whose digest is also a blob
    of the repository is left alone, for the two would differ on it (a blob link another
    image may need)."""

    def __init__(
        self,
        storage: RegistryStorage,
        audit: AuditLog,
        *,
        layers_links: bool | None,
        wave_size: int = STORAGE_WAVE,
        on_progress: ProgressCallback | None = None,
        halt: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self._storage = storage
        #: Asked before each wave: why to stop (the window lost its lock, the registry takes
        #: writes again), or None to go on.
        self._halt = halt
        self._audit = audit
        self._layers_links = layers_links
        self._wave_size = max(1, wave_size)
        self._on_progress = on_progress

    async def run(
        self, plan: Plan, manifests: Mapping[Digest, Manifest], *, job_id: str
    ) -> ExecutionReport:
        report = ExecutionReport(plan.repository, job_id)
        live = await asyncio.to_thread(self._live_tags, plan.repository, manifests)
        trash = Trash(self._storage.root, job_id)
        run = _Run(plan, manifests, job_id, _Tags(live), _protected(plan, live), trash)
        run.fatal = _changed(plan, live)
        depth = dependency_levels(plan.deletions)
        for level in sorted(set(depth.values())):
            deletions = [d for d in plan.deletions if depth[d] == level]
            for start in range(0, len(deletions), self._wave_size):
                await self._wave(run, deletions[start : start + self._wave_size], report)
        report.fatal = run.fatal
        return report

    def _live_tags(self, repository: str, known: Mapping[Digest, Manifest]) -> dict[str, Digest]:
        """Every tag the registry would answer for now. A tag whose manifest it would not
        serve (its link names a digest without a revision) is no tag to the API either."""
        stored = self._storage.tags(repository, self._storage.tag_names(repository))
        return {
            tag: link.digest
            for tag, link in stored.items()
            if link.digest in known or self._present(repository, link.digest)
        }

    def _present(self, repository: str, digest: Digest) -> bool:
        """Whether the registry would serve ``digest`` in ``repository`` (on 2.8 a
        ``_layers`` link is looked at too, as its manifest store does; with the version
        unknown too, so a tag on it counts as live and protects it)."""
        if self._storage.has_revision(repository, digest):
            return True
        return self._layers_links is not False and self._storage.has_layer_link(repository, digest)

    async def _wave(self, run: _Run, wave: Sequence[Deletion], report: ExecutionReport) -> None:
        """Record, remove, settle: the wave's intents are durable before any file goes."""
        if run.fatal is None and self._halt is not None:
            run.fatal = await self._halt()
        attempted: list[tuple[Deletion, AuditEntry]] = []
        for deletion in wave:
            blocked = run.blocked(deletion)
            if blocked is not None:
                self._note(run, report, deletion, *blocked)
            else:
                attempted.append(
                    (deletion, audit_entry(run.plan, deletion, run.manifests, run.job_id))
                )
        if not attempted:
            return
        try:
            await self._audit.intend([entry for _, entry in attempted])
        except StateError as exc:
            run.fatal = f"the audit ({self._audit.location}) cannot be written: {exc}"
            for deletion, _ in attempted:
                self._note(run, report, deletion, Status.ERROR, "not deleted: " + run.fatal)
            return
        results = await asyncio.to_thread(self._remove_all, run, [d for d, _ in attempted])
        settled = []
        for (deletion, entry), result in zip(attempted, results, strict=True):
            self._note(run, report, deletion, result.status, result.detail)
            detail = result.detail or REMOVED_FROM_STORAGE
            settled.append(Settlement.of(entry, result.settled, detail))
        try:
            await self._audit.settle(settled)
        except StateError as exc:
            run.fatal = f"the audit ({self._audit.location}) cannot be written: {exc}"

    def _note(
        self, run: _Run, report: ExecutionReport, deletion: Deletion, status: Status, detail: str
    ) -> None:
        if deletion.action is not Action.UNTAG:
            run.statuses[deletion.digest] = status
        report.done.append((deletion, status, detail))
        _log_deletion(run, deletion, status, detail)
        if self._on_progress is not None:
            self._on_progress(deletion, status)

    # -- the files (in a thread) ---------------------------------------------------------

    def _remove_all(self, run: _Run, deletions: Sequence[Deletion]) -> list[_Result]:
        return [self._remove(run, d) for d in deletions]

    def _remove(self, run: _Run, deletion: Deletion) -> _Result:
        if deletion.action is Action.UNTAG:
            return self._untag(run, deletion)
        return self._delete(run, deletion.digest)

    def _untag(self, run: _Run, deletion: Deletion) -> _Result:
        (tag,) = deletion.tags
        current = run.tags.by_tag.get(tag)
        if current is None:
            return _Result(Status.ALREADY_GONE)
        if current != deletion.digest:
            return _Result(Status.SKIPPED, f"{tag} now points at {current}, not {deletion.digest}")
        try:
            run.trash.take(self._storage.tag_directory(run.plan.repository, tag))
        except OSError as exc:
            return _Result(Status.ERROR, _failed(exc))
        run.tags.removed(tag)
        return _Result(Status.DELETED)

    def _delete(self, run: _Run, digest: Digest) -> _Result:
        """What the registry's DELETE by digest does, file for file."""
        repository = run.plan.repository
        links = [self._storage.revision_link(repository, digest)]
        layer_link = self._storage.layer_link(repository, digest)
        if self._layers_links:
            links.append(layer_link)
        try:
            if self._layers_links is None and layer_link.is_file():
                return _Result(Status.SKIPPED, UNKNOWN_LAYER_LINK)
            present = [link for link in links if link.is_file()]
            if not present:
                return _Result(Status.ALREADY_GONE)
            for link in present:
                _remove_file(link)
        except OSError as exc:
            return _Result(Status.ERROR, _failed(exc))
        for tag in sorted(run.tags.by_digest.get(digest, set())):
            try:
                run.trash.take(self._storage.tag_directory(repository, tag))
            except OSError as exc:
                # The manifest is gone already: what is left is a tag the registry lists
                # and answers 404 for. Restorable, and said.
                return _Result(Status.ERROR, f"tag {tag} left: {_failed(exc)}", Outcome.DELETED)
            run.tags.removed(tag)
        return _Result(Status.DELETED)


def _protected(plan: Plan, live: Mapping[str, Digest]) -> frozenset[Digest]:
    """What must stay: the plan's closure, and the digest of every tag it does not remove."""
    removed = {t for d in plan.deletions for t in d.tags}
    return plan.protected_digests | {d for t, d in live.items() if t not in removed}


def _changed(plan: Plan, live: Mapping[str, Digest]) -> str | None:
    """Why the storage no longer is what the plan was made from, if it is not: a tag the
    plan neither keeps nor removes, or a kept tag on another digest."""
    removed = {t for d in plan.deletions for t in d.tags}
    kept = {k.tag: k.digest for k in plan.kept}
    new = sorted(t for t in live if t not in kept and t not in removed)
    moved = sorted(t for t, d in kept.items() if t in live and live[t] != d)
    if not new and not moved:
        return None
    named = ", ".join([*new, *moved][:5])
    return (
        f"the storage of {plan.repository} changed since its plan (tags {named}): something "
        "writes to it while the registry should refuse writes; nothing removed from it"
    )


def audit_entry(
    plan: Plan, deletion: Deletion, manifests: Mapping[Digest, Manifest], job_id: str
) -> AuditEntry:
    """The same record as the API executor's, so ``regsweep restore`` reads it alike."""
    manifest = manifests.get(deletion.digest)
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
        job_id=job_id,
        manifest=manifest.raw if manifest else b"",
        parents=deletion.parents,
    )


def _remove_file(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return


def _remove_tree(path: Path) -> None:
    """``os.RemoveAll``, as the registry's filesystem driver deletes a tag."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        _remove_file(path)


class Trash:
    """Where removed tag directories go: one ``rename`` each, into :data:`TRASH` at the
    storage root, outside anything the registry reads.

    A rename takes the tag out of the registry's view at once and whole (a crash halfway
    through removing its files would leave a tag the registry lists and answers 404 for),
    and costs a fraction of removing the files: 1,990 tag directories took 1.0 s with
    ``rmtree`` here and 0.03 s renamed. :func:`empty_trash` removes them, after the
    registry is back (``worker.maintenance.storage_prune``), or at the next prune after a
    crash.
    """

    def __init__(self, root: Path, job_id: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in job_id)[:100]
        # One directory per run: a job prunes several repositories, each run counting from 1.
        self.directory = root / TRASH / f"{safe or 'job'}-{uuid.uuid4().hex[:12]}"
        self._count = 0

    def take(self, path: Path) -> None:
        if self._count == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        try:
            os.rename(path, self.directory / str(self._count))
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the storage root on another filesystem
                raise
            _remove_tree(path)


def empty_trash(root: Path) -> None:
    """Remove what storage prunes moved to :data:`TRASH` (their own, or a crashed one's)."""
    _remove_tree(root / TRASH)


def _failed(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"cannot remove {exc.filename}: {exc.strerror or exc}{f' ({name})' if name else ''}"


def _log_deletion(run: _Run, deletion: Deletion, status: Status, detail: str) -> None:
    """One line per deletion, as the API executor logs them, saying it was on storage."""
    if run.fatal is not None and run.fatal in detail:
        return
    plan = run.plan
    what = "tag" if deletion.action is Action.UNTAG else deletion.action.value
    tags = ", ".join(deletion.tags) or "no tags"
    message = (
        f"{status.value} from storage: {plan.repository} {what} {deletion.digest} ({tags}): "
        f"{deletion.reason}; policy {plan.policy}, job {run.job_id}"
    )
    deletions_log.log(
        logging.WARNING if status is Status.ERROR else logging.INFO,
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
            "storage": True,
        },
    )
