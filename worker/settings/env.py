"""The one module that reads environment variables.

Everything else takes an ``environ`` mapping (this module's :func:`current` in
production, a plain dict in tests), so no other code touches ``os.environ``.
Secrets come from variables the policy file names (``password_env``,
``hooks.*_env``); the file itself never holds a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

from worker.settings.model import Secret

CONFIG_PATH_VAR: Final = "REGSWEEP_CONFIG"
REDIS_URL_VAR: Final = "REGSWEEP_REDIS_URL"

_VARIABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def current() -> Mapping[str, str]:
    """The process environment."""
    return os.environ


def _value(environ: Mapping[str, str], name: str) -> str | None:
    # An exported-but-empty variable means "not set": `FOO= regsweep ...` and
    # compose's `FOO: ""` are how people switch a setting off.
    value = environ.get(name, "")
    return value or None


def config_path(environ: Mapping[str, str]) -> str | None:
    """The policy file named by ``REGSWEEP_CONFIG``, if set."""
    return _value(environ, CONFIG_PATH_VAR)


def redis_url(environ: Mapping[str, str]) -> str | None:
    """``REGSWEEP_REDIS_URL``, which overrides the file's ``redis.url``."""
    return _value(environ, REDIS_URL_VAR)


def is_variable_name(name: str) -> bool:
    """Whether ``name`` can be an environment variable's name (``[A-Za-z_][A-Za-z0-9_]*``)."""
    return _VARIABLE_NAME.fullmatch(name) is not None


#: What a conventional variable name looks like: upper-case words joined by "_".
_SHOWN_NAME: Final = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


def shown_name(name: str) -> str:
    """``name`` for a message when it looks like a conventional variable name
    (``REGSWEEP_GITHUB_SECRET``), else a description: a ``*_env`` key sometimes holds the
    secret itself, pasted by mistake, and that must never be echoed."""
    if len(name) <= 64 and _SHOWN_NAME.fullmatch(name):
        return name
    return "the variable it names (not shown: it does not look like a variable name)"


def secret(environ: Mapping[str, str], name: str) -> Secret | None:
    """The secret held by variable ``name``; ``None`` when it is unset or empty."""
    value = _value(environ, name)
    return None if value is None else Secret(value)


CACHE_DIR_VAR: Final = "REGSWEEP_CACHE_DIR"


def cache_dir(environ: Mapping[str, str]) -> str:
    """Where the CLI keeps caches of immutable registry content (``REGSWEEP_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/regsweep``, else ``~/.cache/regsweep``)."""
    explicit = _value(environ, CACHE_DIR_VAR)
    if explicit:
        return explicit
    base = _value(environ, "XDG_CACHE_HOME") or os.path.join(
        _value(environ, "HOME") or os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "regsweep")
