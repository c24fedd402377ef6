"""Table-driven cases for the planner, each over a small hand-made repository."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from tests.strategies import (
    NOW,
    RepoBuilder,
    cosign_tag,
    image,
    index,
    make_policy,
    request,
    rule,
    sha256,
    signature,
    untag_placeholder,
)
from worker.engine.model import Inventory, PushSource, PushTime
from worker.engine.plan import Action, Plan
from worker.engine.planner import TagRequest, plan
from worker.engine.policy import Policy
from worker.oci import Digest

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Case:
    """A repository, a policy and requests, and exactly what the plan must say."""

    inventory: Inventory
    policy: Policy
    requests: tuple[TagRequest, ...] = ()
    kept: frozenset[str] = frozenset()
    #: digest -> (action, tags removed with it) for every digest deletion.
    deleted: Mapping[Digest, tuple[Action, tuple[str, ...]]] = field(default_factory=dict)
    #: Tags removed as tags only.
    untagged: frozenset[str] = frozenset()


def keep_newest_n() -> Case:
    """``newest: 2`` keeps the two most recently pushed matching tags."""
    b = RepoBuilder()
    imgs = [b.tag(f"main-{i}", image(f"m{i}"), age=i * DAY) for i in range(1, 5)]
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "main-*", newest=2)]),
        kept=frozenset({"main-1", "main-2"}),
        deleted={
            imgs[2].digest: (Action.MANIFEST, ("main-3",)),
            imgs[3].digest: (Action.MANIFEST, ("main-4",)),
        },
    )


def pushed_within() -> Case:
    """``pushed_within`` deletes only provably old pushes: unknown keeps, and a build date alone
    (without ``age_from: build_time``) is no push time."""
    b = RepoBuilder()
    b.tag("fresh", image("fresh"), age=2 * DAY)
    old = b.tag("old", image("old"), age=20 * DAY)
    b.tag("unknown", image("unknown"))
    b.tag("built", image("built", created=NOW - 30 * DAY))
    seen_long_ago = b.tag(
        "seen", image("seen"), pushed=PushTime(PushSource.FIRST_SEEN, None, NOW - 15 * DAY)
    )
    b.tag("seen-lately", image("lately"), pushed=PushTime(PushSource.FIRST_SEEN, None, NOW - DAY))
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "*", within=14 * DAY)]),
        kept=frozenset({"fresh", "unknown", "built", "seen-lately"}),
        deleted={
            old.digest: (Action.MANIFEST, ("old",)),
            seen_long_ago.digest: (Action.MANIFEST, ("seen",)),
        },
    )


def protect_beats_keep_and_events() -> Case:
    """A protected tag stays although no keep rule keeps it and an event asks for every tag."""
    b = RepoBuilder()
    b.tag("latest", image("latest"), age=90 * DAY)
    b.tag("v1", image("v1"), age=90 * DAY)
    gone = b.tag("main-1", image("main-1"), age=DAY)
    return Case(
        b.inventory(),
        make_policy(protect=["latest", "v*"], keep=[rule(0, "main-*", newest=5)]),
        requests=(request("branch_deleted", "*"),),
        kept=frozenset({"latest", "v1"}),
        deleted={gone.digest: (Action.MANIFEST, ("main-1",))},
    )


def event_overrides_retention() -> Case:
    """A CI event deletes a tag that retention would keep."""
    b = RepoBuilder()
    pr = b.tag("pr-42", image("pr-42"), age=HOUR)
    b.tag("pr-43", image("pr-43"), age=HOUR)
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "*", within=14 * DAY)]),
        requests=(request("pull_request_closed", "pr-42", "pr-42-*"),),
        kept=frozenset({"pr-43"}),
        deleted={pr.digest: (Action.MANIFEST, ("pr-42",))},
    )


def shared_digest_is_untagged() -> Case:
    """A removed tag sharing its digest with a kept tag goes as a tag only."""
    b = RepoBuilder()
    shared = image("shared")
    b.tag("latest", shared)
    b.tag("pr-1", shared)
    return Case(
        b.inventory(),
        make_policy(protect=["latest"]),
        requests=(request("pull_request_closed", "pr-1"),),
        kept=frozenset({"latest"}),
        untagged=frozenset({"pr-1"}),
    )


def index_deleted_with_children() -> Case:
    """Deleting an index deletes the children nothing else needs."""
    b = RepoBuilder()
    amd, arm = image("amd64"), image("arm64")
    b.add(amd, arm)
    idx = b.tag("pr-1", index("pr-1", [amd, arm]))
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1"),),
        deleted={
            idx.digest: (Action.MANIFEST, ("pr-1",)),
            amd.digest: (Action.CHILD, ()),
            arm.digest: (Action.CHILD, ()),
        },
    )


def child_shared_with_kept_index() -> Case:
    """A child that a kept index also lists survives its deleted index."""
    b = RepoBuilder()
    amd, arm, s390x = image("amd64"), image("arm64"), image("s390x")
    b.add(amd, arm, s390x)
    doomed = b.tag("pr-1", index("pr-1", [amd, arm]))
    b.tag("latest", index("latest", [amd, s390x]))
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1"),),
        kept=frozenset({"latest"}),
        deleted={doomed.digest: (Action.MANIFEST, ("pr-1",)), arm.digest: (Action.CHILD, ())},
    )


def tag_on_child_of_kept_index() -> Case:
    """A removed tag pointing straight at a kept index's child is removed as a tag only."""
    b = RepoBuilder()
    amd, arm = image("amd64"), image("arm64")
    b.add(arm)
    b.tag("pr-1-amd64", amd)
    b.tag("latest", index("latest", [amd, arm]))
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1", "pr-1-*"),),
        kept=frozenset({"latest"}),
        untagged=frozenset({"pr-1-amd64"}),
    )


