"""``regsweep status [--json]``: what the installation is doing and will do next.

The next maintenance window (from ``maintenance.window``) and whether a GC holds
pruning paused now, the prunes parked until it ends, the holds in force, the dead
letters, the registry's clock and the push times the last plans refused or doubted
(:mod:`regsweep.evidence`), the last successful prune (what ``/healthz`` reports), the
last sweep and GC, the jobs of the last 24 hours by state, the processes reporting (the
policy digest each runs) and what waits on each queue. Read from the Redis the service and
workers use; exit 0, 1 when Redis does not answer, 2 without ``redis.url``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from regsweep import evidence
from regsweep.jobs import when
from regsweep.records import Records, reading
from worker.durations import exact
from worker.maintenance.window import window_document
from worker.queue.names import QUEUES
from worker.records import Hold
from worker.settings.model import Config, MaintenanceSettings
from worker.store.processes import queue_lengths, reports
from worker.store.state import RECENT_JOBS_CAP
from worker.store.status import dead_letters, deferred_prunes, health_records

#: ``status`` counts the jobs created this long ago or later.
JOBS_WINDOW: Final = timedelta(hours=24)
#: Dead letters shown (the newest).
DEAD_LETTERS_SHOWN: Final = 3
#: What `status` shows of a job (its last sweep and GC, the counts by state).
STATUS_FIELDS: Final = ("id", "kind", "state", "created", "updated")


def add_parser(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="next maintenance window, deferred prunes, holds, dead letters, jobs"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")


async def status_command(args: argparse.Namespace, config: Config) -> int:
    async with reading(config, "status") as records:
        doc = await status_document(records, config.maintenance, datetime.now(UTC))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for line in status_lines(doc):
            print(line)
    return 0


async def status_document(
    records: Records, settings: MaintenanceSettings, now: datetime
) -> dict[str, Any]:
    """Everything ``status`` shows, JSON-able."""
    health = await health_records(records.state)
    letters = await dead_letters(records.state, DEAD_LETTERS_SHOWN)
    jobs = await records.state.recent_jobs(RECENT_JOBS_CAP, fields=STATUS_FIELDS)
    return {
        "time": now.isoformat(),
        "maintenance": {
            "window": window_document(settings, now),
            "active_job": health.maintenance_job,
        },
        "deferred": [asdict(d) for d in await deferred_prunes(records.state)],
        "holds": holds_document(await records.index.all_holds(), now),
        "dead_letters": asdict(letters),
        "push_times": await evidence.status_document(records.index),
        "last_successful_prune": health.last_prune,
        "last_sweep": _summary(await records.state.newest_job("sweep")),
        "last_gc": _summary(await records.state.newest_job("gc")),
        "jobs": {
            "since": (now - JOBS_WINDOW).isoformat(),
            "by_state": _by_state(jobs, now),
            # Counted from the recent-jobs index: at its cap, older jobs are not counted.
            "capped_at": RECENT_JOBS_CAP if len(jobs) >= RECENT_JOBS_CAP else None,
        },
        **await processes_document(records),
    }


def holds_document(holds: Mapping[str, Sequence[Hold]], now: datetime) -> list[dict[str, str]]:
    """The holds in force, by repository and tag."""
    return [
        {"repository": repo, "tag": h.tag, "until": h.until.isoformat(), "reason": h.reason}
        for repo in sorted(holds)
        for h in holds[repo]
        if h.active(now)
    ]


def _summary(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A job as ``status`` shows it: what the recent-jobs listing reads of each."""
    return None if job is None else {k: job.get(k) for k in STATUS_FIELDS}


def _by_state(jobs: Sequence[Mapping[str, Any]], now: datetime) -> dict[str, int]:
    since = now - JOBS_WINDOW
    counted: Counter[str] = Counter()
    for job in jobs:
        try:
            created = datetime.fromisoformat(str(job.get("created")))
        except ValueError:
            continue
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        if created >= since:
            counted[str(job.get("state"))] += 1
    return dict(sorted(counted.items()))


# --------------------------------------------------------------------------- text


