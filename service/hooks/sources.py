"""The CI sources the service takes webhooks from, as a table, and whether an event concerns
any policy: a delivery no policy is fed by is answered ``202 ignored`` with the reason and
logged, instead of being queued for nothing.

Adding a source (docs/webhooks.md): a module beside ``github.py`` whose ``SOURCE`` implements
:class:`~service.hooks.source.HookSource`, listed in :data:`SOURCES`; the form of its projects
in :data:`worker.engine.events.CI_SOURCES`; a test file of its deliveries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from service.hooks import github, gitlab
from service.hooks.source import HookSource
from worker.engine.events import CI_SOURCES, CiEvent
from worker.engine.policy import Policy

#: Every CI source's hook, served at ``/hooks/<name>``.
SOURCES: Final[tuple[HookSource, ...]] = (github.SOURCE, gitlab.SOURCE)
assert {s.name for s in SOURCES} == set(CI_SOURCES), "a hook for every source, and no other"


def _asks_for(policy: Policy, event: CiEvent) -> bool:
    if event.kind == "pull_request_closed":
        return bool(policy.on.pull_request_closed)
    return bool(policy.on.branch_deleted)


def unwanted(policies: Sequence[Policy], event: CiEvent) -> str | None:
    """Why no policy acts on ``event``; ``None`` when one does."""
    fed = [p for p in policies if p.fed_by(event.source, event.project)]
    if not fed:
        return f"no policy's sources.{event.source} matches {event.project}"
    if not any(_asks_for(p, event) for p in fed):
        names = ", ".join(p.name for p in fed)
        return f"the policies {event.project} feeds ({names}) have no on.{event.kind}"
    return None
