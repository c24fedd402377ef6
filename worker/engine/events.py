"""Events from the registry and from CI as frozen value objects: what the service hands the workers.

The service parses each sender's payload (:mod:`service.hooks`) into these and
enqueues them as dicts; workers read them back with ``from_dict``, checking
again what could have changed meaning in between (a time no clock can hold).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from worker.errors import BadEvent
from worker.oci import KNOWN_MANIFEST_TYPES

#: Schema 1 types still show up in 2.8 notifications for old clients.
MANIFEST_TYPES: Final = KNOWN_MANIFEST_TYPES


EXCERPT_LIMIT: Final = 2048


#: Unusable events of one delivery named one by one in its dead letter; the rest counted.
MAX_DEAD_EXAMPLES: Final = 5


MAX_TIMESTAMP_LENGTH: Final = 64


#: Event times before the first Docker release, or more than this ahead of
#: regsweep's clock, are no registry's: such an event is dead-lettered, never
#: recorded as a push time (the tag index could not read it back).
EARLIEST_EVENT_TIME: Final = datetime(2013, 3, 20, tzinfo=UTC)


MAX_CLOCK_AHEAD: Final = timedelta(days=1)


_MEDIA_TYPE: Final = re.compile(r"[\w.+-]+/[\w.+-]+", re.ASCII)


class RegistryEventKind(StrEnum):
    """What an event means to regsweep; ``IGNORED`` ones are acknowledged and dropped."""

    MANIFEST_PUSH = "manifest_push"
    MANIFEST_DELETE = "manifest_delete"
    TAG_DELETE = "tag_delete"
    REPOSITORY_DELETE = "repository_delete"
    IGNORED = "ignored"


@dataclass(frozen=True)
class RegistryEvent:
    """One event of a distribution notification envelope, validated."""

    id: str
    action: str
    repository: str
    digest: str | None
    tag: str | None
    media_type: str | None
    size: int
    timestamp: datetime
    url: str | None = None

    @property
    def kind(self) -> RegistryEventKind:
        return _classify(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timestamp"] = self.timestamp.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryEvent:
        """The event :meth:`to_dict` gave; its time checked again (:func:`event_time`)."""
        return cls(**{**data, "timestamp": event_time(data["timestamp"])})


@dataclass(frozen=True)
class DeadLetter:
    """A registry event regsweep cannot use: kept for a person to look at, never retried."""

    event_id: str | None
    reason: str
    #: Events it stands for (the ones beyond the envelope limit are one dead letter).
    count: int = 1


@dataclass(frozen=True)
class RegistryEnvelope:
    """A parsed envelope: events to act on, how many were dropped, and the unusable ones
    (``dead_count`` of them; ``dead`` names the first :data:`MAX_DEAD_EXAMPLES`)."""

    events: tuple[RegistryEvent, ...]
    ignored: int
    dead: tuple[DeadLetter, ...]
    dead_count: int

    def dead_summary(self) -> str:
        """One line for the delivery's dead letter and log: what was wrong, how often."""
        named = "; ".join(
            d.reason if d.event_id is None else f"event {d.event_id}: {d.reason}" for d in self.dead
        )
        more = self.dead_count - sum(d.count for d in self.dead)
        return named + (f"; {more} more unusable events" if more > 0 else "")


#: A CI system regsweep takes webhooks from: its hook's route (``/hooks/<source>``), its key
#: under a policy's ``sources:``, its metrics label. One of :data:`CI_SOURCES`.
CiSource = str


@dataclass(frozen=True)
class ProjectForm:
    """How a CI source names a project: ``segments`` parts joined by ``/`` (at least
    ``fewest``, at most ``most``; None: no limit), as a policy's ``sources:`` refuses others."""

    shape: str
    fewest: int
    most: int | None

    def problem(self, text: str) -> str | None:
        """Why ``text`` is not a project of this form (None when it is)."""
        segments = text.split("/")
        fits = len(segments) >= self.fewest and (self.most is None or len(segments) <= self.most)
        return None if fits and all(segments) else f"must look like {self.shape}"


#: Every CI source, and the form of its projects. Adding one: a row here, and its hook module
#: in ``service/hooks/`` listed in ``service.hooks.sources.SOURCES`` (docs/webhooks.md).
CI_SOURCES: Final[Mapping[CiSource, ProjectForm]] = {
    "github": ProjectForm("owner/name", 2, 2),
    # GitLab nests groups: group/subgroup/project.
    "gitlab": ProjectForm("group/project or group/subgroup/project", 2, None),
}


CiKind = Literal["pull_request_closed", "branch_deleted"]


@dataclass(frozen=True)
class CiEvent:
    """A pull/merge request that closed or a branch that was deleted."""

    source: CiSource
    delivery_id: str
    project: str
    kind: CiKind
    number: int | None = None
    branch: str | None = None
    merged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CiEvent:
        return cls(**data)


def excerpt(raw: bytes | str, limit: int = EXCERPT_LIMIT) -> str:
    """The start of a payload, safe to store and log."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text[:limit]


def _classify(event: RegistryEvent) -> RegistryEventKind:
    if event.action == "push" and _is_manifest(event):
        return RegistryEventKind.MANIFEST_PUSH
    if event.action != "delete":
        # Pulls (the registry reports HEADs as pulls, regsweep's own included),
        # blob pushes and mounts change nothing regsweep keeps.
        return RegistryEventKind.IGNORED
    if event.tag is not None:
        return RegistryEventKind.TAG_DELETE
    if event.digest is not None:
        # Blob deletes look the same; regsweep never makes them and the worker
        # treats a delete of a digest it does not know as a no-op.
        return RegistryEventKind.MANIFEST_DELETE
    return RegistryEventKind.REPOSITORY_DELETE


def _is_manifest(event: RegistryEvent) -> bool:
    if event.url is not None and "/manifests/" in event.url:
        return True
    return event.media_type in MANIFEST_TYPES


def printable_ascii(value: str) -> bool:
    """Printable ASCII without blanks (str methods: a regex costs the hook more)."""
    return value.isascii() and value.isprintable() and " " not in value


def valid_media_type(value: str) -> bool:
    return len(value) <= MAX_MEDIA_TYPE_LENGTH and _MEDIA_TYPE.fullmatch(value) is not None


def valid_url(value: str) -> bool:
    return len(value) <= MAX_URL_LENGTH and printable_ascii(value)


def event_time(value: str, now: datetime | None = None) -> datetime:
    """An event's RFC 3339 time in UTC, within the range a registry can have sent."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise BadEvent(f"timestamp {value!r} is not an RFC 3339 time") from exc
    latest = (now or datetime.now(UTC)) + MAX_CLOCK_AHEAD
    if not EARLIEST_EVENT_TIME <= parsed <= latest:
        raise BadEvent(
            f"timestamp {value!r} is before {EARLIEST_EVENT_TIME:%Y-%m-%d} or more than "
            f"{MAX_CLOCK_AHEAD.days} day ahead of this clock"
        )
    return parsed


MAX_MEDIA_TYPE_LENGTH: Final = 255


MAX_URL_LENGTH: Final = 2048
