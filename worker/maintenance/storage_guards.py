"""What must hold before a storage-level prune touches a file, each checked, never assumed.

- **The registry's config** (the process controller's ``config_path``, else the file its
  ``gc_command`` names; the docker controller's ``config_path`` or the file the container
  serves, with the container's ``REGISTRY_*`` overrides): the filesystem driver,
  deletes enabled (a storage prune must not do what the registry's API refuses), and no
  Redis blob-descriptor cache. The window restarts the registry, which empties an
  ``inmemory`` cache; a Redis cache outlives the restart and would go on answering for
  the manifests removed (3.x looks manifests up through it) and, after GC, for blobs
  swept (distribution#1803). No window flushes it: that Redis is usually shared by
  several registry replicas, which one controller neither switches read-only nor
  restarts, so the prune is refused instead.
- **The storage agrees with the API** (:func:`cross_check`): the catalog and the
  storage's repositories, each pruned repository's tag list, and every tag's digest.
  Distribution's own walk dropped repositories and tags whose names prefix others'
  until recently (distribution#4898, #4904); any difference refuses the prune.

Read-only is verified by the window (:mod:`worker.maintenance.storage_prune`): a write
refused before the first removal, and again as the prune goes on.
"""

from __future__ import annotations

import asyncio
import io
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import docker
import docker.errors
import yaml

from worker.errors import ControllerError, RegistryError, StoragePruneRefused
from worker.maintenance.controllers import DockerController, RegistryController, served_config
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage
from worker.settings.model import (
    ControllerSettings,
    DockerControllerSettings,
    ProcessControllerSettings,
)

#: Keys of ``storage:`` that configure the storage rather than name its driver.
_NOT_DRIVERS: Final = frozenset({"delete", "cache", "maintenance", "redirect", "tag"})
#: Differences named in a refusal; the rest are counted.
NAMED: Final = 5
#: Tags HEADed at once by the cross-check (the client's concurrency still bounds requests).
CHECK_BATCH: Final = 1000
#: Repositories checked side by side (the client's concurrency bounds the requests).
CHECK_REPOSITORIES: Final = 4
#: The largest config file read.
CONFIG_MAX_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class RegistryConfig:
    """The registry's config as regsweep read it, environment overrides applied."""

    source: str
    body: Mapping[str, Any]
    env: Mapping[str, str]

    def _value(self, path: tuple[str, ...]) -> object:
        override = self.env.get("REGISTRY_" + "_".join(p.upper() for p in path))
        if override is not None:
            return yaml.safe_load(override)  # the registry reads overrides as YAML
        node: object = self.body
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    def driver(self) -> str | None:
        override = self.env.get("REGISTRY_STORAGE")
        if override:
            return override.strip()
        storage = self.body.get("storage")
        if not isinstance(storage, Mapping):
            return None
        drivers = [str(k) for k in storage if str(k) not in _NOT_DRIVERS]
        return drivers[0] if len(drivers) == 1 else None

    def problem(self) -> str | None:
        """Why a storage prune may not run against this registry; None when it may."""
        driver = self.driver()
        if driver != "filesystem":
            return (
                f"the registry stores on {driver or 'an unknown driver'!s} ({self.source}): the "
                "storage-level prune edits the filesystem driver's storage only"
            )
        if self._value(("storage", "delete", "enabled")) is not True:
            return (
                f"the registry's deletes are disabled (storage.delete.enabled in {self.source}): "
                "a storage prune would do what its API refuses"
            )
        if str(self._value(("storage", "cache", "blobdescriptor")) or "").strip() == "redis":
            return (
                f"the registry keeps its blob descriptors in Redis (storage.cache.blobdescriptor "
                f"in {self.source}), which outlives the window's restart and would go on "
                "answering for what the prune removes (and, after GC, for swept blobs); set it "
                "to inmemory, or prune through the API (maintenance.storage_prune: false)"
            )
        return None


def read_registry_config(
    settings: ControllerSettings | None, controller: RegistryController | None = None
) -> RegistryConfig:
    """The config the registry's garbage collector reads; :class:`StoragePruneRefused` when
    it cannot be read (what is in it cannot be ruled out then)."""
    try:
        if isinstance(settings, ProcessControllerSettings):
            return _process_config(settings)
        if isinstance(settings, DockerControllerSettings):
            return _docker_config(settings, controller)
    except (OSError, ControllerError, docker.errors.DockerException, yaml.YAMLError) as exc:
        raise StoragePruneRefused(
            f"the registry's config cannot be read ({exc}), so a Redis blob-descriptor cache "
            "cannot be ruled out"
        ) from exc
    raise StoragePruneRefused("maintenance.controller is not configured")


