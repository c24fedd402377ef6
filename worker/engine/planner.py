"""The planner: a pure function from a repository snapshot and a policy to a :class:`Plan`.

``plan`` does no I/O, never reads the clock (it is given ``now``) and draws no
random numbers, so the same inventory and policy always give the same plan,
whatever order the inventory's mappings happen to iterate in.

How a plan is made:

1. **Tags are judged.** Protected tags are kept, then held ones. Tags left on
   regsweep's own untag placeholder (an untag interrupted between its PUT and
   its DELETE) are not judged: the placeholder is deleted, which finishes the
   untag. Referrer tags (cosign ``sha256-<hex>.sig|.att|.sbom`` and the OCI
   fallback ``sha256-<hex>``) are not judged: they follow their subject. Every
   other tag is deleted when a CI event asks for it, else kept when the policy
   has no ``keep:`` or when any keep rule keeps it, else deleted by retention.
2. **What kept tags need** (the closure) is everything reachable from their
   digests through index children and referrers, recursively. Nothing in it
   is ever deleted (invariants 1, 3, 4).
3. **Deletions settle.** Digests of removed tags, orphan referrer tags and
   expired untagged manifests are the roots; deleting one takes its children
   and referrers along. This repeats until nothing changes: a referrer tag
   whose subject survives joins the closure, and a manifest that a surviving
   index still lists is spared (so no index is ever left dangling).
4. **Tags are removed** by deleting their digest, or, where the digest must
   stay, as a tag only (``UNTAG``, invariant 2).

Retention decides on evidence only (:mod:`worker.engine.evidence`). ``newest: N``
fails a tag only when N other tags matching the rule were provably pushed
after it, and ``pushed_within`` only when the tag was provably pushed before
the cutoff: equal, overlapping or unknown push times keep, and tag-name order
never decides. The tags counted are those retention decides about: matching
the rule's patterns, neither protected, held nor asked for by a CI event.
Protected and held tags are kept anyway and do not use a slot; tags an event
deletes do not either, so planning again after the plan ran removes nothing
more (the plan is a fixpoint).

5. **Order.** A deletion depends on every deleted index that lists it and on
   every deleted subject it refers to; the executor runs a deletion only after
   those succeeded, so a subject the live re-check spares keeps its referrers
   and an index it spares keeps its children.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from worker.durations import coarse, exact
from worker.engine.model import Inventory, PushSource, PushTime
from worker.engine.plan import ACTION_ORDER, Action, Deletion, Kept, Plan, Reason, dependency_levels
from worker.engine.policy import KeepRule, Policy, TagPattern, any_match
from worker.oci import Descriptor, Digest, referrer_tag_subject

#: Rule names used in reasons besides ``keep[i]`` and ``on.<event>``.
PROTECT: Final = "protect"
HOLD: Final = "hold"
PLACEHOLDER: Final = "placeholder"
RETENTION: Final = "retention"
UNTAGGED: Final = "untagged"
REFERRER: Final = "referrer"
CHILD: Final = "child"


@dataclass(frozen=True)
class TagRequest:
    """Tags a CI event asks to delete, patterns already rendered (``pr-42``, ``pr-42-*``),
    or that a person asked for in the dashboard: by name, or every tag on ``digests``.

    A request overrides ``keep`` but never ``protect`` nor a hold; referrer tags ignore
    it because they follow their subject.
    """

    patterns: tuple[TagPattern, ...]
    reason: Reason
    #: Every tag resolving to one of these (in the snapshot) is asked for too.
    digests: frozenset[Digest] = frozenset()


@dataclass(frozen=True, slots=True)
class _Verdict:
    keep: bool
    reason: Reason


@dataclass(frozen=True, slots=True)
class _Mark:
    """Why and how one digest is deleted."""

    action: Action
    reason: Reason


@dataclass(frozen=True)
class _Graph:
    """The inventory's manifest graph, indexed both ways."""

    children: Mapping[Digest, tuple[Digest, ...]]
    parents: Mapping[Digest, frozenset[Digest]]
    #: subject -> referrers: ``subject`` fields, ``inventory.referrers``, referrer tags' digests.
    referrers: Mapping[Digest, tuple[Digest, ...]]
    #: referrer -> the subjects it refers to.
    subjects: Mapping[Digest, frozenset[Digest]]
    descriptors: Mapping[Digest, Descriptor]
    tags_by_digest: Mapping[Digest, tuple[str, ...]]
    #: referrer tag -> the subject digest its name carries.
    referrer_tags: Mapping[str, Digest]


