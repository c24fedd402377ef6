"""GitLab webhooks, verified and parsed: Merge Request Hook closed or merged, Push Hook
deleting a branch (``after`` all zeros).

A delivery carries ``X-Gitlab-Token`` and, with a signing key set, a Standard Webhooks
signature; its id for deduplication is then the signed ``webhook-id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.hooks import verify
from service.hooks.payload import MAX_BRANCH_LENGTH, field, json_object, pushed_ref_deleted
from service.hooks.source import Parsed, header, require_json
from service.hooks.verify import checked_delivery_id
from worker.engine.events import CiEvent
from worker.errors import BadEvent
from worker.settings.model import HookSettings
from worker.store.keys import Keys

ZERO_SHA: Final = "0" * 40


def parse_gitlab(event_header: str, body: bytes, delivery_id: str) -> CiEvent | None:
    """A :class:`CiEvent` for merge requests closed/merged and deleted branches, else ``None``."""
    document = json_object(body)
    if event_header == "Merge Request Hook":
        return _gitlab_merge_request(document, delivery_id)
    if event_header == "Push Hook":
        if field(document, "after", str) != ZERO_SHA:
            return None
        return pushed_ref_deleted("gitlab", delivery_id, document, "project.path_with_namespace")
    return None


def _gitlab_merge_request(document: Mapping[str, Any], delivery_id: str) -> CiEvent | None:
    if not isinstance(document.get("object_attributes"), dict):
        raise BadEvent("object_attributes is missing or not an object")
    action = document["object_attributes"].get("action")
    if action not in ("close", "merge"):
        return None
    return CiEvent(
        source="gitlab",
        delivery_id=delivery_id,
        project=field(document, "project.path_with_namespace", str),
        kind="pull_request_closed",
        number=field(document, "object_attributes.iid", int),
        branch=field(document, "object_attributes.source_branch", str, MAX_BRANCH_LENGTH),
        merged=action == "merge",
    )


def gitlab_delivery_id(request: Request, *, signed: bool) -> str:
    """GitLab's own id for a delivery, stable across its retries.

    With a signing key, the ``webhook-id`` the signature covers, so that a captured
    delivery replayed under a new unsigned header is still a duplicate (its
    timestamp must also be within 5 minutes). Without one, the first of
    ``Idempotency-Key``, ``X-Gitlab-Event-UUID`` and ``webhook-id``.
    """
    names = ("webhook-id",) if signed else ("idempotency-key", "x-gitlab-event-uuid", "webhook-id")
    for name in names:
        value = request.headers.get(name)
        if value:
            return checked_delivery_id(name, value)
    raise HTTPException(400, "missing Idempotency-Key or X-Gitlab-Event-UUID header")


def verify_gitlab(hooks: HookSettings, request: Request, body: bytes) -> None:
    if hooks.gitlab_token is not None:
        verify.check_token(
            hooks.gitlab_token, request.headers.get("x-gitlab-token"), "X-Gitlab-Token"
        )
    if hooks.gitlab_signing_key is not None:
        verify.check_standard_webhook(
            hooks.gitlab_signing_key,
            body,
            msg_id=request.headers.get("webhook-id"),
            timestamp=request.headers.get("webhook-timestamp"),
            signatures=request.headers.get("webhook-signature"),
        )


class GitLab:
    """GitLab's hook (:class:`~service.hooks.source.HookSource`)."""

    name: Final = "gitlab"
    setting: Final = "hooks.gitlab_token_env"

    def enabled(self, hooks: HookSettings) -> bool:
        return hooks.gitlab_token is not None or hooks.gitlab_signing_key is not None

    def verify(self, hooks: HookSettings, request: Request, body: bytes) -> None:
        verify_gitlab(hooks, request, body)

    def delivery_id(self, hooks: HookSettings, request: Request) -> str:
        return gitlab_delivery_id(request, signed=hooks.gitlab_signing_key is not None)

    def parse(self, request: Request, body: bytes, delivery_id: str) -> Parsed:
        require_json(request, "GitLab")
        event_header = header(request, "X-Gitlab-Event")
        return Parsed(
            parse_gitlab(event_header, body, delivery_id), f"GitLab {event_header[:64]!r}"
        )

    def dedup_keys(self, keys: Keys, delivery_id: str, body: bytes) -> list[str]:
        return [keys.delivery("gitlab", delivery_id)]


SOURCE: Final = GitLab()
