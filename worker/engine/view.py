"""A repository's plan as the dashboard and the read API show it: one JSON document.

A worker makes it from the snapshot and the plan it just made (a prune, a dry
run or a sweep's) and keeps it in Redis (:mod:`worker.store.views`), so a page
or ``GET /api/v1/repositories/{name}/plan`` reads one key and never walks the
registry: what the page shows is what the planner decided, at a time it names.

Per tag: its digest, push time and the evidence for it, the image's size (its
blobs; an index's children's, each blob once), the verdict (``keep``,
``delete``: the digest goes, ``untag``: the tag only) with the rule and reason,
held and protected. Referrer tags (``sha256-<hex>.sig``) carry their subject so
the page folds them under it; per manifest, its children and referrers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

from worker.engine.model import Inventory, PushTime
from worker.engine.plan import Action, Plan, Reason
from worker.engine.policy import Policy
from worker.oci import Digest, Manifest, referrer_tag_subject
from worker.store.views import VIEW_VERSION

KEEP: Final = "keep"
DELETE: Final = "delete"
UNTAG: Final = "untag"


def plan_view(
    inventory: Inventory,
    plan: Plan,
    policy: Policy,
    *,
    job_id: str,
    executed: bool,
) -> dict[str, Any]:
    """The view of ``plan`` (made from ``inventory`` under ``policy``) by job ``job_id``."""
    referrers = _referrers(inventory)
    sizes = _ImageSizes(inventory.manifests)
    verdicts = _verdicts(plan)
    tags = [_tag_row(tag, inventory, policy, sizes, verdicts) for tag in sorted(inventory.tags)]
    return {
        "version": VIEW_VERSION,
        "repository": plan.repository,
        "policy": plan.policy,
        "mode": policy.mode.value,
        "planned_at": plan.created_at.isoformat(),
        "job_id": job_id,
        "executed": executed,
        "notes": list(plan.notes),
        "summary": _summary(inventory, plan, tags),
        "tags": tags,
        "manifests": _manifests(inventory, plan, referrers, sizes),
    }


def _tag_row(
    tag: str,
    inventory: Inventory,
    policy: Policy,
    sizes: _ImageSizes,
    verdicts: Mapping[str, tuple[str, Reason]],
) -> dict[str, Any]:
    """One tag's row; its hold as the snapshot saw it (the holds in force then)."""
    digest = inventory.tags[tag]
    manifest = inventory.manifests.get(digest)
    verdict, reason = verdicts.get(tag, (KEEP, Reason("", "not judged")))
    now = inventory.taken_at
    hold = inventory.holds.get(tag)
    subject = referrer_tag_subject(tag)
    return {
        "tag": tag,
        "digest": digest,
        "media_type": manifest.media_type if manifest else "",
        "size": sizes.of(digest),
        "pushed": pushed_document(inventory.push_time(tag)),
        "verdict": verdict,
        "rule": reason.rule,
        "reason": reason.detail,
        "held": hold is not None and hold.active(now),
        "held_until": hold.until.isoformat() if hold is not None and hold.active(now) else None,
        "protected": policy.protected_by(tag) is not None,
        "subject": subject,
    }


def pushed_document(pushed: PushTime) -> dict[str, Any]:
    """``{"source", "earliest", "latest"}``: an exact time has both bounds equal."""
    return {
        "source": pushed.source.value,
        "earliest": pushed.earliest.isoformat() if pushed.earliest else None,
        "latest": pushed.latest.isoformat() if pushed.latest else None,
    }


def _verdicts(plan: Plan) -> dict[str, tuple[str, Reason]]:
    """Each tag's verdict and why: a removed tag's deletion, else the rule that keeps it."""
    out: dict[str, tuple[str, Reason]] = {k.tag: (KEEP, k.reason) for k in plan.kept}
    for deletion in plan.deletions:
        verdict = UNTAG if deletion.action is Action.UNTAG else DELETE
        for tag in deletion.tags:
            out[tag] = (verdict, deletion.reason)
    return out


