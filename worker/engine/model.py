"""The registry as regsweep sees it: manifests, their graph, and a frozen snapshot.

An :class:`Inventory` is everything the planner may look at for one repository,
taken at one moment. It is built by :mod:`worker.engine.inventory` from the live
registry (plus the push-time store) and never changes afterwards, so planning
is a pure function of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, NewType

from worker.errors import RegistryProtocolError
from worker.registry import mediatypes as mt

Digest = NewType("Digest", str)

_COSIGN_TAG = re.compile(r"^(sha256)-([0-9a-f]{64})(?:\.(sig|att|sbom))?$")


class PushSource(StrEnum):
    NOTIFICATION = "notification"
    STORAGE = "storage"
    FIRST_SEEN = "first seen"
    BUILD_TIME = "build time"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class PushTime:
    """The push happened no earlier than ``earliest`` and no later than ``latest``
    (``None``: no bound known).

    ``listed`` is when the first listing that showed the tag started: the push came
    before that listing read the tag list. A tag that same listing *lacked* (``first
    seen``, with ``earliest`` that listing's start) was pushed after that read, so it
    provably follows, although the two intervals overlap by the listing's duration.
    """

    source: PushSource
    earliest: datetime | None = None
    latest: datetime | None = None
    listed: datetime | None = None
    #: Why a registry time (tag link, notification) was not used as it stands, if one was not.
    doubt: str | None = None

    @classmethod
    def exact(cls, source: PushSource, at: datetime) -> PushTime:
        return cls(source, at, at)

    def older_than(self, cutoff: datetime) -> bool:
        """Whether this push provably happened before ``cutoff``."""
        return self.latest is not None and self.latest < cutoff


#: No evidence at all: unknown keeps.
UNKNOWN: Final = PushTime(PushSource.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Hold:
    """A tag every plan keeps until ``until`` (``regsweep hold``, or put back by ``restore``)."""

    tag: str
    until: datetime
    reason: str

    def active(self, now: datetime) -> bool:
        return self.until > now


def referrer_tag_subject(tag: str) -> Digest | None:
    """The subject digest a cosign / OCI-fallback tag (``sha256-<hex>[.sig|.att|.sbom]``) names."""
    match = _COSIGN_TAG.match(tag)
    if match is None:
        return None
    return Digest(f"{match.group(1)}:{match.group(2)}")


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a manifest points at."""

    digest: Digest
    media_type: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_attestation(self) -> bool:
        """A BuildKit attestation manifest inside an index (not a platform image)."""
        return self.annotations.get(mt.BUILDKIT_REFERENCE_TYPE) == "attestation-manifest"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One manifest (image or index) and what it references."""

    digest: Digest
    media_type: str
    raw: bytes
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()
    subject: Digest | None = None
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Build time from the image config (filled in by the inventory when it is fetched).
    created: datetime | None = None

    @property
    def size(self) -> int:
        """Bytes of the manifest itself."""
        return len(self.raw)

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEX_TYPES

    @property
    def is_placeholder(self) -> bool:
        """regsweep's own throw-away manifest of a tag-only removal (never anyone's image)."""
        return (
            mt.UNTAG_ANNOTATION in self.annotations
            and self.config is not None
            and self.config.media_type == mt.OCI_EMPTY
            and not self.layers
            and not self.children
        )

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers: the blobs this manifest keeps alive."""
        return ((self.config,) if self.config else ()) + self.layers


def _descriptor(obj: Any) -> Descriptor:
    if not isinstance(obj, dict) or not isinstance(obj.get("digest"), str):
        raise RegistryProtocolError(f"descriptor without a digest: {obj!r:.200}")
    annotations = obj.get("annotations") or {}
    return Descriptor(
        digest=Digest(obj["digest"]),
        media_type=str(obj.get("mediaType", "")),
        size=int(obj.get("size", 0)),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def _implied_media_type(body: Mapping[str, Any]) -> str:
    """The type of a manifest that names none and came without a Content-Type (read from
    storage; recorded from an index descriptor that left ``mediaType`` out), decided as
    the registry decides it: schema 1, else an OCI index if it lists manifests, else an
    OCI image manifest (a Docker schema 2 manifest must say its type). Empty when it is
    none of these."""
    if body.get("schemaVersion") == 1:
        return mt.DOCKER_SCHEMA1_SIGNED if "signatures" in body else mt.DOCKER_SCHEMA1
    if body.get("schemaVersion") != 2:
        return ""
    if isinstance(body.get("manifests"), list):
        return mt.OCI_INDEX
    return mt.OCI_MANIFEST if isinstance(body.get("config"), dict) else ""


def parse_manifest(digest: str, media_type: str, raw: bytes) -> Manifest:
    """Parse manifest bytes as served; ``media_type`` is the response's Content-Type."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RegistryProtocolError(f"manifest {digest} is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RegistryProtocolError(f"manifest {digest} is not a JSON object")
    media_type = str(body.get("mediaType") or media_type).split(";")[0].strip()
    media_type = media_type or _implied_media_type(body)
    subject = body.get("subject")
    annotations = body.get("annotations") or {}
    return Manifest(
        digest=Digest(digest),
        media_type=media_type,
        raw=raw,
        config=_descriptor(body["config"]) if "config" in body else None,
        layers=tuple(_descriptor(d) for d in body.get("layers") or ()),
        children=tuple(_descriptor(d) for d in body.get("manifests") or ()),
        subject=_descriptor(subject).digest if subject else None,
        artifact_type=body.get("artifactType"),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


@dataclass(frozen=True)
class Inventory:
    """A frozen snapshot of one repository, everything the planner may use.

    ``manifests`` holds every manifest the snapshot knows: tagged ones, the
    children of indexes, referrers, untagged manifests the state store
    remembers and, with ``registry.storage_path``, every manifest the storage
    holds. ``referrers`` maps a subject digest to the digests of manifests that
    refer to it (``subject`` field, fallback index entries, referrers API);
    cosign-style tags are in ``tags`` and found with :func:`referrer_tag_subject`.
    """

    repository: str
    taken_at: datetime
    tags: Mapping[str, Digest]
    manifests: Mapping[Digest, Manifest]
    #: How sure regsweep is of when each tag was pushed (missing: unknown).
    push_times: Mapping[str, PushTime] = field(default_factory=dict)
    #: Digests that lost their last tag, and since when (from the state store).
    untagged_since: Mapping[Digest, datetime] = field(default_factory=dict)
    referrers: Mapping[Digest, tuple[Digest, ...]] = field(default_factory=dict)
    #: Digests something references that the registry answers 404 for.
    missing: frozenset[Digest] = frozenset()
    #: Of ``missing``, those regsweep's own audit shows it deleted from this repository:
    #: the only absent subjects whose referrers are orphans (404 alone is no evidence).
    deleted_by_regsweep: frozenset[Digest] = frozenset()
    #: Tags held (``regsweep hold``, ``restore``): every plan keeps them.
    holds: Mapping[str, Hold] = field(default_factory=dict)
    #: What the snapshot could not see, said once in the plan.
    notes: tuple[str, ...] = ()

    def push_time(self, tag: str) -> PushTime:
        return self.push_times.get(tag, UNKNOWN)

    @property
    def placeholders(self) -> frozenset[Digest]:
        """Tagged digests that are regsweep's own untag placeholders (an untag interrupted
        between its PUT and its DELETE)."""
        return frozenset(
            d for d in set(self.tags.values()) if (m := self.manifests.get(d)) and m.is_placeholder
        )
