"""Take a frozen :class:`~worker.engine.model.Inventory` of one repository from the live registry.

Cost model (what the bench holds us to): one GET per tag (the manifest by tag
gives digest, type and graph in one round trip, where HEAD would need a second
request for the body), one GET per index child or referrer not already seen.
Push times come from the state store (notifications, earlier listings) and,
with ``registry.storage_path``, from the storage's tag links: a plan then
reads no image config at all. Configs are read only for a policy that asks
for ``age_from: build_time``, once per config digest for the life of the
process (they are content addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol, TypeVar

from worker import oci
from worker.clock import ClockSkew
from worker.engine.evidence import Judgement, TagEvidence, judge
from worker.engine.model import Inventory
from worker.engine.policy import AgeSource, Policy
from worker.errors import ManifestUnknown, RegistryError, RegistryProtocolError, StorageError
from worker.oci import Digest, Manifest, parse_manifest, referrer_tag_subject
from worker.records import EvidenceSummary, Sighting
from worker.registry.client import RegistryClient, digest_of
from worker.registry.storage import RegistryStorage, StoredTag
from worker.store.history import History, RepositoryHistory, new_sightings

T = TypeVar("T")


class AuditEvidence(Protocol):
    """The audit log as the inventory asks it: which absent subjects regsweep deleted."""

    async def deleted(self, repository: str, digests: Iterable[str]) -> set[str]: ...


#: Said once in a plan that has neither storage nor a state store to look in.
UNTAGGED_UNSEEN: Final = (
    "untagged indexes cannot be seen (set registry.storage_path or redis.url): "
    "a manifest only an untagged index lists may be deleted"
)
#: Manifests kept in a process's cache; content-addressed, so never stale.
MANIFEST_CACHE_SIZE: Final = 50_000


#: Entries a persisted created-cache keeps (oldest dropped first).
CREATED_CACHE_SIZE: Final = 200_000
#: A plan with registry times to check asks the registry's clock (``GET /v2/``) when no answer
#: has shown it for this long.
CLOCK_CHECK_AGE: Final = timedelta(minutes=5)


@dataclass
class CreatedCache:
    """``created`` of image configs by config digest; safe forever, content never changes.

    The CLI persists it between runs (:meth:`load` / :meth:`save`), so a repeated
    ``plan`` reads each image config once in its life, not once per run.
    """

    entries: MutableMapping[str, datetime | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CreatedCache:
        """The cache saved at ``path``; empty when it is missing or unreadable (it is a cache)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(raw, dict):
            return cls()
        return cls({str(k): parse_created(v) for k, v in raw.items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically; a failure to write a cache is not an error worth failing for."""
        items = list(self.entries.items())[-CREATED_CACHE_SIZE:]
        data = {k: v.isoformat() if v else None for k, v in items}
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(target)
        except OSError:
            return


class ManifestCache:
    """Manifests by digest (bounded, oldest out first): a digest's bytes never change."""

    def __init__(self, size: int = MANIFEST_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[Digest, Manifest] = OrderedDict()

    def get(self, digest: str) -> Manifest | None:
        return self._entries.get(Digest(digest))

    def put(self, manifest: Manifest) -> None:
        self._entries[manifest.digest] = replace(manifest, created=None)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


def parse_created(value: object) -> datetime | None:
    """An RFC 3339 timestamp as found in configs and annotations, or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    # Go writes nanoseconds; fromisoformat takes at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _gather(items: Iterable[Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*items))


@dataclass
class _Snapshot:
    """The mutable scratchpad a snapshot is built in, frozen at the end."""

    repository: str
    history: RepositoryHistory
    tags: dict[str, Digest] = field(default_factory=dict)
    manifests: dict[Digest, Manifest] = field(default_factory=dict)
    missing: set[Digest] = field(default_factory=set)
    #: tag -> digest and last PUT, from the storage's tag links.
    stored_tags: dict[str, StoredTag] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class InventoryBuilder:
    """Reads one repository's tags, manifest graph, referrers and push evidence."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        history: History | None = None,
        storage: RegistryStorage | None = None,
        audit: AuditEvidence | None = None,
        created_cache: CreatedCache | None = None,
        manifest_cache: ManifestCache | None = None,
    ) -> None:
        self._client = client
        self._history = history
        self._storage = storage
        self._audit = audit
        self._created = created_cache or CreatedCache()
        self._manifests = manifest_cache

    async def take(
        self,
        repository: str,
        policy: Policy,
        *,
        now: datetime | None = None,
        known_tags: Mapping[str, Digest] | None = None,
    ) -> Inventory:
        """Snapshot ``repository`` for ``policy``. With ``known_tags`` (the tag index, for
        event-driven plans) the tag list is not read and manifests come by digest, mostly
        from cache; the executor's live re-check still guards every DELETE."""
        history = await self._history.snapshot(repository) if self._history else None
        snap = _Snapshot(repository, history or RepositoryHistory())
        if known_tags is None:
            sightings = await self._list(snap)
        else:
            await self._adopt_tags(snap, known_tags)
            sightings = dict(snap.history.sightings)
        await self._read_storage(snap)
        await self._read_remembered(snap)
        await self._read_graph(snap)
        referrers = await self._referrers(snap)
        await self._find_missing_subjects(snap)
        taken_at = now or datetime.now(UTC)
        evidence = await self._evidence(snap, sightings, policy)
        judged = await self._judge(snap, evidence, policy, taken_at)
        if self._storage is None and not (self._history and self._history.notified):
            snap.notes.append(UNTAGGED_UNSEEN)
        return Inventory(
            repository=repository,
            taken_at=taken_at,
            tags=dict(snap.tags),
            manifests=dict(snap.manifests),
            push_times=judged.push_times,
            untagged_since={
                d: t for d, t in snap.history.untagged_since.items() if d in snap.manifests
            },
            referrers=referrers,
            missing=frozenset(snap.missing),
            deleted_by_regsweep=await self._deleted_by_regsweep(snap),
            holds=snap.history.active_holds(taken_at),
            notes=tuple(snap.notes),
        )

    async def _list(self, snap: _Snapshot) -> dict[str, Sighting]:
        """Read the live tags; record the listing in the history; the sightings after it."""
        started = datetime.now(UTC)
        await self._read_tags(snap)
        finished = datetime.now(UTC)
        if self._history is not None:
            await self._history.record_listing(snap.repository, snap.tags, started, finished)
        known = snap.history.sightings
        return new_sightings(known, snap.history.listed_at, snap.tags, started, finished)

    async def _read_tags(self, snap: _Snapshot) -> None:
        tags = await self._client.tags(snap.repository)
        fetched = await _gather(self._fetch(snap.repository, tag) for tag in tags)
        for tag, manifest in zip(tags, fetched, strict=True):
            if manifest is None:  # deleted between the list and the GET
                continue
            snap.tags[tag] = manifest.digest
            snap.manifests.setdefault(manifest.digest, manifest)

    async def _adopt_tags(self, snap: _Snapshot, known: Mapping[str, Digest]) -> None:
        await self._fetch_into(snap, sorted(set(known.values())))
        snap.tags.update({t: d for t, d in known.items() if d in snap.manifests})

    async def _read_storage(self, snap: _Snapshot) -> None:
        """Tag push times and every stored manifest, from the storage (local reads)."""
        storage = self._storage
        if storage is None:
            return
        if not await asyncio.to_thread(storage.has_repository, snap.repository):
            if snap.tags:
                # Not this registry's storage (or not its root): a plan on part of the
                # evidence would miss the untagged indexes only the storage shows.
                missing = await asyncio.to_thread(storage.missing, snap.repository)
                raise StorageError(f"{missing}; {snap.repository} is left alone until they agree")
            return
        names = sorted(snap.tags)
        snap.stored_tags = await asyncio.to_thread(storage.tags, snap.repository, names)
        revisions = await asyncio.to_thread(storage.revisions, snap.repository)
        unseen = [d for d in revisions if d not in snap.manifests]
        bodies = await asyncio.to_thread(lambda: [storage.blob(d) for d in unseen])
        for digest, raw in zip(unseen, bodies, strict=True):
            manifest = _stored_manifest(digest, raw) if raw is not None else None
            if manifest is not None:
                snap.manifests[digest] = manifest

    async def _read_remembered(self, snap: _Snapshot) -> None:
        """Untagged manifests and digest-only indexes the state store knows of."""
        wanted = {*snap.history.untagged_since, *snap.history.stored_indexes}
        await self._fetch_into(snap, sorted(d for d in wanted if d not in snap.manifests))

    async def _read_graph(self, snap: _Snapshot) -> None:
        """Follow index children (indexes of indexes too) until nothing new turns up."""
        while True:
            wanted = {
                child.digest
                for m in snap.manifests.values()
                for child in m.children
                if child.digest not in snap.manifests and child.digest not in snap.missing
            }
            if not wanted:
                return
            await self._fetch_into(snap, sorted(wanted))

    async def _fetch_into(self, snap: _Snapshot, digests: list[Digest]) -> None:
        fetched = await _gather(self._fetch(snap.repository, d) for d in digests)
        for digest, manifest in zip(digests, fetched, strict=True):
            if manifest is None:
                snap.missing.add(digest)
            else:
                snap.manifests[digest] = manifest

    async def _fetch(self, repository: str, reference: str) -> Manifest | None:
        cached = self._manifests.get(reference) if self._manifests else None
        if cached is not None:
            return cached
        try:
            manifest = await self._client.get_manifest(repository, reference)
        except ManifestUnknown:
            return None
        if manifest.media_type not in oci.KNOWN_MANIFEST_TYPES:
            # It may reference manifests in ways regsweep cannot see: planning around it
            # could delete what it needs, so the repository is left alone.
            raise RegistryProtocolError(
                f"{repository}@{manifest.digest} has a manifest type regsweep does not know "
                f"({manifest.media_type[:100]!r}); the repository is left alone"
            )
        if self._manifests is not None:
            self._manifests.put(manifest)
        return manifest

    async def _referrers(self, snap: _Snapshot) -> dict[Digest, tuple[Digest, ...]]:
        """subject → referrers, from ``subject`` fields, fallback indexes and the referrers API."""
        found: dict[Digest, set[Digest]] = {}
        for manifest in snap.manifests.values():
            if manifest.subject:
                found.setdefault(manifest.subject, set()).add(manifest.digest)
        for tag, digest in snap.tags.items():
            subject = referrer_tag_subject(tag)
            fallback = snap.manifests.get(digest)
            if subject and fallback and fallback.is_index and "." not in tag:
                found.setdefault(subject, set()).update(c.digest for c in fallback.children)
        await self._referrers_api(snap, found)
        return {subject: tuple(sorted(ds)) for subject, ds in found.items()}

    async def _referrers_api(self, snap: _Snapshot, found: dict[Digest, set[Digest]]) -> None:
        """Ask the referrers API (registry 3.x) about every manifest; 2.8 answers None once."""
        subjects = sorted(snap.manifests)
        if not subjects:
            return
        first = await self._client.referrers(snap.repository, subjects[0])
        if first is None:
            return
        answers = [
            first,
            *await _gather(self._client.referrers(snap.repository, s) for s in subjects[1:]),
        ]
        for subject, descriptors in zip(subjects, answers, strict=True):
            for descriptor in descriptors or ():
                found.setdefault(subject, set()).add(descriptor.digest)
        new = sorted({d for ds in found.values() for d in ds} - set(snap.manifests))
        await self._fetch_into(snap, new)

    async def _find_missing_subjects(self, snap: _Snapshot) -> None:
        """Subjects that cosign tags name and this repository lacks, found with one HEAD each."""
        subjects = {
            s
            for tag in snap.tags
            if (s := referrer_tag_subject(tag)) is not None and s not in snap.manifests
        }
        subjects -= snap.missing
        ordered = sorted(subjects)
        refs = await _gather(self._client.head_manifest(snap.repository, s) for s in ordered)
        snap.missing.update(s for s, ref in zip(ordered, refs, strict=True) if ref is None)

    async def _deleted_by_regsweep(self, snap: _Snapshot) -> frozenset[Digest]:
        """Missing digests regsweep's audit shows it deleted here: their referrers are orphans.

        A 404 alone proves nothing: signatures may live in another repository than
        their image (``COSIGN_REPOSITORY``) or arrive before it (mirroring tools)."""
        if self._audit is None or not snap.missing:
            return frozenset()
        deleted = await self._audit.deleted(snap.repository, sorted(snap.missing))
        return frozenset(Digest(d) for d in deleted)

    async def _evidence(
        self, snap: _Snapshot, sightings: Mapping[str, Sighting], policy: Policy
    ) -> dict[str, TagEvidence]:
        """What is known of each (non-referrer) tag's push."""
        history = snap.history
        evidence: dict[str, TagEvidence] = {}
        for tag, digest in snap.tags.items():
            if referrer_tag_subject(tag) is not None:
                continue
            stored = snap.stored_tags.get(tag)
            evidence[tag] = TagEvidence(
                digest=digest,
                notified=history.pushed_at.get(tag) if history.tags.get(tag) == digest else None,
                stored=stored.pushed if stored and stored.digest == digest else None,
                sighting=sightings.get(tag),
            )
        if policy.age_from is AgeSource.BUILD_TIME:
            await self._fill_build_times(snap, evidence)
        return evidence

    async def _judge(
        self, snap: _Snapshot, evidence: dict[str, TagEvidence], policy: Policy, now: datetime
    ) -> Judgement:
        """Push times from the evidence that holds up; what did not is said in the notes
        and kept for ``regsweep status``."""
        registry_times = any(e.notified or e.stored for e in evidence.values())
        skew = await self._clock_skew() if registry_times else None
        use_build_time = policy.age_from is AgeSource.BUILD_TIME
        judged = judge(evidence, now, use_build_time=use_build_time, skew=skew)
        snap.notes.extend(judged.notes)
        if self._history is not None and registry_times:
            summary = EvidenceSummary(
                snap.repository, now, skew, judged.refused, len(judged.doubted)
            )
            await self._history.record_evidence(summary)
        return judged

    async def _clock_skew(self) -> ClockSkew | None:
        """The registry's clock as its latest answer showed it; asked afresh (one
        ``GET /v2/``) when no answer showed it lately. Unknown when it sends no ``Date``."""
        skew = self._client.clock.skew
        if skew is None or datetime.now(UTC) - skew.measured_at > CLOCK_CHECK_AGE:
            with contextlib.suppress(RegistryError):
                await self._client.ping()
            skew = self._client.clock.skew
        return skew

    async def _fill_build_times(self, snap: _Snapshot, evidence: dict[str, TagEvidence]) -> None:
        """Build times, read only for tags without a notification or a storage push time."""
        wanted = {
            tag: image
            for tag, item in evidence.items()
            if item.notified is None
            and item.stored is None
            and (image := _image_for(snap.manifests, item.digest)) is not None
        }
        ordered = sorted(set(wanted.values()))
        times = await _gather(self._build_time(snap, snap.manifests[d]) for d in ordered)
        built = dict(zip(ordered, times, strict=True))
        for tag, image in wanted.items():
            annotated = parse_created(
                snap.manifests[evidence[tag].digest].annotations.get(oci.CREATED_ANNOTATION)
            )
            evidence[tag] = replace(evidence[tag], built=annotated or built.get(image))

    async def _build_time(self, snap: _Snapshot, image: Manifest) -> datetime | None:
        """An image's ``created``; an unreadable config is reported, and the time unknown."""
        try:
            return await self._created_of(snap.repository, image)
        except RegistryError as exc:
            snap.notes.append(f"build time of {image.digest} unknown: {exc}")
            return None

    async def _created_of(self, repository: str, image: Manifest) -> datetime | None:
        annotated = parse_created(image.annotations.get(oci.CREATED_ANNOTATION))
        if annotated or image.config is None:
            return annotated
        if image.config.media_type not in oci.CONFIG_TYPES:
            return None  # an artifact (signature, SBOM): its config says nothing about time
        key = image.config.digest
        if key not in self._created.entries:
            self._created.entries[key] = await self._read_config_created(repository, key)
        return self._created.entries[key]

    async def _read_config_created(self, repository: str, digest: Digest) -> datetime | None:
        try:
            body = json.loads(await self._client.get_blob(repository, digest))
        except ManifestUnknown:
            return None
        except ValueError as exc:
            raise RegistryProtocolError(f"config {digest} is not JSON: {exc}") from exc
        return parse_created(body.get("created")) if isinstance(body, dict) else None


def _image_for(manifests: Mapping[Digest, Manifest], digest: Digest) -> Digest | None:
    """The image whose config dates ``digest``: itself, or an index's first platform child."""
    manifest = manifests.get(digest)
    depth = 0
    while manifest is not None and manifest.is_index and depth < 4:
        platform = next((c for c in manifest.children if not c.is_attestation), None)
        manifest = manifests.get(platform.digest) if platform else None
        depth += 1
    if manifest is None or manifest.config is None:
        return None
    return manifest.digest


def _stored_manifest(digest: Digest, raw: bytes) -> Manifest | None:
    """A manifest read from storage (its type is in its body: no Content-Type here);
    None when the bytes are not the digest's (caught mid-write)."""
    if digest_of(raw) != digest:
        return None
    return parse_manifest(digest, "", raw)
