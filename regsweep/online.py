"""``regsweep check-config --online``: can this installation do its work, asked of the live parts.

Each check is one line, ok, fail or skip, with a hint on failure:

- ``registry``: ``GET /v2/`` answers, and it is a registry;
- ``credentials``: a catalog read works (else the tag list of a repository a
  policy names, for accounts without catalog access);
- ``deletes``: a DELETE of a digest no content has answers 404 (deletes
  enabled), not 405 ``UNSUPPORTED`` (``storage.delete.enabled`` false) nor the
  read-only 405 of a maintenance window;
- ``clock``: the registry's clock (its answers' ``Date`` header) is within
  :data:`~worker.engine.evidence.CLOCK_SKEW` of this host's: push times on it rank tags;
- ``tag delete``: whether the registry removes a tag by ``DELETE .../manifests/<tag>``
  (3.x), asked with a tag nobody pushed: how regsweep will remove a tag whose digest a
  kept tag shares (one DELETE, or the placeholder method 2.8 needs). Informational:
  either answer is ok;
- ``storage``: ``registry.storage_path`` is the registry's storage root, readable, and
  holds the repositories the registry lists, their tags on the digests the registry
  answers (a path one level off gets the right one suggested);
- ``push-times``: the storage's tag-link times are plausible as a whole (not all equal,
  not all before 2013, not all written at one instant as a copy that kept no times
  leaves them), so they can rank tags;
- ``redis``: Redis answers ``PING``; a warning when it keeps no append-only file
  (what lives only in Redis is then lost with a restart: docs/operations.md).

Nothing is written anywhere: the DELETEs name a manifest and a tag that do not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from worker.durations import approximate, signed
from worker.engine.evidence import StoredLink, moment, storage_refusal
from worker.errors import (
    DeletesDisabled,
    RegistryAuthError,
    RegistryError,
    RegistryReadOnly,
    RegsweepError,
    StateError,
    StorageError,
)
from worker.oci import referrer_tag_subject
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage, check_storage_root, layout_problem
from worker.settings.model import Config
from worker.store.persistence import persistence
from worker.store.state import State

#: Repositories the registry lists that ``storage`` looks for under storage_path.
STORAGE_SAMPLE: Final = 5
#: Tags per sampled repository whose digest ``storage`` compares with the registry's answer.
STORAGE_TAGS_SAMPLE: Final = 3
#: Repositories whose tag-link times ``push-times`` reads (in catalog order).
PUSH_TIMES_SAMPLE: Final = 1000
#: Repositories named in a ``push-times`` detail.
NAMED: Final = 3
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
    #: The storage, once ``storage`` found it to be the registry's.
    storage: RegistryStorage | None = None


async def online_checks(config: Config) -> list[Check]:
    """Every check, in order; each one's failure is its own line, never an exception."""
    seen = _Seen()
    checks: list[Check] = []
    async with RegistryClient.from_settings(config.registry, retries=1) as client:
        checks.append(await _registry(client, config, seen))
        checks.append(await _credentials(client, config, seen))
        checks.append(await _deletes(client, config, seen))
        checks.append(await _tag_delete(client, config, seen))
        checks.append(_clock(client, seen))
        checks.append(await _storage(client, config, seen))
    checks.append(await asyncio.to_thread(_push_times, config, seen))
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


def _clock(client: RegistryClient, seen: _Seen) -> Check:
    if not seen.reachable:
        return Check("clock", Status.SKIP, "the registry is not reachable")
    skew = client.clock.skew
    if skew is None:
        return Check("clock", Status.SKIP, "the registry's answers carry no Date header")
    detail = f"{skew.describe()} (between {signed(skew.low)} and {signed(skew.high)})"
    if skew.agrees:
        return Check("clock", Status.OK, detail)
    return Check(
        "clock",
        Status.FAIL,
        detail,
        "push times on the registry's clock (tag links, notifications) rank no tag, and "
        "nothing is deleted on them, until the clocks agree: run NTP (chrony, "
        "systemd-timesyncd) on the registry's host and this one",
    )


_STORAGE_HINT: Final = (
    "registry.storage_path must be this registry's storage.filesystem.rootdirectory "
    "(the directory that holds docker/registry/v2), not a copy nor another registry's"
)


async def _tag_delete(client: RegistryClient, config: Config, seen: _Seen) -> Check:
    name = "tag delete"
    if not seen.reachable:
        return Check(name, Status.SKIP, "the registry is not reachable")
    repository = _probe_repository(config, seen.catalog)
    try:
        supported = await client.tag_delete(repository)
    except RegistryReadOnly:
        return Check(name, Status.SKIP, "the registry is read-only: it cannot tell now")
    except DeletesDisabled:
        return Check(name, Status.SKIP, "deletes are disabled: regsweep removes no tag either")
    except RegistryError as exc:
        return Check(name, Status.FAIL, exc.detail, exc.hint or "")
    if supported:
        return Check(
            name,
            Status.OK,
            f"supported (a DELETE of an unknown tag in {repository} answered 404 "
            "MANIFEST_UNKNOWN): a tag is removed with one DELETE",
        )
    return Check(
        name,
        Status.OK,
        f"not supported (asked in {repository}; 2.8 answers 400 DIGEST_INVALID): a tag is "
        "removed by the placeholder method (docs/safety.md)",
    )


