"""Alerts told once: a mark per event and subject, so a check that repeats does not repeat them.

The recovery check retries every 30 s while a registry stays read-only; its alert goes out
at the first try only. The mark is ``notify:<event>:<subject>`` (``SET NX``), kept a day.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

import redis

from worker.store.keys import Keys
from worker.store.redis import wrapped

#: How long an alert stays told (its subject is a job: one window).
TOLD_FOR: Final = timedelta(days=1)


def first_telling(client: redis.Redis, keys: Keys, event: str, subject: str) -> bool:
    """Whether this call is the first to tell ``event`` about ``subject`` (it marks it told)."""
    with wrapped(f"cannot mark {event} told"):
        return bool(client.set(keys.notified(event, subject), "1", nx=True, ex=TOLD_FOR))
