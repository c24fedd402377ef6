"""What one maintenance window did: the GC job's report, and the counters kept for metrics.

The report goes on the job record (``GET /api/v1/jobs/{id}``) and is what
``regsweep gc`` prints. Counters go to Redis hashes next to the other worker
metrics (:mod:`worker.store.metrics`): ``metrics:jobs`` gets the GC job's state
changes in its format, ``metrics:gc`` holds GC totals and alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from worker.maintenance.gc import GcResult
from worker.maintenance.window import overran
from worker.store.keys import Keys
from worker.store.metrics import GcCollected, GcMetrics, GcRun
from worker.store.redis import RedisClient

JOB_KIND: Final = "gc"


@dataclass
class GcReport:
    """Filled in step by step while the window runs; whatever was reached is reported."""

    job_id: str
    trigger: str
    dry_run: bool
    started: datetime
    deadline: datetime | None = None
    registry_version: str | None = None
    #: Repositories whose prune still held its lock when the wait for them ended.
    prunes_still_running: list[str] = field(default_factory=list)
    #: How the write probe answered while read-only / after the switch back.
    writes_while_readonly: str | None = None
    writes_after: str | None = None
    gc: GcResult | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    readonly_seconds: float | None = None
    deferred_released: int | None = None
    #: The switch back failed every retry: the recovery check keeps trying.
    left_readonly: bool = False
    #: Wall-clock time just before the switch back: a GC request made by then asked for
    #: nothing this GC did not collect (no deletion runs while the registry is read-only).
    covered_until: datetime | None = None
    finished: datetime | None = None
    errors: list[str] = field(default_factory=list)
    #: Trouble that was overcome (a switch back that worked at the second attempt).
    warnings: list[str] = field(default_factory=list)
    #: What the storage-level prune did (:mod:`worker.maintenance.storage_prune`), if it ran.
    storage_prune: dict[str, Any] | None = None

    def finish(self, at: datetime) -> None:
        self.finished = at

    @property
    def overran(self) -> bool:
        return self.finished is not None and overran(self.deadline, self.finished)

    @property
    def bytes_reclaimed(self) -> int | None:
        """Storage size before GC minus after, both measured while the registry was read-only.

        Never negative: GC only deletes. Storage that grew anyway was written by something
        other than the registry (a process writing into its directory); that is no
        reclaimed space, so it counts 0 and ``storage_grew`` in the report says so.
        """
        if self.bytes_before is None or self.bytes_after is None:
            return None
        return max(0, self.bytes_before - self.bytes_after)

    @property
    def storage_grew(self) -> bool:
        return (
            self.bytes_before is not None
            and self.bytes_after is not None
            and self.bytes_after > self.bytes_before
        )

    @property
    def gc_seconds(self) -> float | None:
        return None if self.gc is None else self.gc.duration_s

    @property
    def ok(self) -> bool:
        return not self.errors and self.gc is not None and self.gc.ok

    def counts(self) -> dict[str, int]:
        gc = self.gc
        if gc is None:
            return {}
        return {
            "blobs_eligible": gc.blobs_eligible,
            "manifests_eligible": gc.manifests_eligible,
            "blobs_deleted": gc.blobs_deleted,
            "manifests_deleted": gc.manifests_deleted,
        }

    def summary(self) -> dict[str, Any]:
        """JSON-able, for the job record and ``--json`` output."""
        gc = self.gc
        return {
            "trigger": self.trigger,
            "dry_run": self.dry_run,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "overran_window": self.overran,
            "registry_version": self.registry_version,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_reclaimed": self.bytes_reclaimed,
            "storage_grew": self.storage_grew,
            "readonly_seconds": _round(self.readonly_seconds),
            "gc_seconds": _round(self.gc_seconds),
            "gc_exit_code": gc.exit_code if gc else None,
            "gc_ok": gc.ok if gc else None,
            "gc_output_tail": list(gc.lines_tail[-10:]) if gc else [],
            "prunes_still_running": self.prunes_still_running,
            "writes_while_readonly": self.writes_while_readonly,
            "writes_after": self.writes_after,
            "deferred_released": self.deferred_released,
            "left_readonly": self.left_readonly,
            "warnings": self.warnings,
            "storage_prune": self.storage_prune,
        }

    def job_fields(self) -> dict[str, Any]:
        """The fields :meth:`SyncState.update_job` stores (``counts``, ``bytes``, ``errors``...)."""
        return {
            "counts": self.counts(),
            "bytes": self.bytes_reclaimed or 0,
            "errors": list(self.errors),
            "report": self.summary(),
        }

    def lines(self) -> list[str]:
        """The report as a person reads it (``regsweep gc``)."""
        what = "dry run: GC would remove" if self.dry_run else "GC removed"
        counts = self.counts()
        out = [
            f"job {self.job_id} ({self.trigger})",
            f"{what} {counts.get('blobs_eligible', 0)} blobs and "
            f"{counts.get('manifests_eligible', 0)} manifests",
        ]
        if not self.dry_run:
            out.append(f"bytes reclaimed: {_maybe(self.bytes_reclaimed)}")
            out.append(
                f"read-only for {_maybe(_round(self.readonly_seconds))} s, "
                f"GC took {_maybe(_round(self.gc_seconds))} s"
            )
        out += storage_prune_lines(self.storage_prune)
        out.append(f"overran the window: {'yes' if self.overran else 'no'}")
        out += [f"error: {e}" for e in self.errors]
        if self.left_readonly:
            out.append("ALERT: the registry is still read-only; the recovery check retries")
        return out


def storage_prune_lines(summary: dict[str, Any] | None) -> list[str]:
    """How ``regsweep gc`` says what the storage-level prune did."""
    if summary is None or summary.get("refused"):
        return []
    counts = summary.get("counts") or {}
    line = (
        f"storage prune: {summary.get('tags_removed', 0)} tags and "
        f"{summary.get('manifests_removed', 0)} manifests removed from "
        f"{len(summary.get('pruned') or [])} of {summary.get('repositories', 0)} repositories "
        f"in {summary.get('prune_seconds')} s (checked against the API in "
        f"{summary.get('check_seconds')} s)"
    )
    others = {k: v for k, v in counts.items() if v and k != "deleted"}
    if others:
        line += "; " + ", ".join(f"{v} {k}" for k, v in sorted(others.items()))
    empties = summary.get("empty_repositories_removed") or []
    return [line] + ([f"empty repositories removed: {', '.join(empties)}"] if empties else [])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _maybe(value: object) -> str:
    return "unknown" if value is None else str(value)


# --------------------------------------------------------------------------- metrics


class MaintenanceMetrics:
    """Best-effort counters in Redis (:class:`~worker.store.metrics.GcMetrics`); a metric
    never fails a window."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._metrics = GcMetrics(client, keys)

    def job_state(self, state: str) -> None:
        self._metrics.job(JOB_KIND, state)

    def window(self, report: GcReport) -> None:
        gc = report.gc
        collected = (
            None
            if gc is None or report.dry_run
            else GcCollected(gc.blobs_deleted, gc.manifests_deleted, gc.duration_s)
        )
        self._metrics.run(
            GcRun(
                dry_run=report.dry_run,
                ok=report.ok,
                overran=report.overran,
                collected=collected,
                bytes_reclaimed=report.bytes_reclaimed,
                readonly_seconds=report.readonly_seconds,
            )
        )

    def alert(self, name: str) -> None:
        """``switch_back_failures``, ``recoveries``: counted, and logged by the caller."""
        self._metrics.alert(name)
