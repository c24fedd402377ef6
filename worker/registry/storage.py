"""Read-only access to the registry's filesystem storage (``registry.storage_path``).

The filesystem driver's ``rootdirectory`` holds, per repository, a link file per
tag and per stored manifest (distribution's ``registry/storage/paths.go``)::

    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link
    docker/registry/v2/repositories/<name>/_manifests/revisions/sha256/<hex>/link
    docker/registry/v2/blobs/sha256/<hex[:2]>/<hex>/data

Two facts the API cannot give come from here: when a tag was last pushed (the
``current/link`` is rewritten on every PUT by tag, even of the same digest, so its
mtime is the push time; checked on 2.8.2), and every manifest the repository
stores, tagged or not (an untagged multi-arch index still needs its children).
regsweep never writes here.

A pull-through cache rewrites tag links on every pull, so its mtimes say nothing
about pushes: such storage (it has the proxy's ``scheduler-state.json`` at its
root) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from worker.engine.model import Digest
from worker.errors import ConfigError

V2: Final = Path("docker/registry/v2")
#: Written at the storage root by a registry configured with ``proxy:`` (its TTL scheduler).
PROXY_STATE: Final = "scheduler-state.json"
_HEX: Final = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class StoredTag:
    digest: Digest
    #: The last PUT of the tag.
    pushed: datetime


def check_storage_root(path: str) -> str | None:
    """Why ``path`` cannot serve as ``registry.storage_path``; ``None`` when it can."""
    root = Path(path)
    if not root.is_dir():
        return "is not a directory (the registry's storage.filesystem.rootdirectory)"
    if not os.access(root, os.R_OK | os.X_OK):
        return "is not readable"
    if (root / PROXY_STATE).exists():
        return (
            "belongs to a pull-through cache (proxy:), whose tag links change on every "
            "pull and say nothing about pushes"
        )
    return None


class RegistryStorage:
    """One registry's storage root, read-only. Methods block: call them in a thread."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        problem = check_storage_root(str(self.root))
        if problem is not None:
            raise ConfigError(f"registry.storage_path {self.root}: {problem}")

    def _manifests(self, repository: str) -> Path:
        return self.root / V2 / "repositories" / repository / "_manifests"

    def has_repository(self, repository: str) -> bool:
        return self._manifests(repository).is_dir()

    def tags(self, repository: str, names: list[str]) -> dict[str, StoredTag]:
        """Digest and last push of each named tag that the storage has."""
        base = self._manifests(repository) / "tags"
        found: dict[str, StoredTag] = {}
        for name in names:
            stored = _read_link(base / name / "current" / "link")
            if stored is not None:
                found[name] = stored
        return found

    def revisions(self, repository: str) -> list[Digest]:
        """Every manifest the repository stores (tagged or not), by digest.

        A manifest deleted through the API loses its revision's ``link`` but keeps the
        directory (until garbage collection): only revisions with a link count."""
        base = self._manifests(repository) / "revisions" / "sha256"
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        return sorted(
            Digest(f"sha256:{n}")
            for n in names
            if len(n) == 64 and set(n) <= _HEX and (base / n / "link").exists()
        )

    def blob(self, digest: str) -> bytes | None:
        """A blob's content (a manifest's bytes), or None when it is not stored."""
        algorithm, _, hexdigits = digest.partition(":")
        if algorithm != "sha256" or len(hexdigits) != 64 or not set(hexdigits) <= _HEX:
            return None
        path = self.root / V2 / "blobs" / algorithm / hexdigits[:2] / hexdigits / "data"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


def _read_link(path: Path) -> StoredTag | None:
    """A link file's digest and mtime; None when absent or caught mid-rewrite (empty)."""
    try:
        with path.open("rb") as fh:
            stat = os.fstat(fh.fileno())
            text = fh.read(200).decode("ascii", "replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if ":" not in text:
        return None
    return StoredTag(Digest(text), datetime.fromtimestamp(stat.st_mtime, UTC))
