"""Hypothesis properties: the planner's safety invariants hold on random repositories."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import NOW, inventories, policies, request, tag_requests
from worker.engine.model import Inventory
from worker.engine.plan import Action, Plan
from worker.engine.planner import TagRequest, plan
from worker.engine.policy import Policy
from worker.oci import Digest, referrer_tag_subject

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
K = TypeVar("K")
V = TypeVar("V")
cases = st.tuples(inventories(), policies(), tag_requests())


def _needed(inventory: Inventory, seeds: Iterable[Digest]) -> set[Digest]:
    """Reference closure, written apart from the planner's: children and referrers, recursively."""
    edges: defaultdict[Digest, set[Digest]] = defaultdict(set)
    for digest, manifest in inventory.manifests.items():
        edges[digest].update(c.digest for c in manifest.children)
        if manifest.subject:
            edges[manifest.subject].add(digest)
    for subject, refs in inventory.referrers.items():
        edges[subject].update(refs)
    for tag, digest in inventory.tags.items():
        named = referrer_tag_subject(tag)
        if named:
            edges[named].add(digest)
    needed = set(seeds)
    while True:
        grown = needed.union(*(edges[d] for d in needed))
        if grown == needed:
            return needed
        needed = grown


def _descendants(inventory: Inventory, digest: Digest) -> set[Digest]:
    found: set[Digest] = set()
    stack = [digest]
    while stack:
        manifest = inventory.manifests.get(stack.pop())
        for child in manifest.children if manifest else ():
            if child.digest not in found:
                found.add(child.digest)
                stack.append(child.digest)
    return found


def _deleted(result: Plan) -> set[Digest]:
    return {d.digest for d in result.deletions if d.action is not Action.UNTAG}


def _kept_digests(inventory: Inventory, result: Plan) -> set[Digest]:
    return {inventory.tags[k.tag] for k in result.kept}


