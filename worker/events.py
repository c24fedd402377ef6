"""Events from the registry and from CI, normalised into frozen value objects.

The service parses a delivery once, here, and hands on only these objects;
workers never see a raw payload. Registry envelopes never raise for a single
bad event: the registry retries any non-2xx answer forever and holds its whole
queue behind it, so an event regsweep cannot use becomes a :class:`DeadLetter`.
CI payloads (GitHub, GitLab) raise :class:`BadEvent`; their senders show the
4xx to a person.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from worker.errors import RegsweepError
from worker.mediatypes import KNOWN_MANIFEST_TYPES

REGISTRY_EVENTS_V1: Final = "application/vnd.docker.distribution.events.v1+json"
REGISTRY_EVENTS_V2: Final = "application/vnd.docker.distribution.events.v2+json"

#: distribution/reference's path component and separator grammar; no domain part,
#: since the registry reports names relative to itself.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_NAME: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
REPOSITORY_MAX_LENGTH: Final = 255
TAG: Final = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST: Final = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
#: What a restore job names: a digest, or the beginning of one (as plan tables show it).
DIGEST_PREFIX: Final = re.compile(r"(?:sha256:)?[a-f0-9]{1,64}")

#: Schema 1 types still show up in 2.8 notifications for old clients.
MANIFEST_TYPES: Final = KNOWN_MANIFEST_TYPES
ZERO_SHA: Final = "0" * 40
BRANCH_REF_PREFIX: Final = "refs/heads/"
EXCERPT_LIMIT: Final = 2048

#: Bounded work per delivery: a registry sends one event per envelope (a few
#: hundred bytes); events beyond this many are dead-lettered unread.
MAX_ENVELOPE_EVENTS: Final = 1000
#: Unusable events of one delivery named one by one in its dead letter; the rest counted.
MAX_DEAD_EXAMPLES: Final = 5
#: Longest event id, action, media type and URL taken (distribution's: a UUID,
#: a word, a media type, one URL); anything longer is not from a registry.
MAX_ID_LENGTH: Final = 256
MAX_ACTION_LENGTH: Final = 32
MAX_MEDIA_TYPE_LENGTH: Final = 255
MAX_URL_LENGTH: Final = 2048
MAX_TIMESTAMP_LENGTH: Final = 64
#: Sizes fit a signed 64-bit integer, as the registry's own do.
MAX_SIZE: Final = 2**63 - 1
#: Event times before the first Docker release, or more than this ahead of
#: regsweep's clock, are no registry's: such an event is dead-lettered, never
#: recorded as a push time (the tag index could not read it back).
EARLIEST_EVENT_TIME: Final = datetime(2013, 3, 20, tzinfo=UTC)
MAX_CLOCK_AHEAD: Final = timedelta(days=1)
#: CI fields: GitHub and GitLab project paths and git branch names are far shorter.
MAX_PROJECT_LENGTH: Final = 512
MAX_BRANCH_LENGTH: Final = 1024
MAX_NUMBER: Final = 2**31 - 1
_MEDIA_TYPE: Final = re.compile(r"[\w.+-]+/[\w.+-]+", re.ASCII)


class BadEvent(RegsweepError):
    """A webhook payload that cannot be used; the message says which field is wrong."""


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


CiSource = Literal["github", "gitlab"]
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


def valid_repository(name: str) -> bool:
    return len(name) <= REPOSITORY_MAX_LENGTH and REPOSITORY_NAME.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return TAG.fullmatch(tag) is not None


def valid_digest(digest: str) -> bool:
    return DIGEST.fullmatch(digest) is not None


def valid_digest_or_prefix(digest: str) -> bool:
    """A whole digest or a prefix of a sha256 one (a restore resolves it, unique or refused)."""
    return valid_digest(digest) or DIGEST_PREFIX.fullmatch(digest) is not None


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


# --- registry envelopes -------------------------------------------------------


def parse_registry_envelope(body: bytes) -> RegistryEnvelope:
    """Parse a notification envelope (``{"events": [...]}``); never raises.

    At most :data:`MAX_ENVELOPE_EVENTS` events are read; the rest are dead-lettered.
    """
    try:
        # UTF-8, as RFC 8259 requires between systems; decoding it here spares
        # json.loads its guess at UTF-16 and UTF-32.
        document = json.loads(body.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return dead_envelope(f"body is not JSON: {_json_error(exc)}")
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


def _json_error(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)[:200]


def _raw_id(raw: object) -> str | None:
    value = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and _printable_ascii(value):
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
    if not _printable_ascii(value):
        raise BadEvent("id is not printable ASCII")
    return value


def _printable_ascii(value: str) -> bool:
    """Printable ASCII without blanks (str methods: a regex costs the hook more)."""
    return value.isascii() and value.isprintable() and " " not in value


def valid_media_type(value: str) -> bool:
    return len(value) <= MAX_MEDIA_TYPE_LENGTH and _MEDIA_TYPE.fullmatch(value) is not None


def valid_url(value: str) -> bool:
    return len(value) <= MAX_URL_LENGTH and _printable_ascii(value)


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


# --- GitHub and GitLab -----------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadEvent(f"body is not JSON: {_json_error(exc)}") from exc
    if not isinstance(document, dict):
        raise BadEvent("body is not a JSON object")
    return document


def _path(document: Mapping[str, Any], dotted: str, kind: type[Any], limit: int = 0) -> Any:
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
        _check_text(dotted, value, limit or MAX_PROJECT_LENGTH)
    return value


def _check_text(name: str, value: str, limit: int) -> None:
    if not value:
        raise BadEvent(f"{name} is empty")
    if len(value) > limit:
        raise BadEvent(f"{name} is longer than {limit} characters")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise BadEvent(f"{name} is not valid Unicode text") from exc


def github_zen(body: bytes) -> str:
    """The ``zen`` line of a GitHub ``ping``; raises :class:`BadEvent` for a non-JSON body."""
    zen = _json_object(body).get("zen")
    return zen if isinstance(zen, str) else ""


def parse_github(event_name: str, body: bytes, delivery_id: str) -> CiEvent | None:
    """A :class:`CiEvent` for the deliveries regsweep acts on, ``None`` for the rest."""
    document = _json_object(body)
    if event_name == "pull_request":
        return _github_pull_request(document, delivery_id)
    if event_name == "delete":
        if _path(document, "ref_type", str) != "branch":
            return None
        return _branch_deleted("github", delivery_id, document, "repository.full_name", "ref")
    if event_name == "push":
        if document.get("deleted") is not True:
            return None
        return _pushed_ref_deleted("github", delivery_id, document, "repository.full_name")
    return None


def _github_pull_request(document: Mapping[str, Any], delivery_id: str) -> CiEvent | None:
    if _path(document, "action", str) != "closed":
        return None
    return CiEvent(
        source="github",
        delivery_id=delivery_id,
        project=_path(document, "repository.full_name", str),
        kind="pull_request_closed",
        number=_path(document, "pull_request.number", int),
        branch=_path(document, "pull_request.head.ref", str, MAX_BRANCH_LENGTH),
        merged=document["pull_request"].get("merged") is True,
    )


def parse_gitlab(event_header: str, body: bytes, delivery_id: str) -> CiEvent | None:
    """A :class:`CiEvent` for merge requests closed/merged and deleted branches, else ``None``."""
    document = _json_object(body)
    if event_header == "Merge Request Hook":
        return _gitlab_merge_request(document, delivery_id)
    if event_header == "Push Hook":
        if _path(document, "after", str) != ZERO_SHA:
            return None
        return _pushed_ref_deleted("gitlab", delivery_id, document, "project.path_with_namespace")
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
        project=_path(document, "project.path_with_namespace", str),
        kind="pull_request_closed",
        number=_path(document, "object_attributes.iid", int),
        branch=_path(document, "object_attributes.source_branch", str, MAX_BRANCH_LENGTH),
        merged=action == "merge",
    )


def _pushed_ref_deleted(
    source: CiSource, delivery_id: str, document: Mapping[str, Any], project_path: str
) -> CiEvent | None:
    ref = _path(document, "ref", str, MAX_BRANCH_LENGTH)
    if not ref.startswith(BRANCH_REF_PREFIX):
        return None  # a deleted tag, not a branch
    short = {**document, "ref": ref.removeprefix(BRANCH_REF_PREFIX)}
    return _branch_deleted(source, delivery_id, short, project_path, "ref")


def _branch_deleted(
    source: CiSource,
    delivery_id: str,
    document: Mapping[str, Any],
    project_path: str,
    branch_path: str,
) -> CiEvent:
    return CiEvent(
        source=source,
        delivery_id=delivery_id,
        project=_path(document, project_path, str),
        kind="branch_deleted",
        branch=_path(document, branch_path, str, MAX_BRANCH_LENGTH),
    )


# --- job requests (POST /api/v1/jobs) ----------------------------------------------


class JobKind(StrEnum):
    PRUNE = "prune"
    SWEEP = "sweep"
    GC = "gc"
    RESTORE = "restore"


_JOB_KEYS: Final = frozenset({"kind", "repository", "dry_run", "digest"})


@dataclass(frozen=True)
class JobRequest:
    """A validated request for work; ``dry_run`` ``None`` means "as the policy's mode says"."""

    kind: JobKind
    repository: str | None = None
    dry_run: bool | None = None
    digest: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The job's parameters, without the ones left unset."""
        given = {"repository": self.repository, "dry_run": self.dry_run, "digest": self.digest}
        return {key: value for key, value in given.items() if value is not None}


