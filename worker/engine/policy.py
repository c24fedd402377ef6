"""A retention policy as a frozen value object: what to keep, what to protect, what events delete.

Built once, by :mod:`worker.settings.load` when the process starts, with every
pattern compiled and every contradiction already refused; planning reads it and
nothing else. Nothing here reads the environment or the file system.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final

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


class Sources(Mapping[str, tuple[RepositoryPattern, ...]]):
    """Which CI projects feed a policy, by source: ``Sources(github=(...), gitlab=(...))``,
    read as a mapping (a source without projects is left out). Frozen and hashable."""

    __slots__ = ("_projects",)

    def __init__(self, **projects: tuple[RepositoryPattern, ...]) -> None:
        self._projects = {source: found for source, found in projects.items() if found}

    def __getitem__(self, source: str) -> tuple[RepositoryPattern, ...]:
        return self._projects[source]

    def __iter__(self) -> Iterator[str]:
        return iter(self._projects)

    def __len__(self) -> int:
        return len(self._projects)

    def __hash__(self) -> int:
        return hash(frozenset(self._projects.items()))

    def __repr__(self) -> str:
        return f"Sources({self._projects!r})"


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

    def fed_by(self, source: str, project: str) -> bool:
        """Whether ``source``'s project ``project`` feeds this policy (``sources:``)."""
        return any(p.matches(project) for p in self.sources.get(source, ()))

    def matches_repository(self, repository: str) -> bool:
        return any(p.matches(repository) for p in self.repositories)

    def protected_by(self, tag: str) -> TagPattern | None:
        return any_match(self.protect, tag)
