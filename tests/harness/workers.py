"""A prune rig: private Redis, a slowed registry, ``regsweep worker`` processes to kill.

Used by tests/test_worker_death.py and bench/prune_death.py. Real parts
throughout: Debian's 2.8.2 registry behind a TCP proxy that slows each request
about :data:`REPOSITORY` (so a prune of its 13 deletions is still running when
it is killed), a private ``redis-server``, and real workers, which may be
started in a PID namespace of their own as a restarted container's would be.
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
from typing import Any, cast

import httpx
import redis
import yaml

from tests.harness import service as h
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from worker.store.locks import holder_of

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
            [
                *unshare,
                REGSWEEP,
                "-c",
                str(self.config),
                "worker",
                "-Q",
                "prune,jobs",
                *args,
                *quiet,
            ],
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
        raw = cast(dict[bytes, bytes], self.redis.hgetall(f"regsweep:job:{job_id}"))
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


@contextlib.contextmanager
def prune_rig(tmp_path: Path) -> Iterator[Rig]:
    """A private Redis, a registry (REPOSITORY slowed by a proxy, death/other not), the
    policy file; every worker started through the rig is SIGKILLed at the end."""
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


def kill_mid_prune(rig: Rig, victim: str) -> tuple[str, float]:
    """Start a worker, enqueue a prune of REPOSITORY, SIGKILL ``victim`` (``whole-worker``,
    ``restarted-container`` or ``pool-child``) after its first deletions, start a new worker
    where the victim was the worker; the job id and when the kill happened."""
    first = rig.worker("-c", "1")
    job_id = rig.enqueue()
    wait_for(lambda: deletions(rig) >= 2, 60, "the first deletions", rig)
    assert rig.job(job_id)["state"] == "running"
    killed = time.monotonic()
    if victim == "pool-child":
        holder = holder_of(rig.redis.get(f"regsweep:lock:prune:{REPOSITORY}") or b"")
        assert holder is not None and holder.pid != first.pid
        os.kill(holder.pid, signal.SIGKILL)
    else:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        rig.worker("-c", "1", namespace=victim == "restarted-container")
    return job_id, killed
