"""The shipped stack (compose.yaml) brought up for real with ``scripts/stack``.

Each :class:`ComposeStack` is a compose project of its own (a unique
``COMPOSE_PROJECT_NAME``), published on free ports of 127.0.0.1, with its own
secrets file and policy file, so it never touches a developer's ``.env`` or
another stack on the machine. Everything goes through ``scripts/stack``, as a
user would type it; the Docker SDK only looks at what it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import yaml
from docker.models.containers import Container

from tests.harness.registry import free_port
from tests.harness.stack import ENVIRONMENT

REPO_ROOT = Path(__file__).resolve().parents[2]
STACK_SCRIPT = REPO_ROOT / "scripts" / "stack"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
#: Cold: debootstrap, pip and apt inside image builds; warm: seconds.
UP_TIMEOUT = 900.0


def hooks() -> dict[str, str]:
    """The ``hooks:`` section naming the variables ``ENVIRONMENT`` sets."""
    return {
        "registry_token_env": "REGSWEEP_HOOK_TOKEN",
        "github_secret_env": "REGSWEEP_GITHUB_SECRET",
        "gitlab_token_env": "REGSWEEP_GITLAB_TOKEN",
        "api_token_env": "REGSWEEP_API_TOKEN",
    }


@dataclass
class ComposeStack:
    """One compose project made from compose.yaml and deploy/compose.local.yaml."""

    root: Path
    policies: Sequence[Mapping[str, Any]]
    project: str = field(default_factory=lambda: f"regsweep-test-{uuid.uuid4().hex[:8]}")
    registry_port: int = field(default_factory=free_port)
    service_port: int = field(default_factory=free_port)
    #: What ``scripts/stack up`` printed.
    up_output: str = ""
    #: The policy's ``notify:`` section, and variables added to the stack's env file.
    notify: Sequence[Mapping[str, Any]] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: ``REGISTRY_VERSION`` for scripts/stack: 2.8 (local/registry:2.8.2) or 3 (:3.1.0).
    registry_version: str = "2.8"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def policy_file(self) -> Path:
        return self.root / "regsweep.yaml"

    def registry_selector(self) -> str:
        """The docker controller's selector for this project's registry container."""
        return f"label={PROJECT_LABEL}={self.project},label={SERVICE_LABEL}=registry"

    def write_files(self) -> None:
        document = {
            "registry": {"url": "http://registry:5000", "storage_path": "/var/lib/registry"},
            "redis": {"url": "redis://redis:6379/0"},
            # As deploy/regsweep.yaml: the audit copied to the volume every container shares.
            "audit": {"path": "/var/lib/regsweep/audit.jsonl"},
            "sweep": {"every": "6h"},
            "hooks": hooks(),
            "policies": list(self.policies),
            "maintenance": {
                "window": {"cron": "0 3 * * sun", "duration": "2h"},
                # No config_path, as deploy/regsweep.yaml: GC reads what the container serves.
                "controller": {"kind": "docker", "container": self.registry_selector()},
            },
        }
        if self.notify:
            document["notify"] = list(self.notify)
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_policy(document)
        variables = {**ENVIRONMENT, **self.extra_env}
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))

    def write_policy(self, document: Mapping[str, Any]) -> None:
        """Replace the policy file (a new file renamed over it, as many editors save)."""
        fresh = self.policy_file.with_suffix(".new")
        fresh.write_text(yaml.safe_dump(dict(document), sort_keys=False))
        # The container's non-root user reads it through a bind mount.
        fresh.chmod(0o644)
        fresh.replace(self.policy_file)

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "STACK_ENV_FILE": str(self.env_file),
            "REGSWEEP_POLICY": str(self.policy_file),
            "REGISTRY_PUBLISH": f"127.0.0.1:{self.registry_port}",
            "SERVICE_PUBLISH": f"127.0.0.1:{self.service_port}",
            "REGISTRY_VERSION": self.registry_version,
        }

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``scripts/stack ARGS``; its exit code is the caller's to check."""
        return subprocess.run(
            [str(STACK_SCRIPT), *args],
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> subprocess.CompletedProcess[str]:
        self.write_files()
        done = self.run("up", timeout=UP_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"scripts/stack up failed:\n{done.stdout}\n{done.stderr}")
        self.up_output = done.stdout
        return done

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("down")

    def logs(self, *services: str) -> str:
        return self.run("logs", "--no-color", "--tail", "60", *services).stdout

    # ----------------------------------------------------------------- docker

    def containers(self, client: docker.DockerClient) -> list[Container]:
        return list(
            client.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={self.project}"})
        )

    def container(self, client: docker.DockerClient, service: str) -> Container:
        """The one container of ``service`` (the registry's is recreated by every GC)."""
        found = client.containers.list(
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]},
        )
        assert len(found) == 1, f"{service}: {[c.name for c in found]}"
        return found[0]

    def leftovers(self, client: docker.DockerClient) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project still on the engine."""
        label = {"label": f"{PROJECT_LABEL}={self.project}"}
        return {
            "containers": [c.name for c in client.containers.list(all=True, filters=label)],
            "networks": [n.name for n in client.networks.list(filters=label)],
            "volumes": [v.name for v in client.volumes.list(filters=label)],
        }


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """Each line of a container's log parsed as one JSON object; raises on any other line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"log line {number} is not one JSON record: {line!r}") from exc
    return records


def remove_project(client: docker.DockerClient, project: str) -> None:
    """Whatever a failed run left of ``project``, removed (the test's own cleanup)."""
    label = {"label": f"{PROJECT_LABEL}={project}"}
    for container in client.containers.list(all=True, filters=label):
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            continue
    for network in client.networks.list(filters=label):
        network.remove()
    for volume in client.volumes.list(filters=label):
        volume.remove(force=True)