def _attested(b: RepoBuilder, tag: str) -> tuple[list[Digest], Digest]:
    amd, arm = image(f"{tag} amd64"), image(f"{tag} arm64")
    att_amd, att_arm = image(f"{tag} att amd64"), image(f"{tag} att arm64")
    b.add(amd, arm, att_amd, att_arm)
    idx = index(tag, [amd, arm], attestations=[(att_amd, amd), (att_arm, arm)])
    b.tag(tag, idx)
    return [amd.digest, arm.digest, att_amd.digest, att_arm.digest], idx.digest


def attestations_follow_their_index() -> Case:
    """BuildKit attestation manifests stay with a kept index and go with a deleted one."""
    b = RepoBuilder()
    _attested(b, "latest")
    children, idx = _attested(b, "pr-1")
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1"),),
        kept=frozenset({"latest"}),
        deleted={idx: (Action.MANIFEST, ("pr-1",))} | {c: (Action.CHILD, ()) for c in children},
    )


def cosign_tags_follow_subject() -> Case:
    """Cosign tags of a kept image stay; those of a deleted image go with it."""
    b = RepoBuilder()
    kept = b.tag("latest", image("kept"))
    b.tag(cosign_tag(kept, "sig"), signature(kept, "sig"))
    b.tag(cosign_tag(kept, "att"), signature(kept, "att"))
    doomed = b.tag("pr-1", image("doomed"))
    sig = b.tag(cosign_tag(doomed, "sig"), signature(doomed, "sig"))
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1"),),
        kept=frozenset({"latest", cosign_tag(kept, "sig"), cosign_tag(kept, "att")}),
        deleted={
            doomed.digest: (Action.MANIFEST, ("pr-1",)),
            sig.digest: (Action.REFERRER, (cosign_tag(doomed, "sig"),)),
        },
    )


def fallback_index_and_referrers_go_with_subject() -> Case:
    """The OCI fallback index, its entries, API referrers and referrers of referrers go too."""
    b = RepoBuilder()
    subject = b.tag("pr-1", image("subject"))
    by_field = signature(subject, "sbom")
    by_api = image("api-only referrer")
    of_referrer = signature(by_field, "countersign")
    b.add(by_field, of_referrer)
    b.refer(subject, by_api)
    fallback = b.tag(cosign_tag(subject, None), index("fallback", [by_field]))
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1"),),
        deleted={
            subject.digest: (Action.MANIFEST, ("pr-1",)),
            fallback.digest: (Action.REFERRER, (cosign_tag(subject, None),)),
            by_field.digest: (Action.REFERRER, ()),
            by_api.digest: (Action.REFERRER, ()),
            of_referrer.digest: (Action.REFERRER, ()),
        },
    )


