"""What ``regsweep status`` says of push-time evidence: the registry's clock, and the
repositories whose registry times the last plans refused or doubted.

The plans record it (:meth:`worker.store.tagindex.TagIndex.record_evidence`); each plan's
own notes say it in full for its repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from regsweep.jobs import when
from worker.clock import ClockSkew
from worker.store.tagindex import TagIndex

#: Repositories named under each heading; the rest are counted.
SHOWN: Final = 5


async def status_document(index: TagIndex) -> dict[str, Any]:
    """The ``push_times`` part of ``status --json``."""
    clock, doubts = await index.evidence()
    refused = [
        {"repository": repo, "reason": d.get("refused"), "time": d.get("time")}
        for repo, d in sorted(doubts.items())
        if d.get("refused")
    ]
    doubted = [
        {"repository": repo, "tags": d.get("doubted"), "time": d.get("time")}
        for repo, d in sorted(doubts.items())
        if not d.get("refused") and d.get("doubted")
    ]
    return {"clock": _clock(clock), "refused": refused, "doubted": doubted}


def _clock(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        skew = ClockSkew(
            timedelta(seconds=float(raw["low_seconds"])),
            timedelta(seconds=float(raw["high_seconds"])),
            datetime.fromisoformat(str(raw["measured_at"])),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return {
        "offset_seconds": round(skew.offset.total_seconds(), 3),
        "low_seconds": skew.low.total_seconds(),
        "high_seconds": skew.high.total_seconds(),
        "agrees": skew.agrees,
        "measured_at": skew.measured_at.isoformat(),
        "text": skew.describe(),
    }


def status_lines(doc: Mapping[str, Any]) -> list[str]:
    """The text form: the clock, then each repository whose registry times were refused,
    then how many tags were doubted where."""
    lines = [_clock_line(doc["clock"])]
    refused = doc["refused"]
    if refused:
        lines.append(
            f"push times refused in {len(refused)} repositories (nothing is deleted on them):"
        )
        lines += [f"  {r['repository']}: {r['reason']}" for r in refused[:SHOWN]]
        lines += [f"  and {len(refused) - SHOWN} more"] if len(refused) > SHOWN else []
    doubted = doc["doubted"]
    if doubted:
        named = ", ".join(f"{d['repository']} ({d['tags']})" for d in doubted[:SHOWN])
        more = f" and {len(doubted) - SHOWN} more" if len(doubted) > SHOWN else ""
        lines.append(
            f"push times doubted for some tags of: {named}{more} (regsweep plan REPO says why)"
        )
    if not refused and not doubted:
        lines.append("push times: the last plans doubted none")
    return lines


def _clock_line(clock: Mapping[str, Any] | None) -> str:
    if clock is None:
        return "registry clock: not measured yet (no plan has read registry times)"
    line = f"registry clock: {clock['text']}, measured {when(clock['measured_at'])}"
    if clock["agrees"]:
        return line
    return line + ": its push times rank no tag until the clocks agree (run NTP on both hosts)"
