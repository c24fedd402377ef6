"""GC-worker kills at every point of the maintenance window, and how long recovery takes.

    PYTHONPATH=. .venv/bin/python -m bench.gc_crash [--kills 20] [--victim both]

Per kill: a fresh process-controlled registry (Debian's 2.8.2, restarted by a
script as systemd would), Redis DB 10 (``$REGSWEEP_TEST_REDIS``), and a real
``regsweep worker -Q gc -c 1``. A GC job is enqueued and the worker SIGKILLed
at one point of the window, in turn:

- ``before-readonly``: the flag is set, the window waits for a running prune
  (a prune lock held by this script) before switching;
- ``switching-readonly``: while the read-only restart command runs;
- ``during-gc``: while ``garbage-collect`` runs;
- ``switching-back``: while the read-write restart command runs.

Each switch command takes ``--switch-seconds`` (default 1) before it restarts
the registry, as ``systemctl restart`` or a container recreate does. A kill
counts as recovered once the registry accepts a write, the maintenance flag
is gone and the job is no longer running; the command the dead worker left
running must then be gone, and the registry must still accept writes
``STAY_WRITABLE`` seconds later (else the line says ``LEFT RUNNING`` or
``LEFT READ-ONLY``).

The victim is the whole worker (its process group; a new worker is started
at once, as a supervisor would) or only the pool process running the task
(``--victim``: ``whole-worker``, ``pool-child`` or ``both``, alternating).
Recovery time: from the SIGKILL until the registry accepts a write, the
maintenance flag is gone and the job is no longer running. Target (issue 12):
every one under 30 s. Runs slower than 10 s leave their logs in ``bench/out/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import httpx
import redis

from tests.harness.images import ImageBuilder
from tests.harness.maintenance import (
    KILL_POINTS,
    REDIS_URL,
    ProcessRegistry,
    image,
    marked_registry,
    upload_status,
)
from tests.harness.workers import HEARTBEAT_OFF, REGSWEEP, start_worker
from worker.identity import ProcessIdentity, group_alive
from worker.store.gclock import LockHolder
from worker.store.keys import Keys

KEYS = Keys()
POINTS = KILL_POINTS
#: After a recovery, how long the registry must go on accepting writes.
STAY_WRITABLE = 6.0
TARGET_SECONDS = 30.0
SLOW_SECONDS = 10.0
OUT = Path(__file__).with_name("out")
#: A prune that "runs" through the window's start: the window waits for its lock.
HELD_PRUNE = "regsweep:lock:prune:bench/held"


@dataclass
class Kill:
    point: str
    victim: str
    recovery: float
    state: str


def write_config(path: Path, registry: ProcessRegistry) -> Path:
    s = registry.settings
    document = {
        "registry": {"url": registry.url},
        "redis": {"url": REDIS_URL},
        "policies": [],
        "maintenance": {
            "window": {"cron": "0 3 * * sun", "duration": "2h"},
            "controller": {
                "kind": "process",
                "readonly_command": s.readonly_command,
                "readwrite_command": s.readwrite_command,
                "gc_command": s.gc_command,
                "storage_path": s.storage_path,
            },
        },
    }
    path.write_text(json.dumps(document))
    return path


def wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not happen within {timeout}s")


def writable(url: str) -> bool:
    try:
        return upload_status(url) == 202
    except httpx.TransportError:
        return False


def job_state(client: redis.Redis, job_id: str) -> str:
    raw = client.hget(f"regsweep:job:{job_id}", "state")
    return json.loads(raw) if raw else "missing"


def one_kill(
    point: str, victim: str, root: Path, client: redis.Redis, args_switch_seconds: float
) -> Kill:
    registry = marked_registry(root, switch_seconds=args_switch_seconds)
    os.system(registry.settings.readwrite_command)
    for marker in POINTS:
        (root / marker).unlink(missing_ok=True)
    config = write_config(root / "regsweep.yaml", registry)
    # Each worker after the first appends to the same log.
    gc_worker = partial(start_worker, config, ("gc",), log=root / "worker.log", extra=HEARTBEAT_OFF)
    workers = [gc_worker()]
    try:
        wait(lambda: writable(registry.url), 20, "the registry")
        with ImageBuilder.connect(registry.url) as builder:
            image(builder, "bench/crash", "t", 1)
        if point == "before-readonly":
            holder = json.dumps({"owner": asdict(ProcessIdentity.of()), "nonce": "bench"})
            client.set(HELD_PRUNE, holder, ex=120)
        job_id = subprocess.run(
            [REGSWEEP, "-c", str(config), "gc", "--enqueue"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if point == "before-readonly":
            wait(lambda: client.get(KEYS.maintenance_flag) is not None, 60, "the flag")
        else:
            wait((root / point).exists, 60, point)
        holder_raw = client.get(KEYS.gc_lock) or b""
        session = json.loads(client.get(KEYS.gc_session) or b"{}").get("pid", 0)
        killed = time.monotonic()
        if victim == "pool-child":
            os.kill(LockHolder.parse(holder_raw).owner.pid, signal.SIGKILL)
        else:
            workers[0].kill()
            workers.append(gc_worker())
        client.delete(HELD_PRUNE)

        def recovered() -> bool:
            running = job_state(client, job_id) in ("queued", "running")
            return (
                not running and client.get(KEYS.maintenance_flag) is None and writable(registry.url)
            )

        wait(recovered, 180, "recovery")
        took = time.monotonic() - killed
        # What the dead worker left running must be gone, and the registry stay writable
        # (a read-only switch finishing late would restart it read-only for good).
        left = " LEFT RUNNING" if session and group_alive(session) else ""
        time.sleep(STAY_WRITABLE)
        left += "" if writable(registry.url) else " LEFT READ-ONLY"
        return Kill(point, victim, took, job_state(client, job_id) + left)
    finally:
        for worker in workers:
            worker.stop()
        registry.stop()


def clean(client: redis.Redis) -> None:
    for pattern in ("regsweep:*", "gc", "unacked*", "_kombu.*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--victim", choices=("whole-worker", "pool-child", "both"), default="both")
    parser.add_argument("--points", nargs="+", choices=POINTS, default=list(POINTS))
    parser.add_argument(
        "--switch-seconds",
        type=float,
        default=1.0,
        help="how long each switch command takes before restarting the registry",
    )
    args = parser.parse_args()
    points = tuple(args.points)
    victims = ("whole-worker", "pool-child") if args.victim == "both" else (args.victim,)
    client = redis.Redis.from_url(REDIS_URL)
    OUT.mkdir(exist_ok=True)
    kills: list[Kill] = []
    for n in range(args.kills):
        point, victim = points[n % len(points)], victims[(n // len(points)) % len(victims)]
        clean(client)
        root = Path(tempfile.mkdtemp(prefix="gc-crash-"))
        kill = one_kill(point, victim, root, client, args.switch_seconds)
        kills.append(kill)
        print(f"{n + 1:2d} {point:19s} {victim:12s} {kill.recovery:6.1f}s  job {kill.state}")
        if kill.recovery > SLOW_SECONDS:
            for name in ("worker.log", "registry/registry.log"):
                if (root / name).exists():
                    shutil.copy(root / name, OUT / f"gc-crash-{n + 1}-{name.replace('/', '-')}")
        shutil.rmtree(root, ignore_errors=True)
    clean(client)
    times = [k.recovery for k in kills]
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    over = sum(t > TARGET_SECONDS for t in times)
    left = sum(k.state != "interrupted" for k in kills)
    print()
    print("| kills | median | p90 | max | over 30 s | not interrupted or left behind |")
    print("|---:|---:|---:|---:|---:|---:|")
    cells = [f"{statistics.median(times):.1f} s", f"{p90:.1f} s", f"{max(times):.1f} s"]
    print(f"| {len(times)} | {' | '.join(cells)} | {over} | {left} |")
    for point in POINTS:
        mine = [k.recovery for k in kills if k.point == point]
        if mine:
            print(f"  {point}: max {max(mine):.1f} s over {len(mine)}")


if __name__ == "__main__":
    main()
