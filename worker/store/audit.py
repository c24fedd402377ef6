"""The audit log: every deletion recorded before it happens, raw manifest bytes included.

The executor writes a deletion's record (its *intent*) and waits until it is
durable — fsynced for the file, acknowledged for Redis — before it sends the
DELETE; then it *settles* the record with what happened. If the intent cannot
be made durable, nothing is deleted. So every manifest regsweep removed has a
record, even when it crashed right after the DELETE, and ``regsweep restore``
can put it back (byte-identical: the raw bytes are in the record) until
garbage collection removes its blobs; the restore then marks the records it
undid (a :class:`Restoration`), so the next restore of that digest leaves them be.

One audit per installation: the Redis stream when ``redis.url`` is set (the
workers and the CLI alike), else the JSONL file (:class:`JsonlAuditLog`). With
both ``redis.url`` and ``audit.path``, every record goes to both
(:mod:`worker.store.mirror`): a Redis that lost its data keeps restore possible.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

import redis.asyncio as aioredis

from worker.errors import StateError
from worker.store.groupcommit import GroupCommit
from worker.store.keys import Keys
from worker.store.redis import text, wrapped


class Outcome(StrEnum):
    """How a recorded deletion ended."""

    #: Recorded, not settled: the run stopped between the DELETE and its settling (or is
    #: still going). Whether the registry still has it, a look tells.
    PENDING = "pending"
    DELETED = "deleted"
    #: Gone before regsweep's DELETE.
    ALREADY_GONE = "already-gone"
    #: Not deleted after all (spared by the re-check, deferred, failed).
    NOT_DONE = "not-done"


@dataclass(frozen=True)
class AuditEntry:
    """One deletion (or tag removal) of one digest."""

    time: datetime
    repository: str
    digest: str
    media_type: str
    size: int
    #: Tags removed with the deletion (for an ``untag`` action, the one tag).
    tags: tuple[str, ...]
    action: str
    policy: str
    rule: str
    reason: str
    job_id: str
    #: The manifest exactly as the registry served it.
    manifest: bytes
    #: The deleted indexes that listed it and the deleted subjects it refers to.
    parents: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outcome: Outcome = Outcome.PENDING
    #: How the settling put it ("answer lost, HEAD shows it gone", an error).
    detail: str = ""
    #: When a restore put back what this record removed, and that restore's job id.
    restored_at: datetime | None = None
    restored_by: str = ""

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "record": "intent",
            "id": self.id,
            "time": self.time.isoformat(),
            "repository": self.repository,
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "tags": list(self.tags),
            "action": self.action,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "job_id": self.job_id,
            "parents": list(self.parents),
            "manifest": base64.b64encode(self.manifest).decode("ascii"),
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, line: str | bytes) -> AuditEntry:
        """An intent record, or a record written before intents existed (after its DELETE,
        so it is a deletion that happened)."""
        data = json.loads(line)
        if not isinstance(data, dict) or data.get("record", "intent") != "intent":
            raise ValueError("not an audit intent record")
        legacy = "record" not in data
        parent = data.get("parent")
        return cls(
            time=datetime.fromisoformat(data["time"]),
            repository=str(data["repository"]),
            digest=str(data["digest"]),
            media_type=str(data["media_type"]),
            size=int(data["size"]),
            tags=tuple(str(t) for t in data["tags"]),
            action=str(data["action"]),
            policy=str(data["policy"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
            job_id=str(data["job_id"]),
            manifest=base64.b64decode(data["manifest"]),
            parents=tuple(data.get("parents") or ([parent] if parent else [])),
            id=str(data.get("id") or uuid.uuid5(uuid.NAMESPACE_OID, str(line)[:512]).hex),
            outcome=Outcome.DELETED if legacy else Outcome.PENDING,
        )

    def public(self) -> dict[str, Any]:
        """The record as ``audit --json`` shows it (the manifest bytes left out)."""
        data: dict[str, Any] = json.loads(self.to_json())
        data.pop("manifest")
        data.pop("record")
        restored_at = self.restored_at.isoformat() if self.restored_at else None
        return data | {
            "outcome": self.outcome.value,
            "detail": self.detail,
            "restored_at": restored_at,
            "restored_by": self.restored_by or None,
        }


@dataclass(frozen=True)
class Settlement:
    """What happened to the deletion a recorded intent announced."""

    id: str
    outcome: Outcome
    detail: str = ""
    #: The settled record (when the settling process has it): its indexes are updated too.
    entry: AuditEntry | None = field(default=None, compare=False)

    @classmethod
    def of(cls, entry: AuditEntry, outcome: Outcome, detail: str = "") -> Settlement:
        return cls(entry.id, outcome, detail, entry)

    def to_json(self) -> str:
        record = {"record": "settled", "id": self.id, "outcome": self.outcome.value}
        return json.dumps(record | {"detail": self.detail, "time": _now()}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str | bytes) -> Settlement:
        data = json.loads(line)
        return cls(str(data["id"]), Outcome(data["outcome"]), str(data.get("detail", "")))


@dataclass(frozen=True)
class Restoration:
    """A restore put back what the recorded deletion ``id`` removed (its manifest if gone,
    and its tags): the next restore of that digest does not put those tags back again."""

    id: str
    #: The restore's job id.
    job_id: str
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The record restored (when the restoring process has it): its job's index is updated.
    entry: AuditEntry | None = field(default=None, compare=False)

    @classmethod
    def of(cls, entry: AuditEntry, job_id: str) -> Restoration:
        return cls(entry.id, job_id, entry=entry)

    def to_json(self) -> str:
        record = {"record": "restored", "id": self.id, "job_id": self.job_id}
        return json.dumps(record | {"time": self.time.isoformat()}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str | bytes) -> Restoration:
        data = json.loads(line)
        return cls(str(data["id"]), str(data["job_id"]), datetime.fromisoformat(data["time"]))


@dataclass(frozen=True)
class AuditQuery:
    """Which records ``entries`` returns; every field set narrows it."""

    since: datetime | None = None
    repository: str | None = None
    #: A digest or a prefix of one (``sha256:0123abcd…`` or just the hex).
    digest: str | None = None
    job_id: str | None = None

    def matches(self, entry: AuditEntry) -> bool:
        return (
            (self.since is None or entry.time >= self.since)
            and (self.repository is None or entry.repository == self.repository)
            and (self.digest is None or digest_matches(entry.digest, self.digest))
            and (self.job_id is None or entry.job_id == self.job_id)
        )


def digest_matches(digest: str, prefix: str) -> bool:
    """``prefix`` is ``digest``'s beginning, with or without ``sha256:``."""
    return digest.startswith(prefix) or digest.partition(":")[2].startswith(prefix)


