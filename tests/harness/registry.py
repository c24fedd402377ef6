"""Start and stop Debian's CNCF distribution 2.8.2 (``docker-registry``) for tests."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """A registry config with deletes enabled and filesystem storage under ``root``."""
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
    """One ``docker-registry serve`` process with its own root directory and port."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, root: Path, overrides: Mapping[str, Any] | None = None) -> RegistryProcess:
        port = free_port()
        config = base_config(root, port)
        for key, value in (overrides or {}).items():
            config[key] = value
        return cls(root=root, config=config, port=port)

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
            [REGISTRY_BINARY, "serve", str(self.config_path)],
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
            [REGISTRY_BINARY, "garbage-collect", *extra, str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
