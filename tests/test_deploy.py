"""compose.yaml and deploy/: the shipped wiring parses, loads and runs with the real parts."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from docker.utils.build import exclude_paths

from regsweep.cli import _parser, split_celery_args
from tests.harness.registry import RegistryBinary, free_port
from worker.maintenance.controllers import served_config
from worker.settings.load import load_config
from worker.settings.model import DockerControllerSettings

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ["-c", "/etc/regsweep/regsweep.yaml"]


def compose() -> dict[str, dict[str, object]]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


REGSWEEP_SERVICES = ("service", "worker", "gc-worker", "beat")


def test_deploy_policy_loads() -> None:
    """deploy/regsweep.yaml is a valid policy file, with the docker controller on the registry."""
    config = load_config(ROOT / "deploy/regsweep.yaml", {})
    assert config.redis_url == "redis://redis:6379/0"
    assert isinstance(config.maintenance.controller, DockerControllerSettings)
    assert config.policy_for("team/web") is not None


@pytest.mark.parametrize("service", ["service", "worker", "gc-worker", "beat"])
def test_compose_commands_are_regsweep_commands(service: str) -> None:
    """Every regsweep service's command is one the CLI accepts (Celery options passed through)."""
    command = [str(part) for part in compose()[service]["command"]]  # type: ignore[attr-defined]
    own, celery = split_celery_args([*ENTRYPOINT, *command])
    args = _parser().parse_args(own)
    assert args.command == command[0]
    assert celery == command[1:] or args.command == "serve"


def test_deploy_registry_config_runs_on_the_real_binary(
    tmp_path: Path, registry_binary: RegistryBinary
) -> None:
    """deploy/registry-config.yml starts Debian's 2.8.2 registry and distribution 3.x (addr
    and root overridden), the two images compose.yaml's REGISTRY_VERSION picks from."""
    port = free_port()
    env = {
        **os.environ,
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path),
    }
    proc = subprocess.Popen(
        [registry_binary.path, "serve", str(ROOT / "deploy/registry-config.yml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
        else:
            pytest.fail("registry did not answer")
        assert response.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_both_registry_versions_serve_the_mounted_config_and_gc_reads_it() -> None:
    """compose.yaml's registry serves the config it mounts whichever image REGISTRY_VERSION
    picks (registry:3 keeps its own at /etc/distribution/config.yml, registry:2.8 at the
    mounted path), and the docker controller's GC, with no config_path in the deploy policy,
    reads the file the container's command names."""
    registry = compose()["registry"]
    assert registry["image"] == "registry:${REGISTRY_VERSION:-2.8}"
    mounted = next(
        v.split(":")[1]
        for v in registry["volumes"]  # type: ignore[attr-defined]
        if "registry-config.yml" in v
    )
    assert registry["command"] == ["serve", mounted]
    controller = load_config(ROOT / "deploy/regsweep.yaml", {}).maintenance.controller
    assert isinstance(controller, DockerControllerSettings) and controller.config_path is None
    # What Docker reports for the recreated container: the image's entrypoint, our command.
    attrs = {"Config": {"Entrypoint": ["/entrypoint.sh"], "Cmd": registry["command"], "Env": []}}
    assert served_config(attrs) == mounted


def test_every_compose_service_has_a_healthcheck_and_a_restart_policy() -> None:
    """Each service says how Docker tells it is healthy, and is restarted when it dies."""
    for name, service in compose().items():
        assert service.get("healthcheck", {}).get("test"), name  # type: ignore[attr-defined]
        assert service.get("restart") == "unless-stopped", name


def test_worker_reads_the_registry_storage_read_only() -> None:
    """The registry's volume is mounted read-only into the worker at the registry's path."""
    volumes = compose()["worker"]["volumes"]
    assert "registry-data:/var/lib/registry:ro" in volumes  # type: ignore[operator]
    assert "registry-data:/var/lib/registry" in compose()["registry"]["volumes"]  # type: ignore[operator]


def test_beat_keeps_its_schedule_in_the_state_volume() -> None:
    """Beat's schedule file is in /var/lib/regsweep, the volume the non-root user owns."""
    command = [str(part) for part in compose()["beat"]["command"]]  # type: ignore[attr-defined]
    assert command[command.index("-s") + 1].startswith("/var/lib/regsweep/")
    assert "regsweep-state:/var/lib/regsweep" in compose()["beat"]["volumes"]  # type: ignore[operator]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "install -d -o regsweep -g regsweep /var/lib/regsweep" in dockerfile
    assert "\nUSER regsweep\n" in dockerfile


def test_build_context_is_the_package_only() -> None:
    """What `docker build .` sends: the package's sources and metadata, no .venv, no .git,
    no tests: about a megabyte of Python sources and templates (it was 221 MB)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sent = sorted(exclude_paths(str(ROOT), patterns))
    assert "pyproject.toml" in sent and "worker/engine/executor.py" in sent
    tops = {path.split("/")[0] for path in sent}
    # Docker always sends the Dockerfile and .dockerignore themselves.
    package = {"pyproject.toml", "constraints.txt", "README.md", "regsweep", "service", "worker"}
    assert tops <= package | {"Dockerfile", ".dockerignore"}, tops
    # The sources alone passed 1 MiB with the dashboard and the storage prune; 2 MiB still
    # catches a stray wheel, venv or node_modules.
    assert sum((ROOT / path).stat().st_size for path in sent if (ROOT / path).is_file()) < 2 << 20


def test_every_secret_is_in_env_example_and_env_is_ignored() -> None:
    """Every variable compose.yaml hands the regsweep services, and every *_env the deploy
    policy names, is in .env.example; git ignores .env."""
    example = (ROOT / ".env.example").read_text()
    listed = {line.split("=")[0] for line in example.splitlines() if "=" in line and line[0] != "#"}
    environment = compose()["service"]["environment"]
    # Not settings of the user's: the stack's own Redis, and the policy's digest (which
    # scripts/stack up computes so that compose recreates what mounts a changed policy).
    computed = {"REGSWEEP_REDIS_URL", "REGSWEEP_POLICY_DIGEST"}
    handed = {name for name in environment if name not in computed}  # type: ignore[attr-defined]
    policy = (ROOT / "deploy/regsweep.yaml").read_text()
    named = set(re.findall(r"_env:\s*(\w+)", policy))
    assert handed <= listed and named <= listed, (handed | named) - listed
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
