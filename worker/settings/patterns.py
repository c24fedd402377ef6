"""Whether a repository glob or a tag glob can ever match anything, and if not, what to write.

A pattern that can match no valid name is accepted by any matcher and then
silently does nothing: ``Team/Web`` (names are lowercase), ``team/web:latest``
(a tag in a repository pattern), ``team/[ab]`` (repository globs have no sets),
a protect pattern ``[abc`` (an unclosed set is a literal ``[``, which no tag
holds). The policy loader refuses them with the reason and a suggestion.

"Can it match" is decided exactly, not by trying samples: the glob and the
name grammar are both regular, so the question is whether their intersection
is empty. Characters are sorted into a handful of classes the grammar cares
about; a breadth-first walk over (position in the glob, grammar state) pairs
finds an accepted name if there is one.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final


class _Char(Enum):
    """Character classes of distribution's name grammar and of the tag grammar."""

    LOWER = "lower-case letter or digit"
    UPPER = "upper-case letter"
    DOT = "."
    UNDERSCORE = "_"
    DASH = "-"
    SLASH = "/"
    OTHER = "other"


_LOWER: Final = frozenset(string.ascii_lowercase + string.digits)


def _class(char: str) -> _Char:
    if char in _LOWER:
        return _Char.LOWER
    if char in string.ascii_uppercase:
        return _Char.UPPER
    return {".": _Char.DOT, "_": _Char.UNDERSCORE, "-": _Char.DASH, "/": _Char.SLASH}.get(
        char, _Char.OTHER
    )


#: distribution/reference's repository path grammar as a DFA over character classes:
#: ``component(/component)*``, component ``[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*``.
#: States: 0 start of a component, 1 in letters/digits (accepting), 2 after ".",
#: 3 after "_", 4 after "__", 5 after dashes.
_NAME_DFA: Final[Mapping[int, Mapping[_Char, int]]] = {
    0: {_Char.LOWER: 1},
    1: {_Char.LOWER: 1, _Char.DOT: 2, _Char.UNDERSCORE: 3, _Char.DASH: 5, _Char.SLASH: 0},
    2: {_Char.LOWER: 1},
    3: {_Char.LOWER: 1, _Char.UNDERSCORE: 4},
    4: {_Char.LOWER: 1},
    5: {_Char.LOWER: 1, _Char.DASH: 5},
}
_NAME_ACCEPT: Final = frozenset({1})

_WORD: Final = frozenset({_Char.LOWER, _Char.UPPER, _Char.UNDERSCORE})
#: The tag grammar ``[A-Za-z0-9_][A-Za-z0-9_.-]*``: 0 start, 1 inside (accepting).
_TAG_DFA: Final[Mapping[int, Mapping[_Char, int]]] = {
    0: dict.fromkeys(_WORD, 1),
    1: dict.fromkeys([*_WORD, _Char.DOT, _Char.DASH], 1),
}
_TAG_ACCEPT: Final = frozenset({1})


@dataclass(frozen=True)
class _Token:
    """One step of a glob: a set of classes it consumes, repeated (``*``) or once."""

    classes: frozenset[_Char]
    repeat: bool = False


_NOT_SLASH: Final = frozenset(_Char) - {_Char.SLASH}


def _matches_something(
    tokens: Sequence[_Token], dfa: Mapping[int, Mapping[_Char, int]], accept: frozenset[int]
) -> bool:
    """Whether some string the glob ``tokens`` matches is accepted by ``dfa``."""
    todo = [(0, 0)]
    seen = set(todo)
    while todo:
        position, state = todo.pop()
        if position == len(tokens):
            if state in accept:
                return True
            continue
        token = tokens[position]
        following = [(position + 1, state)] if token.repeat else []
        after = position if token.repeat else position + 1
        following += [(after, dfa[state][c]) for c in token.classes if c in dfa[state]]
        for step in following:
            if step not in seen:
                seen.add(step)
                todo.append(step)
    return False


# -- repository globs ----------------------------------------------------------------------

NAME_GRAMMAR: Final = (
    "repository names are lowercase letters and digits, separated by '.', '_', '__' or "
    "'-' and joined by '/'"
)


