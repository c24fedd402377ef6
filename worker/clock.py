"""Two clocks compared: the registry's (its answers' ``Date`` header) against regsweep's.

The registry client measures it on every answer; the engine's evidence rules and the store's
tag index both bound times by :data:`CLOCK_SKEW`, so it lives below all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from worker.durations import approximate, signed

#: Clocks disagree a little: a time this far ahead of ours is taken as now; further is doubtful.
#: A registry whose clock is further off than this (either way) ranks nothing by its times.
CLOCK_SKEW: Final = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class ClockSkew:
    """How far the registry's clock is ahead of regsweep's (negative: behind), from one
    answer's ``Date`` header: the true offset lies between ``low`` and ``high`` (the header
    has whole seconds, and the answer took time to come)."""

    low: timedelta
    high: timedelta
    measured_at: datetime

    @classmethod
    def observed(cls, date: datetime, sent: datetime, received: datetime) -> ClockSkew:
        """The skew an answer dated ``date`` shows, asked at ``sent`` and answered at
        ``received`` (regsweep's clock)."""
        return cls(date - received, date + timedelta(seconds=1) - sent, received)

    @property
    def offset(self) -> timedelta:
        return (self.low + self.high) / 2

    @property
    def agrees(self) -> bool:
        """Whether the two clocks may be within :data:`CLOCK_SKEW` of each other."""
        return self.low <= CLOCK_SKEW and self.high >= -CLOCK_SKEW

    def describe(self) -> str:
        """``the registry's clock is 3d 2h behind regsweep's``, or how close they agree."""
        offset = self.offset
        if self.agrees:
            return f"the registry's clock agrees with regsweep's ({signed(offset)})"
        way = "ahead of" if offset > timedelta(0) else "behind"
        return f"the registry's clock is {approximate(abs(offset))} {way} regsweep's"