def referrers_never_count_toward_newest() -> Case:
    """Fresh cosign tags take no ``newest`` slot from the images they sign."""
    b = RepoBuilder()
    imgs = [b.tag(f"main-{i}", image(f"main-{i}"), age=i * DAY) for i in (1, 2, 3)]
    sigs = [cosign_tag(m) for m in imgs]
    for m, tag in zip(imgs, sigs, strict=True):
        b.tag(tag, signature(m), age=timedelta(0))
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "*", newest=2)]),
        kept=frozenset({"main-1", "main-2", sigs[0], sigs[1]}),
        deleted={
            imgs[2].digest: (Action.MANIFEST, ("main-3",)),
            b.tags[sigs[2]]: (Action.REFERRER, (sigs[2],)),
        },
    )


def orphan_cosign_tag() -> Case:
    """A cosign tag whose subject regsweep deleted is deleted; a subject that is merely absent
    (another repository, not pushed yet) is no evidence, and its signature stays."""
    b = RepoBuilder()
    gone, absent, unknown = sha256("gone"), sha256("elsewhere"), sha256("never fetched")
    b.gone_by_regsweep(gone)
    b.missing.add(absent)
    orphan = b.tag(cosign_tag(gone), signature(gone, "orphan"))
    b.tag(cosign_tag(absent), signature(absent, "elsewhere"))
    b.tag(cosign_tag(unknown), signature(unknown, "unknown"))
    return Case(
        b.inventory(),
        make_policy(keep=[]),
        kept=frozenset({cosign_tag(unknown), cosign_tag(absent)}),
        deleted={orphan.digest: (Action.REFERRER, (cosign_tag(gone),))},
    )


def untagged_grace() -> Case:
    """Untagged manifests go after the grace period, an untagged index with its children."""
    b = RepoBuilder()
    stale = b.untagged(image("stale"), since=2 * HOUR)
    b.untagged(image("recent"), since=30 * timedelta(minutes=1))
    child = image("child")
    b.add(child)
    stale_idx = b.untagged(index("stale index", [child]), since=DAY)
    return Case(
        b.inventory(),
        make_policy(untagged_after=HOUR),
        deleted={
            stale.digest: (Action.MANIFEST, ()),
            stale_idx.digest: (Action.MANIFEST, ()),
            child.digest: (Action.CHILD, ()),
        },
    )


def untagged_never_without_grace() -> Case:
    """Without ``untagged.delete_after`` no untagged manifest is deleted."""
    b = RepoBuilder()
    b.untagged(image("ancient"), since=365 * DAY)
    return Case(b.inventory(), make_policy())


def untagged_index_in_grace_keeps_its_child() -> Case:
    """A manifest still listed by an index in its grace period is untagged, never deleted."""
    b = RepoBuilder()
    child = b.tag("pr-1", image("child"))
    b.untagged(index("recent index", [child]), since=timedelta(minutes=5))
    return Case(
        b.inventory(),
        make_policy(untagged_after=HOUR),
        requests=(request("pull_request_closed", "pr-1"),),
        untagged=frozenset({"pr-1"}),
    )


def keep_none_keeps_all_but_events() -> Case:
    """A policy without ``keep:`` keeps every tag an event does not ask for."""
    b = RepoBuilder()
    b.tag("ancient", image("ancient"), age=999 * DAY)
    b.tag("main-1", image("main-1"))
    pr = b.tag("pr-7", image("pr-7"))
    return Case(
        b.inventory(),
        make_policy(keep=None),
        requests=(request("pull_request_closed", "pr-7"),),
        kept=frozenset({"ancient", "main-1"}),
        deleted={pr.digest: (Action.MANIFEST, ("pr-7",))},
    )


