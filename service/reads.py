"""What the read API and the dashboard read: repositories, plans, jobs, audit, holds, status.

Every function here reads Redis only (the records the workers keep): never the
registry, never the engine. A repository's plan is the last one a worker made
(:mod:`worker.store.views`), told apart from what the tag index learned since
(tags pushed, moved or deleted after it), with the holds as they are now. The
read API returns these documents as JSON; the dashboard renders the same ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from worker.maintenance.window import window_document
from worker.oci import Digest
from worker.records import Hold
from worker.settings.model import Config
from worker.store.audit import AuditEntry, AuditQuery, RedisAuditLog
from worker.store.open import tag_index
from worker.store.redis import wrapped
from worker.store.state import RECENT_JOBS_CAP, State
from worker.store.status import dead_letters, deferred_prunes, health_records
from worker.store.views import (
    read_gc_history,
    read_summaries,
    read_view,
    summaries_version,
)

#: Rows per page unless asked otherwise, and the most a page may hold.
PER_PAGE: Final = 50
MAX_PER_PAGE: Final = 5000
#: Deletions listed under each job of a listing (a job's page lists them all).
JOB_DELETIONS: Final = 5
#: How the repositories listing sorts (``-name`` reverses).
REPOSITORY_SORTS: Final = ("name", "tags", "bytes", "reclaimable_bytes", "planned_at", "last_prune")
#: How a repository's tags sort.
TAG_SORTS: Final = ("tag", "pushed", "size", "verdict")
#: Verdicts a tag row may have: the plan's, and what the tag index learned since.
VERDICTS: Final = ("keep", "delete", "untag", "unplanned", "moved", "gone")


@dataclass(frozen=True)
class Page:
    """Which slice of a listing: 1-based ``number`` of ``size`` rows."""

    number: int = 1
    size: int = PER_PAGE

    def cut(self, rows: Sequence[Any]) -> list[Any]:
        start = (self.number - 1) * self.size
        return list(rows[start : start + self.size])

    def document(self, total: int) -> dict[str, int]:
        pages = max(1, -(-total // self.size))
        return {"page": self.number, "per_page": self.size, "total": total, "pages": pages}


class ServiceParts(Protocol):
    """What the read side takes from the running service (its ``Endpoints``)."""

    config: Config

    @property
    def state(self) -> State: ...


class Readers:
    """The service's :class:`Reader`, made again when the lifespan renews its state store or
    the service takes an edited policy file (a token revoked there stops reading at once)."""

    def __init__(self, parts: ServiceParts) -> None:
        self.parts = parts
        self._reader: Reader | None = None

    def __call__(self) -> Reader:
        state, config = self.parts.state, self.parts.config
        made = self._reader
        if made is None or made.state is not state or made.config is not config:
            self._reader = made = Reader(config, state)
        return made


class Reader:
    """The installation's records over the service's Redis client."""

    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self.keys = state.keys
        # The holds the dashboard sets go to the audit file too (audit.path), as the CLI's
        # and restore's do: a Redis that loses its data must not lose them.
        self.index = tag_index(state.client, config, prefix=state.keys.prefix)
        self.audit = RedisAuditLog(state.client, keys=state.keys)
        self._summaries_cache: tuple[int, dict[str, dict[str, Any]]] | None = None
        self._indexed_cache: tuple[int, list[str]] | None = None

    # --- repositories ----------------------------------------------------------------

    async def repositories(
        self, search: str = "", sort: str = "name", page: Page = Page()
    ) -> dict[str, Any]:
        """Every repository a plan or the tag index knows, filtered by ``search`` (a part of
        the name), sorted and cut to ``page``; rows a worker has not planned yet carry the
        tag index's count."""
        summaries = await self._summaries()
        names = await self._names(summaries)
        needle = search.strip().lower()
        found = [n for n in names if needle in n.lower()] if needle else names
        ordered = _sorted(found, summaries, sort)
        shown = [_repository_row(n, summaries.get(n), self.config) for n in page.cut(ordered)]
        await self._fill_unplanned(shown)
        return {
            **page.document(len(ordered)),
            "sort": sort,
            "search": search,
            "repositories": shown,
        }

    async def _summaries(self) -> dict[str, dict[str, Any]]:
        """Every summary, parsed once per change (one GET tells whether any changed): the
        repositories page of thousands then costs a sort, not a parse of each."""
        version = await summaries_version(self.state.client, self.keys)
        if self._summaries_cache is None or self._summaries_cache[0] != version:
            summaries = await read_summaries(self.state.client, self.keys)
            self._summaries_cache = (version, summaries)
        return self._summaries_cache[1]

    async def _names(self, summaries: Mapping[str, Any]) -> list[str]:
        """The planned repositories and those the tag index knows (a set that only grows, so
        its size tells whether it changed)."""
        with wrapped("cannot read the tag index"):
            count = await self.index.repository_count()
        if self._indexed_cache is None or self._indexed_cache[0] != count:
            self._indexed_cache = (count, await self.index.repositories())
        return sorted(set(summaries) | set(self._indexed_cache[1]))

    async def _fill_unplanned(self, rows: list[dict[str, Any]]) -> None:
        unplanned = [r for r in rows if r["planned_at"] is None]
        if not unplanned:
            return
        with wrapped("cannot read the tag index"):
            sizes = await self.index.sizes([row["name"] for row in unplanned])
        for row, (tags, held) in zip(unplanned, sizes, strict=True):
            row["tags"], row["held"] = tags, held

    async def totals(self) -> dict[str, Any]:
        """Sums over every repository's last plan: the overview's sizes."""
        summaries = (await self._summaries()).values()
        return {
            "repositories": len(summaries),
            "bytes": sum(int(s.get("bytes") or 0) for s in summaries),
            "reclaimable_bytes": sum(int(s.get("reclaimable_bytes") or 0) for s in summaries),
            "tags_removed": sum(int(s.get("tags_removed") or 0) for s in summaries),
        }

    # --- a repository's plan ---------------------------------------------------------

    async def plan(self, repository: str) -> dict[str, Any] | None:
        """The last plan of ``repository`` as it stands now; None when nothing is known."""
        view, live, holds = await asyncio.gather(
            read_view(self.state.client, self.keys, repository),
            self._index(repository),
            self.index_holds(repository),
        )
        if view is None and live is None:
            return None
        policy = self.config.policy_for(repository)
        doc = view or _empty_view(repository, policy.name if policy else None)
        doc["tags"] = _merged_tags(doc["tags"], live, holds, datetime.now(UTC))
        doc["configured_policy"] = policy.name if policy else None
        return doc

    async def _index(self, repository: str) -> dict[str, tuple[Digest, datetime | None]] | None:
        """The tag index's tags of ``repository`` (and notified push times); None when the
        index does not know the repository."""
        with wrapped("cannot read the tag index"):
            known = await self.index.knows(repository)
        if not known:
            return None
        tags, pushed = await asyncio.gather(
            self.index.tags(repository), self.index.pushed_at(repository)
        )
        return {tag: (digest, pushed.get(tag)) for tag, digest in tags.items()}

    async def index_holds(self, repository: str) -> dict[str, Hold]:
        return {hold.tag: hold for hold in await self.index.holds_of(repository)}

    # --- jobs, audit, holds, dead letters, status ------------------------------------

    async def jobs(
        self, limit: int, kind: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest jobs first (of ``kind``, in ``state``), each with its first deletions."""
        found = await self.state.recent_jobs(RECENT_JOBS_CAP if kind or state else limit)
        wanted = [
            j
            for j in found
            if (not kind or j.get("kind") == kind) and (not state or j.get("state") == state)
        ][:limit]
        listed = await asyncio.gather(*(self.deletions(j, JOB_DELETIONS) for j in wanted))
        return [_job_document(j, d) for j, d in zip(wanted, listed, strict=True)]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """One job with every deletion its audit records (a sweep: its prunes')."""
        found = await self.state.get_job(job_id)
        if found is None:
            return None
        return _job_document(found, await self.deletions(found, None))

    async def deletions(self, job: Mapping[str, Any], limit: int | None) -> list[AuditEntry]:
        """What the audit records ``job`` deleted (a sweep: its prunes), oldest first."""
        entries: list[AuditEntry] = []
        for job_id in _job_ids(job):
            entries += await self.audit.entries(AuditQuery(job_id=job_id))
            if limit is not None and len(entries) >= limit:
                break
        ordered = sorted(entries, key=lambda e: (e.time, e.id))
        return ordered if limit is None else ordered[:limit]

    async def audit_page(self, query: AuditQuery, limit: int, before: str | None) -> dict[str, Any]:
        entries, cursor = await self.audit.newest(query, limit, before)
        return {"entries": [e.public() for e in entries], "next": cursor}

    async def holds(self) -> list[dict[str, str]]:
        now = datetime.now(UTC)
        held = await self.index.all_holds()
        return [
            {"repository": repo, "tag": h.tag, "until": h.until.isoformat(), "reason": h.reason}
            for repo in sorted(held)
            for h in held[repo]
            if h.active(now)
        ]

    async def dead_letters(self, limit: int) -> dict[str, Any]:
        counts = await dead_letters(self.state, 0)
        entries = await self.state.dead_letters(limit)
        return {"kept": counts.kept, "total": counts.total, "entries": entries}

    async def status(self) -> dict[str, Any]:
        """Windows, the running GC, deferred prunes, dead letters, the last prune, sweep and
        GC (with its report), and the GC history's figures."""
        now = datetime.now(UTC)
        health = await health_records(self.state)
        letters = await dead_letters(self.state, 0)
        last_gc = await self.state.newest_job("gc")
        return {
            "time": now.isoformat(),
            "maintenance": {
                "window": window_document(self.config.maintenance, now),
                "active_job": health.maintenance_job,
                "controller": self.config.maintenance.controller is not None,
            },
            "deferred": [asdict(d) for d in await deferred_prunes(self.state)],
            "dead_letters": {"kept": letters.kept, "total": letters.total},
            "last_successful_prune": health.last_prune,
            "last_sweep": await self.state.newest_job("sweep"),
            "last_gc": last_gc,
            "gc_history": await read_gc_history(self.state.client, self.keys),
        }


# --- shaping rows ------------------------------------------------------------------------


def _repository_row(name: str, summary: Mapping[str, Any] | None, config: Config) -> dict[str, Any]:
    policy = config.policy_for(name)
    base: dict[str, Any] = {
        "name": name,
        "configured_policy": policy.name if policy else None,
        "policy": None,
        "mode": policy.mode.value if policy else None,
        "tags": None,
        "manifests": None,
        "bytes": None,
        "reclaimable_bytes": None,
        "tags_removed": None,
        "held": None,
        "planned_at": None,
        "job_id": None,
        "last_prune": None,
    }
    if summary:
        base.update({k: v for k, v in summary.items() if k in base})
    return base


def _sorted(names: list[str], summaries: Mapping[str, Any], sort: str) -> list[str]:
    """``names`` by ``sort`` (``-`` first: descending); those without the value last (by
    name) either way."""
    field = sort.lstrip("-")
    if field == "name":
        return sorted(names, reverse=sort.startswith("-"))

    def value(name: str) -> Any:
        summary = summaries.get(name) or {}
        if field == "last_prune":
            return (summary.get("last_prune") or {}).get("time")
        return summary.get(field)

    known = [(v, n) for n in names if (v := value(n)) is not None]
    known.sort(reverse=sort.startswith("-"))
    unknown = sorted(n for n in names if value(n) is None)
    return [n for _, n in known] + unknown


def _empty_view(repository: str, policy: str | None) -> dict[str, Any]:
    """What a page shows of a repository no worker has planned yet: the tag index alone."""
    return {
        "repository": repository,
        "policy": policy,
        "mode": None,
        "planned_at": None,
        "job_id": None,
        "executed": False,
        "notes": [],
        "summary": None,
        "tags": [],
        "manifests": {},
    }


def _merged_tags(
    rows: list[dict[str, Any]],
    live: Mapping[str, tuple[Digest, datetime | None]] | None,
    holds: Mapping[str, Hold],
    now: datetime,
) -> list[dict[str, Any]]:
    """The plan's rows with what the tag index learned since: a tag gone, moved, or pushed
    after the plan; holds as they are now."""
    merged: list[dict[str, Any]] = []
    planned = set()
    for planned_row in rows:
        planned.add(planned_row["tag"])
        row = dict(planned_row)
        if live is not None and row["tag"] not in live:
            row["verdict"] = "gone"
        elif live is not None and live[row["tag"]][0] != row["digest"]:
            row["verdict"], row["moved_to"] = "moved", live[row["tag"]][0]
        merged.append(row)
    for tag, (digest, pushed) in sorted((live or {}).items()):
        if tag not in planned:
            merged.append(_unplanned_row(tag, digest, pushed))
    for row in merged:
        hold = holds.get(row["tag"])
        active = hold is not None and hold.active(now)
        row["held"] = active
        row["held_until"] = hold.until.isoformat() if hold is not None and active else None
    return merged


def _unplanned_row(tag: str, digest: Digest, pushed: datetime | None) -> dict[str, Any]:
    at = pushed.isoformat() if pushed else None
    source = "notification" if pushed else "unknown"
    return {
        "tag": tag,
        "digest": digest,
        "media_type": "",
        "size": None,
        "pushed": {"source": source, "earliest": at, "latest": at},
        "verdict": "unplanned",
        "rule": "",
        "reason": "pushed after the last plan",
        "held": False,
        "held_until": None,
        "protected": False,
        "subject": None,
    }


def _is(job: Mapping[str, Any], field: str, wanted: str | None) -> bool:
    return wanted is None or wanted == "" or job.get(field) == wanted


def _job_ids(job: Mapping[str, Any]) -> list[str]:
    """A job's id and, for a sweep, the ids of its per-repository prunes."""
    children = job.get("children")
    own = [str(job["id"])] if "id" in job else []
    return own + ([str(c) for c in children.values()] if isinstance(children, dict) else [])


def _job_document(job: Mapping[str, Any], deletions: Sequence[AuditEntry]) -> dict[str, Any]:
    first = {k: job[k] for k in ("id", "kind", "state", "created", "updated") if k in job}
    return {**first, **job, "deletions": [e.public() for e in deletions]}
