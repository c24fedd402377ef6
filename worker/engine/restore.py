"""Put back what regsweep deleted, from the audit log, until GC runs.

A restore starts from a digest (or a unique prefix of one) in a repository and
takes every job that removed it in a deletion no restore has put back yet (a
digest that lost tag ``a`` in one run and tag ``b`` in the next gets both
back). From those jobs' records it puts back the digest and everything removed
with it or because of it: every tag taken off that digest (a digest deletion
and any tag-only removals), its children and referrers (a fallback-tag index
and its entries included), and a child shared with another deleted index —
each manifest byte for byte, so its digest is the same, with its recorded
media type or, where the record has none, the one its bytes imply. A child the
registry no longer has because a later job deleted it (with the other index
that listed it) comes back too, from that job's record. Once everything is
back, the records it undid are marked restored in the audit (``audit`` shows
by which restore); when every deletion of the digest was restored already, a
restore does again what the latest job's records say.

Order is a graph, not a list: a manifest goes back after the manifests it
lists and after the subject it refers to (a registry refuses an index whose
children are missing). Nothing is moved: a tag that now points at another
digest stops the restore before anything is written, unless ``force`` (a tag
left on regsweep's own untag placeholder was removed, not moved). Every
tag put back is held first (every plan keeps a held tag), so the push
notifications the restore causes cannot have it deleted again; a restore that
fails takes back its holds on the tags it did not put back, and says what
stopped it (garbage collection only when the blobs are really gone).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from graphlib import CycleError, TopologicalSorter

from worker.errors import (
    ManifestUnknown,
    NothingToRestore,
    RegistryError,
    RegistryProtocolError,
    RestoreConflict,
    StateError,
)
from worker.oci import Manifest, parse_manifest
from worker.records import Hold
from worker.registry.client import RegistryClient
from worker.store.audit import AuditEntry, AuditLog, AuditQuery, Outcome, Restoration
from worker.store.history import History

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """One manifest of a restore and what became of it."""

    digest: str
    media_type: str
    #: Tags put back (or found already on it).
    tags: tuple[str, ...]
    action: str
    #: False: the registry still had it (a tag-only removal, or restored before).
    pushed: bool
    #: The jobs whose deletions this undid.
    jobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Item:
    """A digest to put back, with every tag the job removed from it."""

    entry: AuditEntry
    tags: tuple[str, ...]
    manifest: Manifest
    #: The jobs whose deletions it undoes.
    jobs: tuple[str, ...]


async def resolve_digest(audit: AuditLog, repository: str, digest: str) -> str:
    """The one audited digest in ``repository`` that ``digest`` (whole or a prefix) names."""
    found = {
        e.digest for e in await audit.entries(AuditQuery(repository=repository, digest=digest))
    }
    if not found:
        raise NothingToRestore(f"the audit has no deletion of {digest} in {repository}")
    if len(found) > 1:
        names = ", ".join(sorted(found)[:5])
        raise NothingToRestore(f"{digest} is ambiguous in {repository}: {names}")
    return found.pop()


async def restore(
    client: RegistryClient,
    audit: AuditLog,
    history: History,
    repository: str,
    digest: str,
    *,
    hold_for: timedelta,
    force: bool = False,
    job_id: str | None = None,
) -> list[Restored]:
    """Put back every deletion of ``digest`` (or a unique prefix) in ``repository`` that no
    restore has put back yet, whichever jobs made them; ``job_id`` names this restore."""
    job_id = job_id or f"restore-{uuid.uuid4().hex[:12]}"
    full = await resolve_digest(audit, repository, digest)
    chosen = await _chosen(audit, repository, full, job_id)
    items = _items(chosen.records, chosen.tags_from)
    await _add_missing_children(client, audit, repository, items)
    order = _order(items)
    await _refuse_clobbering(client, repository, items, force)
    until = datetime.now(UTC) + hold_for
    reason = f"restore of {full[:19]} from {_jobs_named(chosen.jobs)}"
    held = await _hold(history, repository, items, Hold("", until, reason))
    done: list[Restored] = []
    tagged: set[str] = set()
    for item in (items[d] for d in order):
        try:
            done.append(await _put_back(client, repository, item, tagged))
        except RegistryError as exc:
            await _release(history, repository, held, tagged)
            raise await _failure(client, repository, item, exc, done) from exc
    await _mark_restored(audit, [r for r in chosen.records if chosen.tags_from(r)], job_id)
    return done


@dataclass(frozen=True)
class _Chosen:
    """The records a restore works from, and whose tags it puts back."""

    records: list[AuditEntry]
    jobs: tuple[str, ...]
    #: Whether a record's tags go back (not those of a deletion an earlier restore undid).
    tags_from: Callable[[AuditEntry], bool]


async def _chosen(audit: AuditLog, repository: str, digest: str, job_id: str) -> _Chosen:
    """Every job with a deletion of ``digest`` no restore has put back (this restore's own,
    run again, counts as not yet), and their records of it and of what went because of
    it. When every deletion of it was put back already, the latest job's records again:
    a second restore puts back what the first did (a tag deleted by hand since, say)."""
    removals = await _removals(audit, repository, digest)
    if not removals:
        raise NothingToRestore(f"the audit has no completed deletion of {digest} in {repository}")

    def unrestored(entry: AuditEntry) -> bool:
        return entry.restored_by in ("", job_id)

    tags_from: Callable[[AuditEntry], bool] = unrestored
    if any(unrestored(e) for e in removals):
        jobs = sorted({e.job_id for e in removals if unrestored(e)})
    else:
        jobs = [max(removals, key=lambda e: e.time).job_id]
        tags_from = _every
    records: list[AuditEntry] = []
    for job in jobs:
        records += _related(
            await audit.entries(AuditQuery(job_id=job, repository=repository)), digest
        )
    return _Chosen(records, tuple(jobs), tags_from)


def _every(_: AuditEntry) -> bool:
    return True


def _jobs_named(jobs: Sequence[str]) -> str:
    return f"job {jobs[0]}" if len(jobs) == 1 else f"jobs {', '.join(jobs)}"


async def _removals(audit: AuditLog, repository: str, digest: str) -> list[AuditEntry]:
    """The records of ``digest`` being removed (or maybe removed), restored or not."""
    records = await audit.entries(AuditQuery(repository=repository, digest=digest))
    return [
        e
        for e in records
        if e.digest == digest and e.manifest and e.outcome is not Outcome.NOT_DONE
    ]


async def _latest_record(audit: AuditLog, repository: str, digest: str) -> AuditEntry | None:
    """The most recent record of ``digest`` being removed (or maybe removed), if any."""
    return max(await _removals(audit, repository, digest), key=lambda e: e.time, default=None)


async def _hold(
    history: History, repository: str, items: Mapping[str, _Item], hold: Hold
) -> dict[str, Hold | None]:
    """Hold every tag to put back (before the first PUT: the push notifications it causes
    must not have them deleted again); a longer hold already there stays. The holds that
    were there before, for undoing."""
    before = (await history.snapshot(repository)).holds
    tags = sorted({tag for item in items.values() for tag in item.tags})
    for tag in tags:
        earlier = before.get(tag)
        if earlier is None or earlier.until < hold.until:
            await history.hold(repository, replace(hold, tag=tag))
    return {tag: before.get(tag) for tag in tags}


async def _release(
    history: History, repository: str, held: Mapping[str, Hold | None], put_back: Iterable[str]
) -> None:
    """After a failed restore: no hold of its own on a tag it did not put back (what it did
    put back stays held: it is in the registry now, and must not be deleted again)."""
    back = set(put_back)
    for tag, earlier in held.items():
        if tag in back:
            continue
        if earlier is None:
            await history.unhold(repository, tag)
        else:
            await history.hold(repository, earlier)


async def _mark_restored(audit: AuditLog, records: Sequence[AuditEntry], job_id: str) -> None:
    """Note in the audit which deletions this restore put back. Everything is back already:
    a note that cannot be written is said, not a failed restore."""
    try:
        await audit.mark_restored([Restoration.of(e, job_id) for e in records])
    except StateError as exc:
        log.warning("restore %s: put back, but the audit does not say so: %s", job_id, exc)


async def _add_missing_children(
    client: RegistryClient, audit: AuditLog, repository: str, items: dict[str, _Item]
) -> None:
    """Add the children the items list that the registry no longer has and that another job
    deleted (a child shared with an index deleted later): the registry refuses an index
    whose children are missing. They come back by digest only; their own tags, if any,
    were not removed by this deletion."""
    todo = [c.digest for item in items.values() for c in item.manifest.children]
    while todo:
        digest = todo.pop()
        if digest in items or await client.head_manifest(repository, digest) is not None:
            continue
        record = await _latest_record(audit, repository, digest)
        if record is None:
            continue  # not regsweep's doing: the PUT of its index says what is missing
        manifest = parse_manifest(digest, record.media_type, record.manifest)
        items[digest] = _Item(record, (), manifest, (record.job_id,))
        todo.extend(c.digest for c in manifest.children)


def _related(job: Sequence[AuditEntry], digest: str) -> list[AuditEntry]:
    """The job's records of ``digest`` and of what was removed because of it, recursively:
    records whose parents (deleted indexes listing them, deleted subjects) are in the set."""
    usable = [
        e
        for e in job
        if e.manifest and e.outcome is not Outcome.NOT_DONE and e.rule != "placeholder"
    ]
    digests = {digest}
    while True:
        grown = digests | {e.digest for e in usable if digests.intersection(e.parents)}
        if grown == digests:
            return [e for e in usable if e.digest in digests]
        digests = grown


def _items(
    records: Iterable[AuditEntry], tags_from: Callable[[AuditEntry], bool] = _every
) -> dict[str, _Item]:
    """One item per digest, with the tags of every record of it (tag-only removals too)
    whose tags go back."""
    grouped: dict[str, list[AuditEntry]] = {}
    for record in records:
        grouped.setdefault(record.digest, []).append(record)
    items: dict[str, _Item] = {}
    for digest, found in grouped.items():
        principal = next((e for e in found if e.action != "untag"), found[0])
        tags = tuple(sorted({t for e in found if tags_from(e) for t in e.tags}))
        jobs = tuple(sorted({e.job_id for e in found if tags_from(e)})) or (principal.job_id,)
        manifest = parse_manifest(digest, principal.media_type, principal.manifest)
        items[digest] = _Item(principal, tags, manifest, jobs)
    return items


def _order(items: Mapping[str, _Item]) -> list[str]:
    """Digests so that each comes after what it lists and after its subject."""
    graph = TopologicalSorter[str]()
    for digest, item in sorted(items.items()):
        needs = [c.digest for c in item.manifest.children]
        if item.manifest.subject:
            needs.append(item.manifest.subject)
        graph.add(digest, *sorted(d for d in needs if d in items and d != digest))
    try:
        return list(graph.static_order())
    except CycleError as exc:
        raise RegistryProtocolError(f"the recorded manifests refer to each other: {exc}") from exc


async def _refuse_clobbering(
    client: RegistryClient, repository: str, items: Mapping[str, _Item], force: bool
) -> None:
    """Stop before writing anything when a tag to restore now points elsewhere."""
    if force:
        return
    moved: list[str] = []
    for digest, item in sorted(items.items()):
        for tag in item.tags:
            now = await client.head_manifest(repository, tag)
            if now is None or now.digest == digest:
                continue
            if not await _on_placeholder(client, repository, now.digest):
                moved.append(f"{tag} (now {now.digest[:19]})")
    if moved:
        raise RestoreConflict(
            f"{repository}: not restored, these tags now point elsewhere: {', '.join(moved)}; "
            "--force moves them back"
        )


async def _on_placeholder(client: RegistryClient, repository: str, digest: str) -> bool:
    """Whether ``digest`` is regsweep's own placeholder of a tag removal whose last step (the
    placeholder's deletion) did not happen: the tag on it was removed, not moved."""
    try:
        return (await client.get_manifest(repository, digest)).is_placeholder
    except ManifestUnknown:
        return False


