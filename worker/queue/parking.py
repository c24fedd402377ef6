"""Prunes parked while a maintenance window runs: kept one entry per job, merged per repository
when the window has ended, and forgotten once queued again."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from worker.queue.context import WorkerContext, records
from worker.queue.pruning import keys
from worker.store.window import window_running

log = logging.getLogger(__name__)


async def maintenance_active(ctx: WorkerContext) -> bool:
    return await window_running(ctx.redis, keys(ctx)) is not None


async def defer(ctx: WorkerContext, repository: str, params: Mapping[str, Any]) -> None:
    """Park a prune until the window ends, one entry per job: several prunes of one
    repository are all kept, and merged when released (:func:`parked_prunes`)."""
    # Orders the entries (the first parked leads the merged prune) and tells a re-parked
    # entry from the one read before it (:func:`unpark`).
    mark = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    entry = {**params, "repository": repository, "parked": mark}
    await records(ctx).park(str(params.get("job_id") or entry["parked"]), entry)


@dataclass(frozen=True)
class Parked:
    """The prunes parked during a window, merged per repository (task kwargs), and the
    entries they came from, to forget once those prunes are queued (:func:`unpark`)."""

    prunes: list[dict[str, Any]]
    entries: dict[str, str]


async def parked_prunes(ctx: WorkerContext) -> Parked:
    """What to queue again once no maintenance window runs (nothing while one does).

    Read, not taken: the entries stay until :func:`unpark`, after the prunes are
    queued, so a worker dying in between leaves them for the next tick (a prune
    queued twice runs twice, harmlessly: its job records are settled again).
    """
    if await maintenance_active(ctx):
        return Parked([], {})
    entries = await records(ctx).parked()
    return Parked(merge_parked(_parsed(entries.values())), entries)


async def unpark(ctx: WorkerContext, entries: Mapping[str, str]) -> None:
    """Forget parked entries that have been queued again (those not parked anew since)."""
    await records(ctx).unpark(entries)


def _parsed(values: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for value in values:
        try:
            entry = json.loads(value)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("repository"), str):
            out.append(entry)
    return out


#: What a parked prune keeps of its own when it runs merged into another one.
_OWN: Final = (
    "job_id",
    "parent",
    "trigger",
    "requests",
    "incremental",
    "dry_run",
    "repository",
    "requests_only",
    "expect",
)


def _merge_key(repository: str, one: Mapping[str, Any]) -> tuple[str, bool, str | None]:
    """Which parked prunes run as one: per repository and dry-run flag; a dashboard
    deletion (``requests_only``, bound to its preview's plan) only ever with itself."""
    alone = str(one.get("job_id")) if one.get("requests_only") else None
    return repository, bool(one.get("dry_run", False)), alone


def merge_parked(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One prune per repository (and dry-run flag) for the parked ``entries``: the union of
    their CI requests, a live read if any asked for one, the first job's id and trigger, the
    others' jobs in ``merged`` (each settled when the merged prune ends). A prune that was
    itself merged brings its own merged jobs along. A dashboard deletion stays alone, with
    its request and the fingerprint of the plan its person confirmed."""
    groups: dict[tuple[str, bool, str | None], list[dict[str, Any]]] = {}
    for entry in sorted(entries, key=lambda e: str(e.get("parked", ""))):
        for one in [entry, *(entry.get("merged") or [])]:
            key = _merge_key(str(entry["repository"]), one)
            groups.setdefault(key, []).append(
                {k: one.get(k) for k in _OWN} | {"repository": key[0]}
            )
    return [
        _merged_prune(repository, dry_run, group)
        for (repository, dry_run, _), group in groups.items()
    ]


def _merged_prune(repository: str, dry_run: bool, group: list[dict[str, Any]]) -> dict[str, Any]:
    unique = list({str(g.get("job_id")): g for g in group}.values())
    first, rest = unique[0], unique[1:]
    requests = {json.dumps(r, sort_keys=True): r for g in unique for r in (g.get("requests") or [])}
    return {
        "repository": repository,
        "job_id": first.get("job_id"),
        "dry_run": dry_run,
        "requests": list(requests.values()),
        "incremental": all(g.get("incremental", True) is not False for g in unique),
        "trigger": first.get("trigger") or "deferred",
        "parent": first.get("parent"),
        "merged": rest,
        "requests_only": bool(first.get("requests_only")),
        "expect": first.get("expect"),
    }
