"""What regsweep remembers of each repository between runs: the evidence plans decide on.

Per repository: the tags notifications told of (and when each was pushed), the
tags regsweep saw in its own listings (and between which listings each
appeared), the digests that lost their last tag and since when, indexes pushed
by digest only, and held tags. Two stores keep it behind one interface,
:class:`History`:

- :class:`worker.store.tagindex.TagIndex`, in Redis, when ``redis.url`` is set: the
  service and workers write it, and the CLI reads and writes the same one, so
  every process decides from the same history;
- :class:`LocalHistory`, JSON files next to the audit log, for the CLI without Redis.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from worker.errors import StateError
from worker.oci import Digest
from worker.records import EvidenceSummary, Hold, Sighting

#: Beside the audit file: the CLI's history without Redis, one file per repository.
STATE_DIRECTORY: Final = "regsweep-state"


@dataclass(frozen=True)
class RepositoryHistory:
    """One repository as the state store remembers it."""

    #: tag -> digest as notifications (and reconciling listings) left it.
    tags: Mapping[str, Digest] = field(default_factory=dict)
    #: tag -> when the push that put it on ``tags[tag]`` was notified.
    pushed_at: Mapping[str, datetime] = field(default_factory=dict)
    sightings: Mapping[str, Sighting] = field(default_factory=dict)
    untagged_since: Mapping[Digest, datetime] = field(default_factory=dict)
    #: Indexes pushed by digest only: they protect what they list.
    stored_indexes: frozenset[Digest] = frozenset()
    holds: Mapping[str, Hold] = field(default_factory=dict)
    #: When the last listing regsweep made of the repository started.
    listed_at: datetime | None = None

    def active_holds(self, now: datetime) -> dict[str, Hold]:
        return {tag: hold for tag, hold in self.holds.items() if hold.active(now)}


class History(Protocol):
    """The state store as inventories and ``hold`` see it."""

    #: Whether the registry's notifications feed it (they tell of indexes pushed by digest
    #: only, which no listing shows).
    notified: bool

    async def snapshot(self, repository: str) -> RepositoryHistory: ...

    async def record_listing(
        self, repository: str, live: Mapping[str, Digest], started: datetime, finished: datetime
    ) -> None:
        """A listing that started at ``started`` showed exactly ``live``: new sightings,
        the tag index made to agree, tags gone forgotten."""

    async def hold(self, repository: str, hold: Hold) -> None: ...

    async def unhold(self, repository: str, tag: str) -> bool: ...

    async def holds_of(self, repository: str) -> list[Hold]:
        """The holds recorded on ``repository`` (ended ones included), by tag."""

    async def all_holds(self) -> dict[str, list[Hold]]: ...

    async def forget(self, repository: str, *, tags: Iterable[str], digests: Iterable[str]) -> None:
        """regsweep removed these tags and manifests: no untagged grace to wait out for them."""

    async def record_evidence(self, summary: EvidenceSummary) -> None:
        """What a plan found of the registry's times (its clock, refused or doubted times)."""


def new_sightings(
    known: Mapping[str, Sighting],
    last_listed: datetime | None,
    live: Mapping[str, Digest],
    started: datetime,
    finished: datetime,
) -> dict[str, Sighting]:
    """The sightings after a listing: kept for tags still on the same digest, new for tags
    that appeared or moved since the last listing (pushed after it started)."""
    out: dict[str, Sighting] = {}
    for tag, digest in live.items():
        seen = known.get(tag)
        out[tag] = (
            seen
            if seen is not None and seen.digest == digest
            else Sighting(digest, last_listed, finished, started)
        )
    return out


# --- the file store ---------------------------------------------------------------------


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _sighting(value: list[Any]) -> Sighting:
    digest, earliest, latest, *rest = value
    return Sighting(
        Digest(digest),
        _dt(earliest),
        _dt(latest) or datetime.now(UTC),
        _dt(rest[0] if rest else None),
    )


