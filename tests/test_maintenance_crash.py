"""A GC worker killed with SIGKILL mid-window: a real `regsweep worker -Q gc -c 1`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.harness.images import ImageBuilder
from tests.harness.maintenance import (
    REDIS_URL,
    ProcessRegistry,
    image,
    job_record,
    upload_status,
    write_config,
)
from tests.harness.registry import REGISTRY_BINARY
from worker.maintenance.lock import LockHolder, MaintenanceKeys
from worker.state import JobState, SyncState

REGSWEEP = str(Path(sys.executable).with_name("regsweep"))
KEYS = MaintenanceKeys()
RECOVERY_BUDGET = 60.0


def _wait(condition: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if callable(condition) and condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


@pytest.fixture
def db10() -> Iterator[redis.Redis]:
    """Redis DB 10; every key this test adds (job records, flag, Celery's queues) is deleted."""
    client = redis.Redis.from_url(REDIS_URL)
    before = set(client.keys("*"))
    yield client
    for key in set(client.keys("*")) - before:
        client.delete(key)
    client.close()


class Worker:
    """``regsweep worker -Q gc -c 1`` in a session of its own, logging to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [REGSWEEP, "-c", str(config), "worker", "-Q", "gc", "-c", "1", "--without-heartbeat"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the main process and its pool child at once, as a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()


@pytest.mark.parametrize("victim", ["pool-child", "whole-worker"])
def test_sigkilled_gc_worker_leaves_the_registry_writable_within_a_minute(
    tmp_path: Path, db10: redis.Redis, victim: str
) -> None:
    """SIGKILL the process running GC while the registry is read-only — only the pool child
    (the task is redelivered and recovers) or the whole worker (the restarted worker recovers
    on start): the orphaned GC is killed, the registry writable, the flag cleared and the
    job `interrupted`, well within 60 s."""
    session: dict[str, int] = {}
    started = tmp_path / "gc-started"
    config_rw = tmp_path / "registry" / "config-rw.yml"
    slow_gc = f"touch {started}; sleep 60; {REGISTRY_BINARY} garbage-collect {config_rw}"
    registry = ProcessRegistry.create(tmp_path / "registry", gc_command=slow_gc)
    registry.start()
    config = write_config(tmp_path / "regsweep.yaml", registry)
    workers = [Worker(config, tmp_path / "worker.log")]
    try:
        with ImageBuilder.connect(registry.url) as builder:
            image(builder, "gc/crash", "t", 1)
        enqueued = subprocess.run(
            [REGSWEEP, "-c", str(config), "gc", "--enqueue"],
            capture_output=True,
            text=True,
            check=True,
        )
        job_id = enqueued.stdout.strip()
        _wait(started.exists, 60, "the GC start")
        assert upload_status(registry.url) == 405
        holder = LockHolder.parse(db10.get(KEYS.gc_lock) or b"")
        session.update(json.loads(db10.get(KEYS.gc_session) or b"{}"))
        assert holder.job_id == job_id and session["pid"] > 0
        assert job_record(SyncState(db10), job_id)["state"] == JobState.RUNNING.value

        killed_at = time.monotonic()
        if victim == "pool-child":
            os.kill(holder.owner.pid, signal.SIGKILL)
        else:
            workers[0].kill()
            assert upload_status(registry.url) == 405
            workers.append(Worker(config, tmp_path / "worker.log"))
        _wait(lambda: _writable(registry.url), RECOVERY_BUDGET, "recovery")
        print(f"{victim}: registry writable {time.monotonic() - killed_at:.1f}s after SIGKILL")
        _wait(lambda: db10.get(KEYS.flag) is None, 10, "the flag cleared")
        assert not _running(session["pid"])
        _wait(
            lambda: job_record(SyncState(db10), job_id)["state"] == JobState.INTERRUPTED.value,
            10,
            "the job marked interrupted",
        )
    finally:
        for worker in workers:
            worker.stop()
        registry.stop()
        if _running(session.get("pid", 0)):
            os.killpg(session["pid"], signal.SIGKILL)


def _writable(url: str) -> bool:
    """A write is accepted; refused connections count as "not yet": recovery restarts
    the registry, and the poll may land while its port is closed."""
    try:
        return upload_status(url) == 202
    except httpx.TransportError:
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return pid > 0 and stat.rpartition(")")[2].split()[0] != "Z"
