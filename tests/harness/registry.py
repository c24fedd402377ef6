"""Start and stop a CNCF distribution registry for tests: Debian's 2.8.2 (``docker-registry``),
or distribution 3.1.0 built from the source in ``../shared/registry`` (:func:`distribution_3`).

Which binary a test runs is a parameter (``RegistryProcess.create(..., binary=...)``,
the ``registry_binary`` fixture in ``tests/conftest.py``); without one, 2.8.2.
"""

from __future__ import annotations

import functools
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
#: Prints a distribution 3.x binary's path: ``$REGSWEEP_REGISTRY_V3``, else what
#: ``../shared/registry/build-v3`` builds; exit 3 when there is neither.
V3_LOCATOR: Final = REPO_ROOT / "scripts" / "registry-v3"
V3_ABSENT: Final = 3
#: A distribution 3.x binary to use instead of building one from ``../shared``.
V3_BINARY_ENV: Final = "REGSWEEP_REGISTRY_V3"
#: Set (to anything but empty or 0) where the 3.x runs must not be skipped: CI.
REQUIRE_V3_ENV: Final = "REGSWEEP_REQUIRE_V3"
_VERSION: Final = re.compile(r"\bv?(\d+\.\d+\.\d+)")


@dataclass(frozen=True)
class RegistryBinary:
    """One distribution registry binary and the version it reports."""

    version: str
    path: str

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0])


#: Debian's docker-registry package (2.8.2+ds1).
DISTRIBUTION_2: Final = RegistryBinary("2.8.2", REGISTRY_BINARY)


class RegistryUnavailable(Exception):
    """No binary of this version on this machine; the message says why and what to do."""


@functools.cache
def distribution_3() -> RegistryBinary:
    """Distribution 3.x, as ``scripts/registry-v3`` finds or builds it (about a minute the
    first time, cached after that).

    Raises :class:`RegistryUnavailable` when there is none to be had (a user's own clone);
    a build that fails, or a binary that is not 3.x, is an error, never a reason to skip.
    """
    done = subprocess.run([str(V3_LOCATOR)], capture_output=True, text=True, check=False)
    if done.returncode == V3_ABSENT:
        raise RegistryUnavailable(done.stderr.strip())
    if done.returncode != 0:
        raise RuntimeError(f"{V3_LOCATOR} failed:\n{done.stderr[-3000:]}")
    path = done.stdout.strip().splitlines()[-1]
    version = binary_version(path)
    if not version.startswith("3."):
        raise RuntimeError(f"{path} is distribution {version}, not 3.x")
    return RegistryBinary(version, path)


def binary_version(path: str) -> str:
    """``3.1.0`` from ``registry --version`` (``<path> github.com/distribution/distribution/v3
    v3.1.0``; Debian's 2.8: ``<path> github.com/docker/distribution 2.8.2+ds1``)."""
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    match = _VERSION.search(done.stdout.split()[-1] if done.stdout.split() else "")
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{path} --version: {done.stdout or done.stderr}")
    return match.group(1)


#: The registry versions a test given the ``registry_binary`` fixture runs on, as test ids.
VERSIONS: Final = ("2.8.2", "3.x")


def registry_binary(version: str) -> RegistryBinary:
    """The binary a :data:`VERSIONS` id names (:class:`RegistryUnavailable` for 3.x without
    one)."""
    return DISTRIBUTION_2 if version == "2.8.2" else distribution_3()


def v3_required() -> bool:
    """Whether a missing 3.x binary fails the run instead of skipping its tests (CI)."""
    return os.environ.get(REQUIRE_V3_ENV, "") not in ("", "0")


@functools.cache
def server_ports() -> range:
    """Where test servers listen: the 12,000 ports below the kernel's ephemeral range. A
    port the kernel hands out (``bind(0)``) is one it also gives outgoing connections, so a
    server restarted on it (a registry switched read-only) could find a client's socket
    holding it ("bind: address already in use"), as it once did under a loaded suite."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range."""
    ports = server_ports()
    for _ in range(100):
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports} after 100 tries")


def tag_link(storage: Path, repository: str, tag: str) -> Path:
    """The storage file whose mtime is ``tag``'s last push (``registry.storage_path``)."""
    manifests = storage / "docker/registry/v2/repositories" / repository / "_manifests"
    return manifests / "tags" / tag / "current" / "link"


def set_pushed(storage: Path, repository: str, when: datetime, *tags: str) -> None:
    """Make each of ``tags`` look last pushed at ``when`` to anyone reading the registry's
    storage (time passing, without waiting for it)."""
    for tag in tags:
        os.utime(tag_link(storage, repository, tag), (when.timestamp(), when.timestamp()))


def base_config(root: Path, port: int) -> dict[str, Any]:
    """A registry config with deletes enabled and filesystem storage under ``root``; 2.8 and
    3.x read it alike."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }


@dataclass
class RegistryProcess:
    """One ``registry serve`` process with its own root directory and port."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    binary: RegistryBinary = DISTRIBUTION_2

    @classmethod
    def create(
        cls,
        root: Path,
        overrides: Mapping[str, Any] | None = None,
        *,
        binary: RegistryBinary = DISTRIBUTION_2,
    ) -> RegistryProcess:
        port = free_port()
        config = base_config(root, port)
        for key, value in (overrides or {}).items():
            config[key] = value
        return cls(root=root, config=config, port=port, binary=binary)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    @property
    def storage_path(self) -> Path:
        return Path(self.config["storage"]["filesystem"]["rootdirectory"])

    def set_pushed(self, repository: str, when: datetime, *tags: str) -> None:
        """See :func:`set_pushed`."""
        set_pushed(self.storage_path, repository, when, *tags)

    def set_readonly(self, enabled: bool) -> None:
        """Change maintenance read-only mode; takes effect at the next (re)start."""
        self.config["storage"]["maintenance"] = {"readonly": {"enabled": enabled}}

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, timeout: float = 15.0) -> None:
        self.write_config()
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [self.binary.path, "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_tail()}")
            try:
                httpx.get(f"{self.url}/v2/", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"registry did not start: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "registry.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def garbage_collect(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary.path, "garbage-collect", *extra, str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
