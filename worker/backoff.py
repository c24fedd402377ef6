"""How long to wait before trying again: one exponential backoff for every retry loop.

Registry requests, Celery retries of a prune, a task waiting for Redis and the
switch back to read-write all wait ``base * 2**(attempt - 1)`` seconds, capped,
with jitter where many clients may retry at once (so they spread out instead of
arriving together). redis-py's own connection retries use its ``ExponentialBackoff``.
"""

from __future__ import annotations

import random


def backoff(attempt: int, *, base: float, cap: float | None = None, jitter: float = 0.0) -> float:
    """Seconds before retry ``attempt`` (1 = the first retry): ``base * 2**(attempt - 1)``, at
    most ``cap``, times a random factor in ``[1 - jitter, 1 + jitter]``."""
    delay = base * 2.0 ** max(0, attempt - 1)
    if cap is not None:
        delay = min(delay, cap)
    return delay * random.uniform(1.0 - jitter, 1.0 + jitter) if jitter else delay
