"""Retention policy and settings as frozen value objects.

Everything here is built once, by :mod:`worker.config` when the process starts,
with every pattern compiled and every contradiction already refused. Nothing
here reads the environment or the file system.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final, Literal

DEFAULT_CONCURRENCY: Final = 8
DEFAULT_AUDIT_PATH: Final = "regsweep-audit.jsonl"
DEFAULT_SWEEP_EVERY: Final = timedelta(hours=6)
DEFAULT_WINDOW_DURATION: Final = timedelta(hours=2)
#: A GC does not start when less than this much of the window is left.
DEFAULT_WINDOW_MARGIN: Final = timedelta(minutes=10)
DEFAULT_BODY_LIMIT: Final = 1024 * 1024
DEFAULT_HEAD_LIMIT: Final = 64 * 1024
DEFAULT_HEAD_TIMEOUT: Final = timedelta(seconds=10)
DEFAULT_BODY_TIMEOUT: Final = timedelta(seconds=30)
DEFAULT_MAX_CONNECTIONS: Final = 512
DEFAULT_CONFIG_PATH: Final = "/etc/docker/registry/config.yml"
#: How long ``restore`` holds what it put back (every plan keeps a held tag).
DEFAULT_RESTORE_HOLD: Final = timedelta(days=7)

_REGEX_PREFIX: Final = "re:"


class Mode(StrEnum):
    DRY_RUN = "dry-run"
    ENFORCE = "enforce"


class AgeSource(StrEnum):
    """What a policy's ``newest`` and ``pushed_within`` measure (``age_from``)."""

    #: Push evidence only: notifications, the storage's tag links, regsweep's listings.
    PUSH = "push"
    #: Also the image's build time where no push evidence exists (opt-in; see docs/policy.md).
    BUILD_TIME = "build_time"


