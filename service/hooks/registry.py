"""The registry's notification envelopes (``events.v1+json``, ``v2+json``), parsed and bounded.

An envelope never fails as a whole for a bad event: the registry retries any
non-2xx answer forever and holds its whole queue behind it, so an event regsweep
cannot use becomes a :class:`~worker.engine.events.DeadLetter`, one per delivery.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from service.hooks.payload import json_error
from worker.engine.events import (
    MAX_DEAD_EXAMPLES,
    MAX_TIMESTAMP_LENGTH,
    DeadLetter,
    RegistryEnvelope,
    RegistryEvent,
    RegistryEventKind,
    event_time,
    printable_ascii,
    valid_media_type,
    valid_url,
)
from worker.errors import BadEvent
from worker.oci import valid_digest, valid_repository, valid_tag

REGISTRY_EVENTS_V1: Final = "application/vnd.docker.distribution.events.v1+json"


REGISTRY_EVENTS_V2: Final = "application/vnd.docker.distribution.events.v2+json"


#: Bounded work per delivery: a registry sends one event per envelope (a few
#: hundred bytes); events beyond this many are dead-lettered unread.
MAX_ENVELOPE_EVENTS: Final = 1000


#: Longest event id, action, media type and URL taken (distribution's: a UUID,
#: a word, a media type, one URL); anything longer is not from a registry.
MAX_ID_LENGTH: Final = 256


MAX_ACTION_LENGTH: Final = 32


#: Sizes fit a signed 64-bit integer, as the registry's own do.
MAX_SIZE: Final = 2**63 - 1


def parse_registry_envelope(body: bytes) -> RegistryEnvelope:
    """Parse a notification envelope (``{"events": [...]}``); never raises.

    At most :data:`MAX_ENVELOPE_EVENTS` events are read; the rest are dead-lettered.
    """
    try:
        # UTF-8, as RFC 8259 requires between systems; decoding it here spares
        # json.loads its guess at UTF-16 and UTF-32.
        document = json.loads(body.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return dead_envelope(f"body is not JSON: {json_error(exc)}")
    if not isinstance(document, dict) or not isinstance(document.get("events"), list):
        return dead_envelope('body is not an envelope {"events": [...]}')
    raw_events: list[Any] = document["events"]
    events: list[RegistryEvent] = []
    ignored = 0
    dead: list[DeadLetter] = []
    dead_count = 0
    now = datetime.now(UTC)
    for raw in raw_events[:MAX_ENVELOPE_EVENTS]:
        try:
            event = parse_registry_event(raw, now)
        except BadEvent as exc:
            dead_count += 1
            if len(dead) < MAX_DEAD_EXAMPLES:
                dead.append(DeadLetter(_raw_id(raw), str(exc)))
            continue
        if event.kind is RegistryEventKind.IGNORED:
            ignored += 1
        else:
            events.append(event)
    unread = len(raw_events) - MAX_ENVELOPE_EVENTS
    if unread > 0:
        reason = f"{unread} events beyond the first {MAX_ENVELOPE_EVENTS} were not read"
        dead.append(DeadLetter(None, reason, unread))
        dead_count += unread
    return RegistryEnvelope(tuple(events), ignored, tuple(dead), dead_count)


def dead_envelope(reason: str) -> RegistryEnvelope:
    """A delivery that is unusable as a whole: one dead letter, no events."""
    return RegistryEnvelope((), 0, (DeadLetter(None, reason),), 1)


def _raw_id(raw: object) -> str | None:
    value = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and printable_ascii(value):
        return value
    return None  # not an id worth naming in a log line


def parse_registry_event(raw: object, now: datetime | None = None) -> RegistryEvent:
    """Validate one event of an envelope (received ``now``); raises :class:`BadEvent`."""
    if not isinstance(raw, dict):
        raise BadEvent("event is not an object")
    target = raw.get("target")
    if not isinstance(target, dict):
        raise BadEvent("event has no target object")
    return RegistryEvent(
        id=_event_id(raw),
        action=_required_str(raw, "action", limit=MAX_ACTION_LENGTH),
        repository=_repository(target),
        digest=_optional_checked(target, "digest", valid_digest),
        tag=_optional_checked(target, "tag", valid_tag),
        media_type=_optional_checked(target, "mediaType", valid_media_type),
        size=_size(target),
        timestamp=event_time(_required_str(raw, "timestamp", limit=MAX_TIMESTAMP_LENGTH), now),
        url=_optional_checked(target, "url", valid_url),
    )


def _event_id(raw: Mapping[str, Any]) -> str:
    value = _required_str(raw, "id", limit=MAX_ID_LENGTH)
    if not printable_ascii(value):
        raise BadEvent("id is not printable ASCII")
    return value


def _repository(target: Mapping[str, Any]) -> str:
    name = _required_str(target, "repository", where="target.")
    if not valid_repository(name):
        raise BadEvent(f"target.repository {name[:100]!r} is not a valid repository name")
    return name


def _optional_checked(
    target: Mapping[str, Any], key: str, check: Callable[[str], bool]
) -> str | None:
    value = _optional_str(target, key)
    if value is not None and not check(value):
        raise BadEvent(f"target.{key} {value[:100]!r} is not valid")
    return value


def _size(target: Mapping[str, Any]) -> int:
    value = target.get("size", target.get("length", 0))
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SIZE:
        raise BadEvent("target.size is not a non-negative 64-bit integer")
    return value


def _required_str(
    obj: Mapping[str, Any], key: str, *, where: str = "", limit: int | None = None
) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise BadEvent(f"{where}{key} is missing or not a string")
    if limit is not None and len(value) > limit:
        raise BadEvent(f"{where}{key} is longer than {limit} characters")
    return value


def _optional_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadEvent(f"target.{key} is not a string")
    return value


REGISTRY_MEDIA_TYPES: Final = frozenset(
    {REGISTRY_EVENTS_V1, REGISTRY_EVENTS_V2, "application/json"}
)


def read_registry_delivery(media_type: str, body: bytes) -> RegistryEnvelope:
    """Parse a registry delivery; a content type it cannot be in makes it one dead letter."""
    if media_type not in REGISTRY_MEDIA_TYPES:
        return dead_envelope(f"unsupported content type {media_type[:100]!r}")
    return parse_registry_envelope(body)
