"""A GC worker SIGKILLed at each point of the window: a real `regsweep worker -Q gc -c 1`, on
2.8.2 at every point, on 3.x where the registry itself is in play (during GC and while it is
switched back)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis

from tests.harness.images import ImageBuilder
from tests.harness.maintenance import (
    KILL_POINTS,
    REDIS_URL,
    image,
    job_record,
    marked_registry,
    upload_status,
    write_config,
)
from tests.harness.registry import DISTRIBUTION_2, RegistryBinary
from tests.harness.workers import HEARTBEAT_OFF, REGSWEEP, start_worker
from worker.identity import ProcessIdentity, group_alive
from worker.store.gclock import LockHolder
from worker.store.keys import Keys
from worker.store.state import JobState, SyncState

KEYS = Keys()
#: The deadline a recovery is waited for; bench/gc_crash.py measures the times (< 30 s).
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


@pytest.mark.parametrize("victim", ["pool-child", "whole-worker"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkilled_gc_worker_leaves_the_registry_writable(
    tmp_path: Path, db10: redis.Redis, victim: str, point: str
) -> None:
    """SIGKILL the process running GC at each point of the window — waiting for a prune
    before the switch, while the read-only switch command runs, during GC, while the switch
    back runs — either the pool child (the task is redelivered and recovers) or the whole
    worker (the restarted worker recovers on start): the registry accepts writes again, the
    command the dead worker left running (GC or switch) is killed, so it cannot sweep or
    switch the registry read-only behind the recovery, the flag is cleared and the job is
    `interrupted`."""
    _kill_and_recover(tmp_path, db10, victim, point, DISTRIBUTION_2)


# 3.x once, where its own binary runs under the dead worker: its GC, orphaned mid-sweep.
# Every other point only waits on Redis and on the switch commands, which restart 3.x as
# they restart 2.8 (the window's full cycle on 3.x switches it both ways); the whole
# worker, because its recovery on start is the longer path (a pool child's redelivery is
# version-blind). One run costs about 10 s.
def test_sigkilled_gc_worker_on_3x_leaves_the_registry_writable(
    tmp_path: Path, db10: redis.Redis, registry_binary_3: RegistryBinary
) -> None:
    """The same on distribution 3.x: a worker SIGKILLed while 3.x's GC sweeps is recovered
    on the next start: 3.x accepts writes, the orphaned GC is killed (it cannot sweep behind
    the recovery), the flag cleared, the job `interrupted`."""
    _kill_and_recover(tmp_path, db10, "whole-worker", "during-gc", registry_binary_3)


def _kill_and_recover(
    tmp_path: Path, db10: redis.Redis, victim: str, point: str, binary: RegistryBinary
) -> None:
    registry = marked_registry(tmp_path, binary=binary)
    os.system(registry.settings.readwrite_command)
    for marker in KILL_POINTS:
        (tmp_path / marker).unlink(missing_ok=True)
    config = write_config(tmp_path / "regsweep.yaml", registry)
    # Each worker after the first appends to the same log.
    gc_worker = partial(
        start_worker, config, ("gc",), log=tmp_path / "worker.log", extra=HEARTBEAT_OFF
    )
    workers = [gc_worker()]
    session: dict[str, int] = {}
    try:
        _wait(lambda: _writable(registry.url), 20, "the registry")
        with ImageBuilder.connect(registry.url) as builder:
            image(builder, "gc/crash", "t", 1)
        if point == "before-readonly":
            # A prune still running when the window starts: the window waits for it.
            owner = {"owner": asdict(ProcessIdentity.of()), "nonce": "test"}
            db10.set(f"{KEYS.prefix}lock:prune:gc/held", json.dumps(owner), ex=120)
        job_id = _enqueue(config)
        if point == "before-readonly":
            _wait(lambda: db10.get(KEYS.maintenance_flag) is not None, 60, "the flag")
        else:
            _wait((tmp_path / point).exists, 60, point)
        holder = LockHolder.parse(db10.get(KEYS.gc_lock) or b"")
        assert holder.job_id == job_id
        assert job_record(SyncState(db10), job_id)["state"] == JobState.RUNNING.value
        session.update(json.loads(db10.get(KEYS.gc_session) or b"{}"))

        killed_at = time.monotonic()
        if victim == "pool-child":
            os.kill(holder.owner.pid, signal.SIGKILL)
        else:
            workers[0].kill()
            workers.append(gc_worker())
        _wait(lambda: _recovered(db10, registry.url, job_id), RECOVERY_BUDGET, "recovery")
        print(f"{point}, {victim}: recovered {time.monotonic() - killed_at:.1f}s after SIGKILL")
        assert job_record(SyncState(db10), job_id)["state"] == JobState.INTERRUPTED.value
        if point != "before-readonly":  # nothing of the window runs yet there
            assert session.get("pid"), "the running command's session was not recorded"
            assert not group_alive(session["pid"]), "the dead worker's command still runs"
        assert _writable(registry.url)
    finally:
        for worker in workers:
            worker.stop(timeout=15)
        registry.stop()
        if session.get("pid") and group_alive(session["pid"]):
            os.killpg(session["pid"], signal.SIGKILL)


def _enqueue(config: Path) -> str:
    enqueued = subprocess.run(
        [REGSWEEP, "-c", str(config), "gc", "--enqueue"],
        capture_output=True,
        text=True,
        check=True,
    )
    return enqueued.stdout.strip()


def _recovered(client: redis.Redis, url: str, job_id: str) -> bool:
    """Writes accepted, the flag gone and the job no longer running."""
    state = job_record(SyncState(client), job_id)["state"]
    if state in (JobState.QUEUED.value, JobState.RUNNING.value):
        return False
    return client.get(KEYS.maintenance_flag) is None and _writable(url)


def _writable(url: str) -> bool:
    """A write is accepted; refused connections count as "not yet": recovery restarts
    the registry, and the poll may land while its port is closed."""
    try:
        return upload_status(url) == 202
    except httpx.TransportError:
        return False