def newest_skips_protected_and_requested() -> Case:
    """Protected and event-deleted tags use no ``newest`` slot, so the next one is kept."""
    b = RepoBuilder()
    b.tag("main-1", image("main-1"), age=1 * HOUR)
    b.tag("main-2", image("main-2"), age=2 * HOUR)
    b.tag("main-3", image("main-3"), age=3 * HOUR)
    last = b.tag("main-4", image("main-4"), age=4 * HOUR)
    return Case(
        b.inventory(),
        make_policy(protect=["main-1"], keep=[rule(0, "main-*", newest=1)]),
        requests=(request("branch_deleted", "main-2"),),
        kept=frozenset({"main-1", "main-3"}),
        deleted={
            b.tags["main-2"]: (Action.MANIFEST, ("main-2",)),
            last.digest: (Action.MANIFEST, ("main-4",)),
        },
    )


def equal_and_unknown_push_times_prove_nothing() -> Case:
    """``newest`` deletes a tag only when N others were provably pushed after it: equal times,
    overlapping intervals and unknown times keep, whatever the tag names."""
    b = RepoBuilder()
    a = b.tag("a", image("a"), age=3 * DAY)
    b.tag("b", image("b"), age=DAY)
    b.tag("c", image("c"), age=DAY)
    b.tag("z", image("z"))
    b.tag("overlap", image("o"), pushed=PushTime(PushSource.FIRST_SEEN, NOW - 4 * DAY, NOW))
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "*", newest=2)]),
        kept=frozenset({"b", "c", "z", "overlap"}),
        deleted={a.digest: (Action.MANIFEST, ("a",))},
    )


def held_tag_kept_against_retention_and_events() -> Case:
    """A held tag stays although retention and a CI event would delete it; protect is not needed."""
    b = RepoBuilder()
    b.tag("pr-7", image("pr-7"), age=30 * DAY)
    b.hold("pr-7", until=DAY, reason="restore of sha256:abc from job j1")
    gone = b.tag("pr-8", image("pr-8"), age=30 * DAY)
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "*", within=DAY)]),
        requests=(request("pull_request_closed", "pr-*"),),
        kept=frozenset({"pr-7"}),
        deleted={gone.digest: (Action.MANIFEST, ("pr-8",))},
    )


def interrupted_untag_is_finished_never_ranked() -> Case:
    """A tag left on regsweep's own untag placeholder takes no ``newest`` slot; the placeholder
    is deleted, which finishes the removal."""
    b = RepoBuilder()
    placeholder = b.tag("main-9", untag_placeholder(), age=timedelta(0))
    b.tag("main-2", image("main-2"), age=2 * HOUR)
    b.tag("main-1", image("main-1"), age=HOUR)
    return Case(
        b.inventory(),
        make_policy(keep=[rule(0, "main-*", newest=2)]),
        kept=frozenset({"main-1", "main-2"}),
        deleted={placeholder.digest: (Action.MANIFEST, ("main-9",))},
    )


def any_rule_keeps() -> Case:
    """A tag survives when any rule keeps it, every limit of that rule met."""
    b = RepoBuilder()
    b.tag("main-1", image("main-1"), age=30 * DAY)
    gone = b.tag("main-2", image("main-2"), age=31 * DAY)
    b.tag("feat", image("feat"), age=DAY)
    both = [rule(0, "main-*", newest=1), rule(1, "*", newest=5, within=7 * DAY)]
    return Case(
        b.inventory(),
        make_policy(keep=both),
        kept=frozenset({"main-1", "feat"}),
        deleted={gone.digest: (Action.MANIFEST, ("main-2",))},
    )


def several_tags_one_manifest() -> Case:
    """Removed tags that share a digest nothing kept needs go in one manifest deletion."""
    b = RepoBuilder()
    shared = image("shared")
    b.tag("pr-1", shared)
    b.tag("pr-1-final", shared)
    return Case(
        b.inventory(),
        make_policy(),
        requests=(request("pull_request_closed", "pr-1", "pr-1-*"),),
        deleted={shared.digest: (Action.MANIFEST, ("pr-1", "pr-1-final"))},
    )


