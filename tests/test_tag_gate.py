"""TagWriteGate: a placeholder PUT never overlaps a DELETE by digest of the same repository."""

from __future__ import annotations

import asyncio

import pytest

from worker.registry.client import TagWriteGate

pytestmark = pytest.mark.anyio


async def test_a_tag_write_waits_for_deletes_in_flight_and_holds_new_ones_back() -> None:
    """The write starts only once both DELETEs in flight ended; a DELETE that arrives while the
    write waits goes after it; two DELETEs share the gate."""
    gate = TagWriteGate()
    events: list[str] = []
    release = [asyncio.Event() for _ in range(2)]

    async def delete(name: str, until: asyncio.Event | None) -> None:
        async with gate.deleting():
            events.append(f"{name} in")
            if until is not None:
                await until.wait()
            events.append(f"{name} out")

    async def write() -> None:
        async with gate.writing_tag():
            events.append("write")

    first = [asyncio.create_task(delete(f"d{n}", release[n])) for n in range(2)]
    await asyncio.sleep(0)
    writer = asyncio.create_task(write())
    await asyncio.sleep(0)
    late = asyncio.create_task(delete("late", None))
    await asyncio.sleep(0)
    assert events == ["d0 in", "d1 in"]
    release[0].set()
    await asyncio.sleep(0)
    assert "write" not in events
    release[1].set()
    await asyncio.gather(*first, writer, late)
    assert events.index("write") > events.index("d1 out")
    assert events.index("late in") > events.index("write")


async def test_a_failed_write_releases_the_gate() -> None:
    """A write finishing with an error releases the gate for the DELETEs waiting behind it."""
    gate = TagWriteGate()

    async def failing_write() -> None:
        async with gate.writing_tag():
            raise RuntimeError("PUT refused")

    with pytest.raises(RuntimeError):
        await failing_write()
    async with asyncio.timeout(5), gate.deleting():
        pass
    async with asyncio.timeout(5), gate.writing_tag():
        pass
