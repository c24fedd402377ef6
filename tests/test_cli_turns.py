"""`regsweep prune` beside the workers: one prune of a repository at a time, whoever starts
it; the maintenance window honoured; a Redis that is down named, never taken for an empty
history. Real `regsweep` processes, a real registry (behind a proxy that can hold a
worker's DELETEs), a private `redis-server` and a real `regsweep worker`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.harness import service as h
from tests.harness.cli import REGSWEEP, audit_records, run, write_config
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.stack import wait_for
from tests.harness.workers import WorkerProcess, start_worker
from worker.registry.client import IMPOSSIBLE_DIGEST

#: The CLI's caches (build times, manifests) are each test's own.
pytestmark = pytest.mark.usefixtures("private_cache")

REPOSITORY = "lk/app"
#: Tags on the kept image's digest: each is removed as a tag only, through a placeholder
#: manifest pushed onto it and then deleted (2.8 cannot delete a tag by name).
SHARED = [f"drop-{i:02d}" for i in range(6)]
POLICY = {
    "name": "turns",
    "repositories": ["lk/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}


@dataclass
class Rig:
    config: Path
    registry: RegistryProcess
    proxy: FaultProxy
    redis: redis.Redis
    root: Path

    def tags(self) -> list[str]:
        with ImageBuilder.connect(self.registry.url) as builder:
            return builder.tags(REPOSITORY)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A private Redis; a registry seen through a proxy; REPOSITORY holding `keep-1` and
    SHARED on the same digest; the policy file (registry through the proxy, that Redis)."""
    server = h.RedisServer(free_port())
    server.start()
    registry = RegistryProcess.create(tmp_path / "registry")
    registry.start()
    proxy = FaultProxy(registry.port).start()
    with ImageBuilder.connect(registry.url) as builder:
        kept = builder.image(REPOSITORY, "keep-1")
        builder.tag(REPOSITORY, kept, *SHARED)
    config = write_config(
        tmp_path / "regsweep.yaml",
        f"http://127.0.0.1:{proxy.port}",
        [POLICY],
        concurrency=2,
        redis_url=server.url,
    )
    client = redis.Redis.from_url(server.url)
    try:
        yield Rig(config, registry, proxy, client, tmp_path)
    finally:
        client.close()
        proxy.stop()
        registry.stop()
        server.stop()


@contextlib.contextmanager
def worker(rig: Rig) -> Iterator[WorkerProcess]:
    """`regsweep worker -Q prune,jobs --concurrency 1` (push prunes and asked-for ones),
    SIGKILLed (with its pool) at the end."""
    made = start_worker(rig.config, ("prune", "jobs"), log=rig.root / "worker.log")
    try:
        yield made
    finally:
        made.kill()


def test_a_cli_prune_waits_for_a_workers_prune_and_never_plans_its_placeholders(
    rig: Rig,
) -> None:
    """While a worker's prune of the repository is mid-way (one of its tags moved onto a
    placeholder manifest, the DELETE of that placeholder held back), `regsweep prune` of the
    same repository waits for the worker's lock, saying so, and plans only after it: it
    neither deletes beside the worker nor plans the worker's in-flight placeholder."""
    with worker(rig):
        # The DELETE of a placeholder, by digest; the probes before it go (the tag's own
        # DELETE, and the DELETE of a digest no content has, which asks if deletes are on).
        placeholder = f"DELETE /v2/{REPOSITORY}/manifests/sha256:".encode()
        rig.proxy.hold(placeholder, unless=IMPOSSIBLE_DIGEST.encode())
        queued = run("prune", REPOSITORY, "--enqueue", config=rig.config)
        assert queued.returncode == 0, queued.stderr
        job_id = queued.stdout.split()[0]
        lock = f"regsweep:lock:prune:{REPOSITORY}".encode()
        wait_for(lambda: rig.redis.exists(lock), timeout=60, what="the worker's prune lock")
        wait_for(lambda: placeholder_tagged(rig), timeout=60, what="a tag on a placeholder")
        errors = (rig.root / "cli.err").open("w+")
        cli = subprocess.Popen(
            [*REGSWEEP, "-c", str(rig.config), "prune", REPOSITORY, "--json"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("REGSWEEP_")},
        )
        try:
            waiting = f"{REPOSITORY}: waiting for the prune that holds it"
            wait_for(lambda: waiting in read(rig.root / "cli.err"), timeout=60, what=waiting)
        finally:
            rig.proxy.release()
        out, _ = cli.communicate(timeout=120)
        errors.close()
        wait_for(lambda: job_state(rig, job_id) == "succeeded", timeout=60, what="the worker")
    assert cli.returncode == 0, read(rig.root / "cli.err")
    (planned,) = json.loads(out)["repositories"]
    assert planned["deletions"] == [], "the CLI planned the worker's work (or its placeholder)"
    cli_job = json.loads(out)["job_id"]
    assert audit_records(rig.config, "--job", cli_job) == [], "the CLI deleted beside the worker"
    assert rig.tags() == ["keep-1"]
    assert len(audit_records(rig.config, "--job", job_id)) == len(SHARED)


