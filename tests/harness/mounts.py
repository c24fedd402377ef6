"""Real file-system faults for tests: a full disk (a tiny tmpfs) and a read-only directory.

Both need root (mount(8)); the test machines and CI run as root.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """``path`` as a tmpfs of ``size`` bytes: writes past it fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def bind_mount(path: Path) -> Iterator[Path]:
    """``path`` (a directory) bind-mounted onto itself, writable until :func:`remount` says
    otherwise (so a test can make it read-only at a chosen moment)."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        yield path
    finally:
        _umount(path)


def remount(path: Path, *, read_only: bool) -> None:
    """Make a :func:`bind_mount` read-only (writes fail with EROFS, root's included: file
    modes do not stop root) or writable again."""
    _mount("-o", f"remount,{'ro' if read_only else 'rw'},bind", str(path))


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (a directory) bind-mounted read-only onto itself."""
    with bind_mount(path):
        remount(path, read_only=True)
        yield path


def fill(path: Path) -> None:
    """Use up the file system ``path`` is on (the filler file stays)."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        return
    finally:
        os.close(fd)
