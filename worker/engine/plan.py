"""What a plan is: the deletions the policy asks for, each with its reason.

A :class:`Plan` is produced by :func:`worker.engine.planner.plan` from an
:class:`~worker.engine.model.Inventory` and carried out by :mod:`worker.engine.executor`,
the only code that deletes. ``deletions`` are already in execution order: each
after every deletion it depends on (``parents``: the deleted indexes that list
it, the deleted subjects it refers to).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from worker.engine.policy import Mode
from worker.oci import Digest


class Action(StrEnum):
    """How a deletion is carried out."""

    #: A referrer (signature, attestation, SBOM, fallback index) of a deleted subject.
    REFERRER = "referrer"
    #: Remove the tag only: a kept tag shares its digest (invariant 2).
    UNTAG = "untag"
    #: Delete the manifest by digest; every tag in ``tags`` goes with it.
    MANIFEST = "manifest"
    #: A child of a deleted index that nothing kept references (invariant 3).
    CHILD = "child"


ACTION_ORDER: dict[Action, int] = {
    Action.REFERRER: 0,
    Action.UNTAG: 1,
    Action.MANIFEST: 2,
    Action.CHILD: 3,
}


@dataclass(frozen=True, slots=True)
class Reason:
    """Why something goes or stays: the rule (``keep[0]``, ``protect``, ``on.branch_deleted``,
    ``untagged``, ``referrer``, ``child``) and a human detail (pattern, age, rank)."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}" if self.detail else self.rule


@dataclass(frozen=True, slots=True)
class Deletion:
    action: Action
    digest: Digest
    media_type: str
    #: Bytes of the manifest itself.
    size: int
    #: Tags removed with it (for UNTAG: exactly the tag removed).
    tags: tuple[str, ...]
    reason: Reason
    #: Deletions of this plan that must succeed first: the deleted indexes listing this
    #: digest and the deleted subjects it refers to. If one of them stays, this stays too.
    parents: tuple[Digest, ...] = ()


@dataclass(frozen=True, slots=True)
class Kept:
    """A tag that stays, and the first rule that keeps it."""

    tag: str
    digest: Digest
    reason: Reason


@dataclass(frozen=True)
class Plan:
    repository: str
    policy: str
    mode: Mode
    created_at: datetime
    deletions: tuple[Deletion, ...]
    kept: tuple[Kept, ...]
    #: Every digest a kept or protected tag needs: the tags' own, their index
    #: children and their referrers. The executor re-derives this from the live
    #: registry before each DELETE (invariant 5); this is the plan-time view.
    protected_digests: frozenset[Digest]
    #: Unique-blob bytes of the deleted manifests that no kept manifest shares:
    #: what GC could give back after this plan runs.
    reclaimable_bytes: int

    #: What the snapshot could not see or read, said once (no deletion rests on it).
    notes: tuple[str, ...] = ()

    @property
    def tags_removed(self) -> int:
        return sum(len(d.tags) for d in self.deletions)

    @property
    def manifests_removed(self) -> int:
        return sum(1 for d in self.deletions if d.action is not Action.UNTAG)

    @property
    def tags_kept(self) -> int:
        return len(self.kept)

    @property
    def manifests_kept(self) -> int:
        return len({k.digest for k in self.kept})

    @property
    def is_empty(self) -> bool:
        return not self.deletions

    @property
    def fingerprint(self) -> str:
        """What this plan removes (each deletion's action, digest and tags), hashed: two
        plans with one fingerprint delete the same things, whatever their reasons say (a
        reason names ages, which move with the clock). A deletion confirmed in the
        dashboard runs only while its plan still has its preview's fingerprint."""
        removed = sorted(
            f"{d.action} {d.digest} {','.join(sorted(d.tags))}" for d in self.deletions
        )
        return hashlib.sha256("\n".join(removed).encode()).hexdigest()


def dependency_levels(deletions: Sequence[Deletion]) -> dict[Deletion, int]:
    """How deep each deletion sits in the dependency graph (0: depends on nothing in the
    plan); a (malformed) cycle is cut where it closes."""
    by_digest = {d.digest: d for d in deletions if d.action is not Action.UNTAG}
    memo: dict[Digest, int] = {}

    def depth(digest: Digest, path: frozenset[Digest]) -> int:
        if digest not in memo:
            parents = [p for p in by_digest[digest].parents if p in by_digest and p not in path]
            memo[digest] = 1 + max((depth(p, path | {digest}) for p in parents), default=-1)
        return memo[digest]

    def level(deletion: Deletion) -> int:
        own = depth(deletion.digest, frozenset()) if deletion.action is not Action.UNTAG else 0
        inherited = (depth(p, frozenset()) + 1 for p in deletion.parents if p in by_digest)
        return max([own, *inherited])

    return {deletion: level(deletion) for deletion in deletions}