CASES: list[Callable[[], Case]] = [
    keep_newest_n,
    pushed_within,
    protect_beats_keep_and_events,
    event_overrides_retention,
    shared_digest_is_untagged,
    index_deleted_with_children,
    child_shared_with_kept_index,
    tag_on_child_of_kept_index,
    attestations_follow_their_index,
    cosign_tags_follow_subject,
    fallback_index_and_referrers_go_with_subject,
    referrers_never_count_toward_newest,
    orphan_cosign_tag,
    untagged_grace,
    untagged_never_without_grace,
    untagged_index_in_grace_keeps_its_child,
    keep_none_keeps_all_but_events,
    newest_skips_protected_and_requested,
    equal_and_unknown_push_times_prove_nothing,
    held_tag_kept_against_retention_and_events,
    interrupted_untag_is_finished_never_ranked,
    any_rule_keeps,
    several_tags_one_manifest,
]


@pytest.mark.parametrize("make_case", CASES, ids=[c.__name__ for c in CASES])
def test_plan_matches_case(make_case: Callable[[], Case]) -> None:
    """Each hand-made repository plans exactly the kept tags and deletions its case expects."""
    case = make_case()
    result = plan(case.inventory, case.policy, NOW, case.requests)
    assert {k.tag for k in result.kept} == case.kept
    digest_deletions = {
        d.digest: (d.action, d.tags) for d in result.deletions if d.action is not Action.UNTAG
    }
    assert digest_deletions == dict(case.deleted)
    assert {t for d in result.deletions if d.action is Action.UNTAG for t in d.tags} == (
        case.untagged
    )


def _reasons(result: Plan) -> dict[str, str]:
    """Tag (or digest, for untagged manifests) -> the reason as a table would print it."""
    out = {k.tag: str(k.reason) for k in result.kept}
    for d in result.deletions:
        for tag in d.tags or (d.digest,):
            out[tag] = str(d.reason)
    return out


def test_reasons_are_human_readable() -> None:
    """Every kept and deleted item says its rule and a detail a person can check."""
    b = RepoBuilder()
    for i in range(1, 4):
        b.tag(f"main-{i}", image(f"main-{i}"), age=i * 10 * DAY)
    b.tag("latest", image("latest"))
    b.tag("pr-42", image("pr-42"), age=HOUR)
    stale = b.untagged(image("stale"), since=3 * HOUR)
    policy = make_policy(
        protect=["latest"],
        keep=[rule(0, "main-*", newest=2), rule(1, "*", within=14 * DAY)],
        untagged_after=HOUR,
    )
    event = request("pull_request_closed", "pr-42", detail="PR #42 closed")
    reasons = _reasons(plan(b.inventory(), policy, NOW, [event]))
    assert reasons == {
        "latest": "protect: matches latest",
        "main-1": "keep[0]: matches main-*, 0 of main-* provably pushed later, keeps newest 2",
        "main-2": "keep[0]: matches main-*, 1 of main-* provably pushed later, keeps newest 2",
        "main-3": (
            "retention: keep[0] 2 of main-* provably pushed later, keeps newest 2; "
            "keep[1] pushed 30d ago (notification), keeps 14d"
        ),
        "pr-42": "on.pull_request_closed: PR #42 closed, matches pr-42",
        stale.digest: "untagged: untagged for 3h, grace 1h",
    }


def test_followers_name_what_they_follow() -> None:
    """Children, referrers and tag-only removals name the index or subject they follow."""
    b = RepoBuilder()
    child = image("child")
    b.add(child)
    idx = b.tag("pr-1", index("pr-1", [child]))
    b.tag(cosign_tag(idx), signature(idx))
    b.tag("latest", b.tag("pr-1-alias", image("shared")))
    result = plan(b.inventory(), make_policy(protect=["latest"]), NOW, [request("x", "pr-1*")])
    short = idx.digest[:19]
    by_action = {d.action: d for d in result.deletions}
    assert str(by_action[Action.CHILD].reason) == f"child: of deleted index {short}"
    assert by_action[Action.CHILD].parents == (idx.digest,)
    assert str(by_action[Action.REFERRER].reason) == f"referrer: of deleted subject {short}"
    assert by_action[Action.REFERRER].parents == (idx.digest,)
    assert by_action[Action.UNTAG].tags == ("pr-1-alias",)
    assert str(by_action[Action.UNTAG].reason) == "on.x: matches pr-1*"


