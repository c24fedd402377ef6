"""Push times from evidence, and the promise they keep: no tag is deleted on a guess.

Unit cases for :func:`worker.engine.evidence.push_time`, then Hypothesis properties over random
push histories: true push times, notifications that arrive late or never, storage or not,
listings at random moments, and build dates including the ones reproducible builds write
(1970, 1980, year 1, a shared ``SOURCE_DATE_EPOCH``) and the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import NOW, RepoBuilder, image, make_policy, rule
from worker.engine.evidence import DOCKER_EPOCH, Sighting, TagEvidence, push_time, push_times
from worker.engine.model import Digest, PushSource, PushTime
from worker.engine.plan import Action
from worker.engine.planner import plan
from worker.engine.policy import KeepRule, Policy
from worker.store.history import new_sightings

D = Digest("sha256:" + "d" * 64)
OTHER = Digest("sha256:" + "e" * 64)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
#: Build dates reproducible-build tools write (ko/Bazel/Jib, Nix, buildpacks, nix2container).
SENTINELS = (
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC),
    datetime(1980, 1, 1, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
)


def exact(source: PushSource, at: datetime) -> PushTime:
    return PushTime.exact(source, at)


def test_a_notification_beats_every_other_source() -> None:
    """A notified push is the push time, whatever a listing or the build date says."""
    item = TagEvidence(
        D, notified=NOW - DAY, sighting=Sighting(D, None, NOW, NOW), built=NOW - HOUR
    )
    assert push_time(item, NOW, use_build_time=True) == PushTime(
        PushSource.NOTIFICATION, NOW - DAY, NOW - DAY, NOW
    )


def test_the_later_of_notification_and_storage_wins() -> None:
    """A re-push of the same digest not notified yet shows in the storage's mtime: the later
    time counts (later keeps longer)."""
    item = TagEvidence(D, notified=NOW - DAY, stored=NOW - HOUR)
    assert push_time(item, NOW, use_build_time=False) == exact(PushSource.STORAGE, NOW - HOUR)


def test_times_far_in_the_future_are_doubtful_and_a_little_is_clock_skew() -> None:
    """A push time an hour ahead is not believed; a minute ahead is taken as now."""
    ahead = TagEvidence(D, notified=NOW + HOUR, sighting=Sighting(D, NOW - DAY, NOW))
    assert push_time(ahead, NOW, use_build_time=False).source is PushSource.FIRST_SEEN
    skewed = TagEvidence(D, stored=NOW + timedelta(minutes=1))
    assert push_time(skewed, NOW, use_build_time=False) == exact(PushSource.STORAGE, NOW)


def test_a_sighting_of_another_digest_says_nothing() -> None:
    """A sighting recorded for the digest the tag had before is no evidence for the new one."""
    item = TagEvidence(D, sighting=Sighting(OTHER, NOW - DAY, NOW - HOUR))
    assert push_time(item, NOW, use_build_time=False).source is PushSource.UNKNOWN


def test_first_seen_bounds_then_build_time_then_upper_bound_only() -> None:
    """A sighting with an earlier listing beats the build date; without one, an opted-in sane
    build date is used; otherwise only the upper bound is known."""
    shown = NOW - 2 * HOUR
    bounded = TagEvidence(
        D, sighting=Sighting(D, NOW - DAY, NOW - HOUR, shown), built=NOW - 9 * DAY
    )
    assert push_time(bounded, NOW, use_build_time=True) == PushTime(
        PushSource.FIRST_SEEN, NOW - DAY, NOW - HOUR, shown
    )
    open_ended = TagEvidence(D, sighting=Sighting(D, None, NOW - HOUR, shown), built=NOW - 9 * DAY)
    assert push_time(open_ended, NOW, use_build_time=True) == PushTime(
        PushSource.BUILD_TIME, NOW - 9 * DAY, NOW - 9 * DAY, shown
    )
    assert push_time(open_ended, NOW, use_build_time=False) == PushTime(
        PushSource.FIRST_SEEN, None, NOW - HOUR, shown
    )


def test_build_dates_no_image_can_have_are_ignored() -> None:
    """Before Docker existed, in the future, or after the tag was first seen: not evidence."""
    seen = Sighting(D, None, NOW - DAY)
    for built in (*SENTINELS, DOCKER_EPOCH - DAY, NOW + DAY, NOW - HOUR):
        item = TagEvidence(D, sighting=seen, built=built)
        assert push_time(item, NOW, use_build_time=True).source is PushSource.FIRST_SEEN, built


def test_a_build_date_shared_by_several_images_orders_nothing() -> None:
    """Reproducible builds stamp every image alike: a date two images share is dropped, and
    two tags of one image count as one."""
    shared = NOW - 20 * DAY
    evidence = {
        "a": TagEvidence(D, built=shared),
        "a-alias": TagEvidence(D, built=shared),
        "b": TagEvidence(OTHER, built=shared),
        "c": TagEvidence(Digest("sha256:" + "f" * 64), built=NOW - 3 * DAY),
    }
    times = push_times(evidence, NOW, use_build_time=True)
    assert {tag: t.source for tag, t in times.items()} == {
        "a": PushSource.UNKNOWN,
        "a-alias": PushSource.UNKNOWN,
        "b": PushSource.UNKNOWN,
        "c": PushSource.BUILD_TIME,
    }
    alone = push_times({k: evidence[k] for k in ("a", "a-alias")}, NOW, use_build_time=True)
    assert {t.source for t in alone.values()} == {PushSource.BUILD_TIME}


# --- properties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    """Tags with their true push times, and the evidence regsweep could have of them."""

    truth: dict[str, datetime]
    evidence: dict[str, TagEvidence]


_MINUTES = st.integers(0, 60 * 24 * 60)  # up to 60 days back


@st.composite
def listings(draw: st.DrawFn) -> list[tuple[datetime, datetime, datetime]]:
    """(start, instant the tag list was read, finish) of the listings regsweep recorded, in
    the order it recorded them (by start; they may overlap), the last one just now."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        start = NOW - timedelta(minutes=draw(_MINUTES))
        read = start + timedelta(seconds=draw(st.integers(0, 300)))
        out.append((start, read, read + timedelta(seconds=draw(st.integers(0, 300)))))
    out.sort()
    return [*out, (NOW - timedelta(seconds=1), NOW, NOW)]


