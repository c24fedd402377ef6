"""What a notification says: one event, a title, a few lines of text and the details as JSON.

Each builder turns what the engine already has (a prune job's summary and its
audit records, a GC report, a recovery, the dead-letter count) into one
:class:`Notification`. Builders decide nothing about delivery; they return
``None`` when the event is not worth telling (a prune that deleted nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

#: At most this many deletions are listed in one notification ("and N more" after).
MAX_LISTED: Final = 20


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Notification:
    """One event to tell: ``event`` is one of :data:`~worker.settings.model.NOTIFY_EVENTS`."""

    event: str
    title: str
    lines: tuple[str, ...]
    details: Mapping[str, Any]
    #: The same for every attempt, so a receiver can drop a retried duplicate.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = field(default_factory=_now)

    @property
    def alert(self) -> bool:
        """Something needs a person: the registry stuck read-only, a failed job."""
        return self.event in ("registry.left_read_only", "gc.failed", "prune.failed")


@dataclass(frozen=True)
class Deleted:
    """One deletion as the audit recorded it."""

    repository: str
    digest: str
    tags: tuple[str, ...]
    rule: str
    action: str

    def line(self) -> str:
        tags = ", ".join(self.tags) if self.tags else "untagged"
        what = "tag removed" if self.action == "untag" else self.digest[:19]
        return f"{self.repository}: {tags} ({what}, {self.rule})"


def size(amount: int) -> str:
    """Bytes as a person reads them: ``1.5 MiB``."""
    value = float(amount)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns at GiB


def prune_deleted(
    job_id: str, summary: Mapping[str, Any], deleted: Sequence[Deleted]
) -> Notification | None:
    """A prune job that deleted something; ``None`` when it deleted nothing."""
    counts = dict(summary.get("counts") or {})
    if int(counts.get("deleted", 0)) <= 0:
        return None
    repository = str(summary.get("repository", ""))
    n = int(counts["deleted"])
    lines = [d.line() for d in deleted[:MAX_LISTED]]
    if len(deleted) > MAX_LISTED:
        lines.append(f"and {len(deleted) - MAX_LISTED} more (regsweep audit --job {job_id})")
    return Notification(
        event="prune.deleted",
        title=f"regsweep deleted {n} from {repository}",
        lines=(
            f"policy {summary.get('policy')}, job {job_id}, "
            f"{size(int(summary.get('bytes', 0)))} of manifests",
            *lines,
        ),
        details={
            "job_id": job_id,
            "repository": repository,
            "policy": summary.get("policy"),
            "counts": counts,
            "bytes": summary.get("bytes", 0),
            "errors": list(summary.get("errors") or []),
            "deleted": [d.__dict__ | {"tags": list(d.tags)} for d in deleted[:MAX_LISTED]],
        },
    )


def prune_failed(job_id: str, repository: str, summary: Mapping[str, Any]) -> Notification:
    errors = [str(e) for e in summary.get("errors") or []]
    return Notification(
        event="prune.failed",
        title=f"regsweep: the prune of {repository} failed",
        lines=(f"job {job_id}", *errors[:5]),
        details={"job_id": job_id, "repository": repository, "errors": errors[:20]},
    )


def sweep_finished(job_id: str, totals: Mapping[str, int]) -> Notification | None:
    """A sweep whose prunes deleted something or failed; ``None`` for a quiet one."""
    deleted, failed = int(totals.get("deleted", 0)), int(totals.get("failed", 0))
    if not deleted and not failed:
        return None
    repositories = int(totals.get("repositories", 0))
    return Notification(
        event="sweep.finished",
        title=f"regsweep sweep: {deleted} deleted in {repositories} repositories"
        + (f", {failed} prunes failed" if failed else ""),
        lines=(f"job {job_id} (regsweep audit --job <each prune's job>)",),
        details={"job_id": job_id, "counts": dict(totals)},
    )


def gc_finished(
    job_id: str, summary: Mapping[str, Any], ok: bool, errors: Sequence[str]
) -> Notification:
    """A GC window's report (a dry run is not told: it changed nothing)."""
    reclaimed = summary.get("bytes_reclaimed")
    gc_seconds = summary.get("gc_seconds")
    readonly = summary.get("readonly_seconds")
    lines = [
        f"job {job_id} ({summary.get('trigger')})",
        f"reclaimed {'unknown' if reclaimed is None else size(int(reclaimed))}, "
        f"GC took {gc_seconds} s, read-only for {readonly} s",
    ]
    if summary.get("overran_window"):
        lines.append("it ran past the end of the maintenance window")
    lines += [f"error: {e}" for e in errors[:5]]
    title = (
        f"regsweep GC reclaimed {size(int(reclaimed or 0))}"
        if ok
        else "regsweep GC failed (the registry was switched back; pruning resumed)"
    )
    if summary.get("left_readonly"):
        title = "regsweep GC failed and left the registry read-only"
    return Notification(
        event="gc.finished" if ok else "gc.failed",
        title=title,
        lines=tuple(lines),
        details={"job_id": job_id, "report": dict(summary), "errors": list(errors)},
    )


def left_read_only(job_id: str, failures: Sequence[str]) -> Notification:
    return Notification(
        event="registry.left_read_only",
        title="ALERT: the registry is left read-only",
        lines=(
            f"GC job {job_id}: every switch back to read-write failed; pushes get 405.",
            "The recovery check keeps trying every 30 s; pruning stays paused.",
            *failures[-3:],
        ),
        details={"job_id": job_id, "failures": list(failures)},
    )


def recovered(job_id: str, killed_gc: bool, released: int | None) -> Notification:
    return Notification(
        event="gc.recovered",
        title="regsweep recovered a crashed maintenance window",
        lines=(
            f"GC job {job_id}: its worker died; the registry is read-write again and "
            "pruning resumed",
            *(["the crashed GC command was still running and was stopped"] if killed_gc else []),
        ),
        details={"job_id": job_id, "killed_gc": killed_gc, "deferred_released": released},
    )


def dead_letters(new: int, total: int, latest: Sequence[Mapping[str, Any]]) -> Notification:
    """Dead letters kept since the last tick: unusable deliveries, and work that failed for
    good after its retries, each of those with the command that runs it again. Time, source,
    reason and id only: the body excerpt stays in Redis (regsweep status shows it)."""
    shown = [
        {
            "id": d.get("id"),
            "time": d.get("time"),
            "source": d.get("source"),
            "reason": str(d.get("reason"))[:200],
            "replay": f"regsweep replay {d.get('id')}" if d.get("replay") else None,
        }
        for d in latest[:5]
    ]
    return Notification(
        event="dead_letter",
        title=f"regsweep kept {new} new dead letters",
        lines=(
            f"{total} in all; the newest:",
            *(
                f"{d['source']}: {d['reason']}" + (f" ({d['replay']})" if d["replay"] else "")
                for d in shown
            ),
        ),
        details={"new": new, "total": total, "latest": shown},
    )