async def _put_back(
    client: RegistryClient, repository: str, item: _Item, tagged: set[str]
) -> Restored:
    """PUT the recorded bytes by digest (unless the registry has them) and under each tag
    (each one added to ``tagged`` once it is back), with the media type the record has
    or, for a record without one (a child whose index descriptor left it out), the one
    its bytes imply."""
    entry, media_type = item.entry, item.manifest.media_type
    pushed = await client.head_manifest(repository, entry.digest) is None
    if pushed:
        stored = await client.put_manifest(repository, entry.digest, media_type, entry.manifest)
        if stored != entry.digest:
            raise RegistryProtocolError(f"{entry.digest} came back as {stored}")
    for tag in item.tags:
        await client.put_manifest(repository, tag, media_type, entry.manifest)
        tagged.add(tag)
    return Restored(entry.digest, media_type, item.tags, entry.action, pushed, item.jobs)


async def _failure(
    client: RegistryClient,
    repository: str,
    item: _Item,
    exc: RegistryError,
    done: Sequence[Restored],
) -> RegistryError:
    """What stopped the restore at ``item``, said as it is, and what it had put back."""
    cause = await _cause(client, repository, item, exc)
    if done:
        before = ", ".join(r.digest[:19] for r in done)
        so_far = f"; put back before it (and held): {before}"
    else:
        so_far = "; nothing was put back or held"
    return RegistryError(
        f"cannot restore {item.entry.digest} in {repository}: {cause}{so_far}",
        status=exc.status,
        codes=exc.codes,
    )


