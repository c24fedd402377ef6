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

The registry's times are checked before they count (:func:`judge`). Notifications and
tag links carry the registry host's clock, and links carry the storage's history too
(a copy, an archive, a store that keeps no times). They count only when consistent
with everything else regsweep knows:

- a time before 2013-03-20 (:data:`DOCKER_EPOCH`) or more than :data:`CLOCK_SKEW`
  ahead of regsweep's clock is no push's;
- a time before the start of a listing of regsweep's that lacked the tag (or showed it
  on another image) contradicts that listing, and so does a time after the end of the
  listing that first showed the tag on this image (a clock that ran fast, then was set
  right; or a re-push of the same image, which no time tells apart: either way the push
  may be later than the listing, never proved to be);
- a link older than the notified push of the same image contradicts the notification;
- links of several images written within :data:`ONE_INSTANT` of each other are one
  instant: a copy that kept no times writes them so, and pushes that close are not
  ordered by a clock either;
- a repository's links refused as a whole (:func:`storage_refusal`): all equal, all at
  one instant, all before 2013, all older than its oldest notification;
- a registry whose clock (its ``Date`` header, :class:`ClockSkew`) is more than
  :data:`CLOCK_SKEW` off regsweep's: none of its times rank anything.

A doubted time never proves a tag old nor another tag newer. It is dropped; where it may
stand for a later push than the other sources show (a re-push, or a copy made after the
push), it can only move the tag's latest possible push later. Doubt keeps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Final

from worker.clock import CLOCK_SKEW, ClockSkew
from worker.durations import approximate
from worker.engine.model import UNKNOWN, PushSource, PushTime
from worker.oci import Digest
from worker.records import Sighting

#: Docker's first public release: no image was built before it (as gcr-cleaner checks).
DOCKER_EPOCH: Final = datetime(2013, 3, 20, tzinfo=UTC)
#: Tag links written this close one after another are one instant (see the module docstring).
ONE_INSTANT: Final = timedelta(seconds=1)
#: Fewer links than this, written in one instant, are taken for a burst of pushes (a CI job
#: pushing a few images at once), not for a copy: the repository is not refused as a whole
#: (nor check-config failed), though its clustered links still rank nothing, tag by tag.
COPY_MIN_LINKS: Final = 5
#: A tag link is written just before the notification of its push is dated; the two may
#: come from two hosts' clocks (a storage on NFS), so a link counts as older than its
#: notification only by more than this.
LINK_BEFORE_EVENT: Final = CLOCK_SKEW
#: Tags named in a plan's note on doubted times; the others are counted.
DOUBTS_NAMED: Final = 5
#: How to get a storage's times back, said with every refusal of them.
RESTORE_TIMES: Final = (
    "copy the storage again keeping times (rsync -a, cp -a, tar without --touch), "
    "or push the tags again"
)


@dataclass(frozen=True, slots=True)
class StoredLink:
    """One tag link's time and the image it names: what :func:`storage_refusal` judges."""

    at: datetime
    digest: Digest


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


# --- checking the registry's times -----------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """Push times from the evidence that holds up, and what did not."""

    push_times: dict[str, PushTime]
    #: Said once in the plan: what was not used, why, and what to do about it.
    notes: tuple[str, ...]
    #: Why the repository's registry times are refused as a whole; None when they are not.
    refused: str | None
    #: Tags whose registry times (link, notification) were not used as they stand.
    doubted: tuple[str, ...]


#: How a time before a listing that lacked its tag is said.
LACKED: Final = "before a listing that lacked the tag"
#: How a time after the listing that first showed its tag (on the same image) is said.
SHOWN: Final = "after a listing that showed the tag"
#: A tag's doubt when the repository's links are refused as a whole (its note says why).
REFUSED_WHOLE: Final = "storage times refused: see the note"


@dataclass(frozen=True, slots=True)
class _Doubt:
    """Why one registry time is not evidence, and what is left of it: an upper bound on the
    push (regsweep's clock), or nothing."""

    why: str
    bound: datetime | None


@dataclass(frozen=True)
class _Checks:
    """What every tag's registry times are checked against."""

    now: datetime
    skew: ClockSkew | None
    #: The registry's clock is off: every registry time is doubted.
    clock: str | None
    #: The repository's links are refused as a whole.
    storage: str | None
    #: Tags whose links share one instant with other images' links.
    instants: frozenset[str]


def judge(
    evidence: Mapping[str, TagEvidence],
    now: datetime,
    *,
    use_build_time: bool,
    skew: ClockSkew | None = None,
) -> Judgement:
    """Every tag's push time from the evidence that is consistent (see the module
    docstring), with the notes that say what was doubted and why."""
    checks = _checks(evidence, now, skew)
    vetted = {tag: _vetted(tag, item, checks) for tag, item in evidence.items()}
    cleaned = {tag: item for tag, (item, _) in vetted.items()}
    times = push_times(cleaned, now, use_build_time=use_build_time)
    doubts = {tag: found for tag, (_, found) in vetted.items() if found}
    for tag, found in doubts.items():
        times[tag] = _bounded(times[tag], found, now)
    return Judgement(
        push_times=times,
        notes=_notes(checks, doubts),
        refused=checks.clock or checks.storage,
        doubted=tuple(sorted(doubts)),
    )


