"""How plans, reports and audit records look on a terminal and as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from worker.engine.executor import ExecutionReport, Status
from worker.engine.model import Inventory, PushTime
from worker.engine.plan import Action, Plan
from worker.engine.planner import describe_push
from worker.engine.prune import Pruned, RepositoryFailure, RepositoryPlan, not_executed
from worker.engine.restore import Restored
from worker.oci import referrer_tag_subject
from worker.store.audit import AuditEntry, Outcome

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}"


def short_tag(tag: str) -> str:
    """Cosign-style tags carry a whole digest; a table shows its first 12 hex digits."""
    if referrer_tag_subject(tag) is None:
        return tag
    head, dot, suffix = tag.partition(".")
    return f"{head[:19]}…{dot}{suffix}"


def _pushed(inventory: Inventory, tag: str) -> str:
    """The PUSHED column: how long ago, and on what evidence (a referrer tag has none)."""
    if tag == "-" or tag not in inventory.tags or referrer_tag_subject(tag) is not None:
        return ""
    return describe_push(inventory.push_time(tag), inventory.taken_at).removeprefix("pushed ")


def _rows(planned: RepositoryPlan) -> list[tuple[str, ...]]:
    plan, inventory = planned.plan, planned.inventory
    rows: list[tuple[str, ...]] = []
    for d in plan.deletions:
        action = "untag" if d.action is Action.UNTAG else f"delete {d.action.value}"
        for tag in d.tags or ("-",):
            rows.append(
                (short_tag(tag), short(d.digest), action, _pushed(inventory, tag), str(d.reason))
            )
    for k in plan.kept:
        rows.append(
            (short_tag(k.tag), short(k.digest), "keep", _pushed(inventory, k.tag), str(k.reason))
        )
    return rows


_HEADER = ("TAG", "DIGEST", "ACTION", "PUSHED", "REASON")


def plan_table(planned: RepositoryPlan) -> str:
    plan = planned.plan
    mode = "enforce" if planned.enforced else "dry-run"
    lines = [f"{plan.repository}  (policy {plan.policy}, {mode})"]
    lines += [f"  note: {note}" for note in plan.notes]
    rows = _rows(planned)
    if rows:
        widths = [max(len(r[i]) for r in [*rows, _HEADER]) for i in range(len(_HEADER) - 1)]
        for row in [_HEADER, *rows]:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            lines.append("  " + "  ".join([*cells, row[-1]]))
    lines.append("  " + summary(plan))
    return "\n".join(line.rstrip() for line in lines)


def summary(plan: Plan) -> str:
    return (
        f"tags: {plan.tags_removed} removed, {plan.tags_kept} kept · "
        f"manifests: {plan.manifests_removed} removed, {plan.manifests_kept} kept · "
        f"reclaimable after GC: {human_bytes(plan.reclaimable_bytes)}"
    )


def push_json(pushed: PushTime) -> dict[str, Any]:
    """A push time as JSON: its source and bounds (null: unbounded), and why a registry
    time was not believed (null: none was doubted)."""
    return {
        "source": pushed.source.value,
        "earliest": pushed.earliest.isoformat() if pushed.earliest else None,
        "latest": pushed.latest.isoformat() if pushed.latest else None,
        "doubt": pushed.doubt,
    }


def plan_json(planned: Sequence[RepositoryPlan]) -> list[dict[str, Any]]:
    return [_plan_json(rp) for rp in planned]


def _plan_json(rp: RepositoryPlan) -> dict[str, Any]:
    p, inventory = rp.plan, rp.inventory
    return {
        "repository": p.repository,
        "policy": p.policy,
        "mode": "enforce" if rp.enforced else "dry-run",
        "notes": list(p.notes),
        "deletions": [
            {
                "repository": p.repository,
                "digest": d.digest,
                "media_type": d.media_type,
                "action": d.action.value,
                "tags": list(d.tags),
                "pushed": {t: push_json(inventory.push_time(t)) for t in d.tags},
                "reason": str(d.reason),
                "rule": d.reason.rule,
                "parents": list(d.parents),
            }
            for d in p.deletions
        ],
        "kept": [
            {
                "tag": k.tag,
                "digest": k.digest,
                "pushed": push_json(inventory.push_time(k.tag)),
                "reason": str(k.reason),
            }
            for k in p.kept
        ],
        "totals": {
            "tags_removed": p.tags_removed,
            "tags_kept": p.tags_kept,
            "manifests_removed": p.manifests_removed,
            "manifests_kept": p.manifests_kept,
            "reclaimable_bytes": p.reclaimable_bytes,
        },
    }


def report_line(report: ExecutionReport) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
    line = f"{report.repository}: {report.outcome.value} ({counts or 'nothing to do'})"
    if report.fatal:
        line += f"\n  error: {report.fatal}"
    for deletion, status, detail in report.done:
        caused_by_fatal = report.fatal is not None and report.fatal in detail
        if status in (Status.ERROR, Status.SKIPPED) and detail and not caused_by_fatal:
            line += f"\n  {status.value} {short(deletion.digest)}: {detail}"
    return line


def audit_line(entry: AuditEntry) -> str:
    tags = ",".join(entry.tags) or "-"
    when = entry.time.isoformat(timespec="seconds")
    outcome = entry.outcome.value
    if entry.outcome is not Outcome.DELETED and entry.detail:
        outcome += f" ({entry.detail})"
    line = (
        f"{when}  {entry.repository}  {short(entry.digest)}  {entry.action} {outcome}  "
        f"tags={tags}  {entry.policy}/{entry.rule}: {entry.reason}  job={entry.job_id}"
    )
    if entry.restored_at is not None:
        restored = entry.restored_at.isoformat(timespec="seconds")
        line += f"  restored {restored} by {entry.restored_by}"
    return line


def restored_line(item: Restored) -> str:
    """One manifest of ``regsweep restore``: pushed back or found present, its tags, and the
    jobs whose deletions it undid."""
    tags = ", ".join(item.tags) or "no tags"
    how = "restored" if item.pushed else "present"
    jobs = f" from {'job' if len(item.jobs) == 1 else 'jobs'} {', '.join(item.jobs)}"
    return f"{how} {item.action} {item.digest} ({tags}){jobs if item.jobs else ''}"


def report_json(report: ExecutionReport) -> dict[str, Any]:
    """What became of each planned deletion."""
    return {
        "outcome": report.outcome.value,
        "counts": report.counts(),
        "errors": report.errors(),
        "items": [
            {
                "digest": deletion.digest,
                "action": deletion.action.value,
                "tags": list(deletion.tags),
                "status": status.value,
                "detail": detail,
            }
            for deletion, status, detail in report.done
        ],
    }


def prune_json(
    job_id: str, dry_run: bool, results: Sequence[Pruned | RepositoryFailure]
) -> dict[str, Any]:
    """``regsweep prune --json``: each repository's plan (as ``plan --json`` shows it) and
    what was done, or why nothing was; the repositories that could not be planned."""
    repositories = []
    for result in results:
        if isinstance(result, RepositoryFailure):
            continue
        rp, report = result
        repositories.append(
            _plan_json(rp)
            | {
                "not_executed": None if report else not_executed(rp, dry_run),
                "report": report_json(report) if report else None,
            }
        )
    failures = [
        {"repository": r.repository, "error": r.error}
        for r in results
        if isinstance(r, RepositoryFailure)
    ]
    return {
        "job_id": job_id,
        "dry_run": dry_run,
        "repositories": repositories,
        "failures": failures,
    }


def restore_json(
    repository: str, restored: Sequence[Restored], held_until: datetime, job_id: str
) -> dict[str, Any]:
    """``regsweep restore --json``: each manifest put back (or found present), its tags and
    the jobs whose deletions it undid; the restore's own id (as the audit names it)."""
    return {
        "job_id": job_id,
        "repository": repository,
        "restored": [
            {
                "action": r.action,
                "digest": r.digest,
                "media_type": r.media_type,
                "tags": list(r.tags),
                "pushed": r.pushed,
                "jobs": list(r.jobs),
            }
            for r in restored
        ],
        "held_until": held_until.isoformat(),
    }
