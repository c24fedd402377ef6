"""Redis losing its data (restarted without persistence) loses neither restore nor the holds a
restore made, when ``audit.path`` keeps the audit in a file too; and ``check-config
--online`` warns about a Redis that persists nothing. The real 2.8.2 registry, a real
``redis-server`` restarted empty, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.app import create_app
from tests.harness import service as h
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.sinks import RedisListSink
from tests.harness.workers import REGSWEEP
from tests.test_dashboard import csrf_of, sign_in
from worker.settings.load import load_config

REPOSITORY = "loss/app"
DASHBOARD_TOKEN = "dashboard-admin-Zr4"


@dataclass
class Rig:
    root: Path
    registry: RegistryProcess
    redis: h.RedisServer
    env: dict[str, str]
    dropped: str

    def policy(self, *, mirrored: bool) -> Path:
        document: dict[str, Any] = {
            "registry": {"url": self.registry.url},
            "redis": {"url": self.redis.url},
            "policies": [
                {
                    "name": "loss",
                    "repositories": [REPOSITORY],
                    "mode": "enforce",
                    "keep": [{"tags": ["keep"]}],
                }
            ],
        }
        if mirrored:
            document["audit"] = {"path": "regsweep-audit.jsonl"}
        path = self.root / ("mirrored.yaml" if mirrored else "redis-only.yaml")
        path.write_text(yaml.safe_dump(document))
        return path

    def regsweep(self, policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [REGSWEEP, "-c", str(policy), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def tags(self) -> list[str]:
        response = httpx.get(f"{self.registry.url}/v2/{REPOSITORY}/tags/list", timeout=10)
        return sorted(response.json().get("tags") or [])

    def redis_lost(self) -> None:
        """Redis restarted without persistence: it comes back empty."""
        self.redis.stop()
        self.redis.start()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    server = h.RedisServer(free_port())
    server.start()
    registry = RegistryProcess.create(tmp_path / "registry")
    registry.start()
    with ImageBuilder.connect(registry.url) as builder:
        builder.image(REPOSITORY, "keep")
        dropped = builder.image(REPOSITORY, "drop").digest
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    try:
        yield Rig(tmp_path, registry, server, env, dropped)
    finally:
        registry.stop()
        server.stop()


def test_restore_and_its_hold_outlive_a_redis_that_lost_everything(rig: Rig) -> None:
    """A deletion audited with audit.path set: Redis restarts empty, restore still puts the
    tag back (from the file); Redis restarts empty again, the restore's hold is rebuilt
    from the file, so the next plan keeps the tag and the next prune leaves it."""
    policy = rig.policy(mirrored=True)
    assert rig.regsweep(policy, "prune", REPOSITORY).returncode == 0
    assert rig.tags() == ["keep"]
    rig.redis_lost()

    restored = rig.regsweep(policy, "restore", REPOSITORY, rig.dropped[:19])
    assert restored.returncode == 0, restored.stderr
    assert rig.tags() == ["drop", "keep"]
    rig.redis_lost()

    planned = rig.regsweep(policy, "plan", REPOSITORY, "--json")
    assert planned.returncode == 0, planned.stderr
    [plan] = json.loads(planned.stdout)
    assert plan["deletions"] == [], plan
    assert rig.regsweep(policy, "prune", REPOSITORY).returncode == 0
    assert rig.tags() == ["drop", "keep"]
    held = rig.regsweep(policy, "status")
    assert f"{REPOSITORY}:drop until" in held.stdout, held.stdout


def test_without_the_file_a_redis_that_lost_everything_cannot_restore(rig: Rig) -> None:
    """The same loss with the audit only in Redis: restore finds nothing, as docs say."""
    policy = rig.policy(mirrored=False)
    assert rig.regsweep(policy, "prune", REPOSITORY).returncode == 0
    rig.redis_lost()
    restored = rig.regsweep(policy, "restore", REPOSITORY, rig.dropped[:19])
    assert restored.returncode == 1
    assert "the audit has no deletion" in restored.stderr


def test_check_config_online_warns_about_a_redis_that_persists_nothing(
    rig: Rig, tmp_path: Path
) -> None:
    """A Redis without an append-only file or snapshots is a warning (the check still passes);
    one with appendonly yes is ok."""
    policy = rig.policy(mirrored=True)
    checked = rig.regsweep(policy, "check-config", "--online", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    [redis_check] = [c for c in json.loads(checked.stdout)["checks"] if c["check"] == "redis"]
    assert redis_check["status"] == "warn"
    assert "persists nothing" in redis_check["detail"] and "appendonly" in redis_check["hint"]

    rig.redis.stop()
    rig.redis.data_dir = tmp_path / "redis-data"
    rig.redis.start()
    checked = rig.regsweep(policy, "check-config", "--online", "--json")
    [redis_check] = [c for c in json.loads(checked.stdout)["checks"] if c["check"] == "redis"]
    assert redis_check["status"] == "ok", redis_check


def test_a_hold_set_on_the_dashboard_outlives_a_redis_that_lost_everything(rig: Rig) -> None:
    """A hold an admin sets on the dashboard is mirrored to the audit file like the CLI's:
    Redis restarts empty, the hold is rebuilt from the file, and the next prune keeps the
    held tag the policy would delete."""
    policy = rig.policy(mirrored=True)
    document = yaml.safe_load(policy.read_text())
    document["hooks"] = {"api_token_env": "RT_DASHBOARD_TOKEN"}
    policy.write_text(yaml.safe_dump(document))
    config = load_config(policy, {"RT_DASHBOARD_TOKEN": DASHBOARD_TOKEN})
    sink = RedisListSink.from_url(rig.redis.url)
    with h.running(create_app(config, sink=sink)) as url, httpx.Client(base_url=url) as http:
        sign_in(http, DASHBOARD_TOKEN)
        form = {"csrf": csrf_of(http.get("/ui/")), "repository": REPOSITORY, "tag": "drop"}
        assert http.post("/ui/actions/hold", data=form | {"days": "3"}).status_code == 303
    assert f"{REPOSITORY}:drop until" in rig.regsweep(policy, "status").stdout
    rig.redis_lost()

    pruned = rig.regsweep(policy, "prune", REPOSITORY)
    assert pruned.returncode == 0, pruned.stderr
    assert rig.tags() == ["drop", "keep"]


def test_restore_after_a_redis_loss_puts_back_the_tags_of_deletions_on_both_sides_of_it(
    rig: Rig,
) -> None:
    """The image lost tag ``drop`` to a prune before Redis restarted empty (that record is in
    the file only) and, pushed again as ``again``, lost that tag to a prune after (in Redis
    and the file): a restore of the digest puts back both tags, as it does without a loss."""
    policy = rig.policy(mirrored=True)
    with ImageBuilder.connect(rig.registry.url) as builder:
        raw, media_type = builder.manifest(REPOSITORY, "drop")
        assert rig.regsweep(policy, "prune", REPOSITORY).returncode == 0
        rig.redis_lost()
        builder.put_manifest(REPOSITORY, "again", raw, media_type)
        assert rig.regsweep(policy, "prune", REPOSITORY).returncode == 0
    assert rig.tags() == ["keep"]

    restored = rig.regsweep(policy, "restore", REPOSITORY, rig.dropped[:19])
    assert restored.returncode == 0, restored.stderr
    assert rig.tags() == ["again", "drop", "keep"]
