"""How tests and benches run the worker: :func:`start_worker` (a real ``regsweep worker``
process, the one way they start one), :func:`tasks_in_process` (its task code in this
process), and a prune rig to kill workers in.

The prune rig (tests/test_worker_death.py, bench/prune_death.py): Debian's 2.8.2
registry behind a TCP proxy that slows each request about :data:`REPOSITORY` (so a
prune of its 13 deletions is still running when it is killed), a private
``redis-server``, and real workers, which may be started in a PID namespace of their
own as a restarted container's would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import httpx
import redis
import yaml

from tests.harness import service as h
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess, free_port
from worker.queue import tasks
from worker.queue.celery_app import make_celery
from worker.settings.model import Config
from worker.store.locks import holder_of

REGSWEEP = str(Path(sys.executable).with_name("regsweep"))
#: Celery's chatter between workers turned off: no heartbeats, no start-up sync, no gossip.
QUIET = ("--without-heartbeat", "--without-mingle", "--without-gossip")
#: Only heartbeats off: what the GC workers of the maintenance tests and bench run with.
HEARTBEAT_OFF = ("--without-heartbeat",)
#: Celery logs ``celery@<host> ready.`` once the worker consumes its queues.
#: Runs a command as root without the capabilities that let root read what file modes forbid
#: (``setpriv``, util-linux): a storage file ``chmod 000`` is then unreadable to it, as to a
#: regsweep that runs as another user than the registry.
WITHOUT_ROOTS_READS = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
)
READY_LINE = "ready."
READY_TIMEOUT = 60.0
#: How long :meth:`WorkerProcess.stop` waits for a warm shutdown before SIGKILL.
STOP_TIMEOUT = 20.0


@dataclass
class WorkerProcess:
    """A ``regsweep worker`` started by :func:`start_worker`, in a session of its own,
    appending its output to ``log_path`` (from byte ``log_start`` on)."""

    proc: subprocess.Popen[bytes]
    queues: tuple[str, ...]
    log_path: Path
    log_start: int
    namespace: bool
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        """The pid of the process started (``unshare`` when in a namespace of its own)."""
        return self.proc.pid

    def log(self) -> str:
        """What this worker wrote to its log (not what others appended before it)."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until this worker's own ``ready.`` line is in its log; its log tail if not."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                ended = f"exited {self.proc.returncode}" if self.proc.poll() is not None else ""
                raise AssertionError(
                    f"worker {self.pid} ({','.join(self.queues) or 'every queue'}) not ready "
                    f"within {timeout}s {ended}\n{self.log()[-4000:]}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole session (main process, pool, what they ran) at once, as a lost
        machine would. Once only: a session's id may be another's later."""
        if self._log.closed:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the worker's main process (Celery's warm shutdown), then :meth:`kill`:
        whatever is left of the session goes too."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._main_pid(), signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.kill()

    def _main_pid(self) -> int:
        # In a namespace of its own the worker is unshare's child; unshare ignores SIGTERM.
        if not self.namespace:
            return self.proc.pid
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(children.read_text().split()[0])
        return self.proc.pid


def start_worker(
    config: Path | str,
    queues: Sequence[str] = (),
    *,
    log: Path,
    concurrency: int = 1,
    extra: Sequence[str] = QUIET,
    namespace: bool = False,
    env: Mapping[str, str] | None = None,
    no_read_override: bool = False,
) -> WorkerProcess:
    """``regsweep -c CONFIG worker [-Q QUEUES] --concurrency N EXTRA...`` (every queue when
    ``queues`` is empty), appending to ``log``; with ``namespace``, in a PID namespace of its
    own, as a restarted container's would be (it cannot see its predecessor's pids); with
    ``no_read_override``, without root's power to read what file modes forbid (as a worker
    running as another user than the registry). It is not waited for:
    :meth:`WorkerProcess.wait_ready`."""
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"] if namespace else []
    setpriv = list(WITHOUT_ROOTS_READS) if no_read_override else []
    selected = ["-Q", ",".join(queues)] if queues else []
    argv = [*setpriv, *unshare, REGSWEEP, "-c", str(config), "worker", *selected]
    out = log.open("ab")
    proc = subprocess.Popen(
        [*argv, "--concurrency", str(concurrency), *extra],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        start_new_session=True,
    )
    return WorkerProcess(proc, tuple(queues), log, out.tell(), namespace, out)


@contextlib.contextmanager
def tasks_in_process(config: Config) -> Iterator[None]:
    """The worker's tasks run in this process (``task.apply``, ``tasks.run``) against
    ``config``: its Celery app made, its per-process clients closed at the end."""
    make_celery(config)
    try:
        yield
    finally:
        tasks._close_clients()


PRUNE_QUEUES = ("prune", "jobs")
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
    workers: list[WorkerProcess]

    def worker(self, concurrency: int, *, namespace: bool = False) -> WorkerProcess:
        """A worker on queues prune and jobs, logging to ``worker.log``; see
        :func:`start_worker` for ``namespace``."""
        log = self.root / "worker.log"
        made = start_worker(
            self.config, PRUNE_QUEUES, log=log, concurrency=concurrency, namespace=namespace
        )
        self.workers.append(made)
        return made

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
        for worker in made.workers:
            worker.kill()
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
    first = rig.worker(concurrency=1)
    job_id = rig.enqueue()
    wait_for(lambda: deletions(rig) >= 2, 60, "the first deletions", rig)
    assert rig.job(job_id)["state"] == "running"
    killed = time.monotonic()
    if victim == "pool-child":
        holder = holder_of(rig.redis.get(f"regsweep:lock:prune:{REPOSITORY}") or b"")
        assert holder is not None and holder.pid != first.pid
        os.kill(holder.pid, signal.SIGKILL)
    else:
        first.kill()
        rig.worker(concurrency=1, namespace=victim == "restarted-container")
    return job_id, killed
