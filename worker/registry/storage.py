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
Nothing in this module writes here; the storage-level prune inside a maintenance
window (:mod:`worker.engine.storage_executor`) is the only code that does.

A pull-through cache rewrites tag links on every pull, so its mtimes say nothing
about pushes: such storage (it has the proxy's ``scheduler-state.json`` at its
root) is refused.

A plan never runs on part of this evidence: a file it cannot read (permissions, a
symlink loop, a FIFO where a link should be) raises :class:`StorageError` naming the
file, and so does a repository the registry has and the storage lacks (the path is
not the registry's root: :func:`layout_problem` says which path would be).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from worker.errors import ConfigError, StorageError
from worker.oci import Digest

V2: Final = Path("docker/registry/v2")
#: Written at the storage root by a registry configured with ``proxy:`` (its TTL scheduler).
PROXY_STATE: Final = "scheduler-state.json"
#: What a fresh filesystem may hold at a root no registry has written to yet.
_FRESH: Final = frozenset({"lost+found", PROXY_STATE})
#: Directories looked into (per level) for the storage root under a path that is too shallow.
_SEARCH_WIDTH: Final = 200
#: Absence, not a failure to read: the file or a directory on its way is not there.
_ABSENT: Final = frozenset({errno.ENOENT, errno.ENOTDIR})
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


def layout_problem(path: str) -> str | None:
    """Why ``path``, a readable directory, is not a registry's storage root, with the path
    that is when one is near (one level too deep or too shallow); ``None`` when it is one,
    or when it is empty (a registry that has stored nothing yet writes nothing there)."""
    root = Path(path)
    try:
        if stat.S_ISDIR(os.stat(root / V2).st_mode):
            return None
    except PermissionError as exc:
        return f"cannot be read: {root / V2}: {exc.strerror}"
    except OSError:
        pass  # not there: look around for the root
    found = _root_around(root)
    if found is not None:
        return f"is not the registry's storage root; {found} is: set registry.storage_path to it"
    try:
        entries = {e for e in os.listdir(root) if not e.startswith(".")} - _FRESH
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not entries:
        return None
    return (
        f"holds no {V2}, so it is not a registry's storage root (storage.filesystem."
        "rootdirectory in the registry's config.yml, the directory that holds docker/)"
    )


def _root_around(root: Path) -> Path | None:
    """The storage root ``root`` is inside of (too deep) or holds (too shallow), if any."""
    resolved = root.resolve()
    for parent in resolved.parents:
        if resolved.is_relative_to(parent / "docker") and _looks_like_root(parent):
            return parent
    for candidate in _below(root, depth=2):
        if _looks_like_root(candidate):
            return candidate
    return None


def _below(root: Path, depth: int) -> Iterator[Path]:
    """Directories under ``root`` down to ``depth`` levels, a bounded number per level."""
    if depth == 0:
        return
    try:
        with os.scandir(root) as entries:
            children = sorted(e.name for e in entries if e.is_dir() and e.name != "docker")
    except OSError:
        return
    for name in children[:_SEARCH_WIDTH]:
        yield root / name
        yield from _below(root / name, depth - 1)


def _looks_like_root(path: Path) -> bool:
    """Whether ``path`` holds the registry's tree (an unreadable one counts as not)."""
    try:
        return (path / V2).is_dir()
    except OSError:
        return False


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
        return _is_dir(self._manifests(repository))

    def missing(self, repository: str) -> str:
        """What to say of a repository the registry has and this storage lacks."""
        layout = layout_problem(str(self.root))
        why = (
            f"{self.root} {layout}"
            if layout
            else (f"{self.root} is not this registry's storage (storage.filesystem.rootdirectory)")
        )
        return (
            f"registry.storage_path has no repository {repository}, which the registry has: {why}"
        )

    def tag_names(self, repository: str) -> list[str]:
        """Every tag the storage has for ``repository`` (a directory each)."""
        return sorted(_listing(self._manifests(repository) / "tags"))

    def tags(self, repository: str, names: list[str]) -> dict[str, StoredTag]:
        """Digest and last push of each named tag that the storage has."""
        base = self._manifests(repository) / "tags"
        found: dict[str, StoredTag] = {}
        for name in names:
            stored = _read_link(base / name / "current" / "link")
            if stored is not None:
                found[name] = stored
        return found

    def repositories(self) -> list[str]:
        """Every repository, found as the registry's catalog finds them (distribution's
        ``handleRepository``, 2.8 and 3.x): a directory holding ``_manifests`` is one,
        directories whose names start with ``_`` are never entered, and a repository's
        other directories may hold repositories nested in it."""
        found: list[str] = []
        pending = [""]
        base = self.root / V2 / "repositories"
        while pending:
            current = pending.pop()
            for name in sorted(_listing(base / current)):
                path = f"{current}/{name}" if current else name
                if name == "_manifests":
                    found.append(current)
                elif not name.startswith("_") and _is_dir(base / path):
                    pending.append(path)
        return sorted(found)

    def tag(self, repository: str, tag: str) -> StoredTag | None:
        """One tag's digest and last push; None when the storage has no link for it."""
        return _read_link(self._manifests(repository) / "tags" / tag / "current" / "link")

    def has_revision(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` stores the manifest ``digest`` (its revision has a link)."""
        return _is_file(self.revision_link(repository, digest))

    def has_layer_link(self, repository: str, digest: str) -> bool:
        """Whether ``digest`` is linked into ``repository``'s ``_layers`` (a blob of it)."""
        return _is_file(self.layer_link(repository, digest))

    def repository_path(self, repository: str) -> Path:
        return self.root / V2 / "repositories" / repository

    def tag_directory(self, repository: str, tag: str) -> Path:
        return self._manifests(repository) / "tags" / tag

    def revision_link(self, repository: str, digest: str) -> Path:
        algorithm, _, hexdigits = digest.partition(":")
        return self._manifests(repository) / "revisions" / algorithm / hexdigits / "link"

    def layer_link(self, repository: str, digest: str) -> Path:
        algorithm, _, hexdigits = digest.partition(":")
        return self.repository_path(repository) / "_layers" / algorithm / hexdigits / "link"

    def revisions(self, repository: str) -> list[Digest]:
        """Every manifest the repository stores (tagged or not), by digest.

        A manifest deleted through the API loses its revision's ``link`` but keeps the
        directory (until garbage collection): only revisions with a link count."""
        base = self._manifests(repository) / "revisions" / "sha256"
        return sorted(
            Digest(f"sha256:{n}")
            for n in _listing(base)
            if len(n) == 64 and set(n) <= _HEX and _is_file(base / n / "link")
        )

    def blob(self, digest: str) -> bytes | None:
        """A blob's content (a manifest's bytes), or None when it is not stored."""
        algorithm, _, hexdigits = digest.partition(":")
        if algorithm != "sha256" or len(hexdigits) != 64 or not set(hexdigits) <= _HEX:
            return None
        path = self.root / V2 / "blobs" / algorithm / hexdigits[:2] / hexdigits / "data"
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno in _ABSENT and not os.path.lexists(path):
                return None
            raise unreadable(path, exc) from exc


def unreadable(path: Path, exc: OSError) -> StorageError:
    """The error for a storage file regsweep cannot read: named, with what to change."""
    return StorageError(
        f"registry.storage_path: cannot read {path}: {exc.strerror or exc}; the repository "
        "is left alone (regsweep needs to read the whole storage: give its user read access, "
        "e.g. the registry's group, or mount the storage read-only for it)"
    )


def _listing(directory: Path) -> list[str]:
    """A directory's entries; none when it is absent, an error when it cannot be read."""
    try:
        return os.listdir(directory)
    except OSError as exc:
        if exc.errno in _ABSENT and not os.path.lexists(directory):
            return []
        raise unreadable(directory, exc) from exc


def _status(path: Path) -> os.stat_result | None:
    """``stat`` of ``path``; None when absent, an error when it cannot be looked at (no
    permission, a symlink loop or one that points nowhere)."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno in _ABSENT and not os.path.lexists(path):
            return None
        raise unreadable(path, exc) from exc


def _is_dir(path: Path) -> bool:
    found = _status(path)
    return found is not None and stat.S_ISDIR(found.st_mode)


def _is_file(path: Path) -> bool:
    found = _status(path)
    return found is not None and stat.S_ISREG(found.st_mode)


def _read_link(path: Path) -> StoredTag | None:
    """A link file's digest and mtime; None when absent or caught mid-rewrite (empty).

    Opened without blocking, so a FIFO where a link should be is an error, not a hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in _ABSENT and not os.path.lexists(path):
            return None
        raise unreadable(path, exc) from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise StorageError(
                f"registry.storage_path: {path} is not a file (the registry writes a small "
                "file there); the repository is left alone"
            )
        text = os.read(fd, 200).decode("ascii", "replace").strip()
    except OSError as exc:
        raise unreadable(path, exc) from exc
    finally:
        os.close(fd)
    if ":" not in text:
        return None
    return StoredTag(Digest(text), datetime.fromtimestamp(status.st_mtime, UTC))