@SETTINGS
@given(cases)
def test_kept_and_protected_digests_never_deleted(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """No digest deletion hits the digest of a kept or protected tag (invariant 1)."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    protected = {d for t, d in inventory.tags.items() if policy.protected_by(t)}
    assert not _deleted(result) & (_kept_digests(inventory, result) | protected)


@SETTINGS
@given(cases)
def test_closure_of_kept_tags_never_deleted(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Nothing kept tags need, children and referrers included, is deleted; the plan reports it."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    closure = _needed(inventory, _kept_digests(inventory, result))
    assert not _deleted(result) & closure
    assert closure <= result.protected_digests


@SETTINGS
@given(cases)
def test_every_tag_kept_or_removed_exactly_once(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Each tag is either kept or removed by exactly one deletion, and each digest deleted once."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    seen = Counter(k.tag for k in result.kept)
    seen.update(t for d in result.deletions for t in d.tags)
    assert seen == Counter(list(inventory.tags))
    digests = [d.digest for d in result.deletions if d.action is not Action.UNTAG]
    assert len(digests) == len(set(digests))
    assert all(inventory.tags[t] == d.digest for d in result.deletions for t in d.tags)


@SETTINGS
@given(cases)
def test_untag_only_when_the_digest_must_stay(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """A tag goes alone only when its digest is needed or a surviving index lists it (inv. 2)."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = _deleted(result)
    for d in result.deletions:
        if d.action is Action.UNTAG:
            assert len(d.tags) == 1
            listed = any(
                d.digest in {c.digest for c in m.children}
                for digest, m in inventory.manifests.items()
                if digest not in deleted
            )
            assert d.digest in result.protected_digests or listed


@SETTINGS
@given(cases)
def test_children_of_kept_indexes_never_deleted(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """No child (or grandchild) of a kept index is deleted (invariant 3)."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = _deleted(result)
    for digest in _kept_digests(inventory, result):
        assert not _descendants(inventory, digest) & deleted


@SETTINGS
@given(cases)
def test_no_surviving_manifest_left_dangling(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """No deleted digest is still listed by a manifest the plan leaves in place."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = _deleted(result)
    for digest, manifest in inventory.manifests.items():
        if digest not in deleted:
            assert not {c.digest for c in manifest.children} & deleted


@SETTINGS
@given(cases)
def test_referrers_of_kept_subjects_kept(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Cosign tags, API referrers and ``subject`` referrers of kept digests stay (invariant 4)."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    kept_digests = _kept_digests(inventory, result)
    kept_tags = {k.tag for k in result.kept}
    for tag in inventory.tags:
        if referrer_tag_subject(tag) in kept_digests:
            assert tag in kept_tags
    refs = {r for s in kept_digests for r in inventory.referrers.get(s, ())}
    refs |= {d for d, m in inventory.manifests.items() if m.subject in kept_digests}
    assert not refs & _deleted(result)


@SETTINGS
@given(cases)
def test_referrer_tags_never_influence_other_tags(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Removing every referrer tag changes no verdict on the other tags (they take no slot)."""
    inventory, policy, requests = case
    plain = {t: d for t, d in inventory.tags.items() if referrer_tag_subject(t) is None}
    stripped = replace(
        inventory,
        tags=plain,
        push_times={t: p for t, p in inventory.push_times.items() if t in plain},
    )
    before = {k for k in plan(inventory, policy, NOW, requests).kept if k.tag in plain}
    assert set(plan(stripped, policy, NOW, requests).kept) == before


def _flip(mapping: Mapping[K, V]) -> dict[K, V]:
    return dict(reversed(list(mapping.items())))


def _reversed(inventory: Inventory) -> Inventory:
    """The same snapshot with every mapping (and referrer list) iterating the other way."""
    return replace(
        inventory,
        tags=_flip(inventory.tags),
        manifests=_flip(inventory.manifests),
        push_times=_flip(inventory.push_times),
        untagged_since=_flip(inventory.untagged_since),
        referrers={s: tuple(reversed(r)) for s, r in _flip(inventory.referrers).items()},
        holds=_flip(inventory.holds),
    )


@SETTINGS
@given(cases)
def test_plan_deterministic_and_order_insensitive(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """The same snapshot gives the same plan, whatever order its mappings iterate in."""
    inventory, policy, requests = case
    first = plan(inventory, policy, NOW, requests)
    assert plan(inventory, policy, NOW, requests) == first
    assert plan(_reversed(inventory), policy, NOW, requests) == first


@SETTINGS
@given(inventories(), policies())
def test_protected_tags_kept_even_when_requested(inventory: Inventory, policy: Policy) -> None:
    """An event asking for every tag removes no protected tag (protect beats events)."""
    result = plan(inventory, policy, NOW, [request("branch_deleted", "*")])
    kept = {k.tag: k.reason.rule for k in result.kept}
    for tag in inventory.tags:
        if policy.protected_by(tag):
            assert kept.get(tag) == "protect"


@SETTINGS
@given(cases)
def test_deletions_in_execution_order(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Every deletion depends on each deleted index that lists it and each deleted subject it
    refers to, and comes after them."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = _deleted(result)
    position = {d.digest: i for i, d in enumerate(result.deletions) if d.action is not Action.UNTAG}
    listed_by: defaultdict[Digest, set[Digest]] = defaultdict(set)
    for digest, manifest in inventory.manifests.items():
        for child in manifest.children:
            listed_by[child.digest].add(digest)
        if manifest.subject:
            listed_by[digest].add(manifest.subject)
    for d in result.deletions:
        if d.action is not Action.UNTAG:
            assert listed_by[d.digest] & deleted - {d.digest} <= set(d.parents)
        for parent in d.parents:
            assert position[parent] < result.deletions.index(d)
    assert all(d.reason.rule and str(d.reason) for d in result.deletions)


@SETTINGS
@given(cases)
def test_replanning_after_the_plan_removes_no_tag(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Once a plan has run, planning again (no new event) removes no further tag: a fixpoint."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = _deleted(result)
    survivors = {k.tag for k in result.kept}
    after = replace(
        inventory,
        tags={t: d for t, d in inventory.tags.items() if t in survivors},
        manifests={d: m for d, m in inventory.manifests.items() if d not in deleted},
        untagged_since={d: t for d, t in inventory.untagged_since.items() if d not in deleted},
        missing=inventory.missing | deleted,
        deleted_by_regsweep=inventory.deleted_by_regsweep | deleted,
    )
    again = plan(after, policy, NOW)
    assert again.tags_removed == 0
    assert {k.tag for k in again.kept} == survivors


@SETTINGS
@given(cases)
def test_reclaimable_bytes_bounded_by_what_is_deleted(
    case: tuple[Inventory, Policy, tuple[TagRequest, ...]],
) -> None:
    """Reclaimable bytes are zero for an empty plan and never exceed what the deletions hold."""
    inventory, policy, requests = case
    result = plan(inventory, policy, NOW, requests)
    deleted = [inventory.manifests[d] for d in _deleted(result) if d in inventory.manifests]
    blobs = {b.digest: b.size for m in deleted for b in m.blobs}
    upper = sum(m.size for m in deleted) + sum(blobs.values())
    assert 0 <= result.reclaimable_bytes <= upper
    if not deleted:
        assert result.reclaimable_bytes == 0