@dataclass(frozen=True)
class _Context:
    inventory: Inventory
    policy: Policy
    now: datetime
    graph: _Graph
    #: Protected tags and every non-referrer tag; referrer tags are decided later.
    verdicts: Mapping[str, _Verdict]


def plan(
    inventory: Inventory,
    policy: Policy,
    now: datetime,
    requests: Sequence[TagRequest] = (),
) -> Plan:
    """What ``policy`` deletes from ``inventory`` at ``now``, each item with its reason."""
    graph = _build_graph(inventory)
    ctx = _Context(inventory, policy, now, graph, _classify_tags(inventory, policy, now, requests))
    marks, needed = _settle(ctx)
    return Plan(
        repository=inventory.repository,
        policy=policy.name,
        mode=policy.mode,
        created_at=now,
        deletions=_order(graph, [*_digest_deletions(ctx, marks), *_untags(ctx, marks)]),
        kept=_kept(ctx, marks),
        protected_digests=needed,
        reclaimable_bytes=_reclaimable_bytes(inventory, marks.keys()),
        notes=inventory.notes,
    )


# --- the graph -------------------------------------------------------------------------


def _build_graph(inventory: Inventory) -> _Graph:
    children: dict[Digest, tuple[Digest, ...]] = {}
    parents: defaultdict[Digest, set[Digest]] = defaultdict(set)
    referrers: defaultdict[Digest, set[Digest]] = defaultdict(set)
    descriptors: dict[Digest, Descriptor] = {}
    # Sorted so that which parent's descriptor wins never depends on dict order.
    for digest in sorted(inventory.manifests):
        manifest = inventory.manifests[digest]
        children[digest] = tuple(c.digest for c in manifest.children)
        for child in manifest.children:
            parents[child.digest].add(digest)
            descriptors.setdefault(child.digest, child)
        if manifest.subject is not None:
            referrers[manifest.subject].add(digest)
    for subject, found in inventory.referrers.items():
        referrers[subject].update(found)
    referrer_tags = _referrer_tags(inventory.tags)
    for tag, subject in referrer_tags.items():
        referrers[subject].add(inventory.tags[tag])
    return _Graph(
        children=children,
        parents={d: frozenset(p) for d, p in parents.items()},
        referrers={s: tuple(sorted(r)) for s, r in referrers.items()},
        subjects=_invert(referrers),
        descriptors=descriptors,
        tags_by_digest=_tags_by_digest(inventory.tags),
        referrer_tags=referrer_tags,
    )


def _referrer_tags(tags: Mapping[str, Digest]) -> dict[str, Digest]:
    found = {tag: referrer_tag_subject(tag) for tag in sorted(tags)}
    return {tag: subject for tag, subject in found.items() if subject is not None}


def _tags_by_digest(tags: Mapping[str, Digest]) -> dict[Digest, tuple[str, ...]]:
    grouped: defaultdict[Digest, list[str]] = defaultdict(list)
    for tag in sorted(tags):
        grouped[tags[tag]].append(tag)
    return {digest: tuple(names) for digest, names in grouped.items()}


