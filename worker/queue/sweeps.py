"""Sweeps: one prune per repository, tallied into the sweep's job record."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from worker.queue.context import WorkerContext, records
from worker.queue.pruning import PruneSummary

log = logging.getLogger(__name__)


async def start_sweep(ctx: WorkerContext, job_id: str, children: Mapping[str, str]) -> None:
    """Open the tally of a sweep whose prunes (repository -> child job id) are about to run."""
    await records(ctx).open_sweep(job_id, len(children))


def child_counts(summary: PruneSummary) -> dict[str, int]:
    """What one repository's prune adds to its sweep's counts."""
    counts = {
        "repositories": 1,
        "failed": int(summary.failed),
        "tags_planned": summary.tags_planned,
        "manifests_planned": summary.manifests_planned,
        "bytes": summary.bytes,
    }
    return counts | dict(summary.counts)


async def child_finished(
    ctx: WorkerContext, sweep_id: str, child_id: str, counts: Mapping[str, int]
) -> dict[str, int] | None:
    """Add a finished prune to its sweep; the sweep's totals once the last one is in."""
    return await records(ctx).sweep_prune_finished(sweep_id, child_id, counts)
