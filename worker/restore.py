"""Put a deleted manifest back from the audit log, until garbage collection runs.

A restore replays one deletion and what was deleted with it in the same job:
children first (an index may only be pushed once its children exist), then the
manifest and its tags, then its referrers.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.audit import AuditEntry, AuditLog
from worker.errors import RegistryError, RegsweepError
from worker.registry.client import RegistryClient


class NothingToRestore(RegsweepError):
    """The audit log has no deletion of that digest in that repository."""


@dataclass(frozen=True)
class Restored:
    digest: str
    tags: tuple[str, ...]
    action: str


def _related(
    entries: list[AuditEntry], root: AuditEntry
) -> tuple[list[AuditEntry], list[AuditEntry]]:
    """Children and referrers deleted with ``root`` in the same job (recursively)."""
    same_job = [e for e in entries if e.job_id == root.job_id and e.repository == root.repository]
    children: list[AuditEntry] = []
    referrers: list[AuditEntry] = []
    todo = [root.digest]
    seen = {root.digest}
    while todo:
        parent = todo.pop()
        for entry in same_job:
            if entry.parent == parent and entry.digest not in seen:
                seen.add(entry.digest)
                todo.append(entry.digest)
                (referrers if entry.action == "referrer" else children).append(entry)
    return children, referrers


async def restore(
    client: RegistryClient, audit: AuditLog, repository: str, digest: str
) -> list[Restored]:
    """Push back the most recent deletion of ``digest`` in ``repository`` with its tags."""
    entries = await audit.entries(repository=repository)
    matches = [e for e in entries if e.digest == digest and e.manifest]
    if not matches:
        raise NothingToRestore(f"no audited deletion of {digest} in {repository}")
    root = max(matches, key=lambda e: e.time)
    children, referrers = _related(entries, root)
    restored: list[Restored] = []
    # Deepest children last in the audit order means push them in reverse.
    for entry in [*reversed(children), root, *referrers]:
        restored.append(await _put_back(client, entry))
    return restored


async def _put_back(client: RegistryClient, entry: AuditEntry) -> Restored:
    try:
        await client.put_manifest(entry.repository, entry.digest, entry.media_type, entry.manifest)
        for tag in entry.tags:
            await client.put_manifest(entry.repository, tag, entry.media_type, entry.manifest)
    except RegistryError as exc:
        raise RegistryError(
            f"cannot restore {entry.digest} in {entry.repository} ({exc}); "
            "if garbage collection ran since the deletion, its blobs are gone",
            status=exc.status,
        ) from exc
    return Restored(entry.digest, entry.tags, entry.action)
