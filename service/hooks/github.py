"""GitHub webhooks, verified and parsed: ``ping``, ``pull_request`` closed, a branch deleted
(``delete``, or a ``push`` with ``deleted: true``).

The ``X-Hub-Signature-256`` HMAC covers the body only, so a captured body replayed
under a new delivery id is recognised by the body's hash (:func:`github_dedup_keys`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Final

from service.hooks.payload import (
    MAX_BRANCH_LENGTH,
    branch_deleted,
    field,
    json_object,
    pushed_ref_deleted,
)
from service.hooks.verify import same
from worker.engine.events import CiEvent
from worker.errors import Unverified
from worker.settings.model import Secret
from worker.store.state import State


def github_zen(body: bytes) -> str:
    """The ``zen`` line of a GitHub ``ping``; raises :class:`BadEvent` for a non-JSON body."""
    zen = json_object(body).get("zen")
    return zen if isinstance(zen, str) else ""


def parse_github(event_name: str, body: bytes, delivery_id: str) -> CiEvent | None:
    """A :class:`CiEvent` for the deliveries regsweep acts on, ``None`` for the rest."""
    document = json_object(body)
    if event_name == "pull_request":
        return _github_pull_request(document, delivery_id)
    if event_name == "delete":
        if field(document, "ref_type", str) != "branch":
            return None
        return branch_deleted("github", delivery_id, document, "repository.full_name", "ref")
    if event_name == "push":
        if document.get("deleted") is not True:
            return None
        return pushed_ref_deleted("github", delivery_id, document, "repository.full_name")
    return None


def _github_pull_request(document: Mapping[str, Any], delivery_id: str) -> CiEvent | None:
    if field(document, "action", str) != "closed":
        return None
    return CiEvent(
        source="github",
        delivery_id=delivery_id,
        project=field(document, "repository.full_name", str),
        kind="pull_request_closed",
        number=field(document, "pull_request.number", int),
        branch=field(document, "pull_request.head.ref", str, MAX_BRANCH_LENGTH),
        merged=document["pull_request"].get("merged") is True,
    )


GITHUB_SIGNATURE_PREFIX: Final = "sha256="


def github_signature(secret: Secret, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    digest = hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()
    return GITHUB_SIGNATURE_PREFIX + digest


def check_github_signature(secret: Secret, body: bytes, header: str | None) -> None:
    """``X-Hub-Signature-256`` must be the HMAC-SHA256 of the raw body."""
    if not header:
        raise Unverified("missing X-Hub-Signature-256 header")
    if not same(github_signature(secret, body), header.strip()):
        raise Unverified("X-Hub-Signature-256 does not match the body")


def github_dedup_keys(state: State, delivery_id: str, body: bytes) -> list[str]:
    """A GitHub delivery is a duplicate if its id or its (signed) body was seen: the
    signature covers the body only, so a captured delivery replayed under a new
    ``X-GitHub-Delivery`` is caught by the body's hash."""
    return [
        state.keys.delivery("github", delivery_id),
        state.keys.delivery("github-body", hashlib.sha256(body).hexdigest()),
    ]