def _process_config(settings: ProcessControllerSettings) -> RegistryConfig:
    files = [w for w in shlex.split(settings.gc_command) if w.endswith((".yml", ".yaml"))]
    if settings.config_path is None and not files:
        raise OSError(
            "maintenance.controller.gc_command names no config file (…/config.yml): set "
            "maintenance.controller.config_path"
        )
    path = Path(settings.config_path or files[-1])
    return RegistryConfig(str(path), _parsed(path.read_bytes()[:CONFIG_MAX_BYTES]), {})


def _docker_config(
    settings: DockerControllerSettings, controller: RegistryController | None
) -> RegistryConfig:
    docker_controller = (
        controller
        if isinstance(controller, DockerController)
        else DockerController(settings, docker.from_env())
    )
    container = docker_controller.container()
    path = settings.config_path or served_config(container.attrs)
    where = f"{path} in container {container.name}"
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
        member = archive.extractfile(archive.getmembers()[0])
        if member is None:
            raise OSError(f"{where} is not a file")
        raw = member.read(CONFIG_MAX_BYTES)
    env = dict(e.partition("=")[::2] for e in container.attrs["Config"].get("Env") or [])
    return RegistryConfig(where, _parsed(raw), env)


def _parsed(raw: bytes) -> Mapping[str, Any]:
    body = yaml.safe_load(raw)
    if not isinstance(body, Mapping):
        raise yaml.YAMLError("not a YAML mapping")
    return body


# --- the storage against the API -------------------------------------------------------------


async def cross_check(
    client: RegistryClient, storage: RegistryStorage, repositories: Sequence[str]
) -> None:
    """Refuse (:class:`StoragePruneRefused`) unless the storage shows what the API shows:
    the same repositories, and for each of ``repositories`` the same tags on the same
    digests."""
    try:
        catalog = set(await client.catalog())
        stored = set(await asyncio.to_thread(storage.repositories))
        _refuse_differences("repositories", catalog, stored)
        gate = asyncio.Semaphore(CHECK_REPOSITORIES)

        async def same(repository: str) -> None:
            async with gate:
                await _same_tags(client, storage, repository)

        await asyncio.gather(*(same(r) for r in repositories))
    except RegistryError as exc:
        raise StoragePruneRefused(f"the registry's API could not be asked: {exc}") from exc


async def _same_tags(client: RegistryClient, storage: RegistryStorage, repository: str) -> None:
    listed = await client.tags(repository)
    names = await asyncio.to_thread(storage.tag_names, repository)
    _refuse_differences(f"tags of {repository}", set(listed), set(names))
    links = await asyncio.to_thread(storage.tags, repository, names)
    differing: list[str] = []
    for start in range(0, len(names), CHECK_BATCH):
        batch = names[start : start + CHECK_BATCH]
        heads = await asyncio.gather(*(client.head_manifest(repository, t) for t in batch))
        for tag, head in zip(batch, heads, strict=True):
            link = links.get(tag)
            if head is None and (link is None or not storage.has_revision(repository, link.digest)):
                continue
            if head is None or link is None or head.digest != link.digest:
                api = head.digest if head else "none"
                on_storage = link.digest if link else "none"
                differing.append(f"{tag} (API {api[:19]}, storage {on_storage[:19]})")
    if differing:
        raise StoragePruneRefused(
            f"the storage and the API disagree on the digests of {repository}'s tags "
            f"{_named(differing)}; nothing was removed"
        )


def _refuse_differences(what: str, api: set[str], stored: set[str]) -> None:
    if api == stored:
        return
    parts = []
    if api - stored:
        parts.append(f"only the API lists {_named(sorted(api - stored))}")
    if stored - api:
        parts.append(f"only the storage has {_named(sorted(stored - api))}")
    raise StoragePruneRefused(
        f"the storage and the API disagree on the {what}: {'; '.join(parts)} (registry.storage_"
        "path is not this registry's storage, or its listing drops names, distribution#4898); "
        "nothing was removed"
    )


def _named(items: Sequence[str]) -> str:
    more = len(items) - NAMED
    return ", ".join(items[:NAMED]) + (f" and {more} more" if more > 0 else "")