def placeholder_tagged(rig: Rig) -> bool:
    """Whether some SHARED tag left the kept digest (it is on the worker's placeholder)."""
    with ImageBuilder.connect(rig.registry.url) as builder:
        kept = builder.head(REPOSITORY, "keep-1")
        for tag in SHARED:
            now = builder.head(REPOSITORY, tag)
            if now is not None and kept is not None and now.digest != kept.digest:
                return True
    return False


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def job_state(rig: Rig, job_id: str) -> str | None:
    raw = rig.redis.hget(f"regsweep:job:{job_id}", "state")
    return None if raw is None else str(json.loads(raw))


def test_a_cli_prune_during_a_maintenance_window_deletes_nothing_and_says_why(
    rig: Rig,
) -> None:
    """With the maintenance flag set (a GC's window), `regsweep prune` deletes nothing and
    exits 1 naming the window's GC job; `--dry-run` still plans (reads only)."""
    rig.redis.set("regsweep:maintenance", "gc-job-7")
    refused = run("prune", REPOSITORY, config=rig.config)
    assert refused.returncode == 1, refused.stderr
    assert f"regsweep: {REPOSITORY}: " in refused.stderr
    assert "a maintenance window is running (GC job gc-job-7)" in refused.stderr
    assert rig.tags() == sorted(["keep-1", *SHARED])
    planned = run("prune", REPOSITORY, "--dry-run", config=rig.config)
    assert planned.returncode == 0, planned.stderr
    assert "drop-00" in planned.stdout


def test_without_redis_the_cli_prune_says_it_takes_no_lock(
    tmp_path: Path, registry: RegistryProcess, repo_name: str
) -> None:
    """Without redis.url, `regsweep prune` says plainly that it takes no lock and sees no
    window (workers need Redis, so none can be pruning beside it; another CLI can)."""
    with ImageBuilder.connect(registry.url) as builder:
        builder.image(repo_name, "keep-1")
    policy = POLICY | {"repositories": ["t/**"]}
    config = write_config(
        tmp_path / "regsweep.yaml", registry.url, [policy], audit_path=tmp_path / "a.jsonl"
    )
    done = run("prune", repo_name, config=config)
    assert done.returncode == 0, done.stderr
    assert "no redis.url: no per-repository lock taken, no maintenance window seen" in done.stderr
    quiet = run("prune", repo_name, "--dry-run", config=config)
    assert "no per-repository lock" not in quiet.stderr


@pytest.mark.parametrize("command", [("plan",), ("prune",), ("prune", "--dry-run")])
def test_plan_and_prune_with_redis_down_exit_1_naming_it(
    tmp_path: Path, registry: RegistryProcess, repo_name: str, command: tuple[str, ...]
) -> None:
    """With redis.url set and no Redis answering there, `plan` and `prune` exit 1 naming
    that Redis (without its password), rather than planning without the history the
    workers keep (and saying "no repository matches a policy")."""
    with ImageBuilder.connect(registry.url) as builder:
        builder.image(repo_name, "v1")
    port = free_port()
    config = write_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [POLICY | {"repositories": ["t/**"]}],
        redis_url=f"redis://:s3cret-pw@127.0.0.1:{port}/3",
    )
    result = run(*command, config=config)
    assert result.returncode == 1, result.stdout
    assert f"regsweep: cannot reach Redis at redis://127.0.0.1:{port}/3" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "no repository matches" not in result.stdout
    assert "Traceback" not in result.stderr
