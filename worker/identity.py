"""Which process holds something (a lock, a message), told so that others can check it is alive.

A :class:`ProcessIdentity` names a process by host, pid, the pid's start time
(a reused pid is another process), PID namespace and boot id (two containers
may share a host name, never a namespace and a boot). A process on the same
machine and in the same namespace can tell at once whether another is dead;
one elsewhere cannot, and has to wait for whatever the holder renews (a TTL).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

_PROC: Final = Path("/proc")


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, named so that another process can tell whether it is still alive."""

    host: str
    pid: int
    #: ``/proc/<pid>/stat`` field 22: tells a reused pid from the original.
    started: str = ""
    #: Two containers can share a host name but not a PID namespace and boot id.
    pid_namespace: str = ""
    boot_id: str = ""

    @classmethod
    def of(cls, pid: int | None = None) -> ProcessIdentity:
        pid = os.getpid() if pid is None else pid
        return cls(socket.gethostname(), pid, start_time(pid) or "", _pid_namespace(), _boot_id())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessIdentity:
        return cls(
            host=str(data.get("host", "")),
            pid=int(data.get("pid", 0)),
            started=str(data.get("started", "")),
            pid_namespace=str(data.get("pid_namespace", "")),
            boot_id=str(data.get("boot_id", "")),
        )

    def is_local(self) -> bool:
        """Whether this process can see the other's pid (same host, namespace and boot)."""
        here = ProcessIdentity.of()
        same = (self.host, self.pid_namespace, self.boot_id)
        return bool(self.pid_namespace) and same == (here.host, here.pid_namespace, here.boot_id)

    def is_alive(self) -> bool:
        """False only when provably dead; a process elsewhere counts as alive."""
        if not self.is_local():
            return True
        return bool(self.started) and start_time(self.pid) == self.started


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat``; ``None`` for a process gone or a zombie."""
    stat = _read(_PROC / str(pid) / "stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] == "Z":
        return None
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> str:
    try:
        return os.readlink(_PROC / "self" / "ns" / "pid")
    except OSError:
        return ""


def _boot_id() -> str:
    return (_read(_PROC / "sys" / "kernel" / "random" / "boot_id") or "").strip()


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    if pgid <= 0:
        return False  # no group (kernel threads are "group 0")
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        fields = stat.rpartition(")")[2].split() if stat else []
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False