def storage_refusal(
    links: Sequence[StoredLink], oldest_event: datetime | None = None
) -> str | None:
    """Why a repository's tag links are implausible as a whole; None when they are not."""
    if not links:
        return None
    times = sorted(link.at for link in links)
    first, last, count = times[0], times[-1], len(times)
    if last < DOCKER_EPOCH:
        return (
            f"every tag link is dated before 2013 (the newest {moment(last)}), as an archive "
            f"or store that keeps no times leaves them: {RESTORE_TIMES}"
        )
    if count > 1 and first == last:
        return (
            f"all {count} tag links carry the same time ({moment(first)}), as an archive "
            f"stamped with one time leaves them: {RESTORE_TIMES}"
        )
    copied = count >= COPY_MIN_LINKS and len({link.digest for link in links}) > 1
    if copied and _one_instant(times):
        return (
            f"all {count} tag links were written within {approximate(last - first)} of each "
            f"other ({moment(first)}), as a copy that kept no times writes them (cp -r, rsync "
            f"without -t, tar -x --touch): {RESTORE_TIMES}"
        )
    if oldest_event is not None and last < oldest_event - LINK_BEFORE_EVENT:
        return (
            f"every tag link is older than the oldest push the registry notified "
            f"({moment(oldest_event)}): this storage is not being written by that registry (a "
            "stale copy, or another registry's storage); check registry.storage_path with "
            "regsweep check-config --online"
        )
    return None


def _checks(evidence: Mapping[str, TagEvidence], now: datetime, skew: ClockSkew | None) -> _Checks:
    links = [StoredLink(i.stored, i.digest) for i in evidence.values() if i.stored is not None]
    notified = [i.notified for i in evidence.values() if i.notified is not None]
    clock = None
    if skew is not None and not skew.agrees:
        clock = f"{skew.describe()} (its Date header at {moment(skew.measured_at)})"
    return _Checks(
        now=now,
        skew=skew,
        clock=clock,
        storage=storage_refusal(links, min(notified, default=None)),
        instants=_instant_tags(evidence, now),
    )


def _vetted(tag: str, item: TagEvidence, checks: _Checks) -> tuple[TagEvidence, tuple[_Doubt, ...]]:
    """``item`` without the registry times that are not evidence, and why each is not."""
    doubts: list[_Doubt] = []
    notified, stored = item.notified, item.stored
    if notified is not None:
        doubt = _doubt_notified(item, notified, checks)
        if doubt is not None:
            doubts.append(doubt)
            notified = None
    if stored is not None:
        doubt = _doubt_stored(tag, item, stored, checks)
        if doubt is not None:
            doubts.append(doubt)
            stored = None
    return replace(item, notified=notified, stored=stored), tuple(doubts)


def _doubt_notified(item: TagEvidence, at: datetime, checks: _Checks) -> _Doubt | None:
    impossible = _impossible(at, checks.now)
    if impossible is not None:
        return _Doubt(f"notified time {impossible}", None)
    if checks.clock is not None:
        return _Doubt("notified time on the registry's clock, which is off", _corrected(at, checks))
    listed = _contradicted_by_listing(item, at)
    if listed is not None:
        return _Doubt(f"notified time {listed}", at)
    return None


def _doubt_stored(tag: str, item: TagEvidence, at: datetime, checks: _Checks) -> _Doubt | None:
    impossible = _impossible(at, checks.now)
    if checks.storage is not None:
        return _Doubt(REFUSED_WHOLE, None if impossible else at)
    if impossible is not None:
        return _Doubt(f"storage time {impossible}", None)
    if checks.clock is not None:
        return _Doubt("storage time on the registry's clock, which is off", _corrected(at, checks))
    listed = _contradicted_by_listing(item, at)
    if listed is not None:
        return _Doubt(f"storage time {listed}", at)
    if item.notified is not None and at < item.notified - LINK_BEFORE_EVENT:
        before = approximate(item.notified - at)
        return _Doubt(f"storage time {before} before the notified push of the same image", at)
    if tag in checks.instants:
        return _Doubt(f"storage time within {approximate(ONE_INSTANT)} of other images' links", at)
    return None


def _impossible(at: datetime, now: datetime) -> str | None:
    """Why ``at`` can be no push's time at all: before registries existed, or in the future."""
    if at < DOCKER_EPOCH:
        return f"{moment(at)} is before 2013"
    if at > now + CLOCK_SKEW:
        return f"{approximate(at - now)} in the future"
    return None