def _sightings(
    truth: dict[str, datetime],
    digests: dict[str, Digest],
    recorded: list[tuple[datetime, datetime, datetime]],
) -> dict[str, Sighting]:
    """What the history holds after ``recorded``: each listing shows the tags pushed by the
    instant it read the tag list, and is recorded as the stores record it."""
    seen: dict[str, Sighting] = {}
    last: datetime | None = None
    for start, read, finish in recorded:
        live = {tag: digests[tag] for tag, at in truth.items() if at <= read}
        seen = new_sightings(seen, last, live, start, finish)
        last = start
    return seen


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Up to 8 tags pushed at random (some at the same instant); listings at random times;
    notifications delivered or still in flight; storage or not; any build date."""
    count = draw(st.integers(1, 8))
    pushed = [NOW - timedelta(minutes=draw(_MINUTES)) for _ in range(count)]
    if count > 1 and draw(st.booleans()):
        pushed[1] = pushed[0]  # two pushes in the same instant
    storage = draw(st.booleans())
    shared_build = NOW - timedelta(days=draw(st.integers(0, 40)))
    sharing = set(draw(st.lists(st.integers(0, count - 1), unique=True)))
    if len(sharing) < 2:
        sharing = set()  # a date one image alone carries is a real build date, not a stamp
    truth = {f"main-{i}": at for i, at in enumerate(pushed)}
    digests = {f"main-{i}": Digest(f"sha256:{i:064x}") for i in range(count)}
    seen = _sightings(truth, digests, draw(listings()))
    evidence = {
        tag: TagEvidence(
            digest=digests[tag],
            notified=at if draw(st.booleans()) else None,  # else: the event is late or lost
            stored=at if storage else None,
            sighting=seen[tag],
            built=shared_build if i in sharing else draw(_builds),
        )
        for i, (tag, at) in enumerate(truth.items())
    }
    return History(truth, evidence)


#: Build dates that prove nothing on their own: none, the sentinels, the future (a date several
#: images share is drawn apart).
_builds = st.sampled_from([None, *SENTINELS, NOW + timedelta(days=3)])


@st.composite
def keep_rules(draw: st.DrawFn) -> tuple[KeepRule, ...]:
    newest = draw(st.none() | st.integers(1, 4))
    within = draw(st.none() | st.integers(1, 60 * 24 * 30).map(lambda m: timedelta(minutes=m)))
    return (rule(0, "main-*", newest=newest, within=within),)


def _planned(history: History, rules: tuple[KeepRule, ...], use_build_time: bool) -> set[str]:
    """The tags a plan over ``history`` deletes (each tag on an image of its own)."""
    builder = RepoBuilder(now=NOW)
    times = push_times(history.evidence, NOW, use_build_time=use_build_time)
    for tag in history.truth:
        builder.tag(tag, image(tag), pushed=times[tag])
    policy: Policy = make_policy(keep=list(rules))
    result = plan(builder.inventory(), policy, NOW)
    assert all(d.action is Action.MANIFEST for d in result.deletions)
    return {tag for d in result.deletions for tag in d.tags}


def _justified(tag: str, history: History, keep: KeepRule) -> bool:
    """Whether the truth bears out a deletion: N tags truly pushed later, or truly too old."""
    at = history.truth[tag]
    later = sum(1 for t in history.truth.values() if t > at)
    too_many = keep.newest is not None and later >= keep.newest
    too_old = keep.pushed_within is not None and at < NOW - keep.pushed_within
    return too_many or too_old


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(histories(), keep_rules(), st.booleans())
def test_no_tag_is_deleted_on_a_guess(
    history: History, rules: tuple[KeepRule, ...], use_build_time: bool
) -> None:
    """Whatever arrives late and whatever the build dates say, a tag is deleted only when the
    truth bears it out: no tag among the N most recently pushed, none pushed within
    ``pushed_within``."""
    (keep,) = rules
    for tag in _planned(history, rules, use_build_time):
        assert _justified(tag, history, keep), (tag, history.truth[tag])
