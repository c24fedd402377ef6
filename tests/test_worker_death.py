"""A prune whose worker dies is resumed, and every deletion it planned gets done.

Real parts throughout (tests/harness/workers.py): Debian's 2.8.2 registry behind
a TCP proxy that slows each request, so that a prune is still running when it
is killed, a private ``redis-server``, and ``regsweep worker`` processes
SIGKILLed the way an OOM killer or a lost container would: the whole worker
(then a new one started, as a supervisor would, on this machine or in a PID
namespace of its own) or only the pool process running the prune.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.workers import (
    KEPT,
    REPOSITORY,
    RESUME_DEADLINE,
    Rig,
    deletions,
    kill_mid_prune,
    prune_rig,
    wait_for,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with prune_rig(tmp_path) as made:
        yield made


@pytest.mark.parametrize("victim", ["whole-worker", "restarted-container", "pool-child"])
def test_prune_killed_mid_way_is_resumed_and_finishes_every_deletion(rig: Rig, victim: str) -> None:
    """SIGKILL the worker (then start a new one: on this machine, or in a PID namespace of
    its own as a restarted container, which must wait for the dead worker's liveness key
    and prune lock to expire) or only its pool process while a prune is deleting: the prune
    runs again, every tag the policy drops is gone, the kept ones stay, and the job ends
    succeeded with the interruption on its record."""
    job_id, _ = kill_mid_prune(rig, victim)
    resumed = wait_for(
        lambda: rig.job(job_id)["state"] == "succeeded", RESUME_DEADLINE, "the resumed prune", rig
    )
    print(f"{victim}: prune finished {resumed:.1f}s after the SIGKILL (bench/prune_death.py)")
    assert rig.tags() == KEPT
    record = rig.job(job_id)
    assert record["interruptions"], record
    assert "died" in record["interruptions"][0]


def test_a_busy_repository_waits_in_the_broker_not_in_a_worker_slot(rig: Rig) -> None:
    """Two slots: a prune of one repository is held mid-way (its registry requests hang in
    the proxy); a second prune of it is retried with a countdown, so the other slot is free
    at once for a prune of another repository, which finishes while the first still hangs;
    let go, the first finishes and then the second runs too."""
    rig.worker(concurrency=2)
    slow = rig.enqueue()
    wait_for(lambda: deletions(rig) >= 1, 60, "the slow prune's first deletion", rig)
    rig.proxy.hold(REPOSITORY.encode())
    try:
        again = rig.enqueue()
        other = rig.enqueue("death/other")
        wait_for(lambda: rig.job(other)["state"] == "succeeded", 60, "the other repository", rig)
        assert rig.job(slow)["state"] == "running"
        assert rig.job(again)["state"] == "queued", "the busy prune must wait queued"
        assert rig.tags("death/other") == ["keep"]
    finally:
        rig.proxy.release()
    wait_for(lambda: rig.job(again)["state"] == "succeeded", RESUME_DEADLINE, "the second", rig)
    assert rig.job(slow)["state"] == "succeeded"
    assert rig.tags() == KEPT
