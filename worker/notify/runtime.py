"""The notifier of a process, made from its Config, and how its outcomes are counted.

A worker process has one :class:`~worker.notify.sender.Notifier` for its life
(made at first use; a forked pool process makes its own, since threads do not
survive a fork), drained for a bounded time when the process shuts down. The
CLI and a worker's start-up recovery make one for a single command with
:func:`make_notifier` and close it when done. Outcomes go to the Redis hash
``metrics:notifications`` (``regsweep_notifications_total`` on /metrics).
"""

from __future__ import annotations

import logging
import os
import threading

from worker.errors import StateError
from worker.notify.message import Notification
from worker.notify.sender import DEFAULT_DRAIN_SECONDS, Notifier, OutcomeCallback
from worker.settings.model import Config
from worker.store.keys import DEFAULT_PREFIX, Keys
from worker.store.metrics import count_notification
from worker.store.redis import RedisClient, sync_client

log = logging.getLogger("regsweep.notify")

_lock = threading.Lock()
#: This process's notifier: the pid and Config it was made for, and its Redis client.
_process: tuple[int, Notifier, RedisClient | None, Config] | None = None


def counting(client: RedisClient | None, keys: Keys) -> OutcomeCallback:
    """An outcome callback adding to ``metrics:notifications`` (nothing without Redis)."""

    def count(target: str, event: str, outcome: str) -> None:
        if client is None:
            return
        try:
            count_notification(client, keys, target, event, outcome)
        except StateError as exc:
            log.warning("notification outcome not counted: %s", exc)

    return count


def make_notifier(
    config: Config, *, prefix: str = DEFAULT_PREFIX
) -> tuple[Notifier, RedisClient | None]:
    """A notifier for ``config``'s targets and the Redis client its counts go through."""
    for line in config.notify.unset:
        log.warning("notification target off: %s", line)
    client = sync_client(config.redis_url) if config.redis_url and config.notify.targets else None
    return Notifier(config.notify.targets, counting(client, Keys(prefix))), client


def publish(config: Config, note: Notification | None) -> None:
    """Queue ``note`` on this process's notifier (made on first use); never raises."""
    if note is None or not config.notify.targets:
        return
    global _process  # noqa: PLW0603 - one notifier per process by design
    try:
        replaced = None
        with _lock:
            if _process is None or _process[0] != os.getpid() or _process[3] is not config:
                # A reloaded policy file may name other targets: a notifier of its own.
                if _process is not None and _process[0] == os.getpid():
                    replaced = _process
                notifier, client = make_notifier(config)
                _process = (os.getpid(), notifier, client, config)
            notifier = _process[1]
        if replaced is not None:
            # What the old one holds is still delivered, without holding up this job.
            drain = threading.Thread(target=_close, args=(replaced, DEFAULT_DRAIN_SECONDS))
            drain.daemon = True
            drain.start()
        notifier.publish(note)
    except Exception:  # a notification never fails what published it
        log.warning("notification %s not queued", note.event, exc_info=True)


def close(wait: float = DEFAULT_DRAIN_SECONDS) -> None:
    """Drain this process's notifier for at most ``wait`` seconds (process shutdown)."""
    global _process
    with _lock:
        made, _process = _process, None
    if made is None or made[0] != os.getpid():
        return
    _close(made, wait)


def _close(made: tuple[int, Notifier, RedisClient | None, Config], wait: float) -> None:
    made[1].close(wait)
    if made[2] is not None:
        made[2].close()
