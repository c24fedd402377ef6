"""What regsweep remembers of each repository between runs: the evidence plans decide on.

Per repository: the tags notifications told of (and when each was pushed), the
tags regsweep saw in its own listings (and between which listings each
appeared), the digests that lost their last tag and since when, indexes pushed
by digest only, and held tags. Two stores keep it behind one interface,
:class:`History`:

- :class:`worker.tagindex.TagIndex`, in Redis, when ``redis.url`` is set: the
  service and workers write it, and the CLI reads and writes the same one, so
  every process decides from the same history;
- :class:`LocalHistory`, a JSON file next to the audit log, for the CLI without Redis.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from worker.errors import StateError
from worker.evidence import Sighting
from worker.model import Digest, Hold

STATE_FILE: Final = "regsweep-state.json"


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

    async def all_holds(self) -> dict[str, list[Hold]]: ...


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
    """:class:`History` in a JSON file (the CLI without Redis), rewritten atomically under
    an exclusive lock, so two CLI runs never lose each other's updates."""

    notified = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def snapshot(self, repository: str) -> RepositoryHistory:
        repo = self._read().get("repositories", {}).get(repository, {})
        sightings = {tag: _sighting(v) for tag, v in repo.get("seen", {}).items()}
        holds = {
            tag: Hold(tag, _dt(h["until"]) or datetime.now(UTC), str(h.get("reason", "")))
            for tag, h in repo.get("holds", {}).items()
        }
        untagged = {Digest(d): _dt(t) for d, t in repo.get("untagged", {}).items()}
        return RepositoryHistory(
            sightings=sightings,
            untagged_since={d: t for d, t in untagged.items() if t is not None},
            holds=holds,
            listed_at=_dt(repo.get("listed")),
        )

    async def record_listing(
        self, repository: str, live: Mapping[str, Digest], started: datetime, finished: datetime
    ) -> None:
        with self._update() as data:
            repo = data.setdefault("repositories", {}).setdefault(repository, {})
            last = _dt(repo.get("listed"))
            if last is not None and started < last:
                return  # an older listing finishing late: the newer one already counted
            known = {tag: _sighting(v) for tag, v in repo.get("seen", {}).items()}
            seen = new_sightings(known, last, live, started, finished)
            repo["seen"] = {
                t: [s.digest, _ts(s.earliest), _ts(s.latest), _ts(s.shown)] for t, s in seen.items()
            }
            untagged = repo.setdefault("untagged", {})
            still = set(live.values())
            for tag, old in known.items():
                if (tag not in live or live[tag] != old.digest) and old.digest not in still:
                    untagged.setdefault(old.digest, _ts(finished))
            for digest in still:
                untagged.pop(digest, None)
            repo["listed"] = _ts(started)

    async def hold(self, repository: str, hold: Hold) -> None:
        with self._update() as data:
            repo = data.setdefault("repositories", {}).setdefault(repository, {})
            entry = {"until": _ts(hold.until), "reason": hold.reason}
            repo.setdefault("holds", {})[hold.tag] = entry

    async def unhold(self, repository: str, tag: str) -> bool:
        with self._update() as data:
            holds = data.get("repositories", {}).get(repository, {}).get("holds", {})
            return holds.pop(tag, None) is not None

    async def all_holds(self) -> dict[str, list[Hold]]:
        out: dict[str, list[Hold]] = {}
        for name, repo in self._read().get("repositories", {}).items():
            held = [
                Hold(tag, _dt(h["until"]) or datetime.now(UTC), str(h.get("reason", "")))
                for tag, h in repo.get("holds", {}).items()
            ]
            if held:
                out[name] = sorted(held, key=lambda h: h.tag)
        return out

    def forget_untagged(self, repository: str, digests: list[str]) -> None:
        with self._update() as data:
            untagged = data.get("repositories", {}).get(repository, {}).get("untagged", {})
            for digest in digests:
                untagged.pop(digest, None)

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{self.path} is not regsweep state (JSON): {exc}") from exc
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """Read, let the caller change, write back atomically; one writer at a time."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = lock_path.open("a")
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            self._write(data)

    def _write(self, data: Mapping[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.path)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
