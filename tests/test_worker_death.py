"""A prune whose worker dies is resumed, and every deletion it planned gets done.

Real parts throughout: Debian's 2.8.2 registry (behind a TCP proxy that slows
each request, so that a prune is still running when it is killed), a private
``redis-server``, and ``regsweep worker`` processes SIGKILLed the way an OOM
killer or a lost container would: the whole worker (then a new one started,
as a supervisor would) or only the pool process running the prune.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from tests.harness import service as h
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from worker.prunelock import holder_of

REGSWEEP = str(Path(sys.executable).with_name("regsweep"))
REPOSITORY = "death/app"
KEPT = ["keep-a", "keep-b", "keep-c"]
TAGS = [*(f"drop-{i:02d}" for i in range(13)), *KEPT]
#: Each request to the registry about REPOSITORY waits this long in the proxy: a prune
#: of its 13 deletions then takes seconds, long enough to be killed in the middle.
SLOW = 0.08
RESUME_DEADLINE = 90.0


@dataclass
class Rig:
    root: Path
    config: Path
    registry: RegistryProcess
    proxy: FaultProxy
    redis: redis.Redis
    workers: list[subprocess.Popen[bytes]]

    def worker(self, *args: str, namespace: bool = False) -> subprocess.Popen[bytes]:
        """A worker; with ``namespace``, in a PID namespace of its own, as a restarted
        container's would be (it cannot see its predecessor's pids)."""
        log = (self.root / "worker.log").open("ab")
        unshare = ["unshare", "--pid", "--fork", "--mount-proc"] if namespace else []
        quiet = ["--without-heartbeat", "--without-mingle", "--without-gossip"]
        proc = subprocess.Popen(
            [*unshare, REGSWEEP, "-c", str(self.config), "worker", "-Q", "prune", *args, *quiet],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def enqueue(self, repository: str = REPOSITORY) -> str:
        done = subprocess.run(
            [REGSWEEP, "-c", str(self.config), "prune", repository, "--enqueue"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()[0]

    def job(self, job_id: str) -> dict[str, Any]:
        raw = self.redis.hgetall(f"regsweep:job:{job_id}")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def tags(self, repository: str = REPOSITORY) -> list[str]:
        response = httpx.get(f"{self.registry.url}/v2/{repository}/tags/list", timeout=10)
        return sorted(response.json().get("tags") or [])

    def log(self) -> str:
        return (self.root / "worker.log").read_text(errors="replace")[-4000:]


def wait_for(condition: Any, timeout: float, what: str, rig: Rig) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s\n{rig.log()}")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    server = h.RedisServer(free_port())
    server.start()
    registry = RegistryProcess.create(tmp_path / "registry")
    registry.start()
    proxy = FaultProxy(registry.port, delay=SLOW, slow=REPOSITORY.encode()).start()
    with ImageBuilder.connect(registry.url) as builder:
        for tag in TAGS:
            builder.image(REPOSITORY, tag)
        builder.image("death/other", "keep")
        builder.image("death/other", "drop")
    config = tmp_path / "regsweep.yaml"
    policies = [
        {
            "name": "death",
            "repositories": [REPOSITORY],
            "mode": "enforce",
            "keep": [{"tags": ["keep-*"]}],
        },
        {
            "name": "other",
            "repositories": ["death/other"],
            "mode": "enforce",
            "keep": [{"tags": ["keep"]}],
        },
    ]
    document = {
        "registry": {"url": f"http://127.0.0.1:{proxy.port}", "concurrency": 2},
        "redis": {"url": server.url},
        "policies": policies,
    }
    config.write_text(yaml.safe_dump(document))
    client = redis.Redis.from_url(server.url)
    made = Rig(tmp_path, config, registry, proxy, client, [])
    try:
        yield made
    finally:
        for proc in made.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.close()
        proxy.stop()
        registry.stop()
        server.stop()


def deletions(rig: Rig) -> int:
    return int(rig.redis.xlen("regsweep:audit"))


@pytest.mark.parametrize("victim", ["whole-worker", "restarted-container", "pool-child"])
def test_prune_killed_mid_way_is_resumed_and_finishes_every_deletion(rig: Rig, victim: str) -> None:
    """SIGKILL the worker (then start a new one: on this machine, or in a PID namespace of
    its own as a restarted container, which must wait for the dead worker's liveness key
    and prune lock to expire) or only its pool process while a prune is deleting: the prune
    runs again, every tag the policy drops is gone, the kept ones stay, and the job ends
    succeeded with the interruption on its record."""
    first = rig.worker("-c", "1")
    job_id = rig.enqueue()
    wait_for(lambda: deletions(rig) >= 2, 60, "the first deletions", rig)
    assert rig.job(job_id)["state"] == "running"
    if victim != "pool-child":
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        rig.worker("-c", "1", namespace=victim == "restarted-container")
    else:
        holder = holder_of(rig.redis.get(f"regsweep:lock:prune:{REPOSITORY}") or b"")
        assert holder is not None and holder.pid != first.pid
        os.kill(holder.pid, signal.SIGKILL)
    resumed = wait_for(
        lambda: rig.job(job_id)["state"] == "succeeded", RESUME_DEADLINE, "the resumed prune", rig
    )
    print(f"{victim}: prune finished {resumed:.1f}s after the SIGKILL")
    assert rig.tags() == KEPT
    record = rig.job(job_id)
    assert record["interruptions"], record
    assert "died" in record["interruptions"][0]


def test_a_busy_repository_waits_in_the_broker_not_in_a_worker_slot(rig: Rig) -> None:
    """Two slots: a slow prune holds one repository; a second prune of it is retried with a
    countdown, so the other slot is free at once for a prune of another repository, which
    finishes while the first is still deleting; then the second runs too."""
    rig.proxy.delay = 0.25  # the slow prune now takes well over ten seconds
    rig.worker("-c", "2")
    slow = rig.enqueue()
    wait_for(lambda: deletions(rig) >= 1, 60, "the slow prune's first deletion", rig)
    again = rig.enqueue()
    other = rig.enqueue("death/other")
    wait_for(lambda: rig.job(other)["state"] == "succeeded", 60, "the other repository", rig)
    assert rig.job(slow)["state"] == "running", "the other prune waited for the slow one"
    assert rig.tags("death/other") == ["keep"]
    wait_for(lambda: rig.job(again)["state"] == "succeeded", RESUME_DEADLINE, "the second", rig)
    assert rig.job(slow)["state"] == "succeeded"
    assert rig.tags() == KEPT
