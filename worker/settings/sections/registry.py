"""The ``registry:``, ``redis:``, ``sweep:`` and ``audit:`` sections."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Final

from worker.settings import env
from worker.settings.model import (
    DEFAULT_AUDIT_PATH,
    DEFAULT_CONCURRENCY,
    DEFAULT_SWEEP_EVERY,
    RegistrySettings,
    Secret,
)
from worker.settings.validate import Section

MAX_CONCURRENCY: Final = 64
_REGISTRY_KEYS: Final = (
    "url",
    "username",
    "password_env",
    "ca_file",
    "concurrency",
    "storage_path",
)


def parse_registry(top: Section, environ: Mapping[str, str]) -> RegistrySettings:
    section = top.section("registry", _REGISTRY_KEYS, required=True)
    username = section.text("username")
    return RegistrySettings(
        url=_registry_url(section),
        username=username,
        password=_registry_password(section, username, environ),
        ca_file=section.text("ca_file"),
        concurrency=section.integer("concurrency", low=1, high=MAX_CONCURRENCY)
        or DEFAULT_CONCURRENCY,
        storage_path=_storage_path(section),
    )


def _storage_path(section: Section) -> str | None:
    """Only its form here: the service shares the file but not the registry's volume, so the
    directory is checked where it is read (the CLI, the workers) and by ``check-config``."""
    path = section.text("storage_path")
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def parse_audit_path(top: Section, source: str) -> tuple[str, bool]:
    """The JSONL audit file: ``audit.path``, relative to the policy file's directory, by
    default ``regsweep-audit.jsonl`` beside it, whatever the working directory is; and
    whether the file names it."""
    given = top.section("audit", ("path",)).text("path")
    base = Path(source).resolve().parent if source and not source.startswith("<") else Path.cwd()
    return str(base / Path(given or DEFAULT_AUDIT_PATH).expanduser()), given is not None


def _registry_url(section: Section) -> str:
    url = section.text("url", required=True)
    if url is None:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        section.problem("url", "must be an http:// or https:// URL with a host")
    elif parts.username is not None or parts.password is not None:
        section.problem("url", "must not hold credentials: use username and password_env")
    elif parts.query or parts.fragment:
        section.problem("url", "must not have a query or a fragment")
    elif parts.path.rstrip("/").endswith("/v2"):
        section.problem("url", "must be the registry's base URL, without /v2")
    return url.rstrip("/")


def _registry_password(
    section: Section, username: str | None, environ: Mapping[str, str]
) -> Secret | None:
    name = section.variable("password_env")
    if username is None:
        if name is not None:
            section.problem("password_env", "needs username")
        return None
    if name is None:
        if not section.has("password_env"):
            section.problem("password_env", "required with username")
        return None
    password = env.secret(environ, name)
    if password is None:
        section.problem(
            "password_env",
            f"names an environment variable that is not set: {env.shown_name(name)} "
            "(export it, non-empty, where regsweep runs)",
        )
    return password


def _is_redis_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    return parts.scheme in ("redis", "rediss") and bool(parts.hostname)


def parse_redis_url(top: Section, environ: Mapping[str, str]) -> str | None:
    # The URL may hold a password, so neither message repeats it.
    from_file = top.section("redis", ("url",)).text("url")
    if from_file is not None and not _is_redis_url(from_file):
        top.problem("redis.url", "must be a redis://, rediss:// or unix:// URL")
    override = env.redis_url(environ)
    if override is None:
        return from_file
    if not _is_redis_url(override):
        top.problems.add(f"${env.REDIS_URL_VAR}", "must be a redis://, rediss:// or unix:// URL")
    return override


def parse_sweep_every(top: Section) -> timedelta:
    return top.section("sweep", ("every",)).duration("every") or DEFAULT_SWEEP_EVERY
