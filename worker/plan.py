"""What a plan is: the deletions the policy asks for, each with its reason.

A :class:`Plan` is produced by :func:`worker.planner.plan` from an
:class:`~worker.model.Inventory` and carried out by :mod:`worker.executor`,
the only code that deletes. ``deletions`` are already in execution order:
referrers, then tag-only removals, then manifests, then orphaned children.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from worker.model import Digest
from worker.policy import Mode


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
    #: For REFERRER: the subject it refers to; for CHILD: the index it belonged to.
    parent: Digest | None = None


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