def _summary(inventory: Inventory, plan: Plan, tags: list[dict[str, Any]]) -> dict[str, Any]:
    blobs = {b.digest: b.size for m in inventory.manifests.values() for b in m.blobs}
    manifest_bytes = sum(m.size for m in inventory.manifests.values())
    return {
        "tags": len(inventory.tags),
        "manifests": len(inventory.manifests),
        "bytes": manifest_bytes + sum(blobs.values()),
        "reclaimable_bytes": plan.reclaimable_bytes,
        "tags_removed": plan.tags_removed,
        "manifests_removed": plan.manifests_removed,
        "held": sum(1 for row in tags if row["held"]),
        "protected": sum(1 for row in tags if row["protected"]),
    }


def _manifests(
    inventory: Inventory,
    plan: Plan,
    referrers: Mapping[Digest, list[Digest]],
    sizes: _ImageSizes,
) -> dict[str, dict[str, Any]]:
    """The manifests a row unfolds to (children, referrers) and those the plan deletes."""
    deleted = {d.digest: d for d in plan.deletions if d.action is not Action.UNTAG}
    shown = set(deleted)
    for graph in inventory.manifests.values():
        if graph.children or graph.subject is not None:
            shown.add(graph.digest)
            shown.update(c.digest for c in graph.children)
    shown.update(d for found in referrers.values() for d in found)
    shown.update(referrers)
    out: dict[str, dict[str, Any]] = {}
    for digest in sorted(shown):
        manifest = inventory.manifests.get(digest)
        deletion = deleted.get(digest)
        out[digest] = {
            "media_type": manifest.media_type if manifest else "",
            "artifact_type": manifest.artifact_type if manifest else None,
            "size": sizes.of(digest),
            "children": [c.digest for c in manifest.children] if manifest else [],
            "referrers": referrers.get(digest, []),
            "action": deletion.action.value if deletion else None,
            "reason": str(deletion.reason) if deletion else None,
        }
    return out


def _referrers(inventory: Inventory) -> dict[Digest, list[Digest]]:
    """Subject -> referrers: ``subject`` fields, the referrers API's answers, cosign tags."""
    found: defaultdict[Digest, set[Digest]] = defaultdict(set)
    for manifest in inventory.manifests.values():
        if manifest.subject is not None:
            found[manifest.subject].add(manifest.digest)
    for subject, refs in inventory.referrers.items():
        found[subject].update(refs)
    for tag, digest in inventory.tags.items():
        named = referrer_tag_subject(tag)
        if named is not None:
            found[named].add(digest)
    return {subject: sorted(refs) for subject, refs in found.items()}


class _ImageSizes:
    """Bytes of an image's blobs (config and layers); an index's children's, each blob once."""

    def __init__(self, manifests: Mapping[Digest, Manifest]) -> None:
        self._manifests = manifests
        self._memo: dict[Digest, dict[Digest, int]] = {}

    def of(self, digest: Digest) -> int:
        return sum(self._blobs(digest, frozenset()).values())

    def _blobs(self, digest: Digest, path: frozenset[Digest]) -> dict[Digest, int]:
        if digest in self._memo:
            return self._memo[digest]
        manifest = self._manifests.get(digest)
        blobs: dict[Digest, int] = {}
        if manifest is not None and digest not in path:
            blobs.update((b.digest, b.size) for b in manifest.blobs)
            for child in manifest.children:
                blobs.update(self._blobs(child.digest, path | {digest}))
        self._memo[digest] = blobs
        return blobs


def after_execution(
    inventory: Inventory, plan: Plan, gone_tags: set[str], gone_digests: set[Digest]
) -> tuple[Inventory, Plan]:
    """The snapshot and plan as they stand once a run removed ``gone_tags`` (tag-only
    removals) and ``gone_digests`` (with every tag on them): what the page shows next."""
    tags = {t: d for t, d in inventory.tags.items() if t not in gone_tags and d not in gone_digests}
    manifests = {d: m for d, m in inventory.manifests.items() if d not in gone_digests}
    untagged = {d for d in plan.deletions if d.action is Action.UNTAG and set(d.tags) <= gone_tags}
    left = tuple(d for d in plan.deletions if d.digest not in gone_digests and d not in untagged)
    return (
        replace(inventory, tags=tags, manifests=manifests),
        replace(plan, deletions=left, kept=tuple(k for k in plan.kept if k.tag in tags)),
    )