@dataclass(frozen=True)
class AuditProblem:
    """A line of the audit file that is not a record (torn by a full disk, or foreign)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class AuditLog(Protocol):
    #: Where the audit is, for messages: a file path or ``redis <stream key>``.
    location: str

    async def intend(self, entries: Sequence[AuditEntry]) -> None:
        """Make ``entries`` durable; raise StateError when that cannot be done."""

    async def settle(self, settlements: Sequence[Settlement]) -> None: ...

    async def mark_restored(self, restorations: Sequence[Restoration]) -> None:
        """Record that a restore put these deletions back; raise StateError if it cannot."""

    async def entries(self, query: AuditQuery = AuditQuery()) -> list[AuditEntry]: ...

    async def deleted(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Of ``digests``, those the audit shows regsweep deleted from ``repository``, or set
        out to delete and never settled (a crash between the DELETE and its settling): asked
        only about digests that are gone now."""

    @property
    def problems(self) -> list[AuditProblem]:
        """Lines skipped by the last read."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def merge(
    entries: Iterable[AuditEntry],
    settlements: Iterable[Settlement],
    restorations: Iterable[Restoration] = (),
) -> dict[str, AuditEntry]:
    """Records by id, each with the last outcome its settlements gave it and the last
    restore that put it back."""
    merged = {entry.id: entry for entry in entries}
    for settled in settlements:
        entry = merged.get(settled.id)
        if entry is not None:
            merged[settled.id] = replace(entry, outcome=settled.outcome, detail=settled.detail)
    for restored in restorations:
        entry = merged.get(restored.id)
        if entry is not None:
            merged[restored.id] = replace(
                entry, restored_at=restored.time, restored_by=restored.job_id
            )
    return merged


# --- the file ---------------------------------------------------------------------------

#: Records of the file that are not deletions: holds put and ended (:mod:`worker.store.mirror`).
NOTE_KINDS: Final = frozenset({"hold", "unhold"})


class JsonlAuditLog:
    """Append-only JSON lines. ``intend`` returns once its lines are fsynced.

    Records that arrive while a write is in flight go out together in the next
    one, with one fsync for all of them (a group commit): a prune records a
    whole wave of deletions at once. Every append starts on a new line, so a
    line torn by a full disk spoils only itself; reading skips it and reports it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self._group: GroupCommit[str, None] = GroupCommit(self._write)
        self._problems: list[AuditProblem] = []

    @property
    def problems(self) -> list[AuditProblem]:
        return list(self._problems)

    async def intend(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            await self._group.submit("".join(e.to_json() + "\n" for e in entries))

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        if settlements:
            await self._group.submit("".join(s.to_json() + "\n" for s in settlements))

    async def mark_restored(self, restorations: Sequence[Restoration]) -> None:
        if restorations:
            await self._group.submit("".join(r.to_json() + "\n" for r in restorations))

    async def note(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append records that are not deletions (holds: :mod:`worker.store.mirror`), each
        with its ``record`` kind; durable when this returns, like an intent."""
        if records:
            await self._group.submit("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def notes(self, kinds: frozenset[str]) -> list[dict[str, Any]]:
        """The records of ``kinds`` (see :meth:`note`), in the order they were written."""
        found: list[dict[str, Any]] = []
        for _, line in self._lines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line; reading the deletions reports it
            if isinstance(record, dict) and record.get("record") in kinds:
                found.append(record)
        return found

    async def _write(self, chunks: list[str]) -> list[None]:
        await asyncio.to_thread(self._append, "".join(chunks))
        return [None] * len(chunks)

    def _append(self, text: str) -> None:
        """Write ``text`` at the end, all or nothing: a write that fails (a full disk) is
        cut back off, so no record of a deletion that was never attempted stays behind."""
        try:
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as fh:
                # Several processes may append (workers, the CLI): one at a time.
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                if created:
                    _give_to_directory_owner(fh.fileno(), self.path.parent)
                start = fh.seek(0, os.SEEK_END)
                if start > 0:
                    fh.seek(start - 1)
                    if fh.read(1) != b"\n":
                        text = "\n" + text  # the last append was torn: start a new line
                try:
                    fh.write(text.encode())
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError:
                    _cut_back(fh, start)
                    raise
            if created:
                _fsync_directory(self.path.parent)
        except OSError as exc:
            raise StateError(f"cannot write the audit log {self.path}: {exc.strerror}") from exc

    async def entries(self, query: AuditQuery = AuditQuery()) -> list[AuditEntry]:
        merged = await asyncio.to_thread(self._read)
        return [e for e in merged.values() if query.matches(e)]

    async def deleted(self, repository: str, digests: Iterable[str]) -> set[str]:
        wanted = set(digests)
        merged = await asyncio.to_thread(self._read)
        return {
            e.digest
            for e in merged.values()
            if e.repository == repository
            and e.digest in wanted
            and e.outcome in (Outcome.DELETED, Outcome.PENDING)
        }

    def _read(self) -> dict[str, AuditEntry]:
        entries: list[AuditEntry] = []
        settlements: list[Settlement] = []
        restorations: list[Restoration] = []
        problems: list[AuditProblem] = []
        for number, line in self._lines():
            try:
                kind = json.loads(line).get("record", "intent")
                if kind == "settled":
                    settlements.append(Settlement.from_json(line))
                elif kind == "restored":
                    restorations.append(Restoration.from_json(line))
                elif kind not in NOTE_KINDS:
                    entries.append(AuditEntry.from_json(line))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(AuditProblem(number, f"not an audit record ({exc})"[:200]))
        self._problems = problems
        return merge(entries, settlements, restorations)

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with self.path.open("rb") as fh:
                for number, line in enumerate(fh, start=1):
                    if line.strip():
                        yield number, line
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read the audit log {self.path}: {exc.strerror}") from exc


def _give_to_directory_owner(fd: int, directory: Path) -> None:
    """A file root creates in another user's directory (compose's gc-worker runs as root,
    the other regsweep processes as ``regsweep``) belongs to that user, or they could not
    append to it, and could not delete anything."""
    if os.geteuid() != 0:
        return
    owner = os.stat(directory)
    with contextlib.suppress(OSError):
        os.fchown(fd, owner.st_uid, owner.st_gid)


def _cut_back(fh: BinaryIO, size: int) -> None:
    """Take a failed append back off (shrinking needs no free space)."""
    with contextlib.suppress(OSError):
        fh.truncate(size)
        os.fsync(fh.fileno())


def _fsync_directory(path: Path) -> None:
    """A new file's name is durable only once its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Redis ------------------------------------------------------------------------------

#: The audit stream keeps at least this many records (approximate trim).
AUDIT_STREAM_MAXLEN: Final = 1_000_000
#: Stream records read per step of :meth:`RedisAuditLog.newest` (intents and settlements).
AUDIT_PAGE_READ: Final = 500
#: How long the lookup indexes beside the stream live after their last write.
AUDIT_INDEX_TTL: Final = timedelta(days=90)


# KEYS[1]: the stream; then three per record: its digest index, its job's list, and the
# repository's set of digests regsweep deleted (or set out to). ARGV: maxlen, index TTL,
# then per record its JSON and digest.
_INTEND: Final = """
local n = (#KEYS - 1) / 3
for i = 1, n do
  local json, digest = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'entry', json)
  local k = 1 + 3 * (i - 1)
  redis.call('ZADD', KEYS[k + 1], 0, digest .. ' ' .. id)
  redis.call('RPUSH', KEYS[k + 2], id)
  redis.call('SADD', KEYS[k + 3], digest)
  for j = 1, 3 do redis.call('EXPIRE', KEYS[k + j], ARGV[2]) end
end
return n
"""


class RedisAuditLog:
    """The audit log as a Redis stream, with the indexes restores and plans look things up by.

    Beside the stream (``<prefix>audit``): per repository a sorted set of
    ``"<digest> <stream id>"`` members (a digest or a prefix of one is a lexical
    range), per job the list of its stream ids, the outcomes of its records and
    which of them a restore put back, per repository the set of digests regsweep
    deleted or set out to delete (the evidence that a signature's subject is gone
    because regsweep deleted it).
    """

    def __init__(self, redis: aioredis.Redis, *, keys: Keys | None = None) -> None:
        self._redis = redis
        self.keys = keys or Keys()
        self._key = self.keys.audit
        self.location = f"redis stream {self._key}"
        self._intend = redis.register_script(_INTEND)

    @property
    def problems(self) -> list[AuditProblem]:
        return []

    async def intend(self, entries: Sequence[AuditEntry]) -> None:
        """XADD each record and index it, atomically: a record is findable by digest and job
        as soon as it is durable."""
        if not entries:
            return
        keys = [self._key]
        args: list[str | int] = [AUDIT_STREAM_MAXLEN, int(AUDIT_INDEX_TTL.total_seconds())]
        for entry in entries:
            keys += [
                self.keys.audit_digests(entry.repository),
                self.keys.audit_job(entry.job_id),
                self.keys.audit_deleted(entry.repository),
            ]
            args += [entry.to_json(), entry.digest]
        with wrapped(f"cannot write the audit ({self.location})"):
            await self._intend(keys=keys, args=args)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            return
        pipe = self._redis.pipeline(transaction=True)
        for settled in settlements:
            record = settled.to_json()
            pipe.xadd(self._key, {"settled": record}, maxlen=AUDIT_STREAM_MAXLEN, approximate=True)
            entry = settled.entry
            if entry is None:
                continue
            pipe.hset(self.keys.audit_outcomes(entry.job_id), settled.id, record)
            pipe.expire(self.keys.audit_outcomes(entry.job_id), AUDIT_INDEX_TTL)
            if settled.outcome is Outcome.NOT_DONE:
                pipe.srem(self.keys.audit_deleted(entry.repository), entry.digest)
        with wrapped(f"cannot settle the audit ({self.location})"):
            await pipe.execute()

    async def mark_restored(self, restorations: Sequence[Restoration]) -> None:
        if not restorations:
            return
        pipe = self._redis.pipeline(transaction=True)
        for restored in restorations:
            record = restored.to_json()
            pipe.xadd(self._key, {"restored": record}, maxlen=AUDIT_STREAM_MAXLEN, approximate=True)
            if restored.entry is not None:
                key = self.keys.audit_restorations(restored.entry.job_id)
                pipe.hset(key, restored.id, record)
                pipe.expire(key, AUDIT_INDEX_TTL)
        with wrapped(f"cannot write the audit ({self.location})"):
            await pipe.execute()

    async def deleted(self, repository: str, digests: Iterable[str]) -> set[str]:
        wanted = sorted(set(digests))
        if not wanted:
            return set()
        with wrapped(f"cannot read the audit ({self.location})"):
            flags = await self._redis.smismember(self.keys.audit_deleted(repository), wanted)
        return {digest for digest, flag in zip(wanted, flags, strict=True) if flag}

    async def entries(self, query: AuditQuery = AuditQuery()) -> list[AuditEntry]:
        with wrapped(f"cannot read the audit ({self.location})"):
            if query.job_id is not None:
                merged = await self._looked_up(await self._job_ids(query.job_id))
            elif query.repository is not None and query.digest is not None:
                merged = await self._looked_up(
                    await self._digest_ids(query.repository, query.digest)
                )
            else:
                since = query.since.timestamp() if query.since else 0
                start = f"{int(since * 1000)}-0" if since > 0 else "-"  # ids count from 1970
                merged = _merged(await self._redis.xrange(self._key, min=start, max="+") or ())
        return [e for e in merged.values() if query.matches(e)]

    async def newest(
        self, query: AuditQuery, limit: int, before: str | None = None
    ) -> tuple[list[AuditEntry], str | None]:
        """Up to ``limit`` records matching ``query``, newest first, from the stream id
        ``before`` down (exclusive; None: from the end): a page, and the cursor of the next
        one (None: no more). Looked up by index for a job or a digest, else read backwards
        in chunks, so a page of a long audit costs what it shows."""
        if query.job_id is not None or (query.repository and query.digest):
            found = sorted(await self.entries(query), key=lambda e: e.time, reverse=True)
            return found[:limit], None
        floor = f"{int(query.since.timestamp() * 1000)}-0" if query.since else "-"
        picked: list[tuple[str, AuditEntry]] = []
        top = f"({before}" if before else "+"
        with wrapped(f"cannot read the audit ({self.location})"):
            while len(picked) < limit:
                rows = list(
                    await self._redis.xrevrange(self._key, top, floor, count=AUDIT_PAGE_READ) or ()
                )
                picked += _intents(rows, query)[: limit - len(picked)]
                if len(rows) < AUDIT_PAGE_READ:
                    break
                top = f"({text(cast(Any, rows[-1][0]))}"
            settled = await self._outcomes({e.job_id for _, e in picked})
        entries = list(merge([e for _, e in picked], settled).values())
        return entries, (picked[-1][0] if len(picked) == limit else None)

    async def _outcomes(self, jobs: Iterable[str]) -> list[Settlement]:
        pipe = self._redis.pipeline(transaction=False)
        ordered = sorted(jobs)
        for job_id in ordered:
            pipe.hvals(self.keys.audit_outcomes(job_id))
        return [Settlement.from_json(v) for values in await pipe.execute() for v in values]

    async def _job_ids(self, job_id: str) -> list[str]:
        return [text(i) for i in await self._redis.lrange(self.keys.audit_job(job_id), 0, -1)]

    async def _digest_ids(self, repository: str, prefix: str) -> list[str]:
        start = prefix if prefix.startswith("sha") else f"sha256:{prefix}"
        members = await self._redis.zrangebylex(
            self.keys.audit_digests(repository), f"[{start}", f"[{start}\xff"
        )
        return [text(m).rpartition(" ")[2] for m in members]

    async def _looked_up(self, stream_ids: Sequence[str]) -> dict[str, AuditEntry]:
        """The records ``stream_ids`` name, with the outcomes their jobs settled."""
        if not stream_ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for stream_id in stream_ids:
            pipe.xrange(self._key, min=stream_id, max=stream_id)
        entries = _merged(row for rows in await pipe.execute() for row in rows or ())
        pipe = self._redis.pipeline(transaction=False)
        jobs = sorted({entry.job_id for entry in entries.values()})
        for job_id in jobs:
            pipe.hvals(self.keys.audit_outcomes(job_id))
            pipe.hvals(self.keys.audit_restorations(job_id))
        answers = await pipe.execute()
        settled = [Settlement.from_json(v) for values in answers[0::2] for v in values]
        restored = [Restoration.from_json(v) for values in answers[1::2] for v in values]
        return merge(entries.values(), settled, restored)


def _intents(rows: Iterable[tuple[Any, Any]], query: AuditQuery) -> list[tuple[str, AuditEntry]]:
    """The intent records among stream ``rows`` that ``query`` matches, with their ids."""
    found: list[tuple[str, AuditEntry]] = []
    for stream_id, fields in rows:
        raw = _field(fields or {}, "entry")
        if raw is None:
            continue
        entry = AuditEntry.from_json(raw)
        if query.matches(entry):
            found.append((text(stream_id), entry))
    return found


def _merged(rows: Iterable[tuple[Any, Any]]) -> dict[str, AuditEntry]:
    """Stream rows as records by id, each with its last settlement applied."""
    entries: list[AuditEntry] = []
    settlements: list[Settlement] = []
    restorations: list[Restoration] = []
    for _, row in rows:
        fields = row or {}
        if (raw := _field(fields, "entry")) is not None:
            entries.append(AuditEntry.from_json(raw))
        elif (raw := _field(fields, "settled")) is not None:
            settlements.append(Settlement.from_json(raw))
        elif (raw := _field(fields, "restored")) is not None:
            restorations.append(Restoration.from_json(raw))
    return merge(entries, settlements, restorations)


def _field(fields: Mapping[Any, Any], name: str) -> str | None:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
