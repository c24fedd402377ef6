"""A policy file edited under running workers and beat takes effect between tasks, is refused
while it does not load, and ``regsweep status`` shows the digest each process runs: a real
``regsweep worker`` and ``regsweep beat``, the real 2.8.2 registry, a private Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import yaml

from tests.harness import service as h
from tests.harness import stack
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.workers import REGSWEEP, start_worker
from worker.settings.load import load_config

T = TypeVar("T")
REPOSITORY = "reload/app"


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    return stack.wait_for(condition, timeout, what=what)


@dataclass
class Rig:
    root: Path
    policy: Path
    registry: RegistryProcess
    redis: redis.Redis
    redis_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``regsweep ARGS`` (beat: the worker is :func:`start_worker`'s), logging to
        ``NAME.log``."""
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [REGSWEEP, "-c", str(self.policy), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def regsweep(self, *args: str) -> str:
        """The CLI, on a policy file of its own: the workers' may be broken on purpose."""
        done = subprocess.run(
            [REGSWEEP, "-c", str(self.root / "cli.yaml"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def job(self, job_id: str) -> dict[str, Any]:
        raw: dict[bytes, bytes] = self.redis.hgetall(f"regsweep:job:{job_id}")  # type: ignore[assignment]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def finished(self, job_id: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job.get("state") in ("succeeded", "failed") else None

        return wait_for(done, f"job {job_id} finished\n{self.log('worker')[-3000:]}")

    def tags(self) -> list[str]:
        response = httpx.get(f"{self.registry.url}/v2/{REPOSITORY}/tags/list", timeout=10)
        return sorted(response.json().get("tags") or [])

    def processes_reported(self) -> list[dict[str, Any]]:
        status = json.loads(self.regsweep("status", "--json"))
        return list(status["processes"])


def policy(registry_url: str, redis_url: str, mode: str, keep: list[str]) -> dict[str, Any]:
    return {
        "registry": {"url": registry_url},
        "redis": {"url": redis_url},
        "sweep": {"every": "6h"},
        "policies": [
            {
                "name": "reload",
                "repositories": ["reload/**"],
                "mode": mode,
                "keep": [{"tags": keep}],
            }
        ],
    }


def edit(path: Path, document: dict[str, Any] | str) -> None:
    """Rewrite the file in place (the same inode, as a bind mount shows it)."""
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    with path.open("r+") as fh:
        fh.truncate(0)
        fh.write(text)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("reload")
    server = h.RedisServer(free_port())
    server.start()
    registry = RegistryProcess.create(root / "registry")
    registry.start()
    with ImageBuilder.connect(registry.url) as builder:
        for tag in ("keep", "d1", "d2"):
            builder.image(REPOSITORY, tag)
    path = root / "regsweep.yaml"
    path.write_text(yaml.safe_dump(policy(registry.url, server.url, "dry-run", ["keep"])))
    (root / "cli.yaml").write_text(path.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")}
    made = Rig(root, path, registry, redis.Redis.from_url(server.url), server.url, env)
    worker = start_worker(path, ("prune", "jobs"), log=root / "worker.log", env=env)
    try:
        worker.wait_ready()
        yield made
    finally:
        worker.kill()
        for proc in made.processes:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        made.redis.close()
        registry.stop()
        server.stop()


def test_an_edited_policy_takes_effect_at_the_next_task_and_status_shows_it(rig: Rig) -> None:
    """dry-run, then the file edited in place to enforce: the running worker's next prune
    enforces (the change logged), and status shows the worker on the file's new digest (and
    the queues no worker reporting takes)."""
    first = rig.finished(rig.regsweep("prune", REPOSITORY, "--enqueue").split()[0])
    assert first["mode"] == "dry-run" and first["executed"] is False
    assert rig.tags() == ["d1", "d2", "keep"]
    dry_digest = load_config(rig.policy).digest
    assert _digests(rig, "worker") == [dry_digest]
    text = rig.regsweep("status")
    assert f"(jobs,prune)  policy {dry_digest}" in text
    assert "events 0 (no worker reporting takes it), prune 0, jobs 0, gc 0" in text

    edit(rig.policy, policy(rig.registry.url, rig.redis_url, "enforce", ["keep", "d2"]))
    second = rig.finished(rig.regsweep("prune", REPOSITORY, "--enqueue").split()[0])
    assert second["mode"] == "enforce" and second["counts"]["deleted"] == 1, second
    assert rig.tags() == ["d2", "keep"]
    assert f"changed ({dry_digest} -> " in rig.log("worker")
    enforce_digest = load_config(rig.policy).digest
    wait_for(lambda: _digests(rig, "worker") == [enforce_digest], "status: the new digest", 45)


def test_a_policy_that_does_not_load_holds_the_tasks_until_it_does(rig: Rig) -> None:
    """The file broken mid-edit: a prune queued meanwhile is held, its job still queued,
    rather than run on the policy the file no longer holds; fixed, the prune runs on the
    fixed policy (which keeps d2: the held one would have deleted it)."""
    edit(rig.policy, policy(rig.registry.url, rig.redis_url, "enforce", ["keep"]))
    edit(rig.policy, "policies:\n  - name: [\n")
    job_id = rig.regsweep("prune", REPOSITORY, "--enqueue").split()[0]
    wait_for(lambda: "changed and does not load" in rig.log("worker"), "the refusal logged")
    assert rig.job(job_id)["state"] == "queued"
    edit(rig.policy, policy(rig.registry.url, rig.redis_url, "enforce", ["keep", "d2"]))
    job = rig.finished(job_id)
    assert job["state"] == "succeeded" and job["counts"].get("deleted", 0) == 0, job
    assert rig.tags() == ["d2", "keep"]


def test_beat_follows_a_changed_schedule(rig: Rig) -> None:
    """beat started with a 6h sweep sends none; the file edited to sweep every 2s, the
    running beat merges it and sends sweeps (the worker runs them), and reports the new
    digest."""
    document = policy(rig.registry.url, rig.redis_url, "enforce", ["keep", "d2"])
    edit(rig.policy, document)
    rig.start("beat", "beat", "-s", str(rig.root / "celerybeat-schedule"))
    wait_for(lambda: _digests(rig, "beat"), "beat reported")
    assert rig.redis.get("regsweep:jobs:newest:sweep") is None
    edit(rig.policy, document | {"sweep": {"every": "2s"}})
    wait_for(lambda: rig.redis.get("regsweep:jobs:newest:sweep"), "beat sent a sweep")
    digest = load_config(rig.policy).digest
    wait_for(lambda: _digests(rig, "beat") == [digest], "status: beat's new digest", 45)


def _digests(rig: Rig, role: str) -> list[str]:
    return [p["policy"] for p in rig.processes_reported() if p["role"] == role]