async def _cause(client: RegistryClient, repository: str, item: _Item, exc: RegistryError) -> str:
    """GC is named only when the registry really lacks the manifest's blobs; a missing child
    or a refused manifest is said as such, and a registry that could not be asked (down,
    read-only, credentials) is what its error says."""
    if not isinstance(exc, (ManifestUnknown, RegistryProtocolError)):
        return str(exc)
    manifest = item.manifest
    try:
        gone = [
            b.digest for b in manifest.blobs if not await client.blob_exists(repository, b.digest)
        ]
        missing = [
            c.digest
            for c in manifest.children
            if await client.head_manifest(repository, c.digest) is None
        ]
    except RegistryError as look:
        return f"{exc} (and whether its blobs are still there could not be asked: {look})"
    if gone:
        return (
            f"the registry no longer has {len(gone)} of its blobs ({_shortened(gone)}): "
            "garbage collection has removed them since the deletion, so it cannot come back "
            "from the audit; push it again from its source"
        )
    if missing:
        return f"the manifests it lists are not in the registry ({_shortened(missing)}): {exc}"
    return f"the registry refused the recorded manifest (as {manifest.media_type!r}): {exc}"


def _shortened(digests: Sequence[str]) -> str:
    shown = ", ".join(d[:19] for d in digests[:3])
    return shown + (f" and {len(digests) - 3} more" if len(digests) > 3 else "")