async def _storage(client: RegistryClient, config: Config, seen: _Seen) -> Check:
    path = config.registry.storage_path
    if path is None:
        return Check("storage", Status.SKIP, "registry.storage_path is not set")
    problem = check_storage_root(path) or layout_problem(path)
    if problem is not None:
        return Check("storage", Status.FAIL, f"{path} {problem}", _STORAGE_HINT)
    if not seen.catalog:
        seen.storage = RegistryStorage(path)
        why = "the catalog was not read" if seen.catalog is None else "it lists no repository"
        return Check("storage", Status.OK, f"{path} is a storage root ({why})")
    storage = RegistryStorage(path)
    try:
        disagreement = await _disagreement(client, storage, seen.catalog[:STORAGE_SAMPLE])
    except (StorageError, RegistryError) as exc:
        return Check("storage", Status.FAIL, str(exc), _STORAGE_HINT)
    if disagreement is not None:
        return Check("storage", Status.FAIL, disagreement, _STORAGE_HINT)
    seen.storage = storage
    return Check(
        "storage", Status.OK, f"{path} holds the repositories and digests the registry lists"
    )


async def _disagreement(
    client: RegistryClient, storage: RegistryStorage, sample: list[str]
) -> str | None:
    """What the storage says otherwise than the registry of a few repositories: one it
    lacks, or a tag on another digest; None when they agree."""
    missing = [name for name in sample if not storage.has_repository(name)]
    if missing:
        return f"{storage.missing(missing[0])} (lacks {', '.join(missing)})"
    for repository in sample:
        for tag in (await client.tags(repository))[:STORAGE_TAGS_SAMPLE]:
            answered = await client.head_manifest(repository, tag)
            stored = storage.tags(repository, [tag]).get(tag)
            if answered is not None and stored is not None and stored.digest != answered.digest:
                return (
                    f"{repository}:{tag} is {answered.digest} as the registry answers, but "
                    f"{stored.digest} in {storage.root}"
                )
    return None


def _push_times(config: Config, seen: _Seen) -> Check:
    """Whether the storage's tag-link times are plausible as a whole."""
    storage = seen.storage
    if storage is None or not seen.catalog:
        why = (
            "registry.storage_path is not set"
            if config.registry.storage_path is None
            else ("the storage check did not pass" if storage is None else "no repository listed")
        )
        return Check("push-times", Status.SKIP, why)
    try:
        links = {name: _links(storage, name) for name in seen.catalog[:PUSH_TIMES_SAMPLE]}
    except StorageError as exc:
        return Check("push-times", Status.FAIL, str(exc))
    return _judged_links({name: found for name, found in links.items() if found})


def _links(storage: RegistryStorage, repository: str) -> list[StoredLink]:
    names = [n for n in storage.tag_names(repository) if referrer_tag_subject(n) is None]
    return [StoredLink(t.pushed, t.digest) for t in storage.tags(repository, names).values()]


def _judged_links(links: dict[str, list[StoredLink]]) -> Check:
    """``push-times`` from every repository's links: fails when the storage as a whole (or
    most of its repositories) has times no push left."""
    everything = [link for found in links.values() for link in found]
    if not everything:
        return Check("push-times", Status.OK, "no tag links yet")
    refused = {name: why for name, found in links.items() if (why := storage_refusal(found))}
    whole = storage_refusal(everything)
    if whole is not None or 2 * len(refused) > len(links):
        reason = whole or next(iter(refused.values()))
        named = ", ".join(list(refused)[:NAMED])
        return Check(
            "push-times",
            Status.FAIL,
            f"the storage's tag links rank no tag in {len(refused)} of {len(links)} "
            f"repositories ({named}): {reason}",
            "until then nothing is deleted on these times: tags age from notifications and "
            "regsweep's own listings instead",
        )
    times = sorted(link.at for link in everything)
    detail = (
        f"{len(everything)} tag links in {len(links)} repositories, written "
        f"{moment(times[0])} to {moment(times[-1])} (over {approximate(times[-1] - times[0])})"
    )
    if refused:
        named = ", ".join(list(refused)[:NAMED])
        detail += f"; not used to rank in {len(refused)} ({named}: {next(iter(refused.values()))})"
    return Check("push-times", Status.OK, detail)


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
    kept = await persistence(state.client)
    if kept is None or kept.append_only:
        return None
    # CONFIG is often renamed away on managed Redis: then the snapshots are unknown.
    save = "?" if kept.snapshots is None else kept.snapshots
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
