"""Seed registries for the benchmarks through the registry API, fast and reproducibly.

Every image is its own manifest over one shared layer, with a unique config
whose ``created`` orders the tags: ``t00000`` is the oldest. The tags' links in
storage get the same times as their last push (the seeding pushes them all within
seconds, in no particular order), so ``registry.storage_path`` tells regsweep the
order the floor assumes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import httpx

from tests.harness.registry import RegistryProcess, set_pushed

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
SHARED_LAYER = b"one layer shared by every image of the benchmark\n" * 1024
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tag_name(i: int) -> str:
    return f"t{i:05d}"


async def _upload(client: httpx.AsyncClient, repo: str, data: bytes) -> str:
    d = digest(data)
    start = await client.post(f"/v2/{repo}/blobs/uploads/")
    start.raise_for_status()
    location = httpx.URL(start.headers["Location"])
    put = await client.put(location.copy_merge_params({"digest": d}), content=data)
    put.raise_for_status()
    return d


async def _image(client: httpx.AsyncClient, repo: str, i: int, layer: str) -> None:
    created = pushed_at(i).isoformat().replace("+00:00", "Z")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        }
    ).encode()
    config_digest = await _upload(client, repo, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": len(SHARED_LAYER)}],
        }
    ).encode()
    put = await client.put(
        f"/v2/{repo}/manifests/{tag_name(i)}",
        content=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    put.raise_for_status()


async def seed_repository(url: str, repo: str, count: int, concurrency: int = 8) -> None:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        layer = await _upload(client, repo, SHARED_LAYER)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await _image(client, repo, i, layer)

        await asyncio.gather(*(one(i) for i in range(count)))


def pushed_at(i: int) -> dt.datetime:
    """When tag ``i`` was (as the storage says) last pushed: the order of the tag names."""
    return EPOCH + dt.timedelta(minutes=i)


def seeded_storage(cache: Path, name: str, repos: dict[str, int]) -> Path:
    """A registry root seeded once and reused: copy it for each measured run."""
    root = cache / name
    done = root / "done-with-push-times"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    registry = RegistryProcess.create(root)
    registry.start()
    try:
        for repo, count in repos.items():
            asyncio.run(seed_repository(registry.url, repo, count))
            for i in range(count):
                set_pushed(registry.storage_path, repo, pushed_at(i), tag_name(i))
    finally:
        registry.stop()
    done.write_text("ok")
    return root


def fresh_registry(seeded: Path, work: Path) -> RegistryProcess:
    """A registry on a private copy of a seeded root (so every run starts identical; the
    copy keeps the tag links' mtimes)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(seeded / "data", work / "data", symlinks=True)
    registry = RegistryProcess.create(work)
    registry.start()
    return registry