def test_deletions_in_execution_order() -> None:
    """Each deletion after what it depends on (the deleted index listing it, the deleted subject
    it refers to); within a level, tag-only removals, manifests, children."""
    b = RepoBuilder()
    amd, arm, shared = image("amd64"), image("arm64"), image("shared")
    inner = index("inner", [amd, arm])
    b.add(arm, inner)
    b.tag("pr-1-amd64", amd)
    outer = b.tag("pr-1", index("outer", [inner]))
    b.tag(cosign_tag(outer), signature(outer))
    b.tag("latest", b.tag("pr-1-alias", shared))
    result = plan(b.inventory(), make_policy(protect=["latest"]), NOW, [request("x", "pr-1*")])
    assert [(d.action, d.digest, d.parents) for d in result.deletions] == [
        (Action.UNTAG, shared.digest, ()),
        (Action.MANIFEST, outer.digest, ()),
        (Action.REFERRER, b.tags[cosign_tag(outer)], (outer.digest,)),
        (Action.CHILD, inner.digest, (outer.digest,)),
        (Action.MANIFEST, amd.digest, (inner.digest,)),
        (Action.CHILD, arm.digest, (inner.digest,)),
    ]


def test_reclaimable_bytes_count_unshared_blobs_once() -> None:
    """A layer a surviving image shares is not reclaimable; the doomed image's own blobs are."""
    b = RepoBuilder()
    kept = b.tag("latest", image("kept", [("base", 1000), ("app-a", 200)]))
    doomed = b.tag("pr-1", image("doomed", [("base", 1000), ("app-b", 300), ("app-b", 300)]))
    result = plan(b.inventory(), make_policy(), NOW, [request("x", "pr-1")])
    config_size = 10
    assert result.reclaimable_bytes == doomed.size + 300 + config_size
    assert kept.digest in result.protected_digests


def test_protected_digests_cover_children_and_referrers() -> None:
    """The plan's closure holds a kept index, its children, and its signature."""
    b = RepoBuilder()
    amd = image("amd64")
    b.add(amd)
    idx = b.tag("latest", index("latest", [amd]))
    sig = b.tag(cosign_tag(idx), signature(idx))
    result = plan(b.inventory(), make_policy(), NOW)
    assert result.protected_digests == {idx.digest, amd.digest, sig.digest}
    assert result.is_empty


def test_protected_referrer_tag_stays_with_its_digest() -> None:
    """``protect`` beats everything: a protected cosign tag stays though its subject goes."""
    b = RepoBuilder()
    subject = b.tag("pr-1", image("subject"))
    sig = b.tag(cosign_tag(subject), signature(subject))
    result = plan(b.inventory(), make_policy(protect=["sha256-*"]), NOW, [request("x", "pr-1")])
    assert [(k.tag, k.reason.rule) for k in result.kept] == [(cosign_tag(subject), "protect")]
    assert [d.digest for d in result.deletions] == [subject.digest]
    assert sig.digest in result.protected_digests


def test_plan_metadata() -> None:
    """The plan names its repository, policy, mode and time, and counts what it removes."""
    b = RepoBuilder()
    b.tag("latest", image("latest"))
    b.tag("pr-1", image("pr-1"))
    policy = make_policy()
    result = plan(b.inventory(), policy, NOW, [request("x", "pr-1")])
    assert (result.repository, result.policy, result.mode, result.created_at) == (
        "team/web",
        "web",
        policy.mode,
        NOW,
    )
    assert (result.tags_removed, result.manifests_removed, result.tags_kept) == (1, 1, 1)
