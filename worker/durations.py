"""Durations, read and written one way: the policy file's syntax (``30s``, ``1h30m``, ``14d``,
``2w``) parsed, and every duration a message, a plan or a status line shows formatted here.

Three ways to say one, each for its reader:

- :func:`exact` writes it back in the policy file's syntax (``1d12h``, ``1m30s``): a grace,
  a window, a bound a person may copy into the file;
- :func:`coarse` rounds down to its largest unit (``20d``, ``3h``): an age in a plan table;
- :func:`approximate` keeps two units, rounded (``3d 2h``, ``4m 3s``, ``0.25s``): a clock's
  offset or a span between two times in an evidence note (:func:`signed` with its sign).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Final

_DURATION: Final = re.compile(
    r"(?:(?P<weeks>\d+)w)?(?:(?P<days>\d+)d)?(?:(?P<hours>\d+)h)?"
    r"(?:(?P<minutes>\d+)m)?(?:(?P<seconds>\d+)s)?",
    re.ASCII,
)
DURATION_HINT: Final = "must be a duration like 30s, 15m, 1h30m, 14d or 2w"
#: The longest duration anywhere (policy file, --for, --since): now plus or minus it is
#: still a date (200000w back from now is not, and a plan or hold would crash on it).
MAX_DURATION: Final = timedelta(days=36500)
#: The units :func:`exact` and :func:`coarse` write, largest first.
_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


class DurationTooLong(ValueError):
    """A duration written right that is longer than :data:`MAX_DURATION`."""


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h30m``, ``14d``, ``2w`` as a timedelta; raises ``ValueError``
    (:class:`DurationTooLong` past :data:`MAX_DURATION`)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not any(match.groupdict().values()):
        raise ValueError(DURATION_HINT)
    parts = {unit: amount for unit, amount in match.groupdict().items() if amount}
    try:
        # More digits than any bounded duration has: no int() of thousands of digits.
        digits = max(len(amount.lstrip("0")) for amount in parts.values())
        duration = None if digits > 12 else timedelta(**_ints(parts))
    except OverflowError:
        duration = None
    if duration is None or duration > MAX_DURATION:
        raise DurationTooLong(f"is too long: at most {MAX_DURATION.days}d (about 100 years)")
    return duration


def _ints(parts: Mapping[str, str]) -> dict[str, int]:
    return {unit: int(amount) for unit, amount in parts.items()}


def exact(delta: timedelta) -> str:
    """The policy file's syntax, to the second: ``14d``, ``1d12h``, ``90s`` → ``1m30s``."""
    seconds = max(0, int(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in _UNITS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def coarse(delta: timedelta) -> str:
    """An age in its largest unit, rounded down: ``20d``, ``3h``, ``5m``, ``12s``."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return "0s"


def approximate(delta: timedelta) -> str:
    """A short duration, rounded to its smaller unit: ``3d 2h``, ``5h 10m``, ``4m 3s``,
    ``12s``, ``0.25s``, ``under 0.01s``."""
    seconds = abs(delta.total_seconds())
    if seconds < 0.01:
        return "0s" if seconds == 0 else "under 0.01s"
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    for size, big, unit, small in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "m"),
        (60, "m", 1, "s"),
    ):
        if seconds >= size - unit / 2:
            whole, part = divmod(round(seconds / unit), size // unit)
            return f"{whole}{big} {part}{small}"
    return f"{seconds:.0f}s"


def signed(delta: timedelta) -> str:
    """``+0.4s`` / ``-3d 2h``."""
    return ("-" if delta < timedelta(0) else "+") + approximate(delta)
