"""This worker process's event loop and clients, made once, and how a task's work runs on them.

:func:`run` runs a coroutine factory on the loop (then flushes the metrics);
:func:`run_patiently` retries it in place while Redis is unreachable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from celery.signals import worker_process_init, worker_process_shutdown

from worker.backoff import backoff
from worker.errors import StateError
from worker.notify import runtime as notify_runtime
from worker.queue.context import WorkerContext
from worker.queue.runtime import EventLoopThread, configured

T = TypeVar("T")
log = logging.getLogger("regsweep.worker")

#: How long a task waits in place for Redis (state and broker) to come back.
STATE_PATIENCE_SECONDS: Final = 120.0
STATE_RETRY_FIRST_SECONDS: Final = 0.25
STATE_RETRY_MAX_SECONDS: Final = 8.0

_loop: EventLoopThread | None = None
_ctx: WorkerContext | None = None


def _context() -> tuple[EventLoopThread, WorkerContext]:
    """This process's loop and clients, made on first use (or at worker_process_init)."""
    global _loop, _ctx  # noqa: PLW0603 - one per process by design
    if _loop is None or _ctx is None:
        _loop = EventLoopThread()
        _ctx = _loop.run(WorkerContext.open(configured()))
    return _loop, _ctx


def run(make: Any) -> Any:
    """Run ``make(ctx)`` (a coroutine factory) on this process's loop, then flush metrics."""
    loop, ctx = _context()
    return loop.run(_flushed(ctx, make(ctx)))


def run_patiently(make: Any, patience: float = STATE_PATIENCE_SECONDS) -> Any:
    """:func:`run`, retried in place while Redis is unreachable, for up to ``patience`` s.

    A Celery retry would need the broker, which is the same Redis: while it is
    away the task holds its (unacknowledged) message and waits instead.
    """
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            return run(make)
        except StateError as exc:
            attempt += 1
            delay = backoff(attempt, base=STATE_RETRY_FIRST_SECONDS, cap=STATE_RETRY_MAX_SECONDS)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("redis unavailable (%s); trying again in %.1fs", exc, delay)
            time.sleep(delay)


async def _flushed(ctx: WorkerContext, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        await ctx.metrics.flush(ctx.redis)


@worker_process_init.connect
def _open_clients(**_: Any) -> None:
    _context()


@worker_process_shutdown.connect
def _close_clients(**_: Any) -> None:
    global _loop, _ctx  # noqa: PLW0603
    notify_runtime.close()
    if _loop is not None and _ctx is not None:
        _loop.run(_ctx.aclose())
        _loop.close()
    _loop = _ctx = None


def reopen_context() -> None:
    """Close this process's clients; the next task opens them from the Config configured now
    (a policy file reloaded between tasks: :mod:`worker.queue.reload`)."""
    global _loop, _ctx  # noqa: PLW0603
    if _loop is not None and _ctx is not None:
        _loop.run(_ctx.aclose())
        _loop.close()
    _loop = _ctx = None
