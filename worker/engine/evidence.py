"""When was a tag pushed? The evidence for it, and how much of it can be trusted.

A push time is an interval, ``earliest`` to ``latest``, with the source it came
from. Retention decides on provable facts only:

- ``pushed_within: D`` removes a tag only when its ``latest`` is before ``now - D``;
- ``newest: N`` removes a tag only when N other tags were *provably* pushed after
  it: their ``earliest`` after its ``latest``. Equal or overlapping times prove
  nothing, so tag-name order never decides a deletion.

Sources, most trusted first (:func:`push_time` picks one per tag):

1. ``notification``: a push the registry notified regsweep of (the tag index);
2. ``storage``: the mtime of the tag's ``current/link`` in the registry's
   filesystem storage, rewritten on every PUT by tag (``registry.storage_path``);
3. ``first seen``: the tag appeared between two listings regsweep made — pushed
   after the one that lacked it, before the one that showed it;
4. ``build time``: the image's ``created``, only where the policy says
   ``age_from: build_time``, and never when it is before Docker existed, in the
   future, or shared by other images being ranked (reproducible builds);
5. ``first seen`` with no earlier listing: an upper bound only;
6. ``unknown``: nothing at all. Unknown keeps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from worker.engine.model import UNKNOWN, Digest, PushSource, PushTime

#: Docker's first public release: no image was built before it (as gcr-cleaner checks).
DOCKER_EPOCH: Final = datetime(2013, 3, 20, tzinfo=UTC)
#: Clocks disagree a little: a time this far ahead of ours is taken as now; further is doubtful.
CLOCK_SKEW: Final = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Sighting:
    """A tag regsweep first saw on ``digest`` in a listing that started at ``shown`` and
    finished at ``latest``; the listing before, which lacked it (or showed another digest),
    started at ``earliest``."""

    digest: Digest
    earliest: datetime | None
    latest: datetime
    #: None for sightings recorded before this was kept: ``latest`` stands in.
    shown: datetime | None = None


@dataclass(frozen=True)
class TagEvidence:
    """Everything known about one tag's push, gathered by the inventory."""

    digest: Digest
    #: Recorded from a notification for this same digest.
    notified: datetime | None = None
    #: ``current/link`` mtime, when the link names this same digest.
    stored: datetime | None = None
    sighting: Sighting | None = None
    #: The image's build time (config ``created`` or the OCI annotation).
    built: datetime | None = None


def push_times(
    evidence: Mapping[str, TagEvidence], now: datetime, *, use_build_time: bool
) -> dict[str, PushTime]:
    """The most trusted sane push time of every tag (see the module docstring)."""
    shared = _shared_build_times(evidence) if use_build_time else set()
    return {
        tag: push_time(item, now, use_build_time=use_build_time and item.built not in shared)
        for tag, item in evidence.items()
    }


def push_time(item: TagEvidence, now: datetime, *, use_build_time: bool) -> PushTime:
    """One tag's push time from its evidence, most trusted source first."""
    seen = item.sighting if item.sighting and item.sighting.digest == item.digest else None
    found = _most_trusted(item, seen, now, use_build_time)
    if seen is None:
        return found
    return replace(found, listed=seen.shown or seen.latest)


def _most_trusted(
    item: TagEvidence, seen: Sighting | None, now: datetime, use_build_time: bool
) -> PushTime:
    exact = _exact(item, now)
    if exact is not None:
        return exact
    if seen is not None and seen.earliest is not None:
        return PushTime(PushSource.FIRST_SEEN, seen.earliest, _clamped(seen.latest, now))
    built = item.built if use_build_time else None
    if built is not None and _sane_build_time(built, now, seen):
        return PushTime.exact(PushSource.BUILD_TIME, built)
    if seen is not None:
        return PushTime(PushSource.FIRST_SEEN, None, _clamped(seen.latest, now))
    return UNKNOWN


def _exact(item: TagEvidence, now: datetime) -> PushTime | None:
    """A notification or the storage: the later of the two when both are believable
    (a re-push of the same digest may not be notified yet)."""
    found = [
        (at, source)
        for at, source in (
            (item.notified, PushSource.NOTIFICATION),
            (item.stored, PushSource.STORAGE),
        )
        if at is not None and at <= now + CLOCK_SKEW
    ]
    if not found:
        return None
    at, source = max(found, key=lambda pair: pair[0])
    return PushTime.exact(source, min(at, now))


def _clamped(at: datetime, now: datetime) -> datetime:
    return min(at, now)


def _sane_build_time(built: datetime, now: datetime, seen: Sighting | None) -> bool:
    """Not before Docker existed, not in the future, not after the tag was first seen."""
    if built < DOCKER_EPOCH or built > now + CLOCK_SKEW:
        return False
    return seen is None or built <= seen.latest


def _shared_build_times(evidence: Mapping[str, TagEvidence]) -> set[datetime | None]:
    """Build times that more than one image carries: they order nothing (reproducible builds,
    ``SOURCE_DATE_EPOCH``). Tags of one digest share their image's time and count once."""
    per_image = {(item.digest, item.built) for item in evidence.values() if item.built}
    counts = Counter(built for _, built in per_image)
    return {built for built, count in counts.items() if count > 1}
