"""The registry as regsweep sees it: manifests, their graph, and a frozen snapshot.

An :class:`Inventory` is everything the planner may look at for one repository,
taken at one moment. It is built by :mod:`worker.engine.inventory` from the live
registry (plus the push-time store) and never changes afterwards, so planning
is a pure function of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from worker.oci import Digest, Manifest
from worker.records import Hold


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
