"""What a CI event asks a policy to delete: its ``on:`` templates filled from the event.

A closed pull request or a deleted branch names tags through the policy's
templates (``pr-{number}-*``, ``{branch_slug}-*``); the event's values are
escaped first, so a branch called ``*`` is a branch, never a pattern.
"""

from __future__ import annotations

import re
from typing import Any

from worker.engine.events import CiEvent
from worker.engine.plan import Reason
from worker.engine.planner import TagRequest
from worker.engine.policy import Policy, TagPattern
from worker.oci import Digest


def _fill(template: str, values: dict[str, str]) -> str:
    """Render a CI template; event values are escaped so a branch name is never a pattern."""
    if template.startswith("re:"):
        return template.format(**{k: re.escape(v) for k, v in values.items()})
    return template.format(**{k: _glob_escape(v) for k, v in values.items()})


def _glob_escape(value: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in value)


def branch_slug(branch: str) -> str:
    return re.sub(r"[^a-z0-9._-]", "-", branch.lower())


def _event_values(event: CiEvent) -> dict[str, str]:
    values = {"number": str(event.number or "")}
    if event.branch:
        values |= {"branch": event.branch, "branch_slug": branch_slug(event.branch)}
    else:
        values |= {"branch": "", "branch_slug": ""}
    return values


def request_for(policy: Policy, event: CiEvent) -> TagRequest | None:
    """The tags ``event`` asks ``policy`` to delete, or None when it asks for nothing."""
    if not policy.fed_by(event.source, event.project):
        return None
    templates = (
        policy.on.pull_request_closed
        if event.kind == "pull_request_closed"
        else policy.on.branch_deleted
    )
    if not templates:
        return None
    values = _event_values(event)
    patterns = tuple(TagPattern.compile(fnmatch_safe(_fill(t, values))) for t in templates)
    what = f"#{event.number}" if event.kind == "pull_request_closed" else f"branch {event.branch}"
    detail = f"{event.source} {event.project} {what}"
    return TagRequest(patterns, Reason(f"on.{event.kind}", detail))


def fnmatch_safe(pattern: str) -> str:
    """Patterns rendered from an empty value (``{branch}`` of a PR event) match nothing."""
    return pattern if pattern.strip("-*") else "[]never"


def request_to_json(request: TagRequest) -> dict[str, Any]:
    """The request as a task message carries it (``digests`` only when there are some: the
    dashboard's requests; :func:`worker.queue.messages.ui_request` writes the same)."""
    data: dict[str, Any] = {
        "patterns": [p.source for p in request.patterns],
        "rule": request.reason.rule,
        "detail": request.reason.detail,
    }
    if request.digests:
        data["digests"] = sorted(request.digests)
    return data


def request_from_json(data: dict[str, Any]) -> TagRequest:
    patterns = tuple(TagPattern.compile(p) for p in data["patterns"])
    digests = frozenset(Digest(str(d)) for d in data.get("digests") or ())
    return TagRequest(patterns, Reason(data["rule"], data["detail"]), digests)