def status_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = _maintenance_lines(doc["maintenance"])
    deferred = doc["deferred"]
    lines.append(f"deferred prunes: {len(deferred) or 'none'}")
    lines += [
        f"  {d['repository']}  job {d['job_id'] or '-'}  ({d['trigger'] or 'no trigger'})"
        for d in deferred
    ]
    holds = doc["holds"]
    lines.append(f"holds: {len(holds) or 'none'}")
    lines += [
        f"  {h['repository']}:{h['tag']} until {when(h['until'])} ({h['reason']})" for h in holds
    ]
    letters = doc["dead_letters"]
    lines.append(f"dead letters: {letters['kept']} kept ({letters['total']} ever)")
    for entry in letters["newest"]:
        lines.append(
            f"  {when(entry.get('time'))}  {entry.get('source')}: {str(entry.get('reason'))[:200]}"
        )
        if entry.get("replay"):
            lines.append(f"    run it again: regsweep replay {entry.get('id')}")
    lines += evidence.status_lines(doc["push_times"])
    lines.append(f"last successful prune: {_last_prune(doc['last_successful_prune'])}")
    lines.append(f"last sweep: {_job_line(doc['last_sweep'])}")
    lines.append(f"last GC: {_job_line(doc['last_gc'])}")
    by_state = ", ".join(f"{n} {s}" for s, n in doc["jobs"]["by_state"].items()) or "none"
    capped = doc["jobs"]["capped_at"]
    among = f" (among the newest {capped:,} jobs)" if capped else ""
    lines.append(f"jobs in the last 24h{among}: {by_state}")
    return lines + processes_lines(doc)


def _maintenance_lines(maintenance: Mapping[str, Any]) -> list[str]:
    window = maintenance["window"]
    if window is None:
        lines = ["maintenance window: none configured (maintenance.window.cron)"]
    else:
        lasting = exact(timedelta(seconds=window["duration_seconds"]))
        lines = [f"maintenance window: {window['cron']!r} (UTC), {lasting} long"]
        if window["open"]:
            lines.append(f"  open now, until {when(window['open']['end'])}")
        nxt = window["next"]
        lines.append(f"  next: {when(nxt['start'])} to {when(nxt['end'])}")
    active = maintenance["active_job"]
    lines.append(
        f"maintenance: GC job {active} running (registry read-only, prunes deferred)"
        if active
        else "maintenance: not running (pruning active)"
    )
    return lines


def _last_prune(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "none recorded"
    return (
        f"{when(record.get('time'))} ({record.get('age_seconds')}s ago), "
        f"{record.get('repository')}, job {record.get('job_id')}"
    )


def _job_line(job: Mapping[str, Any] | None) -> str:
    if job is None:
        return "none in the last 7 days"
    return f"{when(job.get('created'))} job {job.get('id')} {job.get('state')}"


# --------------------------------------------------------------------------- processes


async def processes_document(records: Records) -> dict[str, Any]:
    """The processes reporting (each one's policy digest) and the queues' lengths."""
    client, keys = records.state.client, records.state.keys
    processes = await reports(client, keys)
    lengths = await queue_lengths(client, QUEUES)
    consumed = {q for p in processes if p.get("role") == "worker" for q in p.get("queues") or ()}
    queues = {
        name: {"waiting": int(n), "consumed": name in consumed}
        for name, n in zip(QUEUES, lengths, strict=True)
    }
    return {"processes": processes, "queues": queues}


def processes_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = [f"processes: {len(doc['processes']) or 'none reporting'}"]
    for process in doc["processes"]:
        queues = f" ({','.join(process['queues'])})" if process.get("queues") else ""
        line = f"  {process['id']}{queues}  policy {process['policy']}"
        if process.get("problem"):
            line += f"; the file does not load: {str(process['problem'])[:300]}"
        if process.get("restart_needed"):
            line += f"; restart for: {', '.join(process['restart_needed'])}"
        lines.append(line)
    shown = [
        f"{name} {q['waiting']}" + ("" if q["consumed"] else " (no worker reporting takes it)")
        for name, q in doc["queues"].items()
    ]
    lines.append(f"queues: {', '.join(shown)}")
    return lines
