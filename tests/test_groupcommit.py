"""GroupCommit: who shares a commit, in what order, and who hears of a failure."""

from __future__ import annotations

import asyncio

import pytest

from worker.store.groupcommit import GroupCommit

pytestmark = pytest.mark.anyio


async def test_waiting_items_share_commits_bounded_by_weight() -> None:
    """Items submitted together are committed together, in order, at most ``max_weight``
    per call; an item heavier than the bound alone still goes through."""
    calls: list[list[str]] = []

    async def commit(batch: list[str]) -> list[int]:
        calls.append(batch)
        await asyncio.sleep(0.01)
        return [len(item) for item in batch]

    group: GroupCommit[str, int] = GroupCommit(commit, max_weight=4, weight=len)
    items = ["a", "bb", "c", "dddddd", "e", "f"]
    results = await asyncio.gather(*(group.submit(item) for item in items))
    assert results == [1, 2, 1, 6, 1, 1]
    assert calls == [["a", "bb", "c"], ["dddddd"], ["e", "f"]]
    assert await group.submit("g") == 1  # the committer is started again when idle
    assert calls[-1] == ["g"]


async def test_a_failed_commit_fails_its_items_only() -> None:
    """Every item of the failing call gets the error; items of the next call succeed."""
    attempts = 0

    async def commit(batch: list[int]) -> list[int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("broker away")
        return [item * 10 for item in batch]

    group: GroupCommit[int, int] = GroupCommit(commit)
    first = await asyncio.gather(*(group.submit(i) for i in range(3)), return_exceptions=True)
    assert [str(r) for r in first] == ["broker away"] * 3
    assert await asyncio.gather(*(group.submit(i) for i in range(3))) == [0, 10, 20]


async def test_a_shared_failure_fails_the_items_that_waited_for_it() -> None:
    """With shared_failure, items that arrived while a call failed get its error at once
    instead of a call of their own; without it they get their own call."""
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def commit(batch: list[int]) -> list[int]:
        calls.append(batch)
        await gate.wait()
        raise ConnectionError("down")

    shared: GroupCommit[int, int] = GroupCommit(
        commit, shared_failure=lambda exc: isinstance(exc, ConnectionError)
    )
    first = asyncio.ensure_future(shared.submit(1))
    await asyncio.sleep(0.01)  # the first call is running
    later = [asyncio.ensure_future(shared.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(first, *later, return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert calls == [[1]]
