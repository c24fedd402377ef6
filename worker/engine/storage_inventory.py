"""The same :class:`~worker.engine.model.Inventory`, read from the registry's storage.

A storage-level prune (:mod:`worker.maintenance.storage_prune`) plans with the same
pure planner as every prune; only where the snapshot comes from differs. Everything
:class:`~worker.engine.inventory.InventoryBuilder` asks the registry's API is read from
``registry.storage_path`` instead, as the registry itself would answer it:

- the tag list is the ``_manifests/tags`` directory, and a tag resolves to the digest
  its ``current/link`` holds, with the link's mtime as its push time;
- a manifest answers by digest when its revision has a ``link`` and its bytes are in
  ``blobs/`` (on 2.8 a ``_layers`` link of the digest counts too: its manifest store
  looks in both, distribution 2.8.2 ``registry/storage/registry.go``);
- referrers are the manifests whose ``subject`` names a digest: distribution 3.1.0 has
  no referrers API (``registry/handlers`` has none), and the fallback ``sha256-<hex>``
  tags are read as the API inventory reads them.

The history (notifications, listings, holds, untagged times), the audit's answers and
the checks of the registry's times (:func:`~worker.engine.evidence.judge`, the clock's
skew from one ``GET /v2/``) are the API inventory's own code, so the same repository
plans the same from either (``tests/test_storage_prune_sameness.py`` holds it to that
on 2.8.2 and 3.1.0). A listing read here is recorded in the history like the API's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from worker import oci
from worker.engine.inventory import AuditEvidence, InventoryBuilder, _Snapshot, parse_created
from worker.engine.model import Inventory
from worker.engine.policy import Policy
from worker.errors import RegistryProtocolError
from worker.oci import Digest, Manifest, parse_manifest, referrer_tag_subject
from worker.registry.client import RegistryClient, digest_of
from worker.registry.storage import RegistryStorage, StoredTag
from worker.store.history import History


@dataclass
class _Reads:
    """What one repository's snapshot read from storage, so nothing is read twice."""

    #: tag -> its link, for every tag directory with a link.
    links: dict[str, StoredTag] = field(default_factory=dict)
    #: digest -> whether the registry would answer for it in this repository.
    present: dict[Digest, bool] = field(default_factory=dict)


