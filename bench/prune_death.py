"""How long a prune whose worker was SIGKILLed takes to resume, and to finish.

    PYTHONPATH=. .venv/bin/python -m bench.prune_death [--kills 3]

Per kill (tests/harness/workers.py): a private Redis, Debian's 2.8.2 registry
behind a proxy that slows the pruned repository's requests (13 deletions take
seconds), a real ``regsweep worker -Q prune,jobs --concurrency 1``; a prune is enqueued and,
after its first deletions, SIGKILLed:

- ``whole-worker``: the worker's process group; a new worker starts on this
  machine (the dead worker's pids are visible: its messages are given back at
  once);
- ``restarted-container``: the same, the new worker in a PID namespace of its
  own, as a restarted container (the dead worker's liveness key and prune lock
  must expire first);
- ``pool-child``: only the pool process running the prune (Celery requeues it).

Resume: from the SIGKILL until the next deletion is audited. Finish: until the
job is ``succeeded``. Target (issue 12): resume under 60 s, every time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.harness.workers import RESUME_DEADLINE, deletions, kill_mid_prune, prune_rig, wait_for

VICTIMS = ("whole-worker", "restarted-container", "pool-child")
TARGET_SECONDS = 60.0


def one(victim: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp, prune_rig(Path(tmp)) as rig:
        job_id, killed = kill_mid_prune(rig, victim)
        done_at_kill = deletions(rig)
        wait_for(lambda: deletions(rig) > done_at_kill, RESUME_DEADLINE, "a deletion", rig)
        resumed = time.monotonic() - killed
        wait_for(lambda: rig.job(job_id)["state"] == "succeeded", RESUME_DEADLINE, "the end", rig)
        return resumed, time.monotonic() - killed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=3, help="per victim")
    args = parser.parse_args()
    print("| victim | kills | resume: median | max | finish: max |")
    print("|---|---:|---:|---:|---:|")
    for victim in VICTIMS:
        runs = [one(victim) for _ in range(args.kills)]
        resumes = [r for r, _ in runs]
        finishes = [f for _, f in runs]
        print(
            f"| {victim} | {len(runs)} | {statistics.median(resumes):.1f} s "
            f"| {max(resumes):.1f} s | {max(finishes):.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
