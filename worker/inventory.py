"""Take a frozen :class:`~worker.model.Inventory` of one repository from the live registry.

Cost model (what the bench holds us to): one GET per tag (the manifest by tag
gives digest, type and graph in one round trip, where HEAD would need a second
request for the body), one GET per index child or referrer not already seen,
and one config GET per image only when the policy needs push times that the
state store does not have. Config digests are content addresses, so their
``created`` is cached for the life of the process.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, TypeVar

from worker import mediatypes as mt
from worker.errors import ManifestUnknown, RegistryProtocolError
from worker.model import Digest, Inventory, Manifest, referrer_tag_subject
from worker.registry.client import RegistryClient

T = TypeVar("T")


class TagHistory(Protocol):
    """What regsweep remembers of a repository from push notifications (the state store)."""

    async def pushed_at(self, repository: str) -> Mapping[str, datetime]: ...

    async def untagged_since(self, repository: str) -> Mapping[Digest, datetime]: ...


#: Manifests kept in a process's cache; content-addressed, so never stale.
MANIFEST_CACHE_SIZE: Final = 50_000


#: Entries a persisted created-cache keeps (oldest dropped first).
CREATED_CACHE_SIZE: Final = 200_000


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
    tags: dict[str, Digest] = field(default_factory=dict)
    manifests: dict[Digest, Manifest] = field(default_factory=dict)
    missing: set[Digest] = field(default_factory=set)


class InventoryBuilder:
    """Reads one repository's tags, manifest graph, referrers and push times."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        history: TagHistory | None = None,
        created_cache: CreatedCache | None = None,
        manifest_cache: ManifestCache | None = None,
    ) -> None:
        self._client = client
        self._history = history
        self._created = created_cache or CreatedCache()
        self._manifests = manifest_cache

    async def take(
        self,
        repository: str,
        *,
        need_push_times: bool = True,
        now: datetime | None = None,
        known_tags: Mapping[str, Digest] | None = None,
    ) -> Inventory:
        """Snapshot ``repository``. With ``known_tags`` (the tag index, for event-driven
        plans) the tag list is not read and manifests come by digest, mostly from cache;
        the executor's live re-check still guards every DELETE."""
        snap = _Snapshot(repository)
        pushed_at, untagged_since = await self._remembered(repository)
        if known_tags is None:
            await self._read_tags(snap)
        else:
            await self._adopt_tags(snap, known_tags)
        await self._read_untagged(snap, untagged_since)
        await self._read_graph(snap)
        referrers = await self._referrers(snap)
        await self._find_missing_subjects(snap)
        if need_push_times:
            await self._fill_created(snap, pushed_at)
        return Inventory(
            repository=repository,
            taken_at=now or datetime.now(UTC),
            tags=dict(snap.tags),
            manifests=dict(snap.manifests),
            pushed_at=dict(pushed_at),
            untagged_since={d: t for d, t in untagged_since.items() if d in snap.manifests},
            referrers=referrers,
            missing=frozenset(snap.missing),
        )

    async def _remembered(
        self, repository: str
    ) -> tuple[Mapping[str, datetime], Mapping[Digest, datetime]]:
        if self._history is None:
            return {}, {}
        return (
            await self._history.pushed_at(repository),
            await self._history.untagged_since(repository),
        )

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

    async def _read_untagged(self, snap: _Snapshot, untagged: Mapping[Digest, datetime]) -> None:
        wanted = [d for d in untagged if d not in snap.manifests]
        await self._fetch_into(snap, wanted)

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
        """A cosign tag whose subject is gone is an orphan; find out with one HEAD each."""
        subjects = {
            s
            for tag in snap.tags
            if (s := referrer_tag_subject(tag)) is not None and s not in snap.manifests
        }
        subjects -= snap.missing
        ordered = sorted(subjects)
        refs = await _gather(self._client.head_manifest(snap.repository, s) for s in ordered)
        snap.missing.update(s for s, ref in zip(ordered, refs, strict=True) if ref is None)

    async def _fill_created(self, snap: _Snapshot, pushed_at: Mapping[str, datetime]) -> None:
        """Give each tagged manifest a build time where the store has no push time."""
        wanted = {
            digest
            for tag, digest in snap.tags.items()
            if tag not in pushed_at and referrer_tag_subject(tag) is None
        }
        images = {self._image_for(snap, d) for d in wanted}
        images.discard(None)
        ordered = sorted(d for d in images if d is not None)
        times = await _gather(self._created_of(snap.repository, snap.manifests[d]) for d in ordered)
        created = dict(zip(ordered, times, strict=True))
        for digest in wanted:
            image = self._image_for(snap, digest)
            when = created.get(image) if image else None
            when = (
                parse_created(snap.manifests[digest].annotations.get(mt.CREATED_ANNOTATION)) or when
            )
            if when is not None:
                snap.manifests[digest] = replace(snap.manifests[digest], created=when)

    @staticmethod
    def _image_for(snap: _Snapshot, digest: Digest) -> Digest | None:
        """The image whose config dates ``digest``: itself, or an index's first platform child."""
        manifest = snap.manifests.get(digest)
        depth = 0
        while manifest is not None and manifest.is_index and depth < 4:
            platform = next((c for c in manifest.children if not c.is_attestation), None)
            manifest = snap.manifests.get(platform.digest) if platform else None
            depth += 1
        if manifest is None or manifest.config is None:
            return None
        return manifest.digest

    async def _created_of(self, repository: str, image: Manifest) -> datetime | None:
        annotated = parse_created(image.annotations.get(mt.CREATED_ANNOTATION))
        if annotated or image.config is None:
            return annotated
        if image.config.media_type not in mt.CONFIG_TYPES:
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
