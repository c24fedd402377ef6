"""Group commit: callers that arrive while a commit is in flight share the next one.

Used where every caller must wait until its item is durable and the durable
step costs far more than one item: the registry hook's dedup claim and broker
publish (``service.ingest``) and the JSONL audit log's write and fsync
(``worker.store.audit``). One commit runs at a time; alone, an item is committed at
once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Hands every waiting item to ``commit`` in one call, which answers one result per
    item, in order. When ``commit`` raises, every item of that call gets the error.

    ``max_weight`` bounds one call by the sum of ``weight(item)`` (a single item is
    always taken, whatever its weight). When ``shared_failure(error)`` says so, the
    items that came while the failing call ran get its error too, without a call of
    their own: a store that is down fails each call only after its timeouts, and
    those items would otherwise wait out a second round of them.
    """

    def __init__(
        self,
        commit: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_weight: int | None = None,
        weight: Callable[[Item], int] = lambda _: 1,
        shared_failure: Callable[[BaseException], bool] = lambda _: False,
    ) -> None:
        self._commit = commit
        self._max_weight = max_weight
        self._weight = weight
        self._shared_failure = shared_failure
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """``item``'s result once the commit that took it has returned."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_waiting())
        return await done

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                # One turn of the loop first: callers already on their way (deliveries
                # read off their sockets, DELETEs just answered) join the batch.
                await asyncio.sleep(0)
                batch = self._take()
                try:
                    results = await self._commit([item for item, _ in batch])
                except BaseException as exc:  # every waiting caller must get an answer
                    if self._shared_failure(exc):
                        batch, self._waiting = batch + self._waiting, []
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for (_, done), result in zip(batch, results, strict=True):
                        if not done.done():  # its caller went away meanwhile
                            done.set_result(result)
        finally:
            # No await between the empty check and this: an item queued after it
            # starts the next committer.
            self._committer = None

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        if self._max_weight is None:
            taken, self._waiting = self._waiting, []
            return taken
        count, total = 0, 0
        for item, _ in self._waiting:
            total += self._weight(item)
            if count and total > self._max_weight:
                break
            count += 1
        taken, self._waiting = self._waiting[:count], self._waiting[count:]
        return taken
