"""Repository names, tags and digests as people type them, checked one way everywhere.

``plan``, ``prune``, ``hold``, ``unhold``, ``restore``, ``audit`` and the job API
take names a person typed, and people type references the way ``docker pull``
takes them: ``127.0.0.1:5000/Team/Web:pr-7``. The registry knows none of that
as a name (the host is not part of it, names are lowercase, the tag or digest
goes apart), so such input is refused with what was most likely meant, before
anything is read or written: a hold on a name no plan ever sees holds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from worker.oci import REPOSITORY_MAX_LENGTH, valid_digest_or_prefix, valid_repository, valid_tag

NAME_GRAMMAR: Final = "lowercase letters and digits, separated by . _ __ or -, joined by /"
TAG_GRAMMAR: Final = "up to 128 letters, digits, _ . or -, not starting with . or -"
DIGEST_GRAMMAR: Final = "sha256:<64 hex digits>, or the first hex digits of one"
#: Longest input echoed back in a message (a name is at most 255 characters).
SHOWN_MAX: Final = REPOSITORY_MAX_LENGTH + 20


class Second(StrEnum):
    """What a command takes after the repository."""

    NOTHING = ""
    TAG = "TAG"
    DIGEST = "DIGEST"


@dataclass(frozen=True)
class Meant:
    """What a reference typed the ``docker pull`` way most likely names, and what was changed."""

    repository: str
    tag: str | None
    digest: str | None
    #: Each change, said to the person: "leave out the registry's address 127.0.0.1:5000".
    fixes: tuple[str, ...]


def meant(text: str) -> Meant:
    """Split ``[scheme://][host[:port]/]name[:tag][@digest]`` the way docker does, lowercased."""
    rest, fixes = text.strip(), []
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        fixes.append(f"leave out {scheme}://")
    rest, at, digest = rest.partition("@")
    head, slash, last = rest.rpartition("/")
    last, colon, tag = last.partition(":")
    if colon and not slash and tag.isdigit():
        return Meant("", None, None, ("that is a registry's address, not a repository in it",))
    rest = head + slash + last
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        rest = remainder
        fixes.append(f"leave out the registry's address {first}")
    if colon:
        fixes.append("give the tag apart")
    if at:
        fixes.append("give the digest apart")
    if rest != rest.lower():
        rest = rest.lower()
        fixes.append("repository names are lowercase")
    return Meant(rest, tag if colon else None, digest if at else None, tuple(fixes))


def shown(text: str) -> str:
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX] + "…"


@dataclass(frozen=True)
class Named:
    """The names one command was given: REPO, then its TAG or DIGEST if it takes one."""

    repository: str
    second: str | None = None
    takes: Second = Second.NOTHING


def name_problems(named: Named, suggest: Callable[[str, str | None], str]) -> list[str]:
    """Every problem with ``named``, each naming its input; the last ends with what was most
    likely meant (``suggest`` words it: ``team/web pr-7`` on the command line) when every
    part of that is valid. Empty when all is well."""
    problems: list[str] = []
    repository, second = named.repository, named.second
    if not valid_repository(named.repository):
        guess = meant(named.repository)
        repository = guess.repository
        enough = valid_repository(repository)
        problems.append(
            _refusal(
                named.repository, "a repository name", guess.fixes, NAME_GRAMMAR, enough=enough
            )
        )
        if second is None and named.takes is not Second.NOTHING:
            second = guess.tag if named.takes is Second.TAG else guess.digest
    if named.takes is not Second.NOTHING:
        second = _check_second(named, second, problems)
    if problems and valid_repository(repository) and _valid_second(named.takes, second):
        problems[-1] += f"; did you mean {suggest(repository, second)}?"
    return problems


def _check_second(named: Named, second: str | None, problems: list[str]) -> str | None:
    """Check the TAG or DIGEST given; the one most likely meant."""
    given = named.second
    if given is None:
        if second is None:
            problems.append(f"{named.takes.value} is missing")
        return second
    if _valid_second(named.takes, given):
        return given
    tag = named.takes is Second.TAG
    what, grammar = ("a tag", TAG_GRAMMAR) if tag else ("a digest", DIGEST_GRAMMAR)
    # Only a whole reference (team/web:pr-7, team/web@sha256:...) says what it meant.
    if not any(mark in given for mark in ("/@:" if tag else "/@")):
        problems.append(f"{shown(given)}: not {what} ({grammar})")
        return None
    guess = meant(given)
    meant_here = guess.tag if tag else guess.digest
    enough = _valid_second(named.takes, meant_here)
    problems.append(_refusal(given, what, guess.fixes, grammar, enough=enough))
    return meant_here


def _refusal(text: str, what: str, fixes: tuple[str, ...], grammar: str, *, enough: bool) -> str:
    """``text: not a tag (why)``: what to change, and the grammar unless the changes are
    ``enough`` to make it one."""
    if len(text) > SHOWN_MAX:
        return f"{shown(text)}: not {what} (too long)"
    why = list(fixes) if fixes and enough else [*fixes, grammar]
    return f"{shown(text)}: not {what} ({'; '.join(why)})"


def _valid_second(takes: Second, value: str | None) -> bool:
    if takes is Second.NOTHING:
        return True
    if value is None:
        return False
    return valid_tag(value) if takes is Second.TAG else valid_digest_or_prefix(value)


def on_command_line(repository: str, second: str | None) -> str:
    """A suggestion as command-line arguments: ``team/web pr-7``."""
    return repository if second is None else f"{repository} {second}"


def digest_problems(text: str) -> list[str]:
    """Why ``text`` (``audit --digest``) is not a digest or the beginning of one, if it is not."""
    if valid_digest_or_prefix(text):
        return []
    return [f"{shown(text)}: not a digest ({DIGEST_GRAMMAR})"]


def repository_problem(name: str) -> str | None:
    """Why ``name`` is not a repository name (naming it, with the name most likely meant),
    or None: the check of ``plan REPO`` and of the job API's ``repository``."""
    problems = name_problems(Named(name), on_command_line)
    return problems[0] if problems else None