class Secret:
    """A secret value that never shows itself in a repr, a log line or a response."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TagPattern:
    """A glob (``*``, ``?``, ``[...]``) or, with ``re:``, a regex matched against the whole tag."""

    source: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, source: str) -> TagPattern:
        """Compile ``source``; raises ``re.error`` for a bad ``re:`` expression."""
        if source.startswith(_REGEX_PREFIX):
            return cls(source, re.compile(source[len(_REGEX_PREFIX) :]))
        return cls(source, re.compile(fnmatch.translate(source)))

    def matches(self, tag: str) -> bool:
        return self.regex.fullmatch(tag) is not None


@dataclass(frozen=True)
class RepositoryPattern:
    """A repository glob: ``*`` and ``?`` stay within one path segment, ``**`` crosses ``/``."""

    source: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, source: str) -> RepositoryPattern:
        out: list[str] = []
        i = 0
        while i < len(source):
            if source.startswith("**", i):
                out.append(".*")
                i += 2
            elif source[i] == "*":
                out.append("[^/]*")
                i += 1
            elif source[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(source[i]))
                i += 1
        return cls(source, re.compile("".join(out)))

    def matches(self, repository: str) -> bool:
        return self.regex.fullmatch(repository) is not None


def any_match(patterns: tuple[TagPattern, ...], tag: str) -> TagPattern | None:
    """The first pattern that matches ``tag``, if any."""
    return next((p for p in patterns if p.matches(tag)), None)


@dataclass(frozen=True)
class KeepRule:
    """Keeps the matching tags that satisfy every limit given (no limit: all matching tags)."""

    index: int
    tags: tuple[TagPattern, ...]
    newest: int | None = None
    pushed_within: timedelta | None = None

    @property
    def label(self) -> str:
        """How reasons name this rule, e.g. ``keep[0]``."""
        return f"keep[{self.index}]"


@dataclass(frozen=True)
class EventTemplates:
    """Tag templates deleted when a CI event arrives (``{number}``, ``{branch}``, ...)."""

    pull_request_closed: tuple[str, ...] = ()
    branch_deleted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sources:
    """Which CI projects feed a policy (``owner/name`` / ``group/project`` globs)."""

    github: tuple[RepositoryPattern, ...] = ()
    gitlab: tuple[RepositoryPattern, ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    repositories: tuple[RepositoryPattern, ...]
    mode: Mode = Mode.DRY_RUN
    protect: tuple[TagPattern, ...] = ()
    #: ``None``: the policy has no ``keep:`` and retention removes no tag.
    keep: tuple[KeepRule, ...] | None = None
    untagged_delete_after: timedelta | None = None
    on: EventTemplates = field(default_factory=EventTemplates)
    sources: Sources = field(default_factory=Sources)
    age_from: AgeSource = AgeSource.PUSH

    def matches_repository(self, repository: str) -> bool:
        return any(p.matches(repository) for p in self.repositories)

    def protected_by(self, tag: str) -> TagPattern | None:
        return any_match(self.protect, tag)


@dataclass(frozen=True)
class RegistrySettings:
    url: str
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    #: The filesystem driver's rootdirectory, read-only: exact push times, stored manifests.
    storage_path: str | None = None


@dataclass(frozen=True)
class HookSettings:
    """Resolved hook secrets; a hook whose secret is ``None`` is disabled (404)."""

    registry_token: Secret | None = None
    github_secret: Secret | None = None
    gitlab_token: Secret | None = None
    gitlab_signing_key: Secret | None = None
    api_token: Secret | None = None
    body_limit: int = DEFAULT_BODY_LIMIT
    #: Request line and headers, in bytes (431 beyond).
    head_limit: int = DEFAULT_HEAD_LIMIT
    #: To receive the head (from the connection or the head's first byte), then the body (408).
    head_timeout: timedelta = DEFAULT_HEAD_TIMEOUT
    body_timeout: timedelta = DEFAULT_BODY_TIMEOUT
    #: Open connections; one more is answered 503 and closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: ``/metrics`` wants ``Authorization: Bearer`` with it when set.
    metrics_token: Secret | None = None
    #: ``host:port`` to serve ``/metrics`` on instead of the hooks' address.
    metrics_listen: str | None = None
    #: ``hooks.*_env`` keys the file sets whose variable is not set (their hook is off).
    unset: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockerControllerSettings:
    kind: Literal["docker"] = "docker"
    container: str = "registry"
    config_path: str = DEFAULT_CONFIG_PATH


@dataclass(frozen=True)
class ProcessControllerSettings:
    readonly_command: str
    readwrite_command: str
    gc_command: str
    storage_path: str | None = None
    kind: Literal["process"] = "process"


ControllerSettings = DockerControllerSettings | ProcessControllerSettings


@dataclass(frozen=True)
class MaintenanceSettings:
    window_cron: str | None = None
    window_duration: timedelta = DEFAULT_WINDOW_DURATION
    window_margin: timedelta = DEFAULT_WINDOW_MARGIN
    #: ``auto``: pass --delete-untagged only to registry >= 3.0 (2.8's is unsafe).
    gc_delete_untagged: Literal["auto", "always", "never"] = "auto"
    controller: ControllerSettings | None = None
    #: Registry major.minor when the controller cannot tell, e.g. "2.8" or "3.0".
    registry_version: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole validated policy file plus what the environment added."""

    registry: RegistrySettings
    policies: tuple[Policy, ...] = ()
    #: ``None``: no Redis configured; the CLI then keeps its audit log in ``audit_path``.
    #: Out of the repr: ``redis://:password@host`` is a common way to write it.
    redis_url: str | None = field(default=None, repr=False)
    sweep_every: timedelta = DEFAULT_SWEEP_EVERY
    hooks: HookSettings = field(default_factory=HookSettings)
    maintenance: MaintenanceSettings = field(default_factory=MaintenanceSettings)
    #: The audit log (and, beside it, the CLI's state file) when no Redis is configured:
    #: an absolute path, by default next to the policy file.
    audit_path: str | None = None
    restore_hold: timedelta = DEFAULT_RESTORE_HOLD
    source: str = "<memory>"

    def policy_for(self, repository: str) -> Policy | None:
        """The first policy matching ``repository``; unmatched repositories are never touched."""
        return next((p for p in self.policies if p.matches_repository(repository)), None)
