"""What the senders' payloads share: a JSON object, typed and bounded fields, branch events.

A payload that cannot be used raises :class:`~worker.errors.BadEvent` naming
the field; its sender shows the 4xx to a person.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from worker.engine.events import CiEvent, CiSource
from worker.errors import BadEvent

BRANCH_REF_PREFIX: Final = "refs/heads/"


#: CI fields: GitHub and GitLab project paths and git branch names are far shorter.
MAX_PROJECT_LENGTH: Final = 512


MAX_BRANCH_LENGTH: Final = 1024


MAX_NUMBER: Final = 2**31 - 1


def json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadEvent(f"body is not JSON: {json_error(exc)}") from exc
    if not isinstance(document, dict):
        raise BadEvent("body is not a JSON object")
    return document


def field(document: Mapping[str, Any], dotted: str, kind: type[Any], limit: int = 0) -> Any:
    """The value at ``dotted``; a str at most ``limit`` characters of text (UTF-8
    encodable: JSON escapes can spell lone surrogates), an int in 1..MAX_NUMBER."""
    value: Any = document
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadEvent(f"{dotted} is missing or not a {kind.__name__}")
    if kind is int and not 1 <= value <= MAX_NUMBER:
        raise BadEvent(f"{dotted} is not a number between 1 and {MAX_NUMBER}")
    if kind is str:
        check_text(dotted, value, limit or MAX_PROJECT_LENGTH)
    return value


def check_text(name: str, value: str, limit: int) -> None:
    if not value:
        raise BadEvent(f"{name} is empty")
    if len(value) > limit:
        raise BadEvent(f"{name} is longer than {limit} characters")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise BadEvent(f"{name} is not valid Unicode text") from exc


def pushed_ref_deleted(
    source: CiSource, delivery_id: str, document: Mapping[str, Any], project_path: str
) -> CiEvent | None:
    ref = field(document, "ref", str, MAX_BRANCH_LENGTH)
    if not ref.startswith(BRANCH_REF_PREFIX):
        return None  # a deleted tag, not a branch
    short = {**document, "ref": ref.removeprefix(BRANCH_REF_PREFIX)}
    return branch_deleted(source, delivery_id, short, project_path, "ref")


def branch_deleted(
    source: CiSource,
    delivery_id: str,
    document: Mapping[str, Any],
    project_path: str,
    branch_path: str,
) -> CiEvent:
    return CiEvent(
        source=source,
        delivery_id=delivery_id,
        project=field(document, project_path, str),
        kind="branch_deleted",
        branch=field(document, branch_path, str, MAX_BRANCH_LENGTH),
    )


def json_error(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)[:200]
