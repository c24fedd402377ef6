"""The `regsweep` command as an operator runs it: real process, real registry, exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port

#: The CLI's caches (build times, manifests) are each test's own.
pytestmark = pytest.mark.usefixtures("private_cache")

REGSWEEP = [sys.executable, "-m", "regsweep.cli"]


def run(*args: str, config: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")} | env
    cmd = [*REGSWEEP, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=environ, timeout=120, check=False
    )


def write_config(
    tmp_path: Path, url: str, mode: str = "enforce", storage: Path | None = None
) -> Path:
    path = tmp_path / "regsweep.yaml"
    storage_path = f"\n  storage_path: {storage}" if storage else ""
    path.write_text(
        f"""
registry:
  url: {url}{storage_path}
policies:
  - name: cli
    repositories: ["t/**"]
    mode: {mode}
    protect: ["latest"]
    keep:
      - tags: ["v*"]
        newest: 1
audit:
  path: {tmp_path / "audit.jsonl"}
"""
    )
    return path


@pytest.fixture
def seeded(registry: RegistryProcess, repo_name: str) -> Iterator[tuple[ImageBuilder, str]]:
    now = dt.datetime.now(dt.UTC)
    with ImageBuilder.connect(registry.url) as b:
        for i in range(3):
            b.image(repo_name, f"v{i}")
            registry.set_pushed(repo_name, now - dt.timedelta(days=5 - i), f"v{i}")
        yield b, repo_name


def test_check_config_ok_and_broken(tmp_path: Path) -> None:
    """check-config exits 0 on a good file and 2 with every problem listed, no traceback."""
    good = write_config(tmp_path, "http://127.0.0.1:1")
    assert run("check-config", config=good).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "registry: {url: ftp://x}\npolicies:\n  - name: p\n    repositories: ['a']\n"
        "    keep: [{tags: ['re:(('], newest: 0}]\n"
    )
    result = run("check-config", config=bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "registry.url" in result.stderr
    assert "policies[0] (p).keep[0].newest" in result.stderr
    assert "policies[0] (p).keep[0].tags[0]" in result.stderr


def test_check_config_refuses_a_configured_hook_whose_variable_is_unset(tmp_path: Path) -> None:
    """A hook the file configures but whose secret variable is unset would answer 404:
    check-config names its key and exits 2; with the variable set it passes."""
    path = write_config(tmp_path, "http://127.0.0.1:1")
    path.write_text(path.read_text() + "hooks:\n  github_secret_env: REGSWEEP_TEST_GH\n")
    result = run("check-config", config=path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{path}:15: hooks.github_secret_env: names REGSWEEP_TEST_GH, which is not set: the "
        "hook answers 404 to every delivery until it is (export it where regsweep serve runs, "
        "or remove the key)"
    )
    assert run("check-config", config=path, REGSWEEP_TEST_GH="s3cret").returncode == 0


def test_missing_config_is_a_usage_error() -> None:
    """Without -c or REGSWEEP_CONFIG the command says how to give one and exits 2."""
    result = run("plan")
    assert result.returncode == 2
    assert "REGSWEEP_CONFIG" in result.stderr


def test_config_from_environment(tmp_path: Path, registry: RegistryProcess) -> None:
    """REGSWEEP_CONFIG names the policy file when -c is not given."""
    path = write_config(tmp_path, registry.url)
    assert run("check-config", REGSWEEP_CONFIG=str(path)).returncode == 0


def test_plan_table_and_json(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """plan prints a table with reasons and totals; --json lists digest, tags and reason."""
    builder, repo = seeded
    config = write_config(tmp_path, registry.url, storage=registry.storage_path)
    table = run("plan", repo, config=config)
    assert table.returncode == 0, table.stderr
    assert "v0" in table.stdout
    assert "keep[0]" in table.stdout
    assert "tags: 2 removed, 1 kept" in table.stdout
    assert "5d ago (storage)" in table.stdout  # the push time and its source, per row
    out = run("plan", repo, "--json", config=config)
    (doc,) = json.loads(out.stdout)
    deleted = {tag for d in doc["deletions"] for tag in d["tags"]}
    assert deleted == {"v0", "v1"}
    assert {d["pushed"]["v0"]["source"] for d in doc["deletions"] if "v0" in d["tags"]} == {
        "storage"
    }
    assert [k["pushed"]["source"] for k in doc["kept"]] == ["storage"]
    assert all(d["digest"].startswith("sha256:") and d["reason"] for d in doc["deletions"])
    assert all(d["repository"] == repo for d in doc["deletions"])
    assert builder.tags(repo) == ["v0", "v1", "v2"]


def test_prune_dry_run_then_enforce_then_audit_and_restore(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """prune --dry-run deletes nothing; prune deletes, audit lists it, restore brings it back."""
    builder, repo = seeded
    config = write_config(tmp_path, registry.url, storage=registry.storage_path)
    dry = run("prune", repo, "--dry-run", config=config)
    assert dry.returncode == 0
    assert "nothing deleted (--dry-run)" in dry.stdout
    assert builder.tags(repo) == ["v0", "v1", "v2"]
    real = run("prune", repo, config=config)
    assert real.returncode == 0, real.stderr
    assert f"{repo}: done (2 deleted)" in real.stdout
    assert builder.tags(repo) == ["v2"]
    audit = run("audit", "--json", config=config)
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    assert {tuple(r["tags"]) for r in records if r["repository"] == repo} == {("v0",), ("v1",)}
    digest = next(r["digest"] for r in records if r["tags"] == ["v0"])
    restored = run("restore", repo, digest, config=config)
    assert restored.returncode == 0, restored.stderr
    assert builder.tags(repo) == ["v0", "v2"]


def test_dry_run_policy_mode_is_respected(
    tmp_path: Path, registry: RegistryProcess, seeded: tuple[ImageBuilder, str]
) -> None:
    """A policy in dry-run mode is only planned by prune, never executed."""
    builder, repo = seeded
    config = write_config(tmp_path, registry.url, mode="dry-run", storage=registry.storage_path)
    result = run("prune", repo, config=config)
    assert result.returncode == 0
    assert "policy cli is dry-run" in result.stdout
    assert builder.tags(repo) == ["v0", "v1", "v2"]


def test_registry_down_is_a_run_error(tmp_path: Path) -> None:
    """An unreachable registry gives exit 1 and one clear line, not a traceback."""
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    result = run("plan", "t/x", config=config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("regsweep: ")
    assert "ConnectError" in last


def test_restore_of_unknown_digest_is_a_run_error(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """restore of a digest the audit log never saw says so and exits 1."""
    config = write_config(tmp_path, registry.url)
    result = run("restore", "t/none", "sha256:" + "0" * 64, config=config)
    assert result.returncode == 1
    assert "the audit has no deletion of" in result.stderr


def test_check_config_refuses_storage_it_cannot_read(tmp_path: Path) -> None:
    """check-config names a registry.storage_path that is no directory, and one that belongs
    to a pull-through cache, and exits 2."""
    config = tmp_path / "regsweep.yaml"
    config.write_text(f"registry: {{url: 'http://r:5000', storage_path: '{tmp_path / 'no'}'}}\n")
    missing = run("check-config", config=config)
    assert missing.returncode == 2
    assert "registry.storage_path" in missing.stderr and "not a directory" in missing.stderr
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / "scheduler-state.json").write_text("{}")
    proxy = run("check-config", config=config)
    assert proxy.returncode == 2 and "pull-through cache" in proxy.stderr
