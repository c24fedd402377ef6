"""Dashboard test parts: repositories planned for real on a made-up snapshot, kept in Redis.

:func:`seed_repository` builds an :class:`~worker.engine.model.Inventory` of
made-up manifests (images with shared base layers, a signature on some),
plans it with the real planner and keeps the view exactly as a worker does
(:func:`worker.store.views.save_view`); with ``index`` the tag index learns the
same tags. The read API tests, the page tests and ``bench/ui_bench.py`` use it to
fill a repository of thousands of tags, or thousands of repositories, in seconds
without a registry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from worker.engine.model import (
    Digest,
    Inventory,
    Manifest,
    PushSource,
    PushTime,
    parse_manifest,
)
from worker.engine.planner import plan
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.view import plan_view
from worker.registry import mediatypes as mt
from worker.store.keys import Keys
from worker.store.views import save_view

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: Every image shares this base layer; each has one layer of its own.
BASE_LAYER = ("sha256:" + "b" * 64, 30_000_000)

POLICY = Policy(
    name="seeded",
    repositories=(RepositoryPattern.compile("**"),),
    mode=Mode.DRY_RUN,
    protect=(TagPattern.compile("latest"),),
    keep=(KeepRule(0, (TagPattern.compile("*"),), newest=10),),
)


def fake_digest(seed: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(seed.encode()).hexdigest())


def image_manifest(seed: str, subject: Digest | None = None) -> Manifest:
    """A made-up OCI image: its config, the shared base layer and a layer of its own."""
    own = (fake_digest(f"layer {seed}"), 1_000_000 + len(seed) * 1000)
    layers = [BASE_LAYER, own]
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {
            "mediaType": mt.OCI_CONFIG,
            "digest": fake_digest(f"config {seed}"),
            "size": 900,
        },
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    if subject is not None:
        document["subject"] = {"mediaType": mt.OCI_MANIFEST, "digest": subject, "size": 500}
    raw = json.dumps(document).encode()
    return parse_manifest(f"sha256:{hashlib.sha256(raw).hexdigest()}", mt.OCI_MANIFEST, raw)


@dataclass(frozen=True)
class Seeded:
    """A repository kept as a worker would keep it."""

    name: str
    inventory: Inventory
    view: dict[str, Any]


def snapshot(name: str, tags: int, *, shared_every: int = 10, signed_every: int = 25) -> Inventory:
    """``tags`` tags (``build-0000`` …, one pushed an hour), every ``shared_every``-th sharing
    the previous tag's digest, every ``signed_every``-th image signed (a cosign tag), and
    ``latest`` on the newest."""
    tag_map: dict[str, Digest] = {}
    manifests: dict[Digest, Manifest] = {}
    pushed: dict[str, PushTime] = {}
    last: Manifest | None = None
    for i in range(tags):
        tag = f"build-{i:04d}"
        image = (
            last if last is not None and i % shared_every == 1 else image_manifest(f"{name} {i}")
        )
        manifests[image.digest] = image
        tag_map[tag] = image.digest
        pushed[tag] = PushTime.exact(PushSource.NOTIFICATION, NOW - timedelta(hours=tags - i))
        if i % signed_every == 0:
            signature = image_manifest(f"{name} sig {i}")
            manifests[signature.digest] = signature
            tag_map["sha256-" + image.digest.removeprefix("sha256:") + ".sig"] = signature.digest
        last = image
    if last is not None:
        tag_map["latest"] = last.digest
        pushed["latest"] = PushTime.exact(PushSource.STORAGE, NOW)
    return Inventory(name, NOW, tag_map, manifests, push_times=pushed)


async def seed_repository(
    client: aioredis.Redis, keys: Keys, name: str, tags: int, *, index: bool = False
) -> Seeded:
    """Plan ``name`` (``tags`` tags) with :data:`POLICY` and keep it as a worker does."""
    inventory = snapshot(name, tags)
    planned = plan(inventory, POLICY, NOW)
    view = plan_view(inventory, planned, POLICY, job_id="0" * 32, executed=False)
    await save_view(client, keys, view)
    if index:
        pipe = client.pipeline(transaction=False)
        pipe.hset(keys.index(name, "tags"), mapping={t: str(d) for t, d in inventory.tags.items()})
        pipe.sadd(keys.indexed_repositories, name)
        await pipe.execute()
    return Seeded(name, inventory, view)
