"""compose.yaml and deploy/: the shipped wiring parses, loads and runs with the real parts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from regsweep.cli import _parser, split_celery_args
from tests.harness.registry import REGISTRY_BINARY, free_port
from worker.config import load_config
from worker.policy import DockerControllerSettings

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ["-c", "/etc/regsweep/regsweep.yaml"]


def compose() -> dict[str, dict[str, object]]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


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


def test_deploy_registry_config_runs_on_the_real_binary(tmp_path: Path) -> None:
    """deploy/registry-config.yml starts Debian's 2.8.2 registry (addr and root overridden)."""
    port = free_port()
    env = {
        **os.environ,
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path),
    }
    proc = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(ROOT / "deploy/registry-config.yml")],
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