def _repository_tokens(glob: str) -> list[_Token]:
    """``**`` crosses ``/``, ``*`` and ``?`` stay within a path component (as the matcher)."""
    tokens: list[_Token] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            tokens.append(_Token(frozenset(_Char), repeat=True))
            i += 2
            continue
        char = glob[i]
        if char == "*":
            tokens.append(_Token(_NOT_SLASH, repeat=True))
        elif char == "?":
            tokens.append(_Token(_NOT_SLASH))
        else:
            tokens.append(_Token(frozenset({_class(char)})))
        i += 1
    return tokens


def repository_glob_can_match(glob: str) -> bool:
    return _matches_something(_repository_tokens(glob), _NAME_DFA, _NAME_ACCEPT)


def repository_glob_problem(glob: str) -> str | None:
    """Why ``glob`` can never match a repository name, with what to write instead; ``None``
    when it can match one."""
    if repository_glob_can_match(glob):
        return None
    for mark, what in (("@", "a digest"), (":", "a tag")):
        if mark in glob:
            name = glob.split(mark, 1)[0]
            suggestion = f" (did you mean {name.lower()!r}?)" if _fixable(name) else ""
            return (
                f"names {what} ({mark}...): a repository pattern matches repository names "
                f"only{suggestion}; choose tags with protect and keep"
            )
    if "[" in glob or "]" in glob:
        return (
            "[...] sets are not supported in repository globs (only *, ** and ?): list each "
            "repository, or use ? for one character"
        )
    if "{" in glob:
        return "{a,b} alternatives are not supported in repository globs: list each repository"
    if _fixable(glob) and glob != glob.lower():
        return f"can never match: repository names are lowercase (did you mean {glob.lower()!r}?)"
    return f"can never match a repository name: {NAME_GRAMMAR}"


def _fixable(glob: str) -> bool:
    return bool(glob) and repository_glob_can_match(glob.lower())


# -- tag globs -----------------------------------------------------------------------------

TAG_GRAMMAR: Final = "tags are letters, digits, '_', '.' and '-', and do not start with '.' or '-'"


class UnclosedSet(ValueError):
    """A ``[`` without its ``]``: the glob matcher would take it literally."""


def _set_classes(body: str) -> frozenset[_Char]:
    """The classes a ``[...]`` set can match (a negated one: anything)."""
    if body.startswith("!"):
        return frozenset(_Char)
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = ord(body[i]), ord(body[i + 2])
            chars.update(chr(c) for c in range(low, min(high, 0x7F) + 1))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return frozenset(_class(c) for c in chars)


def _tag_tokens(glob: str) -> list[_Token]:
    """fnmatch's syntax: ``*``, ``?``, ``[...]`` and ``[!...]`` (``]`` first is literal)."""
    tokens: list[_Token] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "*":
            tokens.append(_Token(frozenset(_Char), repeat=True))
        elif char == "?":
            tokens.append(_Token(frozenset(_Char)))
        elif char == "[":
            end = _set_end(glob, i)
            tokens.append(_Token(_set_classes(glob[i + 1 : end])))
            i = end
        else:
            tokens.append(_Token(frozenset({_class(char)})))
        i += 1
    return tokens


def _set_end(glob: str, start: int) -> int:
    """The index of the ``]`` closing the set opened at ``start``."""
    j = start + 1
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    end = glob.find("]", j)
    if end < 0:
        raise UnclosedSet(start)
    return end


def tag_glob_problem(glob: str) -> str | None:
    """Why the tag glob ``glob`` can never match a tag, with what to write instead."""
    try:
        tokens = _tag_tokens(glob)
    except UnclosedSet:
        return (
            f"unbalanced brackets in {glob!r}: a '[' that no ']' closes (a set like [abc] "
            "matches one of a, b, c; a tag never contains '[' itself)"
        )
    if _matches_something(tokens, _TAG_DFA, _TAG_ACCEPT):
        return None
    if "]" in glob and "[" not in glob:
        return f"unbalanced brackets in {glob!r}: a ']' without its '['"
    if ":" in glob:
        tag = glob.rsplit(":", 1)[1]
        return (
            f"{glob!r} names a repository and a tag: a tag pattern matches the tag only "
            f"(did you mean {tag!r}?)"
        )
    return f"{glob!r} can never match a tag: {TAG_GRAMMAR}"