class LocalHistory:
    """:class:`History` in files (the CLI without Redis): one JSON file per repository in
    a directory, each rewritten atomically under an exclusive lock, so two CLI runs never
    lose each other's updates. File work runs in a thread, off the event loop."""

    notified = False

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def field(self, repository: str) -> Path:
        return self.directory / (urllib.parse.quote(repository, safe="") + ".json")

    async def snapshot(self, repository: str) -> RepositoryHistory:
        repo = await asyncio.to_thread(_read, self.field(repository))
        untagged = {Digest(d): _dt(t) for d, t in repo.get("untagged", {}).items()}
        return RepositoryHistory(
            sightings={tag: _sighting(v) for tag, v in repo.get("seen", {}).items()},
            untagged_since={d: t for d, t in untagged.items() if t is not None},
            holds=_holds(repo),
            listed_at=_dt(repo.get("listed")),
        )

    async def record_listing(
        self, repository: str, live: Mapping[str, Digest], started: datetime, finished: datetime
    ) -> None:
        def change(repo: dict[str, Any]) -> None:
            last = _dt(repo.get("listed"))
            if last is not None and started < last:
                return  # an older listing finishing late: the newer one already counted
            known = {tag: _sighting(v) for tag, v in repo.get("seen", {}).items()}
            seen = new_sightings(known, last, live, started, finished)
            repo["seen"] = {t: _sighting_json(s) for t, s in seen.items()}
            untagged = repo.setdefault("untagged", {})
            still = set(live.values())
            for tag, old in known.items():
                if (tag not in live or live[tag] != old.digest) and old.digest not in still:
                    untagged.setdefault(old.digest, _ts(finished))
            for digest in still:
                untagged.pop(digest, None)
            repo["listed"] = _ts(started)

        await asyncio.to_thread(self._update, repository, change)

    async def forget(self, repository: str, *, tags: Iterable[str], digests: Iterable[str]) -> None:
        gone_tags, gone = set(tags), set(digests)

        def change(repo: dict[str, Any]) -> None:
            for tag in gone_tags:
                repo.get("seen", {}).pop(tag, None)
            for digest in gone:
                repo.get("untagged", {}).pop(digest, None)

        await asyncio.to_thread(self._update, repository, change)

    async def record_evidence(self, summary: EvidenceSummary) -> None:
        """Not kept: ``regsweep status``, which shows it, reads the Redis one only (the plan
        itself already said it in its notes)."""

    async def hold(self, repository: str, hold: Hold) -> None:
        entry = {"until": _ts(hold.until), "reason": hold.reason}

        def change(repo: dict[str, Any]) -> None:
            repo.setdefault("holds", {})[hold.tag] = entry

        await asyncio.to_thread(self._update, repository, change)

    async def holds_of(self, repository: str) -> list[Hold]:
        held = _holds(await asyncio.to_thread(_read, self.field(repository)))
        return [held[tag] for tag in sorted(held)]

    async def unhold(self, repository: str, tag: str) -> bool:
        ended: list[bool] = []

        def change(repo: dict[str, Any]) -> None:
            ended.append(repo.get("holds", {}).pop(tag, None) is not None)

        await asyncio.to_thread(self._update, repository, change)
        return ended[0]

    async def all_holds(self) -> dict[str, list[Hold]]:
        def scan() -> dict[str, list[Hold]]:
            out: dict[str, list[Hold]] = {}
            for path in sorted(self.directory.glob("*.json")):
                held = sorted(_holds(_read(path)).values(), key=lambda h: h.tag)
                if held:
                    out[urllib.parse.unquote(path.stem)] = held
            return out

        return await asyncio.to_thread(scan)

    def _update(self, repository: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Read the repository's file, let ``change`` edit it, write it back atomically;
        one writer at a time."""
        path = self.field(repository)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = path.with_name(path.name + ".lock").open("a")
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            repo = _read(path)
            change(repo)
            _write(path, repo)


def _sighting_json(s: Sighting) -> list[Any]:
    return [s.digest, _ts(s.earliest), _ts(s.latest), _ts(s.shown)]


def _holds(repo: Mapping[str, Any]) -> dict[str, Hold]:
    return {
        tag: Hold(tag, _dt(h["until"]) or datetime.now(UTC), str(h.get("reason", "")))
        for tag, h in repo.get("holds", {}).items()
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path} is not regsweep state (JSON): {exc}") from exc
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from exc
