"""A real Docker engine and registry containers, for tests: ``local/registry:2.8.2`` (Debian's
binary) and ``local/registry:3.1.0`` (distribution 3.x from ``../shared``, laid out like the
upstream ``registry:3`` image), both built by ``.ci/dockerd.sh``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
from docker.models.containers import Container

from tests.harness.registry import (
    DISTRIBUTION_2,
    V3_BINARY_ENV,
    RegistryBinary,
    RegistryUnavailable,
    distribution_3,
    free_port,
)
from worker.maintenance.controllers import BACKUP_SUFFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERD_SCRIPT = REPO_ROOT / ".ci" / "dockerd.sh"
REGISTRY_IMAGE = "local/registry:2.8.2"
#: Where each image keeps its config: the upstream images' paths (registry:3 moved it).
CONFIG_PATH = "/etc/docker/registry/config.yml"
CONFIG_PATH_3 = "/etc/distribution/config.yml"
STORAGE_ROOT = "/var/lib/registry"
#: Every container the test session makes carries this label, so cleanup finds them all.
SESSION_LABEL = "io.regsweep.test-session"


def registry_image(binary: RegistryBinary) -> str:
    """The local image of ``binary``'s version."""
    return REGISTRY_IMAGE if binary == DISTRIBUTION_2 else f"local/registry:{binary.version}"


def config_path(binary: RegistryBinary) -> str:
    """Where the image of ``binary``'s version keeps the registry's config."""
    return CONFIG_PATH if binary.major < 3 else CONFIG_PATH_3


def docker_engine(timeout: float = 180.0) -> docker.DockerClient:
    """Start dockerd and build the registry images if needed (``.ci/dockerd.sh``; the 3.x one
    where a 3.x binary is to be had); a client."""
    env = dict(os.environ)
    with contextlib.suppress(RegistryUnavailable):
        env[V3_BINARY_ENV] = distribution_3().path  # found (or built) once per session
    done = subprocess.run(
        ["bash", str(DOCKERD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{DOCKERD_SCRIPT} failed:\n{done.stderr}")
    return docker.from_env(timeout=60)


def new_session_id() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class RegistryContainer:
    """One registry container (``local/registry:2.8.2`` unless told) on the host network,
    storage bind-mounted."""

    client: docker.DockerClient
    name: str
    port: int
    storage: Path
    session: str
    project: str
    image: str = REGISTRY_IMAGE

    @classmethod
    def start(
        cls,
        client: docker.DockerClient,
        storage: Path,
        session: str,
        *,
        image: str = REGISTRY_IMAGE,
    ) -> RegistryContainer:
        name = f"regsweep-test-{session}-{uuid.uuid4().hex[:6]}"
        storage.mkdir(parents=True, exist_ok=True)
        project = f"regsweep-test-{session}"
        made = cls(client, name, free_port(), storage, session, project, image)
        api = client.api
        # Low-level create, so /scratch is a Config.Volumes anonymous volume, like an
        # image's VOLUME (the official registry image declares /var/lib/registry).
        created = api.create_container(
            image,
            name=name,
            environment={"REGISTRY_HTTP_ADDR": f"127.0.0.1:{made.port}"},
            labels=made.labels,
            volumes=[STORAGE_ROOT, "/scratch"],
            host_config=api.create_host_config(
                binds=[f"{storage}:{STORAGE_ROOT}:rw"],
                network_mode="host",
                restart_policy={"Name": "unless-stopped"},
            ),
        )
        api.start(created["Id"])
        made.wait_ready()
        return made

    @property
    def labels(self) -> dict[str, str]:
        return {
            SESSION_LABEL: self.session,
            "com.docker.compose.project": self.project,
            "com.docker.compose.service": "registry",
            "com.docker.compose.oneoff": "False",
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def container(self) -> Container:
        return self.client.containers.get(self.name)

    def inspect(self) -> dict[str, Any]:
        return dict(self.client.api.inspect_container(self.name))

    def remove(self) -> None:
        """Remove the container and any switch leftover, with their volumes."""
        for name in (self.name, self.name + BACKUP_SUFFIX):
            try:
                remove_with_volumes(self.client.containers.get(name))
            except docker.errors.NotFound:
                continue

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until ``GET /v2/`` answers (the container may just have been recreated)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/v2/", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        logs = self.container().logs(tail=30).decode(errors="replace")
        raise RuntimeError(f"registry container {self.name} did not answer:\n{logs}")


def remove_session_containers(client: docker.DockerClient, session: str) -> None:
    """Remove every container (and its volumes) this test session made."""
    for container in client.containers.list(
        all=True, filters={"label": f"{SESSION_LABEL}={session}"}
    ):
        remove_with_volumes(container)


def remove_with_volumes(container: Container) -> None:
    """Remove a test container and the volumes it mounted.

    ``remove(v=True)`` is not enough: after a switch the anonymous volumes are
    mounted by name, and Docker only removes volumes it still sees as anonymous.
    """
    volumes = [m["Name"] for m in container.attrs.get("Mounts") or [] if m.get("Type") == "volume"]
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True, v=True)
    for name in volumes:
        with contextlib.suppress(docker.errors.NotFound):
            container.client.volumes.get(name).remove(force=True)
