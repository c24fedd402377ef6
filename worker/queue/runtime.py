"""What a worker process holds for its life: its Config and one event loop for the engine.

Celery tasks are synchronous; the registry client, the tag index and the audit
stream are asyncio. Rather than ``asyncio.run`` per task (which would throw
away the connection pool every time), each worker process keeps one loop in a
daemon thread and the clients made on it live as long as the process. The
Config is set once, by :func:`worker.queue.celery_app.make_celery`, and read by
the tasks through :func:`configured`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from worker.errors import ConfigError
from worker.settings.model import Config

T = TypeVar("T")


class EventLoopThread:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="regsweep-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (exceptions propagate)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


_config: Config | None = None


def configure(config: Config) -> None:
    """Set this process's Config (once, when its Celery app is made)."""
    global _config  # noqa: PLW0603 - one Config per process, set at start-up
    _config = config


def configured() -> Config:
    """The Config this process's Celery app was made from."""
    if _config is None:
        raise ConfigError("the Celery app was used before make_celery(config) was called")
    return _config