class StorageInventoryBuilder(InventoryBuilder):
    """An :class:`InventoryBuilder` whose registry reads come from the storage.

    ``client`` is asked for nothing but the registry's clock (one ``GET /v2/`` when its
    times are to be checked). ``layers_count`` is distribution 2.8's manifest lookup,
    which also takes a ``_layers`` link of the digest for the manifest.
    """

    def __init__(
        self,
        client: RegistryClient,
        storage: RegistryStorage,
        *,
        layers_count: bool,
        history: History | None = None,
        audit: AuditEvidence | None = None,
    ) -> None:
        super().__init__(client, history=history, storage=storage, audit=audit)
        self._store = storage
        self._layers_count = layers_count
        self._reads: dict[str, _Reads] = {}
        #: Manifest bytes by digest, for the snapshot being taken.
        self._bodies: dict[Digest, bytes | None] = {}

    async def take(
        self,
        repository: str,
        policy: Policy,
        *,
        now: datetime | None = None,
        known_tags: Mapping[str, Digest] | None = None,
    ) -> Inventory:
        """Snapshot ``repository`` from the storage; every tag is read (``known_tags``, the
        tag index's shortcut for event-driven plans, is not taken)."""
        self._reads.clear()
        self._bodies.clear()
        try:
            return await super().take(repository, policy, now=now)
        finally:
            self._reads.clear()
            self._bodies.clear()

    def _of(self, repository: str) -> _Reads:
        return self._reads.setdefault(repository, _Reads())

    async def _read_tags(self, snap: _Snapshot) -> None:
        """The tag directories and their links; a tag whose manifest the registry would not
        serve is left out, as the API inventory leaves out a tag whose GET says 404."""
        repository = snap.repository
        reads = self._of(repository)
        reads.links = await asyncio.to_thread(self._links, repository)
        digests = sorted({link.digest for link in reads.links.values()})
        found = await self._manifests_of(repository, digests)
        for tag, link in sorted(reads.links.items()):
            manifest = found.get(link.digest)
            if manifest is None:
                continue
            _check_known(repository, manifest)
            snap.tags[tag] = manifest.digest
            snap.manifests.setdefault(manifest.digest, manifest)

    def _links(self, repository: str) -> dict[str, StoredTag]:
        return self._store.tags(repository, self._store.tag_names(repository))

    async def _read_storage(self, snap: _Snapshot) -> None:
        """Push times from the links already read, and every stored manifest, as the API
        inventory reads them with ``registry.storage_path``."""
        links = self._of(snap.repository).links
        snap.stored_tags = {tag: links[tag] for tag in snap.tags if tag in links}
        revisions = await asyncio.to_thread(self._store.revisions, snap.repository)
        unseen = [d for d in revisions if d not in snap.manifests]
        bodies = await asyncio.to_thread(self._bodies_of, unseen)
        for digest in unseen:
            raw = bodies.get(digest)
            if raw is not None and digest_of(raw) == digest:
                snap.manifests[digest] = parse_manifest(digest, "", raw)

    async def _fetch_into(self, snap: _Snapshot, digests: list[Digest]) -> None:
        found = await self._manifests_of(snap.repository, digests)
        for digest in digests:
            manifest = found.get(digest)
            if manifest is None:
                snap.missing.add(digest)
            else:
                _check_known(snap.repository, manifest)
                snap.manifests[digest] = manifest

    async def _fetch(self, repository: str, reference: str) -> Manifest | None:
        if reference.startswith("sha256:"):
            found = await self._manifests_of(repository, [Digest(reference)])
            manifest = found.get(Digest(reference))
        else:
            link = await asyncio.to_thread(self._store.tag, repository, reference)
            manifest = None
            if link is not None:
                manifest = (await self._manifests_of(repository, [link.digest])).get(link.digest)
        if manifest is not None:
            _check_known(repository, manifest)
        return manifest

    async def _referrers_api(self, snap: _Snapshot, found: dict[Digest, set[Digest]]) -> None:
        """Nothing to add: the ``subject`` fields of every stored manifest are read already,
        and they are all a referrers API could answer from."""

    async def _find_missing_subjects(self, snap: _Snapshot) -> None:
        """Subjects that cosign tags name and the registry would answer 404 for."""
        subjects = sorted(
            {
                s
                for tag in snap.tags
                if (s := referrer_tag_subject(tag)) is not None and s not in snap.manifests
            }
            - snap.missing
        )
        present = await asyncio.to_thread(self._present_all, snap.repository, subjects)
        snap.missing.update(s for s in subjects if not present[s])

    async def _read_config_created(self, repository: str, digest: Digest) -> datetime | None:
        raw = await asyncio.to_thread(self._store.blob, digest)
        if raw is None:
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise RegistryProtocolError(f"config {digest} is not JSON: {exc}") from exc
        return parse_created(body.get("created")) if isinstance(body, dict) else None

    # -- storage reads ------------------------------------------------------------------

    async def _manifests_of(
        self, repository: str, digests: Iterable[Digest]
    ) -> dict[Digest, Manifest]:
        """The manifests the registry would serve by digest in ``repository``."""
        wanted = list(digests)
        return await asyncio.to_thread(self._read_manifests, repository, wanted)

    def _read_manifests(self, repository: str, digests: list[Digest]) -> dict[Digest, Manifest]:
        present = self._present_all(repository, digests)
        bodies = self._bodies_of([d for d in digests if present[d]])
        found: dict[Digest, Manifest] = {}
        for digest in digests:
            raw = bodies.get(digest)
            if raw is not None and digest_of(raw) == digest:
                found[digest] = parse_manifest(digest, "", raw)
        return found

    def _present_all(self, repository: str, digests: Iterable[Digest]) -> dict[Digest, bool]:
        known = self._of(repository).present
        for digest in digests:
            if digest not in known:
                known[digest] = self._store.has_revision(repository, digest) or (
                    self._layers_count and self._store.has_layer_link(repository, digest)
                )
        return {d: known[d] for d in digests}

    def _bodies_of(self, digests: Iterable[Digest]) -> dict[Digest, bytes | None]:
        for digest in digests:
            if digest not in self._bodies:
                self._bodies[digest] = self._store.blob(digest)
        return {d: self._bodies[d] for d in digests}


def _check_known(repository: str, manifest: Manifest) -> None:
    """The API inventory's refusal of a manifest type it does not know, word for word."""
    if manifest.media_type not in oci.KNOWN_MANIFEST_TYPES:
        raise RegistryProtocolError(
            f"{repository}@{manifest.digest} has a manifest type regsweep does not know "
            f"({manifest.media_type[:100]!r}); the repository is left alone"
        )
