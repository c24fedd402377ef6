"""What every CI source's hook implements (:class:`HookSource`), and the request helpers
they share.

A source is one module in ``service/hooks/`` (``github.py``, ``gitlab.py``) whose ``SOURCE``
the table in :mod:`service.hooks.sources` lists: its route (``/hooks/<name>``), its metrics
label and its key under a policy's ``sources:`` are all its ``name``. The service runs every
delivery through the same steps: :meth:`~HookSource.verify` (nothing is parsed before),
:meth:`~HookSource.delivery_id`, :meth:`~HookSource.parse`, then dedup on
:meth:`~HookSource.dedup_keys` and the hand-off (:func:`service.ingest.ingest_ci`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from starlette.exceptions import HTTPException
from starlette.requests import Request

from worker.engine.events import CiEvent
from worker.settings.model import HookSettings
from worker.store.keys import Keys


@dataclass(frozen=True)
class Parsed:
    """What a verified delivery asks for."""

    #: The event to act on; None for a delivery that deletes nothing (answered ``ignored``).
    event: CiEvent | None
    #: The delivery as the ``ignored`` reason names it: ``GitHub event 'issues'``.
    what: str
    #: A delivery answered at once and never enqueued (GitHub's ``ping``): its JSON.
    answer: dict[str, Any] | None = None


class HookSource(Protocol):
    """One CI system's webhooks."""

    @property
    def name(self) -> str:
        """``github``: the route ``/hooks/github``, the metrics label, ``sources.github``."""
        ...

    @property
    def setting(self) -> str:
        """The ``hooks.*_env`` key that turns the hook on (named when it is off)."""
        ...

    def enabled(self, hooks: HookSettings) -> bool:
        """Whether its secret is set (a disabled hook answers 404)."""
        ...

    def verify(self, hooks: HookSettings, request: Request, body: bytes) -> None:
        """Raise :class:`~worker.errors.Unverified` unless the sender proves itself."""
        ...

    def delivery_id(self, hooks: HookSettings, request: Request) -> str:
        """The sender's id for the delivery, stable across its retries."""
        ...

    def parse(self, request: Request, body: bytes, delivery_id: str) -> Parsed:
        """The event the delivery carries (:class:`~worker.errors.BadEvent` for a bad one)."""
        ...

    def dedup_keys(self, keys: Keys, delivery_id: str, body: bytes) -> list[str]:
        """The dedup records of the delivery: a second delivery matching any is a duplicate."""
        ...


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request, sender: str) -> None:
    found = media_type(request)
    if found != "application/json":
        raise HTTPException(
            415, f"{sender} deliveries must be application/json, got {found[:100]!r}"
        )


def header(request: Request, name: str) -> str:
    value = request.headers.get(name)
    if not value:
        raise HTTPException(400, f"missing {name} header")
    return value
