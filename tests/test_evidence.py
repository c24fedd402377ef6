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
from worker.clock import CLOCK_SKEW, ClockSkew
from worker.engine.evidence import DOCKER_EPOCH, TagEvidence, judge, push_time, push_times
from worker.engine.model import PushSource, PushTime
from worker.engine.plan import Action
from worker.engine.planner import plan
from worker.engine.policy import KeepRule, Policy
from worker.oci import Digest
from worker.records import Sighting
from worker.store.history import new_sightings

D = Digest("sha256:" + "d" * 64)
OTHER = Digest("sha256:" + "e" * 64)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)
#: The registry's clock as a fresh Date header shows it when it agrees with regsweep's.
AGREES = ClockSkew(timedelta(seconds=-0.2), timedelta(seconds=0.9), NOW)
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
    times = judge(history.evidence, NOW, use_build_time=use_build_time, skew=AGREES).push_times
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


# --- registry times checked against everything else ------------------------------------------


def digest(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def _deleted(times: dict[str, PushTime], *rules: KeepRule) -> set[str]:
    """The tags a plan deletes over ``times`` (each tag on an image of its own)."""
    builder = RepoBuilder(now=NOW)
    for tag, pushed in times.items():
        builder.tag(tag, image(tag), pushed=pushed)
    result = plan(builder.inventory(), make_policy(keep=list(rules)), NOW)
    return {tag for d in result.deletions for tag in d.tags}


def test_a_link_older_than_a_listing_that_lacked_the_tag_is_not_its_push_time() -> None:
    """The registry's clock was 3 days behind when ``new`` was pushed: its link says 3 days
    ago, but regsweep's listing an hour ago lacked it. The link is doubted (the row says why),
    ``new`` counts from that listing, ``pushed_within: 1d`` keeps it, and ``newest: 1``
    deletes ``old`` (pushed before that listing), not ``new``."""
    listing = NOW - HOUR
    evidence = {
        "old": TagEvidence(
            digest(1), stored=NOW - 2 * HOUR, sighting=Sighting(digest(1), None, listing)
        ),
        "new": TagEvidence(
            digest(2), stored=NOW - 3 * DAY, sighting=Sighting(digest(2), listing, NOW, NOW - MS)
        ),
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    new = judged.push_times["new"]
    assert (new.source, new.earliest, new.latest) == (PushSource.FIRST_SEEN, listing, NOW)
    assert new.doubt == "storage time 2d 23h before a listing that lacked the tag"
    assert judged.doubted == ("new",) and judged.refused is None
    assert "new: storage time 2d 23h before a listing that lacked the tag" in judged.notes[0]
    assert "the registry's clock agrees with regsweep's (+0.35s) now" in judged.notes[0]
    assert _deleted(judged.push_times, rule(0, "*", within=DAY)) == set()
    assert _deleted(judged.push_times, rule(0, "*", newest=1)) == {"old"}
    # What the link alone said: 3 days old, and older than ``old``.
    alone = push_times(evidence, NOW, use_build_time=False)
    assert _deleted(alone, rule(0, "*", within=DAY)) == {"new"}
    assert _deleted(alone, rule(0, "*", newest=1)) == {"new"}


def test_link_times_of_1970_rank_nothing_even_one_second_apart() -> None:
    """Links dated 0 and 1 (an archive without times, a Nix-like store): no push's time, so
    ``newest: 1`` deletes nothing and a tag pushed a minute ago is not 20,000 days old."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    evidence = {
        f"v{i}": TagEvidence(
            digest(i),
            stored=epoch + i * timedelta(seconds=1),
            sighting=Sighting(digest(i), None, NOW),
        )
        for i in range(2)
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert {t.source for t in judged.push_times.values()} == {PushSource.FIRST_SEEN}
    assert _deleted(judged.push_times, rule(0, "*", newest=1)) == set()
    assert _deleted(judged.push_times, rule(0, "*", within=DAY)) == set()
    assert judged.refused is not None and "before 2013" in judged.refused
    assert "rsync -a, cp -a, tar without --touch" in judged.notes[0]
    alone = push_times(evidence, NOW, use_build_time=False)
    assert _deleted(alone, rule(0, "*", newest=1)) == {"v0"}


def test_links_a_copy_wrote_in_archive_order_rank_nothing_and_later_pushes_still_count() -> None:
    """Storage copied without times: every link at one instant, in archive order (the builds
    pushed last copied first). ``newest: 3`` deletes none of them on that order; after one
    real push the copied ones still rank nothing among themselves, and that push (provably
    after the copy) does not make three of them go."""
    copy = NOW - DAY
    evidence = {f"build-{n}": TagEvidence(digest(n), stored=copy + (9 - n) * MS) for n in range(10)}
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert judged.refused is not None
    assert "as a copy that kept no times writes them" in judged.refused
    assert _deleted(judged.push_times, rule(0, "build-*", newest=3)) == set()
    assert _deleted(judged.push_times, rule(0, "build-*", within=HOUR)) == set()
    assert (
        len(_deleted(push_times(evidence, NOW, use_build_time=False), rule(0, "build-*", newest=3)))
        == 7
    )
    evidence["build-10"] = TagEvidence(digest(10), stored=NOW - HOUR)
    after = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert after.refused is None
    assert after.push_times["build-10"] == PushTime.exact(PushSource.STORAGE, NOW - HOUR)
    assert set(after.doubted) == {f"build-{n}" for n in range(10)}
    assert _deleted(after.push_times, rule(0, "build-*", newest=3)) == set()


def test_a_burst_of_one_image_under_several_tags_keeps_its_storage_times() -> None:
    """One image pushed under three tags in the same second (a CI job's tags): one image is
    no copy, the links stay exact."""
    evidence = {tag: TagEvidence(D, stored=NOW - HOUR + i * MS) for i, tag in enumerate("abc")}
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert judged.doubted == () and judged.refused is None
    assert {t.source for t in judged.push_times.values()} == {PushSource.STORAGE}


def test_a_burst_of_a_few_images_is_no_copy_yet_ranks_nothing_among_itself() -> None:
    """Two images pushed 0.2 s apart (a CI job, a test stack): too few links to call the
    repository a copy (no refusal as a whole, so check-config does not fail), but the two
    links still rank neither tag before the other (``newest: 1`` deletes neither)."""
    evidence = {
        "a": TagEvidence(D, stored=NOW - HOUR),
        "b": TagEvidence(OTHER, stored=NOW - HOUR + 200 * MS),
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert judged.refused is None
    assert set(judged.doubted) == {"a", "b"}
    assert _deleted(judged.push_times, rule(0, "*", newest=1)) == set()


def test_a_doubted_link_never_makes_a_re_pushed_tag_older() -> None:
    """``stable`` was first seen 30 days ago and re-pushed an hour ago, in the same instant as
    another image's tag: its link is doubted, yet ``pushed_within: 14d`` keeps it (the link
    may stand for a later push than the listing showed); it only ranks nothing."""
    evidence = {
        "stable": TagEvidence(
            D, stored=NOW - HOUR, sighting=Sighting(D, NOW - 31 * DAY, NOW - 30 * DAY)
        ),
        "other": TagEvidence(OTHER, stored=NOW - HOUR + MS),
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    stable = judged.push_times["stable"]
    assert (stable.earliest, stable.latest) == (NOW - 31 * DAY, NOW - HOUR)
    assert _deleted(judged.push_times, rule(0, "*", within=14 * DAY)) == set()


def test_links_all_older_than_every_notification_are_refused_as_a_whole() -> None:
    """A storage not written since regsweep was first notified (a stale copy, another
    registry's storage): every link older than the oldest notification is refused."""
    evidence = {
        "a": TagEvidence(D, notified=NOW - HOUR, stored=NOW - 9 * DAY),
        "b": TagEvidence(OTHER, stored=NOW - 8 * DAY),
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=AGREES)
    assert judged.refused is not None and "not being written by that registry" in judged.refused
    a, b = judged.push_times["a"], judged.push_times["b"]
    assert (a.source, a.earliest, a.latest) == (PushSource.NOTIFICATION, NOW - HOUR, NOW - HOUR)
    assert b.source is PushSource.UNKNOWN and b.doubt == "storage times refused: see the note"


def test_a_registry_clock_off_by_days_ranks_nothing() -> None:
    """The registry's Date says it is 3 days behind: its links and notifications say
    "3 days ago" for pushes of today. None ranks or ages a tag; the note says so once."""
    behind = ClockSkew(-3 * DAY - timedelta(seconds=1), -3 * DAY + timedelta(seconds=1), NOW)
    evidence = {
        "a": TagEvidence(D, notified=NOW - 3 * DAY, sighting=Sighting(D, None, NOW)),
        "b": TagEvidence(OTHER, stored=NOW - 3 * DAY - HOUR, sighting=Sighting(OTHER, None, NOW)),
    }
    judged = judge(evidence, NOW, use_build_time=False, skew=behind)
    assert judged.refused is not None and "3d 0h behind regsweep's" in judged.refused
    assert _deleted(judged.push_times, rule(0, "*", within=DAY)) == set()
    assert _deleted(judged.push_times, rule(0, "*", newest=1)) == set()
    (note,) = judged.notes
    assert "until the clocks agree" in note
    alone = push_times(evidence, NOW, use_build_time=False)
    assert _deleted(alone, rule(0, "*", within=DAY)) == {"a", "b"}


def test_clock_skew_from_a_date_header() -> None:
    """A Date of whole seconds, asked at ``sent`` and answered at ``received``: the offset
    lies between Date - received and Date + 1s - sent; 5 minutes off is the limit."""
    sent = NOW
    skew = ClockSkew.observed(NOW - DAY, sent, sent + timedelta(milliseconds=200))
    assert skew.low == -DAY - timedelta(milliseconds=200)
    assert skew.high == -DAY + timedelta(seconds=1)
    assert not skew.agrees
    assert skew.describe() == "the registry's clock is 1d 0h behind regsweep's"
    near = ClockSkew.observed(NOW + CLOCK_SKEW, sent, sent)
    assert near.agrees and near.describe().startswith("the registry's clock agrees")


# --- property: registry times that lie never beat regsweep's own listings ---------------------

_EPOCH_1970 = datetime(1970, 1, 1, tzinfo=UTC)


@st.composite
def _lie(draw: st.DrawFn, truth: datetime, copy: datetime, rank: int) -> datetime | None:
    """A registry time that is not the push's: a clock behind or ahead, 1970, a copy's
    instant in archive order, the future, or any time at all."""
    return draw(
        st.sampled_from(
            [
                None,
                truth - timedelta(minutes=draw(st.integers(1, 60 * 24 * 90))),
                truth + timedelta(minutes=draw(st.integers(1, 60 * 24 * 3))),
                _EPOCH_1970 + timedelta(seconds=draw(st.integers(0, 2))),
                copy + rank * MS,
                NOW - timedelta(minutes=draw(_MINUTES)),
            ]
        )
    )


def _told(
    truth: datetime, honest: bool, copy: datetime, rank: int
) -> st.SearchStrategy[datetime | None]:
    """What a registry time says of a push: the truth (or nothing) for an honest tag."""
    return st.sampled_from([None, truth]) if honest else _lie(truth, copy, rank)


Lying = tuple[History, set[str], list[datetime], ClockSkew | None]


@st.composite
def lying(draw: st.DrawFn) -> Lying:
    """Tags truly pushed at random times, instantaneous listings between them, and registry
    times (links, notifications) true for the honest tags and anything for the rest; the
    registry's clock as a Date header shows it (or no header at all)."""
    count = draw(st.integers(2, 7))
    truth = {f"t{i}": NOW - timedelta(minutes=draw(_MINUTES)) for i in range(count)}
    digests = {tag: digest(i) for i, tag in enumerate(truth)}
    moments = {NOW - timedelta(minutes=draw(_MINUTES)) for _ in range(draw(st.integers(0, 4)))}
    instants = sorted(moments)
    seen = _sightings(truth, digests, [*((t, t, t) for t in instants), (NOW, NOW, NOW)])
    honest = {tag for tag in truth if draw(st.booleans())}
    copy = NOW - timedelta(minutes=draw(_MINUTES))
    evidence = {
        tag: TagEvidence(
            digests[tag],
            notified=draw(_told(at, tag in honest, copy, rank)),
            stored=draw(_told(at, tag in honest, copy, rank)),
            sighting=seen[tag],
        )
        for rank, (tag, at) in enumerate(truth.items())
    }
    behind = ClockSkew(-3 * DAY, -3 * DAY + timedelta(seconds=1), NOW)
    skew = draw(st.sampled_from([None, AGREES, behind]))
    return History(truth, evidence), honest, [*instants, NOW], skew


@PROPERTY
@given(lying())
def test_no_registry_time_beats_a_listing(case: Lying) -> None:
    """Whatever links and notifications say (a clock behind or ahead, 1970, a copy's instant,
    the future, anything), no tag is provably pushed before a listing that lacked it, nor
    provably older than an honestly dated tag that listing showed: one it followed."""
    history, honest, instants, skew = case
    times = judge(history.evidence, NOW, use_build_time=False, skew=skew).push_times
    for tag, item in history.evidence.items():
        earliest = item.sighting.earliest if item.sighting else None
        latest = times[tag].latest
        assert earliest is None or latest is None or latest >= earliest, (tag, times[tag])
    for listing in instants:
        shown = {t for t, at in history.truth.items() if at <= listing} & honest
        lacked = {t for t, at in history.truth.items() if at > listing}
        for before in shown:
            for after in lacked:
                newer, older = times[before].earliest, times[after].latest
                assert newer is None or older is None or older >= newer, (before, after, times)