def parse_job_request(body: bytes) -> JobRequest:
    """Validate ``{"kind", "repository", "dry_run", "digest"}``; raises :class:`BadEvent`."""
    document = _json_object(body)
    unknown = sorted(set(document) - _JOB_KEYS)
    if unknown:
        raise BadEvent(f"unknown fields: {', '.join(unknown)[:200]}")
    kind_value = document.get("kind")
    if kind_value not in tuple(JobKind):
        raise BadEvent(f"kind must be one of {', '.join(JobKind)}")
    request = JobRequest(
        kind=JobKind(kind_value),
        repository=_optional_field(document, "repository", valid_repository),
        dry_run=_optional_bool(document, "dry_run"),
        digest=_optional_field(document, "digest", valid_digest_or_prefix),
    )
    _check_job_shape(request)
    return request


def _optional_field(
    document: Mapping[str, Any], key: str, check: Callable[[str], bool]
) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not check(value):
        raise BadEvent(f"{key} is not a valid {key}")
    return value


def _optional_bool(document: Mapping[str, Any], key: str) -> bool | None:
    value = document.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadEvent(f"{key} must be true or false")
    return value


def _check_job_shape(request: JobRequest) -> None:
    if request.kind is JobKind.RESTORE and (request.repository is None or request.digest is None):
        raise BadEvent("restore needs repository and digest")
    if request.kind is not JobKind.RESTORE and request.digest is not None:
        raise BadEvent("digest is only for restore")
    if request.kind is JobKind.GC and request.repository is not None:
        raise BadEvent("gc runs on the whole registry; repository is not allowed")