def _contradicted_by_listing(item: TagEvidence, at: datetime) -> str | None:
    """How ``at`` contradicts regsweep's own listings, on its own clock: the push came after
    the listing that lacked the tag (or showed it on another image) started, and before the
    listing that first showed it on this image finished."""
    seen = item.sighting
    if seen is None or seen.digest != item.digest:
        return None
    if seen.earliest is not None and at < seen.earliest:
        return f"{approximate(seen.earliest - at)} {LACKED}"
    if at > seen.latest:
        return f"{approximate(at - seen.latest)} {SHOWN}"
    return None


def _corrected(at: datetime, checks: _Checks) -> datetime:
    """A time on the registry's clock as the latest it can be on regsweep's (the measured
    skew at its low end; the skew when it was written is unknown, so only a bound)."""
    return at - checks.skew.low if checks.skew is not None else at


def _instant_tags(evidence: Mapping[str, TagEvidence], now: datetime) -> frozenset[str]:
    """Tags whose links were written one instant with links of other images: each within
    :data:`ONE_INSTANT` of the one before, in runs naming more than one image."""
    ordered = sorted(
        (item.stored, tag, item.digest)
        for tag, item in evidence.items()
        if item.stored is not None and _impossible(item.stored, now) is None
    )
    found: set[str] = set()
    for run in _runs(ordered):
        if len({digest for _, _, digest in run}) > 1:
            found.update(tag for _, tag, _ in run)
    return frozenset(found)


def _runs(
    ordered: Sequence[tuple[datetime, str, Digest]],
) -> Iterable[list[tuple[datetime, str, Digest]]]:
    """Maximal runs of ``ordered`` (by time) each within :data:`ONE_INSTANT` of the last."""
    run: list[tuple[datetime, str, Digest]] = []
    for entry in ordered:
        if run and entry[0] - run[-1][0] > ONE_INSTANT:
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


def _one_instant(times: Sequence[datetime]) -> bool:
    """Whether sorted ``times`` form one run (each within :data:`ONE_INSTANT` of the last)."""
    return all(b - a <= ONE_INSTANT for a, b in pairwise(times))


def _bounded(found: PushTime, doubts: Sequence[_Doubt], now: datetime) -> PushTime:
    """The push time from the other sources, its latest moved later by a doubted time that
    may stand for a later push than they show; it never moves earlier. Says why."""
    why = "; ".join(d.why for d in doubts)
    bounds = [min(d.bound, now) for d in doubts if d.bound is not None]
    latest = found.latest
    if bounds and latest is not None and max(bounds) > latest:
        latest = max(bounds)
    return replace(found, latest=latest, doubt=why)


def _notes(checks: _Checks, doubts: Mapping[str, Sequence[_Doubt]]) -> tuple[str, ...]:
    """One note for a refusal as a whole, one naming the tags doubted one by one."""
    after = "tags age from notifications and regsweep's own listings meanwhile"
    if checks.clock is not None:
        return (
            f"{checks.clock}: the push times it writes (tag links, notifications) rank no tag "
            f"and nothing is deleted on them until the clocks agree (run NTP, e.g. chrony, on "
            f"both hosts); {after}",
        )
    notes: list[str] = []
    if checks.storage is not None:
        notes.append(
            f"registry.storage_path: {checks.storage}. Until then its times rank no tag and "
            f"nothing is deleted on them; {after}"
        )
    single = {t: d for t, d in doubts.items() if not _refused_whole(d, checks)}
    if single:
        named = [
            f"{tag}: {'; '.join(d.why for d in found)}" for tag, found in sorted(single.items())
        ]
        more = len(named) - DOUBTS_NAMED
        listed = "; ".join(named[:DOUBTS_NAMED]) + (f"; and {more} more" if more > 0 else "")
        notes.append(
            f"registry times of {len(named)} tags not used to rank them, and nothing is "
            f"deleted on them: {listed}{_clock_now(checks, single)}"
        )
    return tuple(notes)


def _clock_now(checks: _Checks, doubts: Mapping[str, Sequence[_Doubt]]) -> str:
    """Where a listing contradicts a registry time: what the registry's clock says now."""
    contradicted = any(LACKED in d.why for found in doubts.values() for d in found)
    if checks.skew is None or not contradicted:
        return ""
    return f" ({checks.skew.describe()} now: those times were written while it was off)"


def _refused_whole(doubts: Sequence[_Doubt], checks: _Checks) -> bool:
    """Whether a tag's doubts are all the repository-wide refusal (said once, in its note)."""
    return checks.storage is not None and all(d.why == REFUSED_WHOLE for d in doubts)


# --- how times read in notes -----------------------------------------------------------------


def moment(at: datetime) -> str:
    """``2026-03-01 10:00:03 UTC``."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
