"""The dashboard's records in Redis: each repository's last plan, their summaries, GC history.

A worker writes a repository's view (:mod:`worker.engine.view`) after every
plan of the policy's own (a prune, a dry run, a sweep's prune; not a
deletion asked for in the dashboard, whose plan judges nothing else), under
the repository's prune lock, and its summary into one hash, so the
repositories page of thousands reads one ``HGETALL`` and a repository page one
``GET``. The GC job pushes each report's figures onto a capped list: the
maintenance page's history outlives the job records (7 days).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import redis
import redis.asyncio as aioredis

from worker.store.keys import Keys
from worker.store.redis import text, wrapped

#: The shape of a plan view (:mod:`worker.engine.view` writes it); a reader refuses others
#: (an older worker's are simply replaced).
VIEW_VERSION: Final = 1
#: GC reports kept for the maintenance page's history.
GC_HISTORY_CAP: Final = 200
#: The summary fields the repositories page reads (the view's ``summary`` and these).
SUMMARY_FIELDS: Final = ("policy", "mode", "planned_at", "job_id")


def summary_of(view: Mapping[str, Any], last_prune: Mapping[str, Any] | None) -> dict[str, Any]:
    """A repository's line on the repositories page: its plan's summary and last prune."""
    return {
        **{key: view.get(key) for key in SUMMARY_FIELDS},
        **view["summary"],
        "last_prune": dict(last_prune) if last_prune else None,
    }


async def save_view(
    client: aioredis.Redis,
    keys: Keys,
    view: Mapping[str, Any],
    *,
    deleted: int | None = None,
) -> None:
    """Keep ``view`` and its summary; ``deleted`` (a run that was carried out): what it
    deleted becomes the repository's last prune, else the last one stays."""
    repository = str(view["repository"])
    with wrapped(f"cannot read the summary of {repository}"):
        before = await client.hget(keys.plan_views, repository)
    last = _last_prune(before)
    if deleted is not None:
        last = {"time": view["planned_at"], "job_id": view["job_id"], "deleted": deleted}
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.plan_view(repository), json.dumps(view, separators=(",", ":")))
    pipe.hset(keys.plan_views, repository, json.dumps(summary_of(view, last)))
    pipe.incr(keys.plan_views_version)
    with wrapped(f"cannot keep the plan of {repository}"):
        await pipe.execute()


def _last_prune(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        found = json.loads(raw).get("last_prune")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


async def read_view(client: aioredis.Redis, keys: Keys, repository: str) -> dict[str, Any] | None:
    """The last plan's view of ``repository``; None when none was made (or by an older
    worker whose shape this reader does not know)."""
    with wrapped(f"cannot read the plan of {repository}"):
        raw = await client.get(keys.plan_view(repository))
    if raw is None:
        return None
    view = json.loads(raw)
    return view if isinstance(view, dict) and view.get("version") == VIEW_VERSION else None


async def summaries_version(client: aioredis.Redis, keys: Keys) -> int:
    """How many times the summaries changed (a reader's cache is good while this stays)."""
    with wrapped("cannot read the repository summaries"):
        return int(await client.get(keys.plan_views_version) or 0)


async def read_summaries(client: aioredis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every repository's summary, by name."""
    with wrapped("cannot read the repository summaries"):
        raw = await client.hgetall(keys.plan_views)
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        try:
            out[text(name)] = json.loads(value)
        except ValueError:
            continue
    return out


def record_gc(client: redis.Redis, keys: Keys, job_id: str, summary: Mapping[str, Any]) -> None:
    """Push a finished GC's figures onto the history (newest first, capped)."""
    entry = {
        "job_id": job_id,
        "finished": summary.get("finished"),
        "dry_run": summary.get("dry_run"),
        "ok": summary.get("gc_ok"),
        "bytes_reclaimed": summary.get("bytes_reclaimed"),
        "bytes_after": summary.get("bytes_after"),
    }
    with wrapped("cannot record the GC history"):
        pipe = client.pipeline(transaction=True)
        pipe.lpush(keys.gc_history, json.dumps(entry))
        pipe.ltrim(keys.gc_history, 0, GC_HISTORY_CAP - 1)
        pipe.execute()


async def read_gc_history(
    client: aioredis.Redis, keys: Keys, limit: int = GC_HISTORY_CAP
) -> list[dict[str, Any]]:
    """The newest ``limit`` GC reports' figures, newest first."""
    with wrapped("cannot read the GC history"):
        raw = await client.lrange(keys.gc_history, 0, limit - 1)
    return [json.loads(item) for item in raw]
