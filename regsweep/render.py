"""How plans, reports and audit records look on a terminal and as JSON."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from worker.audit import AuditEntry
from worker.executor import ExecutionReport, Status
from worker.model import referrer_tag_subject
from worker.plan import Action, Plan
from worker.pruner import RepositoryPlan

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


def _rows(plan: Plan) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for d in plan.deletions:
        action = "untag" if d.action is Action.UNTAG else f"delete {d.action.value}"
        for tag in d.tags or ("-",):
            rows.append((short_tag(tag), short(d.digest), action, str(d.reason)))
    for k in plan.kept:
        rows.append((short_tag(k.tag), short(k.digest), "keep", str(k.reason)))
    return rows


def plan_table(planned: RepositoryPlan) -> str:
    plan = planned.plan
    mode = "enforce" if planned.enforced else "dry-run"
    lines = [f"{plan.repository}  (policy {plan.policy}, {mode})"]
    rows = _rows(plan)
    if rows:
        widths = [
            max(len(r[i]) for r in [*rows, ("TAG", "DIGEST", "ACTION", "")]) for i in range(3)
        ]
        header = ("TAG", "DIGEST", "ACTION", "REASON")
        for row in [header, *rows]:
            lines.append(
                "  "
                + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                + "  "
                + row[3]
            )
    lines.append("  " + summary(plan))
    return "\n".join(line.rstrip() for line in lines)


def summary(plan: Plan) -> str:
    return (
        f"tags: {plan.tags_removed} removed, {plan.tags_kept} kept · "
        f"manifests: {plan.manifests_removed} removed, {plan.manifests_kept} kept · "
        f"reclaimable after GC: {human_bytes(plan.reclaimable_bytes)}"
    )


def plan_json(planned: Sequence[RepositoryPlan]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rp in planned:
        p = rp.plan
        out.append(
            {
                "repository": p.repository,
                "policy": p.policy,
                "mode": "enforce" if rp.enforced else "dry-run",
                "deletions": [
                    {
                        "repository": p.repository,
                        "digest": d.digest,
                        "media_type": d.media_type,
                        "action": d.action.value,
                        "tags": list(d.tags),
                        "reason": str(d.reason),
                        "rule": d.reason.rule,
                        "parent": d.parent,
                    }
                    for d in p.deletions
                ],
                "kept": [
                    {"tag": k.tag, "digest": k.digest, "reason": str(k.reason)} for k in p.kept
                ],
                "totals": {
                    "tags_removed": p.tags_removed,
                    "tags_kept": p.tags_kept,
                    "manifests_removed": p.manifests_removed,
                    "manifests_kept": p.manifests_kept,
                    "reclaimable_bytes": p.reclaimable_bytes,
                },
            }
        )
    return out


def report_line(report: ExecutionReport) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items() if n)
    line = f"{report.repository}: {report.outcome.value} ({counts or 'nothing to do'})"
    if report.fatal:
        line += f"\n  error: {report.fatal}"
    for deletion, status, detail in report.done:
        if status in (Status.ERROR, Status.SKIPPED) and detail and detail != report.fatal:
            line += f"\n  {status.value} {short(deletion.digest)}: {detail}"
    return line


def audit_line(entry: AuditEntry) -> str:
    tags = ",".join(entry.tags) or "-"
    when = entry.time.isoformat(timespec="seconds")
    return (
        f"{when}  {entry.repository}  {short(entry.digest)}  {entry.action}  tags={tags}  "
        f"{entry.policy}/{entry.rule}: {entry.reason}  job={entry.job_id}"
    )


class Progress:
    """A one-line progress bar on a terminal; plain lines otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.count = 0
        self.stream = stream
        self.tty = stream.isatty()

    def step(self, label: str) -> None:
        self.count += 1
        if self.tty:
            width = 30
            filled = width * self.count // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.count}/{self.total}")
            if self.count >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.count}/{self.total} {label}\n")
        self.stream.flush()