def _invert(edges: Mapping[Digest, Iterable[Digest]]) -> dict[Digest, frozenset[Digest]]:
    inverted: defaultdict[Digest, set[Digest]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            inverted[target].add(source)
    return {d: frozenset(s) for d, s in inverted.items()}


def _closure(seeds: Iterable[Digest], graph: _Graph) -> frozenset[Digest]:
    """``seeds`` plus everything they need: index children and referrers, recursively."""
    seen = set(seeds)
    queue = deque(seen)
    while queue:
        digest = queue.popleft()
        for nxt in (*graph.children.get(digest, ()), *graph.referrers.get(digest, ())):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return frozenset(seen)


# --- judging tags ----------------------------------------------------------------------


def _classify_tags(
    inventory: Inventory, policy: Policy, now: datetime, requests: Sequence[TagRequest]
) -> dict[str, _Verdict]:
    """A verdict for every protected or held tag and every tag that is neither a referrer
    tag nor left on an untag placeholder."""
    verdicts: dict[str, _Verdict] = {}
    candidates: list[str] = []
    placeholders = inventory.placeholders
    for tag in sorted(inventory.tags):
        pattern = policy.protected_by(tag)
        if pattern is not None:
            verdicts[tag] = _Verdict(True, Reason(PROTECT, f"matches {pattern.source}"))
        elif (hold := inventory.holds.get(tag)) is not None:
            until = hold.until.strftime("%Y-%m-%d %H:%M UTC")
            verdicts[tag] = _Verdict(True, Reason(HOLD, f"held ({hold.reason}) until {until}"))
        elif inventory.tags[tag] in placeholders or referrer_tag_subject(tag) is not None:
            continue
        elif (asked := _requested(tag, inventory.tags[tag], requests)) is not None:
            verdicts[tag] = _Verdict(False, asked)
        else:
            candidates.append(tag)
    verdicts.update(_retention(inventory, policy, now, candidates))
    return verdicts


def _requested(tag: str, digest: Digest, requests: Sequence[TagRequest]) -> Reason | None:
    for request in requests:
        pattern = any_match(request.patterns, tag)
        if pattern is not None:
            matched = f"matches {pattern.source}"
        elif digest in request.digests:
            matched = f"on {_short(digest)}"
        else:
            continue
        detail = f"{request.reason.detail}, {matched}" if request.reason.detail else matched
        return Reason(request.reason.rule, detail)
    return None


def _retention(
    inventory: Inventory, policy: Policy, now: datetime, candidates: list[str]
) -> dict[str, _Verdict]:
    if policy.keep is None:
        kept = _Verdict(True, Reason(RETENTION, "the policy has no keep rules"))
        return dict.fromkeys(candidates, kept)
    pushed = {tag: inventory.push_time(tag) for tag in candidates}
    newer = {
        rule.index: _pushed_later(rule, candidates, pushed)
        for rule in policy.keep
        if rule.newest is not None
    }
    return {tag: _judge(tag, policy.keep, newer, pushed[tag], now) for tag in candidates}


def _pushed_later(
    rule: KeepRule, candidates: list[str], pushed: Mapping[str, PushTime]
) -> dict[str, int]:
    """For each tag matching ``rule``: how many other matching tags were provably pushed
    after it — their earliest possible push after its latest possible one, or first seen
    after the very listing that first showed this tag (one listing reads the tag list at
    one instant: what it showed came before what it lacked)."""
    matching = [tag for tag in candidates if any_match(rule.tags, tag) is not None]
    starts = sorted(e for tag in matching if (e := pushed[tag].earliest) is not None)
    lacked_by = Counter(e for tag in matching if (e := _lacked_by(pushed[tag])) is not None)
    counts: dict[str, int] = {}
    for tag in matching:
        own = pushed[tag]
        if own.latest is None:
            counts[tag] = 0
            continue
        later = len(starts) - bisect_right(starts, own.latest)
        # Those first seen after this tag's listing, unless the time rule counted them.
        if own.listed is not None and own.listed <= own.latest:
            later += lacked_by[own.listed]
        counts[tag] = later
    return counts


def _lacked_by(pushed: PushTime) -> datetime | None:
    """The start of the listing a first-seen tag was absent from, if that is its evidence."""
    return pushed.earliest if pushed.source is PushSource.FIRST_SEEN else None


def _judge(
    tag: str,
    rules: tuple[KeepRule, ...],
    newer: Mapping[int, Mapping[str, int]],
    pushed: PushTime,
    now: datetime,
) -> _Verdict:
    """Kept by the first rule that keeps ``tag``; otherwise why each matching rule did not."""
    misses: list[str] = []
    for rule in rules:
        pattern = any_match(rule.tags, tag)
        if pattern is None:
            continue
        limits = _limits(rule, newer.get(rule.index, {}).get(tag, 0), pushed, now)
        if all(ok for ok, _ in limits):
            detail = ", ".join([f"matches {pattern.source}", *(text for _, text in limits)])
            return _Verdict(True, Reason(rule.label, detail))
        misses.append(f"{rule.label} " + ", ".join(text for ok, text in limits if not ok))
    return _Verdict(False, Reason(RETENTION, "; ".join(misses) or "no keep rule matches"))


def _limits(rule: KeepRule, later: int, pushed: PushTime, now: datetime) -> list[tuple[bool, str]]:
    """Each limit of ``rule``: whether the tag meets it, and how to say so."""
    limits: list[tuple[bool, str]] = []
    if rule.newest is not None:
        patterns = ", ".join(p.source for p in rule.tags)
        text = f"{later} of {patterns} provably pushed later, keeps newest {rule.newest}"
        limits.append((later < rule.newest, text))
    if rule.pushed_within is not None:
        kept = not pushed.older_than(now - rule.pushed_within)
        limits.append((kept, f"{describe_push(pushed, now)}, keeps {exact(rule.pushed_within)}"))
    return limits


def describe_push(pushed: PushTime, now: datetime) -> str:
    """``pushed 3d ago (storage)``, ``pushed 2d to 5d ago (first seen)``, ``push time unknown``;
    with a doubted registry time, why: ``(first seen; storage time 3d before a listing ...)``."""
    source = f"{pushed.source}; {pushed.doubt}" if pushed.doubt else str(pushed.source)
    if pushed.source is PushSource.UNKNOWN or pushed.latest is None:
        return f"push time unknown ({pushed.doubt})" if pushed.doubt else "push time unknown"
    newest = coarse(now - pushed.latest)
    if pushed.earliest == pushed.latest:
        return f"pushed {newest} ago ({source})"
    if pushed.earliest is None:
        return f"pushed {newest} ago or earlier ({source})"
    return f"pushed {newest} to {coarse(now - pushed.earliest)} ago ({source})"


# --- settling deletions ----------------------------------------------------------------


def _settle(ctx: _Context) -> tuple[dict[Digest, _Mark], frozenset[Digest]]:
    """The digests to delete and the closure of what stays, at their common fixpoint.

    Each round can only grow the closure and the spared set and so only shrink
    the deletions, which makes the loop end.
    """
    kept = (ctx.inventory.tags[tag] for tag, verdict in ctx.verdicts.items() if verdict.keep)
    needed = _closure(kept, ctx.graph)
    spared: frozenset[Digest] = frozenset()
    while True:
        marks = _mark(ctx, needed | spared)
        staying = {ctx.inventory.tags[tag] for tag in _staying_referrer_tags(ctx, marks)}
        grown = needed | _closure(staying - needed, ctx.graph)
        more_spared = spared | _still_listed(marks, ctx.graph)
        if grown == needed and more_spared == spared:
            return marks, needed
        needed, spared = grown, more_spared


def _still_listed(marks: Mapping[Digest, _Mark], graph: _Graph) -> frozenset[Digest]:
    """Marked digests that a surviving index still lists: deleting them would leave it dangling."""
    return frozenset(
        digest
        for digest in marks
        if any(parent not in marks for parent in graph.parents.get(digest, ()))
    )


def _staying_referrer_tags(ctx: _Context, marks: Mapping[Digest, _Mark]) -> list[str]:
    """Unjudged referrer tags whose subject is neither deleted now nor by regsweep before."""
    return [
        tag
        for tag, subject in ctx.graph.referrer_tags.items()
        if tag not in ctx.verdicts and subject not in marks and not _orphaned(ctx, subject)
    ]


def _orphaned(ctx: _Context, subject: Digest) -> bool:
    """A subject that is gone *and* that regsweep's audit shows it deleted: a 404 alone is
    no evidence (signatures may live in another repository, or arrive before their image)."""
    return subject in ctx.inventory.deleted_by_regsweep and subject in ctx.inventory.missing


def _mark(ctx: _Context, excluded: frozenset[Digest]) -> dict[Digest, _Mark]:
    """Every digest to delete: the roots, then what goes with them (children, referrers)."""
    marks: dict[Digest, _Mark] = {}
    for digest, mark in _roots(ctx):
        if digest not in excluded:
            marks.setdefault(digest, mark)
    queue = deque(marks)
    while queue:
        digest = queue.popleft()
        for nxt, mark in _dependents(digest, ctx.graph):
            if nxt in excluded or nxt in marks or nxt in ctx.inventory.missing:
                continue
            marks[nxt] = mark
            queue.append(nxt)
    return marks


def _dependents(digest: Digest, graph: _Graph) -> Iterator[tuple[Digest, _Mark]]:
    """What goes when ``digest`` goes: its children, then its referrers."""
    for child in graph.children.get(digest, ()):
        reason = Reason(CHILD, f"of deleted index {_short(digest)}")
        yield child, _Mark(Action.CHILD, reason)
    for ref in graph.referrers.get(digest, ()):
        reason = Reason(REFERRER, f"of deleted subject {_short(digest)}")
        yield ref, _Mark(Action.REFERRER, reason)


def _roots(ctx: _Context) -> Iterator[tuple[Digest, _Mark]]:
    """Deletions asked for directly, most specific first: removed tags, orphans, untagged."""
    doomed: defaultdict[Digest, list[str]] = defaultdict(list)
    for tag, verdict in ctx.verdicts.items():
        if not verdict.keep:
            doomed[ctx.inventory.tags[tag]].append(tag)
    for digest in sorted(doomed):
        yield digest, _Mark(Action.MANIFEST, _combined(ctx, sorted(doomed[digest])))
    for digest in sorted(ctx.inventory.placeholders):
        reason = Reason(PLACEHOLDER, "finishes an interrupted tag removal")
        yield digest, _Mark(Action.MANIFEST, reason)
    for tag, subject in ctx.graph.referrer_tags.items():
        if tag not in ctx.verdicts and _orphaned(ctx, subject):
            reason = Reason(REFERRER, f"subject {_short(subject)} was deleted by regsweep")
            yield ctx.inventory.tags[tag], _Mark(Action.REFERRER, reason)
    yield from _expired_untagged(ctx)


def _combined(ctx: _Context, tags: list[str]) -> Reason:
    first = ctx.verdicts[tags[0]].reason
    if len(tags) == 1:
        return first
    return Reason(first.rule, "; ".join(f"{tag}: {ctx.verdicts[tag].reason}" for tag in tags))


def _expired_untagged(ctx: _Context) -> Iterator[tuple[Digest, _Mark]]:
    """Untagged manifests past the grace period that follow nothing else.

    A referrer is left to its subject (it goes when the subject goes), unless
    that subject is gone and regsweep's audit shows it deleted it.
    """
    grace = ctx.policy.untagged_delete_after
    if grace is None:
        return
    inventory = ctx.inventory
    for digest in sorted(inventory.untagged_since):
        age = ctx.now - inventory.untagged_since[digest]
        if age < grace or digest in ctx.graph.tags_by_digest or digest in inventory.missing:
            continue
        subjects = ctx.graph.subjects.get(digest, frozenset())
        if not all(_orphaned(ctx, subject) for subject in subjects):
            continue
        detail = f"untagged for {coarse(age)}, grace {exact(grace)}"
        yield digest, _Mark(Action.MANIFEST, Reason(UNTAGGED, detail))


# --- rendering -------------------------------------------------------------------------


def _digest_deletions(ctx: _Context, marks: Mapping[Digest, _Mark]) -> Iterator[Deletion]:
    for digest, mark in marks.items():
        media_type, size = _describe(ctx, digest)
        yield Deletion(
            action=mark.action,
            digest=digest,
            media_type=media_type,
            size=size,
            tags=ctx.graph.tags_by_digest.get(digest, ()),
            reason=mark.reason,
            parents=_depends_on(digest, ctx.graph, marks),
        )


def _depends_on(digest: Digest, graph: _Graph, marks: Mapping[Digest, _Mark]) -> tuple[Digest, ...]:
    """The deleted indexes that list ``digest`` and the deleted subjects it refers to."""
    related = graph.parents.get(digest, frozenset()) | graph.subjects.get(digest, frozenset())
    return tuple(sorted(d for d in related if d in marks and d != digest))


def _untags(ctx: _Context, marks: Mapping[Digest, _Mark]) -> Iterator[Deletion]:
    """Removed tags whose digest must stay: they go as tags only (invariant 2)."""
    for tag, reason in _removed_tags(ctx, marks):
        digest = ctx.inventory.tags[tag]
        if digest in marks:
            continue
        media_type, size = _describe(ctx, digest)
        subject = ctx.graph.referrer_tags.get(tag)
        parents = (subject,) if subject is not None and subject in marks else ()
        yield Deletion(Action.UNTAG, digest, media_type, size, (tag,), reason, parents)


def _removed_tags(ctx: _Context, marks: Mapping[Digest, _Mark]) -> Iterator[tuple[str, Reason]]:
    for tag, verdict in ctx.verdicts.items():
        if not verdict.keep:
            yield tag, verdict.reason
    for tag, subject in ctx.graph.referrer_tags.items():
        if tag in ctx.verdicts:
            continue
        if subject in marks:
            yield tag, Reason(REFERRER, f"of deleted subject {_short(subject)}")
        elif _orphaned(ctx, subject):
            yield tag, Reason(REFERRER, f"subject {_short(subject)} was deleted by regsweep")


def _kept(ctx: _Context, marks: Mapping[Digest, _Mark]) -> tuple[Kept, ...]:
    tags = ctx.inventory.tags
    kept = [Kept(t, tags[t], v.reason) for t, v in ctx.verdicts.items() if v.keep]
    for tag in _staying_referrer_tags(ctx, marks):
        subject = ctx.graph.referrer_tags[tag]
        kept.append(Kept(tag, tags[tag], _referrer_kept(ctx, subject)))
    return tuple(sorted(kept, key=lambda k: k.tag))


def _referrer_kept(ctx: _Context, subject: Digest) -> Reason:
    if subject in ctx.inventory.missing:
        detail = f"of {_short(subject)}, absent here but not deleted by regsweep"
    else:
        detail = f"of {_short(subject)}, which stays"
    return Reason(REFERRER, detail)


def _describe(ctx: _Context, digest: Digest) -> tuple[str, int]:
    """Media type and manifest size, from the manifest or else from an index's descriptor."""
    manifest = ctx.inventory.manifests.get(digest)
    if manifest is not None:
        return manifest.media_type, manifest.size
    descriptor = ctx.graph.descriptors.get(digest)
    return (descriptor.media_type, descriptor.size) if descriptor else ("", 0)


def _order(graph: _Graph, deletions: list[Deletion]) -> tuple[Deletion, ...]:
    """Execution order: each deletion after those it depends on (its level), then by action,
    outer indexes before what they list, then by digest."""
    heights: dict[Digest, int] = {}
    levels = dependency_levels(deletions)

    def key(d: Deletion) -> tuple[int, int, int, str, tuple[str, ...]]:
        height = _height(d.digest, graph, heights)
        return (levels[d], ACTION_ORDER[d.action], -height, d.digest, d.tags)

    return tuple(sorted(deletions, key=key))


def _height(digest: Digest, graph: _Graph, memo: dict[Digest, int]) -> int:
    """How deep the indexes under ``digest`` nest (an image is 0)."""
    if digest in memo:
        return memo[digest]
    memo[digest] = 0  # guards against a (malformed) cycle
    children = graph.children.get(digest, ())
    memo[digest] = 1 + max((_height(c, graph, memo) for c in children), default=-1)
    return memo[digest]


def _reclaimable_bytes(inventory: Inventory, deleted: Iterable[Digest]) -> int:
    """Manifest bytes plus the distinct blobs of deleted manifests that no survivor uses."""
    gone = set(deleted)
    survivors = (m for d, m in inventory.manifests.items() if d not in gone)
    still_used = {blob.digest for manifest in survivors for blob in manifest.blobs}
    freed: dict[Digest, int] = {}
    total = 0
    for digest in gone:
        manifest = inventory.manifests.get(digest)
        if manifest is None:
            continue
        total += manifest.size
        freed.update((b.digest, b.size) for b in manifest.blobs if b.digest not in still_used)
    return total + sum(freed.values())


# --- wording ---------------------------------------------------------------------------


def _short(digest: Digest) -> str:
    """``sha256:`` and the first 12 hex digits: enough to tell digests apart in a table."""
    algorithm, _, hexdigits = digest.partition(":")
    return f"{algorithm}:{hexdigits[:12]}"
