"""What the installation is doing, as ``/healthz`` and ``regsweep status`` read it from Redis.

The last prune that succeeded and the running maintenance window's GC job (both for
``/healthz`` and ``status``), the prunes parked until a window ends, and the dead
letters kept. Reads only; the records are written by the workers
(:mod:`worker.store.prunes`, :mod:`worker.maintenance.job`) and the service.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.store.redis import text, wrapped
from worker.store.state import State


@dataclass(frozen=True)
class HealthRecords:
    """The records ``/healthz`` shows."""

    #: The last prune job that succeeded (time, job_id, repository, age_seconds), or None.
    last_prune: dict[str, Any] | None
    #: The GC job whose window holds pruning paused, or None.
    maintenance_job: str | None


async def health_records(state: State) -> HealthRecords:
    """The last successful prune and the maintenance flag, in one round trip."""
    keys = state.keys
    with wrapped("cannot read the health records"):
        pipe = state.client.pipeline(transaction=False)
        pipe.get(keys.last_prune)
        pipe.get(keys.maintenance_flag)
        last, flag = await pipe.execute()
    return HealthRecords(last_prune(last), None if flag is None else text(flag))


def last_prune(raw: bytes | str | None, now: datetime | None = None) -> dict[str, Any] | None:
    """The last-prune record with its age; None when absent or unreadable."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        at = datetime.fromisoformat(record["time"])
    except (ValueError, TypeError, KeyError):
        return None
    age = ((now or datetime.now(UTC)) - at).total_seconds()
    return {**record, "age_seconds": round(max(age, 0.0), 1)}


@dataclass(frozen=True)
class DeferredPrune:
    """A prune parked until the maintenance window ends (released by the workers' tick)."""

    repository: str
    job_id: str | None
    trigger: str | None
    dry_run: bool


async def deferred_prunes(state: State) -> list[DeferredPrune]:
    """The parked prunes, one per job (several of one repository are all kept, and run
    merged), by repository."""
    with wrapped("cannot read the deferred prunes"):
        parked = await state.client.hgetall(state.keys.deferred)
    out: list[DeferredPrune] = []
    for field, raw in parked.items():
        try:
            params = json.loads(raw)
        except ValueError:
            params = {}
        params = params if isinstance(params, dict) else {}
        out.append(
            DeferredPrune(
                # Entries are per job; one written before that was per repository.
                str(params.get("repository") or text(field)),
                params.get("job_id"),
                params.get("trigger"),
                bool(params.get("dry_run")),
            )
        )
    return sorted(out, key=lambda d: (d.repository, d.job_id or ""))


@dataclass(frozen=True)
class DeadLetters:
    """The dead letters kept (the list is capped), how many there ever were, the newest."""

    kept: int
    total: int
    newest: list[dict[str, Any]]


async def dead_letters(state: State, newest: int) -> DeadLetters:
    """The dead-letter counts and the ``newest`` entries (their body excerpts left out)."""
    keys = state.keys
    with wrapped("cannot read the dead letters"):
        pipe = state.client.pipeline(transaction=False)
        pipe.llen(keys.dead_letters)
        pipe.get(keys.dead_letters_total)
        kept, total = await pipe.execute()
    entries = await state.dead_letters(newest) if newest > 0 and kept else []
    shown = [{k: v for k, v in e.items() if k != "body"} for e in entries]
    return DeadLetters(int(kept), max(int(total or 0), int(kept)), shown)
