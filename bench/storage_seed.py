"""Seed a registry's storage by writing its files directly: the 100,000-tag registry in a minute.

The benchmark images of :mod:`bench.seed` (each tag its own OCI manifest over one shared
layer, with a config of its own whose ``created`` orders the tags; ``t00000`` the oldest),
written in distribution's filesystem layout (``registry/storage/paths.go``) instead of
pushed through the API, which takes about 3 ms per image here: a blob's ``data``, the
repository's ``_layers`` links of the config and layer, the manifest's revision link, and
per tag ``current/link`` plus its ``index`` entry, the tag link's mtime its push time.
:func:`check` has the real registry serve a seeded storage (tag list, a manifest by tag,
``garbage-collect --dry-run`` marking every manifest) before a benchmark trusts it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx

from bench.seed import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    SHARED_LAYER,
    digest,
    pushed_at,
    tag_name,
)
from tests.harness.registry import RegistryProcess

V2 = Path("docker/registry/v2")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _blob(root: Path, data: bytes) -> str:
    found = digest(data)
    hexdigits = found.removeprefix("sha256:")
    path = root / V2 / "blobs/sha256" / hexdigits[:2] / hexdigits / "data"
    if not path.exists():
        _write(path, data)
    return found


def _link(path: Path, target: str, mtime: float | None = None) -> None:
    _write(path, target.encode())
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _image(i: int, layer: str) -> tuple[bytes, bytes]:
    """The config and manifest bytes of image ``i`` (as :mod:`bench.seed` pushes them)."""
    created = pushed_at(i).isoformat().replace("+00:00", "Z")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "rootfs": {"type": "layers", "diff_ids": [layer]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": len(SHARED_LAYER)}],
        }
    ).encode()
    return config, manifest


def seed_repository(root: Path, repo: str, count: int) -> None:
    """``count`` tagged images in ``repo`` under the storage root ``root``."""
    base = root / V2 / "repositories" / repo
    layer = _blob(root, SHARED_LAYER)
    _link(base / "_layers/sha256" / layer.removeprefix("sha256:") / "link", layer)
    for i in range(count):
        config, manifest = _image(i, layer)
        config_digest = _blob(root, config)
        manifest_digest = _blob(root, manifest)
        config_hex = config_digest.removeprefix("sha256:")
        manifest_hex = manifest_digest.removeprefix("sha256:")
        _link(base / "_layers/sha256" / config_hex / "link", config_digest)
        _link(base / "_manifests/revisions/sha256" / manifest_hex / "link", manifest_digest)
        tag = base / "_manifests/tags" / tag_name(i)
        _link(tag / "index/sha256" / manifest_hex / "link", manifest_digest)
        _link(tag / "current/link", manifest_digest, pushed_at(i).timestamp())


def seeded_storage(cache: Path, name: str, repos: dict[str, int]) -> Path:
    """A registry root seeded once (checked by the registry) and reused: copy it per run."""
    root = cache / name
    done = root / "done-direct"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for repo, count in repos.items():
        seed_repository(root / "data", repo, count)
    check(root, repos)
    done.write_text("ok")
    return root


def check(root: Path, repos: dict[str, int]) -> None:
    """The registry serves what was written: every tag listed, a manifest by tag, and its
    garbage collector marks every manifest (nothing eligible)."""
    registry = RegistryProcess.create(root)
    registry.start()
    try:
        for repo, count in repos.items():
            tags = httpx.get(f"{registry.url}/v2/{repo}/tags/list", timeout=600).json()["tags"]
            assert len(tags) == count, (repo, len(tags))
            got = httpx.get(
                f"{registry.url}/v2/{repo}/manifests/{tag_name(count - 1)}",
                headers={"Accept": OCI_MANIFEST},
            )
            assert got.status_code == 200, got.text
    finally:
        registry.stop()
    done = registry.garbage_collect("--dry-run")
    assert done.returncode == 0 and "0 blobs and 0 manifests eligible" in done.stdout, done.stdout[
        -500:
    ]
