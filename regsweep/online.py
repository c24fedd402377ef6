"""``regsweep check-config --online``: can this installation do its work, asked of the live parts.

Each check is one line, ok, fail or skip, with a hint on failure:

- ``registry``: ``GET /v2/`` answers, and it is a registry;
- ``credentials``: a catalog read works (else the tag list of a repository a
  policy names, for accounts without catalog access);
- ``deletes``: a DELETE of a digest no content has answers 404 (deletes
  enabled), not 405 ``UNSUPPORTED`` (``storage.delete.enabled`` false) nor the
  read-only 405 of a maintenance window;
- ``storage``: ``registry.storage_path`` is readable and holds the repositories
  the registry lists;
- ``redis``: Redis answers ``PING``; a warning when it keeps no append-only file
  (what lives only in Redis is then lost with a restart: docs/operations.md).

Nothing is written anywhere: the DELETE names a manifest that cannot exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import redis

from worker.errors import (
    RegistryAuthError,
    RegistryError,
    RegistryReadOnly,
    RegsweepError,
    StateError,
)
from worker.registry.client import RegistryClient
from worker.registry.storage import V2, check_storage_root
from worker.settings.model import Config
from worker.store.state import State

#: Repositories the registry lists that ``storage`` looks for under storage_path.
STORAGE_SAMPLE: Final = 5
#: The repository the DELETE probe names when neither the catalog nor a policy gives one.
PROBE_REPOSITORY: Final = "regsweep/check-config"


class Status(StrEnum):
    OK = "ok"
    #: Works, but something should be changed; does not fail the check.
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status.value, "detail": self.detail} | (
            {"hint": self.hint} if self.hint else {}
        )


@dataclass
class _Seen:
    """What earlier checks learnt that later ones use."""

    reachable: bool = False
    catalog: list[str] | None = None


async def online_checks(config: Config) -> list[Check]:
    """Every check, in order; each one's failure is its own line, never an exception."""
    seen = _Seen()
    checks: list[Check] = []
    async with RegistryClient.from_settings(config.registry, retries=1) as client:
        checks.append(await _registry(client, config, seen))
        checks.append(await _credentials(client, config, seen))
        checks.append(await _deletes(client, config, seen))
    checks.append(_storage(config, seen))
    checks.append(await _redis(config))
    return checks


async def _registry(client: RegistryClient, config: Config, seen: _Seen) -> Check:
    url = config.registry.url
    try:
        await client.ping()
    except RegistryAuthError:
        seen.reachable = True  # it answered, and wants credentials: the next check says more
        return Check("registry", Status.OK, f"{url} answers (and asks for credentials)")
    except RegistryError as exc:
        return Check("registry", Status.FAIL, exc.detail, exc.hint or "check registry.url")
    seen.reachable = True
    return Check("registry", Status.OK, f"{url} answers as a registry")


async def _credentials(client: RegistryClient, config: Config, seen: _Seen) -> Check:
    if not seen.reachable:
        return Check("credentials", Status.SKIP, "the registry is not reachable")
    who = f"as {config.registry.username}" if config.registry.username else "anonymously"
    try:
        await client.ping()
        seen.catalog = await client.catalog()
    except RegistryAuthError as exc:
        fallback = await _tag_list_instead(client, config)
        if fallback is not None:
            return Check("credentials", Status.OK, f"{who}: {fallback} (no catalog access)")
        return Check("credentials", Status.FAIL, exc.detail, exc.hint or _credentials_hint(config))
    except RegistryError as exc:
        return Check("credentials", Status.FAIL, exc.detail, exc.hint or "")
    count = len(seen.catalog)
    return Check("credentials", Status.OK, f"{who}: read the catalog ({count} repositories)")


def _credentials_hint(config: Config) -> str:
    if config.registry.username is None:
        return "set registry.username and registry.password_env"
    return "check registry.username and the password in the variable registry.password_env names"


async def _tag_list_instead(client: RegistryClient, config: Config) -> str | None:
    """An account without catalog access may still read a repository a policy names."""
    repository = _literal_repository(config)
    if repository is None:
        return None
    try:
        await client.tags(repository)
    except RegistryError:
        return None
    return f"read the tag list of {repository}"


def _literal_repository(config: Config) -> str | None:
    for policy in config.policies:
        for pattern in policy.repositories:
            if not any(c in pattern.source for c in "*?"):
                return pattern.source
    return None


