"""Whether a CI event concerns any policy: a delivery no policy is fed by is answered
``202 ignored`` with the reason and logged, instead of being queued for nothing."""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.events import CiEvent
from worker.engine.policy import Policy


def _fed_by(policy: Policy, event: CiEvent) -> bool:
    patterns = policy.sources.github if event.source == "github" else policy.sources.gitlab
    return any(p.matches(event.project) for p in patterns)


def _asks_for(policy: Policy, event: CiEvent) -> bool:
    if event.kind == "pull_request_closed":
        return bool(policy.on.pull_request_closed)
    return bool(policy.on.branch_deleted)


def unwanted(policies: Sequence[Policy], event: CiEvent) -> str | None:
    """Why no policy acts on ``event``; ``None`` when one does."""
    fed = [p for p in policies if _fed_by(p, event)]
    if not fed:
        return f"no policy's sources.{event.source} matches {event.project}"
    if not any(_asks_for(p, event) for p in fed):
        names = ", ".join(p.name for p in fed)
        return f"the policies {event.project} feeds ({names}) have no on.{event.kind}"
    return None
