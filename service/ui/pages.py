"""What the dashboard's templates are given: a repository's tag table, a tag's detail, a
job's progress, the overview's alerts, the GC chart, and the filters the templates use.

Sorting, filtering, folding and paging happen here, on the server, in plain
Python over the read side's documents; the templates only lay rows out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from jinja2 import Environment

from service.read_api import whole_number
from service.reads import REPOSITORY_SORTS, TAG_SORTS, Page

__all__ = ["REPOSITORY_SORTS", "TAG_SORTS"]

REPOSITORIES_PER_PAGE: Final = 50
TAGS_PER_PAGE: Final = 100
MOST_PER_PAGE: Final = 5000
#: The highest page number a link may name (beyond the last page: an empty page).
MOST_PAGE: Final = 1_000_000
#: The order verdicts sort in: what goes first.
VERDICT_ORDER: Final = {"delete": 0, "untag": 1, "moved": 2, "unplanned": 3, "keep": 4, "gone": 5}
FINAL_STATES: Final = frozenset({"succeeded", "failed", "skipped", "interrupted"})
_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
#: What a table shows for a value that is not known.
DASH: Final = "\u2013"


# --- filters -----------------------------------------------------------------------------


def human_bytes(value: object) -> str:
    if value is None or value == "":
        return DASH
    size = float(str(value))
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def when(value: object) -> str:
    """An ISO time as ``2026-01-02 10:00Z`` (UTC); a dash for none."""
    if not value:
        return DASH
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return DASH
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


def short(digest: object) -> str:
    algorithm, _, hexdigits = str(digest or "").partition(":")
    return f"{algorithm}:{hexdigits[:12]}" if hexdigits else str(digest or "")


def pushed(value: Mapping[str, Any] | None) -> str:
    """A push time as the evidence allows: exact, a span, no later than, or unknown."""
    if not value or not value.get("latest"):
        return "unknown"
    latest, earliest = when(value["latest"]), value.get("earliest")
    if earliest == value["latest"]:
        return latest
    if earliest:
        return f"{when(earliest)} {DASH} {latest}"
    return f"≤ {latest}"


def install_filters(env: Environment) -> None:
    env.filters.update(bytes=human_bytes, when=when, short=short, pushed=pushed)


def page_of(query: Mapping[str, str], default: int) -> Page:
    """The query's page (bad numbers read as the first page: a page is no API)."""
    size = query.get("per_page", "")
    per_page = MOST_PER_PAGE if size == "all" else whole_number(size, MOST_PER_PAGE)
    return Page(whole_number(query.get("page", ""), MOST_PAGE) or 1, per_page or default)


# --- a repository's tags -----------------------------------------------------------------


@dataclass(frozen=True)
class TagTable:
    """One page of a repository's tag rows, with what each row unfolds to."""

    rows: list[dict[str, Any]]
    #: subject digest -> the referrer tags folded under it.
    referrer_tags: Mapping[str, list[dict[str, Any]]]
    paging: dict[str, int]
    sort: str
    order: str
    search: str
    verdict: str
    counts: Mapping[str, int]


def tag_table(plan: Mapping[str, Any], query: Mapping[str, str]) -> TagTable:
    """Filter (a part of the tag, a verdict), sort and page the rows; referrer tags whose
    subject is another row's digest are folded under that row instead."""
    rows: list[dict[str, Any]] = plan["tags"]
    digests = {row["digest"] for row in rows if row.get("subject") is None}
    folded: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    top: list[dict[str, Any]] = []
    for row in rows:
        if row.get("subject") in digests:
            folded[row["subject"]].append(row)
        else:
            top.append(row)
    counts: defaultdict[str, int] = defaultdict(int)
    for row in top:
        counts[row["verdict"]] += 1
    search = query.get("q", "").strip()[:200]
    verdict = query.get("verdict", "")
    if search:
        top = [row for row in top if search.lower() in row["tag"].lower()]
    if verdict:
        top = [row for row in top if row["verdict"] == verdict]
    sort = query.get("sort", "pushed")
    sort = sort if sort in TAG_SORTS else "pushed"
    order = "asc" if query.get("order") == "asc" else "desc"
    top.sort(key=_tag_key(sort), reverse=order == "desc")
    page = page_of(query, TAGS_PER_PAGE)
    return TagTable(
        page.cut(top), folded, page.document(len(top)), sort, order, search, verdict, counts
    )


