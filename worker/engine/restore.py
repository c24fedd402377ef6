"""Put back what one recorded deletion removed, from the audit log, until GC runs.

A restore starts from a digest (or a unique prefix of one) in a repository and
takes the most recent job that removed it. From that job's records it puts
back the digest and everything removed with it or because of it: every tag
taken off that digest (a digest deletion and any tag-only removals), its
children and referrers (a fallback-tag index and its entries included), and
a child shared with another deleted index — each manifest byte for byte, so
its digest is the same. A child the registry no longer has because a later
job deleted it (with the other index that listed it) comes back too, from
that job's record.

Order is a graph, not a list: a manifest goes back after the manifests it
lists and after the subject it refers to (a registry refuses an index whose
children are missing). Nothing is moved: a tag that now points at another
digest stops the restore before anything is written, unless ``force`` (a tag
left on regsweep's own untag placeholder was removed, not moved). Every
tag put back is held first (every plan keeps a held tag), so the push
notifications the restore causes cannot have it deleted again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from graphlib import CycleError, TopologicalSorter

from worker.engine.model import Hold, Manifest, parse_manifest
from worker.errors import (
    ManifestUnknown,
    NothingToRestore,
    RegistryError,
    RegistryProtocolError,
    RestoreConflict,
)
from worker.registry.client import RegistryClient
from worker.store.audit import AuditEntry, AuditLog, AuditQuery, Outcome
from worker.store.history import History


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


@dataclass(frozen=True)
class _Item:
    """A digest to put back, with every tag the job removed from it."""

    entry: AuditEntry
    tags: tuple[str, ...]
    manifest: Manifest


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
) -> list[Restored]:
    """Put back the most recent deletion of ``digest`` (or a unique prefix) in ``repository``."""
    full = await resolve_digest(audit, repository, digest)
    root = await _latest_removal(audit, repository, full)
    job = await audit.entries(AuditQuery(job_id=root.job_id, repository=repository))
    items = _items(_related(job, full))
    await _add_missing_children(client, audit, repository, items)
    order = _order(items)
    await _refuse_clobbering(client, repository, items, force)
    until = datetime.now(UTC) + hold_for
    reason = f"restore of {full[:19]} from job {root.job_id}"
    for item in items.values():
        for tag in item.tags:
            await history.hold(repository, Hold(tag, until, reason))
    return [await _put_back(client, repository, items[d]) for d in order]


async def _latest_removal(audit: AuditLog, repository: str, digest: str) -> AuditEntry:
    removal = await _latest_record(audit, repository, digest)
    if removal is None:
        raise NothingToRestore(f"the audit has no completed deletion of {digest} in {repository}")
    return removal


async def _latest_record(audit: AuditLog, repository: str, digest: str) -> AuditEntry | None:
    """The most recent record of ``digest`` being removed (or maybe removed), if any."""
    records = await audit.entries(AuditQuery(repository=repository, digest=digest))
    removals = [
        e
        for e in records
        if e.digest == digest and e.manifest and e.outcome is not Outcome.NOT_DONE
    ]
    return max(removals, key=lambda e: e.time, default=None)


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
        items[digest] = _Item(record, (), manifest)
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


def _items(records: Iterable[AuditEntry]) -> dict[str, _Item]:
    """One item per digest, with the tags of every record of it (tag-only removals too)."""
    grouped: dict[str, list[AuditEntry]] = {}
    for record in records:
        grouped.setdefault(record.digest, []).append(record)
    items: dict[str, _Item] = {}
    for digest, found in grouped.items():
        principal = next((e for e in found if e.action != "untag"), found[0])
        tags = tuple(sorted({t for e in found for t in e.tags}))
        manifest = parse_manifest(digest, principal.media_type, principal.manifest)
        items[digest] = _Item(principal, tags, manifest)
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


async def _put_back(client: RegistryClient, repository: str, item: _Item) -> Restored:
    entry = item.entry
    try:
        pushed = await client.head_manifest(repository, entry.digest) is None
        if pushed:
            stored = await client.put_manifest(
                repository, entry.digest, entry.media_type, entry.manifest
            )
            if stored != entry.digest:
                raise RegistryProtocolError(f"{entry.digest} came back as {stored}")
        for tag in item.tags:
            await client.put_manifest(repository, tag, entry.media_type, entry.manifest)
    except RegistryError as exc:
        raise RegistryError(
            f"cannot restore {entry.digest} in {repository} ({exc}); "
            "if garbage collection ran since the deletion, its blobs are gone",
            status=exc.status,
        ) from exc
    return Restored(entry.digest, entry.media_type, item.tags, entry.action, pushed)