def _probe_repository(config: Config, catalog: list[str] | None) -> str:
    names = catalog or []
    governed = [n for n in names if config.policy_for(n) is not None]
    return next(iter(governed or names), None) or _literal_repository(config) or PROBE_REPOSITORY


async def _deletes(client: RegistryClient, config: Config, seen: _Seen) -> Check:
    if not seen.reachable:
        return Check("deletes", Status.SKIP, "the registry is not reachable")
    repository = _probe_repository(config, seen.catalog)
    try:
        enabled = await client.deletes_enabled(repository)
    except RegistryReadOnly as exc:
        return Check(
            "deletes",
            Status.FAIL,
            exc.detail,
            "the registry is read-only (a maintenance window running, or one left it so): "
            "regsweep gc puts it back, or restart it without storage.maintenance.readonly",
        )
    except RegistryError as exc:
        return Check("deletes", Status.FAIL, exc.detail, exc.hint or "")
    if not enabled:
        return Check(
            "deletes",
            Status.FAIL,
            f"the registry refuses deletes (405 UNSUPPORTED, asked in {repository})",
            "set storage.delete.enabled: true in the registry's config.yml "
            "(or REGISTRY_STORAGE_DELETE_ENABLED=true) and restart it",
        )
    return Check("deletes", Status.OK, f"enabled (a DELETE in {repository} answered 404)")


def _storage(config: Config, seen: _Seen) -> Check:
    path = config.registry.storage_path
    if path is None:
        return Check("storage", Status.SKIP, "registry.storage_path is not set")
    problem = check_storage_root(path)
    if problem is not None:
        return Check("storage", Status.FAIL, f"{path} {problem}")
    if seen.catalog is None:
        return Check("storage", Status.OK, f"{path} is readable (the catalog was not read)")
    if not seen.catalog:
        return Check("storage", Status.OK, f"{path} is readable; the registry lists no repository")
    sample = seen.catalog[:STORAGE_SAMPLE]
    root = Path(path) / V2 / "repositories"
    missing = [name for name in sample if not (root / name / "_manifests").is_dir()]
    if missing:
        return Check(
            "storage",
            Status.FAIL,
            f"{root} lacks {', '.join(missing)}, which the registry lists",
            "registry.storage_path must be this registry's storage.filesystem.rootdirectory",
        )
    return Check("storage", Status.OK, f"{path} holds the repositories the registry lists")


async def _redis(config: Config) -> Check:
    if config.redis_url is None:
        return Check("redis", Status.SKIP, "no redis.url (nor REGSWEEP_REDIS_URL)")
    state = State.from_url(config.redis_url)
    try:
        await state.ping()
        lost = await _unpersisted(state)
    except StateError as exc:
        return Check("redis", Status.FAIL, str(exc), "is Redis running at redis.url?")
    finally:
        await _close(state)
    if lost is not None:
        hint = "run it with appendonly yes (compose.yaml does); see docs/operations.md, Redis"
        return Check("redis", Status.WARN, f"{state.server} answers PING, but {lost}", hint)
    return Check("redis", Status.OK, f"{state.server} answers PING")


async def _unpersisted(state: State) -> str | None:
    """What a restart of Redis would lose when it keeps no append-only file; None when it
    does, or when it will not say (INFO refused)."""
    try:
        info = await state.client.info("persistence")
    except (redis.RedisError, OSError):
        return None
    if str(info.get("aof_enabled", "0")) == "1":
        return None
    try:  # CONFIG is often renamed away on managed Redis: then the snapshots are unknown
        save = str((await state.client.config_get("save")).get("save", ""))
    except (redis.RedisError, OSError):
        save = "?"
    if not save:
        return (
            'it persists nothing (appendonly no, save ""): a restart empties it, queued '
            "work, holds and the audit stream included"
        )
    return (
        f"its append-only file is off (appendonly no, snapshots save {save!r}): a crash "
        "loses what was written since the last snapshot"
    )


async def _close(state: State) -> None:
    with contextlib.suppress(RegsweepError):  # nothing to close on a server that is not there
        await state.aclose()


def failed(checks: list[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


def render(checks: list[Check]) -> str:
    """One line per check, and its hint under it."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.name.ljust(width)}  {check.status.value.ljust(4)}  {check.detail}")
        if check.hint:
            lines.append(f"{' ' * width}        hint: {check.hint}")
    return "\n".join(lines)
