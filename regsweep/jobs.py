"""``regsweep jobs [ID] [--follow] [--limit N] [--json]``: the jobs the workers ran.

Without ID: the newest jobs first (``--limit``, default 20) from the recent-jobs
index, each with its state, counts and what it deleted. With ID (a job id or a
unique prefix of one): that job in detail, with every deletion its audit records
(repository, tags, digest, reason, outcome; for a sweep, its prunes' deletions).
``--follow`` polls the job until it ends, printing each state change and each
deletion as it is settled; ``--json`` then prints one JSON object per line
(``{"event": "state"|"deletion"|"end", ...}``, the ``end`` line carrying the whole
job as ``jobs ID --json`` shows it).

Exit codes: 0 listed or shown; with ``--follow`` 0 when the job succeeded (or was
skipped: a GC that had no window to run in), 1 when it failed or was interrupted;
1 for an unknown ID or a Redis that does not answer; 2 without ``redis.url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from regsweep import console
from regsweep.records import Records, public, reading
from regsweep.render import human_bytes, short
from worker.errors import ConfigError, UnknownJob
from worker.settings.model import Config
from worker.store.audit import AuditEntry, Outcome
from worker.store.state import JOB_TTL, JobState

DEFAULT_LIMIT: Final = 20
#: How often ``--follow`` reads the job again.
FOLLOW_INTERVAL: Final = 1.0
#: States a job does not leave.
FINAL_STATES: Final = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.INTERRUPTED}
)
#: Final states ``--follow`` exits 1 for.
FAILED_STATES: Final = frozenset({JobState.FAILED, JobState.INTERRUPTED})
#: A prefix shorter than this is not looked up (it would name half the jobs).
MIN_PREFIX: Final = 4
#: Deletions the listing shows under each job (``jobs ID`` shows them all).
LISTED_DELETIONS: Final = 5

Emit = Callable[[str], None]


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="recent jobs, or one job and what it deleted")
    jobs.add_argument("job_id", nargs="?", metavar="ID", help="a job id or a unique prefix")
    jobs.add_argument(
        "--follow", action="store_true", help="poll ID until it ends; exit 1 if it failed"
    )
    jobs.add_argument(
        "--limit", type=_positive, default=DEFAULT_LIMIT, help=f"default {DEFAULT_LIMIT}"
    )
    jobs.add_argument("--json", action="store_true", help="machine-readable output")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def _print(line: str) -> None:
    print(line, flush=True)


async def jobs_command(args: argparse.Namespace, config: Config) -> int:
    if args.follow and args.job_id is None:
        raise ConfigError("regsweep jobs --follow needs a job ID")
    async with reading(config, "jobs") as records:
        if args.job_id is None:
            return await list_jobs(records, args.limit, as_json=args.json)
        job_id = await resolve(records, args.job_id)
        if args.follow:
            return await follow(records, job_id, as_json=args.json)
        return await show_job(records, job_id, as_json=args.json)


async def resolve(records: Records, given: str) -> str:
    """The job id ``given`` names: itself, or the one recent job whose id starts with it."""
    if await records.state.get_job(given) is not None:
        return given
    listed = await records.state.job_ids_starting(given) if len(given) >= MIN_PREFIX else []
    # An id whose record expired since the index was trimmed names no job.
    found = [i for i in listed if await records.state.get_job(i) is not None]
    if len(found) == 1:
        return found[0]
    if found:
        raise UnknownJob(f"{len(found)} jobs start with {given}: {', '.join(found[:5])}")
    raise UnknownJob(
        f"no job {given} in Redis at {records.location} (unknown, or last updated more than "
        f"{JOB_TTL.days} days ago; an in-process prune's deletions: regsweep audit --job ID)"
    )


# --------------------------------------------------------------------------- the list


async def list_jobs(records: Records, limit: int, *, as_json: bool, out: Emit = _print) -> int:
    found = await records.state.recent_jobs(limit)
    documents = [document(job, await records.deletions(job)) for job in found]
    if as_json:
        out(json.dumps(documents, indent=2))
        return 0
    if not documents:
        out(f"no jobs recorded (in the last {JOB_TTL.days} days)")
        return 0
    out(LIST_HEADER)
    for doc in documents:
        out(list_line(doc))
        deletions = doc["deletions"]
        for entry in deletions[:LISTED_DELETIONS]:
            out("    " + deletion_line(entry))
        if len(deletions) > LISTED_DELETIONS:
            more = len(deletions) - LISTED_DELETIONS
            out(f"    … {more} more: regsweep jobs {doc['id']}")
    return 0


def document(job: Mapping[str, Any], deletions: Sequence[AuditEntry]) -> dict[str, Any]:
    """A job as ``--json`` shows it: its record (``id``, ``kind``, ``state``, ``created``,
    ``updated`` first) and what its audit says it deleted."""
    first = {k: job[k] for k in ("id", "kind", "state", "created", "updated") if k in job}
    return {**first, **job, "deletions": public(deletions)}


def list_line(doc: Mapping[str, Any]) -> str:
    """``<id>  <kind>  <state>  <created>  <repository>  <summary>``."""
    return _columns(
        str(doc.get("id", "?")),
        str(doc.get("kind", "?")),
        str(doc.get("state", "?")),
        when(doc.get("created")),
        repository(doc),
        summary(doc),
    )


def _columns(*cells: str) -> str:
    widths = (32, 7, 11, 20, 20)
    padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
    return "  ".join([*padded, *cells[len(widths) :]]).rstrip()


LIST_HEADER: Final = _columns("ID", "KIND", "STATE", "CREATED", "REPOSITORY", "SUMMARY")


def when(value: object) -> str:
    """An ISO time as ``2026-01-02 10:00:01Z`` (UTC, to the second)."""
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%SZ")
    except ValueError:
        return "-"


def repository(doc: Mapping[str, Any]) -> str:
    """What a job was about: its repository, every repository (a sweep of all), or ``-``."""
    params = _mapping(doc.get("params"))
    named = doc.get("repository") or params.get("repository")
    if named:
        return str(named)
    return "(all)" if doc.get("kind") == "sweep" else "-"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def summary(doc: Mapping[str, Any]) -> str:
    """The counts that are not zero, bytes, errors, and why a job waits or was skipped."""
    counts = _mapping(doc.get("counts"))
    parts = [f"{n} {k}" for k, n in counts.items() if n and k != "bytes"]
    plan = doc.get("plan")
    if doc.get("executed") is False and isinstance(plan, dict):
        parts.append(
            f"planned {plan.get('tags_removed', 0)} tags, "
            f"{plan.get('manifests_removed', 0)} manifests (not carried out)"
        )
    if doc.get("bytes"):
        parts.append(human_bytes(int(doc["bytes"])))
    if doc.get("errors"):
        parts.append(f"{len(doc['errors'])} error(s)")
    for note in ("reason", "waiting", "skipped"):
        if doc.get(note):
            parts.append(str(doc[note]))
    return ", ".join(parts)


def deletion_line(entry: Mapping[str, Any]) -> str:
    """One audited deletion: outcome, repository, digest, tags, rule and reason."""
    tags = ",".join(entry.get("tags", ())) or "-"
    outcome = str(entry.get("outcome"))
    if entry.get("detail") and outcome != Outcome.DELETED:
        outcome += f" ({entry['detail']})"
    return (
        f"{outcome}  {entry.get('repository')}  {short(str(entry.get('digest')))}  "
        f"{entry.get('action')}  tags={tags}  {entry.get('policy')}/{entry.get('rule')}: "
        f"{entry.get('reason')}"
    )


# --------------------------------------------------------------------------- one job


async def show_job(records: Records, job_id: str, *, as_json: bool, out: Emit = _print) -> int:
    job = await records.state.get_job(job_id)
    if job is None:  # expired between resolve() and now
        raise UnknownJob(f"job {job_id} is no longer recorded")
    doc = document(job, await records.deletions(job))
    if as_json:
        out(json.dumps(doc, indent=2))
    else:
        for line in detail_lines(doc):
            out(line)
    return 0


def detail_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = [f"job {doc.get('id')}"]
    rows = [
        ("kind", doc.get("kind")),
        ("state", doc.get("state")),
        ("repository", _policy_of(doc)),
        ("trigger", _mapping(doc.get("params")).get("trigger")),
        ("created", when(doc.get("created"))),
        ("updated", when(doc.get("updated"))),
        ("plan", _plan_line(doc.get("plan"))),
        ("summary", summary(doc) or "nothing done yet"),
        # Parked during a window and run as one prune of the repository.
        ("ran with", f"job {doc['ran_with']}" if doc.get("ran_with") else None),
        ("ran for", ", ".join(f"job {j}" for j in doc.get("ran_for") or ()) or None),
    ]
    lines += [f"  {name:<11}{value}" for name, value in rows if value]
    lines += [f"  error      {e}" for e in doc.get("errors") or ()]
    lines += [f"  note       {n}" for n in doc.get("interruptions") or ()]
    children = doc.get("children")
    if isinstance(children, dict):
        lines += [f"  prune      {repo}: job {child}" for repo, child in children.items()]
    deletions = doc.get("deletions") or []
    lines.append(f"deletions ({len(deletions)}):" if deletions else "deletions: none audited")
    lines += ["  " + deletion_line(e) for e in deletions]
    return lines


def _policy_of(doc: Mapping[str, Any]) -> str:
    name = repository(doc)
    if doc.get("policy"):
        return f"{name} (policy {doc['policy']}, {doc.get('mode', '?')})"
    return name


def _plan_line(plan: object) -> str | None:
    if not isinstance(plan, dict):
        return None
    return (
        f"remove {plan.get('tags_removed', 0)} tags, {plan.get('manifests_removed', 0)} "
        f"manifests; keep {plan.get('tags_kept', 0)} tags; "
        f"{human_bytes(int(plan.get('reclaimable_bytes', 0)))} reclaimable after GC"
    )


# --------------------------------------------------------------------------- --follow


async def follow(
    records: Records,
    job_id: str,
    *,
    as_json: bool,
    out: Emit = _print,
    interval: float = FOLLOW_INTERVAL,
) -> int:
    """Print the job's state changes and settled deletions until it ends; the exit code."""
    state: str | None = None
    shown: set[str] = set()
    while True:
        job = await records.state.get_job(job_id)
        if job is None:
            raise UnknownJob(f"job {job_id} is no longer recorded (its record expired)")
        deletions = await records.deletions(job)
        changed = job.get("state") != state
        state = str(job.get("state"))
        final = state in FINAL_STATES
        if changed and not final:
            out(_state_event(job) if as_json else _state_line(job))
        for entry in deletions:
            if entry.outcome is not Outcome.PENDING and entry.id not in shown:
                shown.add(entry.id)
                out(_deletion_event(entry) if as_json else deletion_line(entry.public()))
        if final:
            doc = document(job, deletions)
            if as_json:
                out(_state_event(job))
            out(json.dumps({"event": "end", "job": doc}) if as_json else _end_line(doc))
            return 1 if state in FAILED_STATES else 0
        if console.reader_gone():  # `jobs ID --follow | head -3`: nobody is watching
            return 0
        await asyncio.sleep(interval)


def _state_event(job: Mapping[str, Any]) -> str:
    keys = ("id", "kind", "state", "updated")
    return json.dumps({"event": "state", **{k: job.get(k) for k in keys}})


def _deletion_event(entry: AuditEntry) -> str:
    return json.dumps({"event": "deletion", **entry.public()})


def _state_line(job: Mapping[str, Any]) -> str:
    return f"{when(job.get('updated'))}  {_title(job)}: {job.get('state')}"


def _title(job: Mapping[str, Any]) -> str:
    """``job <id> (<kind> <repository>)``."""
    about = repository(job)
    return f"job {job.get('id')} ({job.get('kind')}{'' if about == '-' else ' ' + about})"


def _end_line(doc: Mapping[str, Any]) -> str:
    done = summary(doc) or "nothing done"
    lines = [f"{when(doc.get('updated'))}  {_title(doc)}: {doc.get('state')}: {done}"]
    lines += [f"  error: {e}" for e in doc.get("errors") or ()]
    return "\n".join(lines)
