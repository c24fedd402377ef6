"""The maintenance window: when a GC may start, and whether it ran past the window's end.

The window is ``maintenance.window.cron`` (its start, UTC) plus ``duration``.
The window a moment falls in starts at the cron's latest fire time at or
before that moment; it is open while ``start <= now < start + duration``.

Rules (docs/operations.md "Maintenance window"):

- A GC fired by beat (``trigger="window"``) starts only inside a window with
  at least ``window_margin`` of it left; otherwise it is skipped, not queued
  for later (the next window will come).
- A GC asked for by a person (``regsweep gc``, ``POST /api/v1/jobs``) starts
  at once, inside a window or not. Inside a window, that window's end is its
  deadline for the overrun report; outside one it has no deadline.
- A GC that runs past its deadline is allowed to finish (stopping GC half-way
  gains nothing and the registry stays read-only until it ends anyway) and is
  reported as overrunning.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from croniter import croniter

from worker.durations import exact
from worker.settings.model import MaintenanceSettings

WINDOW_TRIGGER: Final = "window"
#: croniter's get_prev at exactly a fire time returns the one before; a hair later it does not.
_JUST_AFTER: Final = timedelta(microseconds=1)


@dataclass(frozen=True)
class MaintenanceWindow:
    """One occurrence of the window, ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def left(self, moment: datetime) -> timedelta:
        return max(self.end - moment, timedelta(0))

    @property
    def key(self) -> str:
        """Names the occurrence, e.g. for the per-window "already started" claim."""
        return self.start.strftime("%Y%m%dT%H%MZ")


def latest_window(cron: str, duration: timedelta, now: datetime) -> MaintenanceWindow:
    """The occurrence that started last at or before ``now`` (open or already over)."""
    start = croniter(cron, now + _JUST_AFTER).get_prev(datetime)
    return MaintenanceWindow(start, start + duration)


def current_window(settings: MaintenanceSettings, now: datetime) -> MaintenanceWindow | None:
    """The window open at ``now``; ``None`` outside every window or without a cron."""
    if settings.window_cron is None:
        return None
    window = latest_window(settings.window_cron, settings.window_duration, now)
    return window if window.contains(now) else None


def next_window(settings: MaintenanceSettings, now: datetime) -> MaintenanceWindow | None:
    """The first occurrence that starts after ``now``; ``None`` without a cron."""
    if settings.window_cron is None:
        return None
    start = croniter(settings.window_cron, now).get_next(datetime)
    return MaintenanceWindow(start, start + settings.window_duration)


@dataclass(frozen=True)
class StartDecision:
    """Whether a GC may start now, and against which deadline it will be measured."""

    allowed: bool
    reason: str
    window: MaintenanceWindow | None = None

    @property
    def deadline(self) -> datetime | None:
        return self.window.end if self.window is not None else None


def may_start(settings: MaintenanceSettings, trigger: str, now: datetime) -> StartDecision:
    """Apply the window rules in this module's docstring to a GC about to start."""
    window = current_window(settings, now)
    if trigger != WINDOW_TRIGGER:
        where = "inside" if window else "outside"
        return StartDecision(True, f"asked for by {trigger}, {where} the window", window)
    if window is None:
        return StartDecision(False, "no maintenance window is open")
    left = window.left(now)
    if left < settings.window_margin:
        return StartDecision(
            False,
            f"only {exact(left)} of the window left, less than the margin "
            f"of {exact(settings.window_margin)}",
            window,
        )
    return StartDecision(True, f"window {window.key}, {exact(left)} left", window)


def overran(deadline: datetime | None, finished: datetime) -> bool:
    return deadline is not None and finished > deadline


def window_document(settings: MaintenanceSettings, now: datetime) -> dict[str, Any] | None:
    """The window as ``regsweep status`` and ``GET /api/v1/status`` show it (None: none)."""
    if settings.window_cron is None:
        return None
    return {
        "cron": settings.window_cron,
        "duration_seconds": int(settings.window_duration.total_seconds()),
        "open": _span(current_window(settings, now)),
        "next": _span(next_window(settings, now)),
    }


def _span(window: MaintenanceWindow | None) -> dict[str, str] | None:
    if window is None:
        return None
    return {"start": window.start.isoformat(), "end": window.end.isoformat()}
