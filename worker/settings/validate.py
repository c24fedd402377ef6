"""The generic validator: a section of the policy file read key by key, every problem
collected with its file, line and key (never a secret), raised together at the end."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from worker.durations import DURATION_HINT, parse_duration
from worker.errors import ConfigError
from worker.settings import env
from worker.settings.yamlfile import Map, Seq

_T = TypeVar("_T")


class Problems:
    """Every problem found, each with its place, so the user sees them all at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []
        #: The line of every key read (``registry.ca_file``: 4), for later checks' messages.
        self.key_lines: dict[str, int] = {}

    def add(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{self.source}:{line}" if line else self.source
        self.lines.append(f"{where}: {path}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _unknown_key(key: str, keys: Sequence[str]) -> str:
    if key == "password":
        return "unknown key: the password comes from the variable named by password_env"
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (expected one of: {', '.join(keys)})"
    return f"unknown key{hint}"


def _not_a_string(value: object) -> str:
    if isinstance(value, bool | int | float):
        return "must be a string (put it in quotes)"
    return "must be a non-empty string"


class Section:
    """One YAML mapping being read: typed getters that record problems instead of raising.

    A getter returns ``None`` (or an empty list) for a value that is absent or
    wrong; the wrong ones are in ``problems`` and the load fails as a whole.
    """

    def __init__(
        self,
        value: object,
        path: str,
        problems: Problems,
        keys: Sequence[str],
        *,
        list_item: bool = False,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.problems = problems
        self._data: dict[str, object] = {}
        #: Where this mapping starts, and where each of its keys is.
        self.line = value.line if isinstance(value, Map) else line
        self._key_lines = value.key_lines if isinstance(value, Map) else {}
        # "required" is only worth saying inside a mapping that exists.
        self._present = isinstance(value, dict)
        # An absent section is empty; an empty list entry (`- `) is a mistake.
        if (value is not None or list_item) and not isinstance(value, dict):
            problems.add(path, "must be a mapping", self.line)
        for key, item in value.items() if isinstance(value, dict) else ():
            if isinstance(key, str) and key in keys:
                self._data[key] = item
                problems.key_lines[self.at(key)] = self.line_of(key) or 0
            else:
                self.problem(str(key), _unknown_key(str(key), keys))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` (of its first part for ``a.b``), else of this mapping."""
        head = key.partition(".")[0]
        return self._key_lines.get(key) or self._key_lines.get(head) or self.line

    def problem(self, key: str, message: str) -> None:
        self.problems.add(self.at(key), message, self.line_of(key))

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def get(self, key: str, *, required: bool = False) -> object:
        value = self._data.get(key)
        if value is None and required and self._present:
            self.problem(key, "required")
        return value

    def section(self, key: str, keys: Sequence[str], *, required: bool = False) -> Section:
        value = self.get(key, required=required)
        return Section(value, self.at(key), self.problems, keys, line=self.line_of(key))

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.get(key, required=required)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None:
            self.problem(key, _not_a_string(value))
        return None

    def integer(self, key: str, *, low: int, high: int | None = None) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, "must be a whole number")
        elif value < low:
            self.problem(key, f"must be at least {low}")
        elif high is not None and value > high:
            self.problem(key, f"must be at most {high}")
        else:
            return value
        return None

    def duration(
        self, key: str, *, zero_ok: bool = False, required: bool = False
    ) -> timedelta | None:
        value = self.get(key, required=required)
        if value is None:
            return None
        try:
            # A bare 0 needs no unit; any other bare number is ambiguous.
            result = timedelta(0) if type(value) is int and value == 0 else _duration_of(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None
        if result == timedelta(0) and not zero_ok:
            self.problem(key, "must be longer than 0s")
            return None
        return result

    def strings(
        self, key: str, convert: Callable[[str], _T], *, required: bool = False
    ) -> tuple[_T, ...]:
        """Each item of a list of non-empty strings, through ``convert`` (which raises
        ``ValueError`` with the message for a bad item)."""
        value = self.get(key, required=required)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(key, "must be a list of strings")
            return ()
        if not value and required:
            self.problem(key, "must list at least one entry")
        converted: list[_T] = []
        for index, item in enumerate(value):
            where = f"{self.at(key)}[{index}]"
            try:
                if not (isinstance(item, str) and item.strip()):
                    raise ValueError(_not_a_string(item))
                converted.append(convert(item))
            except ValueError as exc:
                self.problems.add(where, str(exc), item_line(value, index) or self.line_of(key))
        return tuple(converted)

    def variable(self, key: str) -> str | None:
        """The name of an environment variable (never echoed: it may be a pasted secret)."""
        name = self.text(key)
        if name is not None and not env.is_variable_name(name):
            self.problem(key, "must be the name of an environment variable, like REGSWEEP_X")
            return None
        return name


def item_line(value: object, index: int) -> int | None:
    """The line of item ``index`` of a YAML sequence, when it has one."""
    if isinstance(value, Seq) and index < len(value.item_lines):
        return value.item_lines[index]
    return None


def _duration_of(value: object) -> timedelta:
    if not isinstance(value, str):
        raise ValueError(DURATION_HINT)
    return parse_duration(value)