def _tag_key(sort: str) -> Any:
    if sort == "tag":
        return lambda row: row["tag"]
    if sort == "size":
        return lambda row: (row.get("size") or -1, row["tag"])
    if sort == "verdict":
        return lambda row: (-VERDICT_ORDER.get(row["verdict"], 9), row["tag"])
    return lambda row: ((row.get("pushed") or {}).get("latest") or "", row["tag"])


def tag_detail(plan: Mapping[str, Any], tag: str) -> dict[str, Any] | None:
    """One tag: its row, the tags sharing its digest, its children and referrers."""
    rows = {row["tag"]: row for row in plan["tags"]}
    row = rows.get(tag)
    if row is None:
        return None
    manifests: Mapping[str, Any] = plan.get("manifests") or {}
    by_digest: defaultdict[str, list[str]] = defaultdict(list)
    for other in plan["tags"]:
        by_digest[other["digest"]].append(other["tag"])
    manifest = manifests.get(row["digest"]) or {}
    return {
        "row": row,
        "siblings": [t for t in sorted(by_digest[row["digest"]]) if t != tag],
        "children": [_part(d, manifests, by_digest) for d in manifest.get("children", [])],
        "referrers": [_part(d, manifests, by_digest) for d in manifest.get("referrers", [])],
    }


def _part(
    digest: str, manifests: Mapping[str, Any], by_digest: Mapping[str, list[str]]
) -> dict[str, Any]:
    found = manifests.get(digest) or {}
    return {"digest": digest, "tags": sorted(by_digest.get(digest, [])), **found}


# --- jobs --------------------------------------------------------------------------------


def job_context(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job's page beyond its record: whether it ended, what it is about, its progress."""
    params = job.get("params") or {}
    plan = job.get("plan") or {}
    settled = [d for d in job.get("deletions", []) if d.get("outcome") != "pending"]
    return {
        "final": job.get("state") in FINAL_STATES,
        "params": params,
        "preview": params.get("dry_run") is True and job.get("kind") in ("delete", "prune", "gc"),
        "planned": plan.get("deletions"),
        "settled": len(settled),
        "report": job.get("report") or {},
    }


# --- the overview and the maintenance page -----------------------------------------------


def alerts(status: Mapping[str, Any], failed: Sequence[Mapping[str, Any]]) -> list[str]:
    """What needs a person: a window running, dead letters, failed jobs, a failed GC."""
    out: list[str] = []
    active = status["maintenance"]["active_job"]
    if active:
        out.append(f"GC job {active} is running: the registry is read-only, prunes wait")
    letters = status["dead_letters"]["kept"]
    if letters:
        out.append(f"{letters} dead letter(s) kept: deliveries regsweep could not use")
    if failed:
        out.append(f"{len(failed)} failed job(s) recorded in the last 7 days")
    last_gc = status.get("last_gc") or {}
    if last_gc.get("state") == "failed":
        out.append(f"the last GC (job {last_gc.get('id')}) failed")
    if (last_gc.get("report") or {}).get("left_readonly"):
        out.append("the registry was left read-only by the last GC: recovery keeps trying")
    if status["deferred"]:
        out.append(f"{len(status['deferred'])} prune(s) wait for the window to end")
    return out


#: The chart's drawing area (SVG user units).
CHART_WIDTH: Final = 640
CHART_HEIGHT: Final = 160
CHART_BARS: Final = 40


def gc_chart(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Bars of bytes reclaimed per GC, oldest left, scaled to the largest; None without any."""
    runs = [h for h in history if not h.get("dry_run") and h.get("bytes_reclaimed") is not None]
    runs = list(reversed(runs[:CHART_BARS]))
    if not runs:
        return None
    top = max(int(h["bytes_reclaimed"]) for h in runs) or 1
    slot = CHART_WIDTH / max(len(runs), CHART_BARS // 2)  # a few runs: narrow bars, left
    bars = []
    for i, run in enumerate(runs):
        height = round(int(run["bytes_reclaimed"]) / top * (CHART_HEIGHT - 20), 1)
        bars.append(
            {
                "x": round(i * slot + slot * 0.1, 1),
                "y": round(CHART_HEIGHT - height, 1),
                "width": round(slot * 0.8, 1),
                "height": height,
                "title": f"{when(run.get('finished'))}: {human_bytes(run['bytes_reclaimed'])}",
                "failed": run.get("ok") is False,
            }
        )
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bars": bars,
        "top": human_bytes(top),
        "first": when(runs[0].get("finished")),
        "last": when(runs[-1].get("finished")),
    }
