"""GitHub webhooks, verified and parsed: ``ping``, ``pull_request`` closed, a branch deleted
(``delete``, or a ``push`` with ``deleted: true``).

The ``X-Hub-Signature-256`` HMAC covers the body only, so a captured body replayed
under a new delivery id is recognised by the body's hash (:func:`github_dedup_keys`).
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.hooks.payload import (
    MAX_BRANCH_LENGTH,
    branch_deleted,
    field,
    json_object,
    pushed_ref_deleted,
)
from service.hooks.source import Parsed, header, media_type
from service.hooks.verify import checked_delivery_id, same
from worker.engine.events import CiEvent
from worker.errors import BadEvent, Unverified
from worker.settings.model import HookSettings, Secret
from worker.store.keys import Keys


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


#: GitHub's two content types: JSON, or (its default) a form whose ``payload`` field is the JSON.
JSON_TYPE: Final = "application/json"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
PAYLOAD_FIELD: Final = "payload"
#: A form carries one field; more than a few means it is not GitHub's.
MAX_FORM_FIELDS: Final = 16


def github_payload(media_type: str, body: bytes) -> bytes:
    """The JSON of a delivery whose signature was checked over ``body``: the body itself, or
    the ``payload`` field of a form-encoded one. Raises :class:`BadEvent` (400) for a form
    that cannot be read or has not exactly one ``payload``, ``HTTPException`` 415 for any
    other content type."""
    if media_type == JSON_TYPE:
        return body
    if media_type != FORM_TYPE:
        raise HTTPException(
            415,
            f"GitHub deliveries must be {JSON_TYPE} or {FORM_TYPE}, got {media_type[:100]!r}",
        )
    values = [value for name, value in _form_fields(body) if name == PAYLOAD_FIELD]
    if len(values) != 1:
        found = "no" if not values else f"{len(values)}"
        raise BadEvent(f"the form has {found} {PAYLOAD_FIELD} fields; GitHub sends exactly one")
    return values[0].encode()


def _form_fields(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("ascii")
        return urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise BadEvent("the form is not URL-encoded text (or not UTF-8 once decoded)") from exc
    except ValueError as exc:
        raise BadEvent(f"the form cannot be read: {str(exc)[:200]}") from exc


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


def github_dedup_keys(keys: Keys, delivery_id: str, body: bytes) -> list[str]:
    """A GitHub delivery is a duplicate if its id or its (signed) body was seen: the
    signature covers the body only, so a captured delivery replayed under a new
    ``X-GitHub-Delivery`` is caught by the body's hash."""
    return [
        keys.delivery("github", delivery_id),
        keys.delivery("github-body", hashlib.sha256(body).hexdigest()),
    ]


class GitHub:
    """GitHub's hook (:class:`~service.hooks.source.HookSource`)."""

    name: Final = "github"
    setting: Final = "hooks.github_secret_env"

    def enabled(self, hooks: HookSettings) -> bool:
        return hooks.github_secret is not None

    def verify(self, hooks: HookSettings, request: Request, body: bytes) -> None:
        # The signature covers the raw body, form-encoded or not: checked before parsing.
        assert hooks.github_secret is not None
        check_github_signature(
            hooks.github_secret, body, request.headers.get("x-hub-signature-256")
        )

    def delivery_id(self, hooks: HookSettings, request: Request) -> str:
        return checked_delivery_id("X-GitHub-Delivery", header(request, "X-GitHub-Delivery"))

    def parse(self, request: Request, body: bytes, delivery_id: str) -> Parsed:
        payload = github_payload(media_type(request), body)
        event_name = header(request, "X-GitHub-Event")
        what = f"GitHub event {event_name[:64]!r}"
        if event_name == "ping":
            return Parsed(None, what, {"ok": True, "zen": github_zen(payload)})
        return Parsed(parse_github(event_name, payload, delivery_id), what)

    def dedup_keys(self, keys: Keys, delivery_id: str, body: bytes) -> list[str]:
        return github_dedup_keys(keys, delivery_id, body)


SOURCE: Final = GitHub()
