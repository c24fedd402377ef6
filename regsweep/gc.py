"""``regsweep gc [--dry-run] [--enqueue] [--storage-prune]``.

Without ``--enqueue`` the window runs in this process, right now (a manual
GC is not held to the window; see :mod:`worker.maintenance.window`), and the
report is printed. It still needs Redis: the cluster-wide GC lock and the
maintenance flag that pauses the workers' prunes live there. The prunes
parked meanwhile are released by the workers' next tick (within 30 s).

With ``--enqueue`` a job is recorded and ``regsweep.gc`` is sent to the
``gc`` queue; the job id is printed. Both print the running GC's job id
instead when a GC is already running. ``--json`` prints one JSON object instead of
lines: the job id, how the request ended and, when GC ran, its report.
``--storage-prune`` runs the storage-level prune in this window (as
``maintenance.storage_prune: true`` does in every window); a dry run cannot, it
switches nothing read-only (``regsweep plan`` shows what would go).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, Final

from worker.errors import ConfigError
from worker.maintenance.job import GcRequest, GcStatus, open_maintenance, run_gc
from worker.queue.celery_app import make_celery
from worker.queue.enqueue import enqueue
from worker.queue.messages import TaskMessage, follow_hint
from worker.queue.names import GC_QUEUE, TASK_GC
from worker.settings.model import Config
from worker.store.gclock import GcLock
from worker.store.keys import Keys
from worker.store.redis import sync_client
from worker.store.state import SyncState

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
TRIGGER: Final = "cli"

Printer = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def gc_command(
    config: Config,
    *,
    dry_run: bool,
    enqueue: bool,
    as_json: bool = False,
    storage_prune: bool = False,
    out: Printer = print,
    err: Printer = _stderr,
) -> int:
    """Run or enqueue one GC; the exit code (0 done, enqueued or already running; 1 failed)."""
    if config.redis_url is None:
        raise ConfigError(
            "regsweep gc needs Redis (redis.url or REGSWEEP_REDIS_URL): the GC lock and the "
            "maintenance flag that pauses pruning are kept there"
        )
    _check_storage_prune(config, dry_run=dry_run, storage_prune=storage_prune)
    if enqueue:
        return _enqueue(
            config,
            config.redis_url,
            dry_run=dry_run,
            as_json=as_json,
            out=out,
            err=err,
            storage_prune=storage_prune,
        )
    with open_maintenance(config, storage_prune=storage_prune) as m:
        job_id = m.state.create_job("gc", {"dry_run": dry_run, "trigger": TRIGGER})
        outcome = run_gc(m, GcRequest(job_id, dry_run, TRIGGER))
    ran = outcome.report is not None
    code = EXIT_FAILED if ran and outcome.status is not GcStatus.DONE else EXIT_OK
    if as_json:
        report = outcome.report.summary() if outcome.report else None
        errors = outcome.report.errors if outcome.report else []
        out(
            json.dumps(
                _result(outcome.job_id, outcome.status.value, outcome.reason, report, errors)
            )
        )
        return code
    if outcome.report is None:
        err(f"regsweep: GC not run: {outcome.reason}; job {outcome.job_id}")
        out(outcome.job_id)
        return EXIT_OK
    for line in outcome.report.lines():
        out(line)
    if outcome.report.deferred_released is None and not dry_run:
        out("prunes deferred during the window: released by the workers' next tick")
    return code


def _check_storage_prune(config: Config, *, dry_run: bool, storage_prune: bool) -> None:
    if not storage_prune:
        return
    if dry_run:
        raise ConfigError(
            "regsweep: --storage-prune cannot be a dry run (a dry run switches nothing "
            "read-only); regsweep plan shows what it would delete"
        )
    if config.registry.storage_path is None:
        raise ConfigError(
            "regsweep: --storage-prune needs registry.storage_path (the storage it prunes)"
        )


def _result(
    job_id: str, status: str, reason: str, report: dict[str, Any] | None, errors: list[str]
) -> dict[str, Any]:
    """``regsweep gc --json``: one object, whichever way the request ended."""
    return {
        "job_id": job_id,
        "status": status,
        "reason": reason,
        "errors": errors,
        "report": report,
    }


def _enqueue(
    config: Config,
    url: str,
    *,
    dry_run: bool,
    as_json: bool,
    out: Printer,
    err: Printer,
    storage_prune: bool = False,
) -> int:
    client = sync_client(url)
    try:
        holder = GcLock(client, Keys()).holder()
        if holder is not None:
            reason = f"a GC is already running: job {holder.job_id}"
            if as_json:
                out(json.dumps(_result(holder.job_id, GcStatus.BUSY.value, reason, None, [])))
            else:
                err(f"regsweep: {reason}")
                out(holder.job_id)
            err(follow_hint(holder.job_id))
            return EXIT_OK
        job_id = SyncState(client).create_job("gc", {"dry_run": dry_run, "trigger": TRIGGER})
    finally:
        client.close()
    app = make_celery(config)
    kwargs = {"job_id": job_id, "dry_run": dry_run, "trigger": TRIGGER}
    if storage_prune:
        kwargs["storage_prune"] = True
    try:
        enqueue(app, TaskMessage(TASK_GC, kwargs, GC_QUEUE))
    finally:
        app.close()
    out(json.dumps(_result(job_id, "queued", "", None, [])) if as_json else job_id)
    err(follow_hint(job_id))
    return EXIT_OK
