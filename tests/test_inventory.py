"""Inventory snapshots from the real registry: what is read, and what is not read twice."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.harness.images import ImageBuilder
from tests.harness.registry import RegistryProcess
from tests.strategies import make_policy
from worker.engine.inventory import CreatedCache, InventoryBuilder, ManifestCache, parse_created
from worker.engine.model import PushSource, PushTime
from worker.engine.policy import AgeSource
from worker.errors import RegistryProtocolError
from worker.oci import Digest
from worker.registry.client import RegistryClient
from worker.settings.model import RegistrySettings

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
#: A policy that opts in to build times (``age_from: build_time``).
BUILD_TIME = replace(make_policy(), age_from=AgeSource.BUILD_TIME)
PUSH = make_policy()


@pytest.fixture
def builder(registry: RegistryProcess) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(registry.url) as b:
        yield b


def counting_client(url: str, counts: Counter[str]) -> RegistryClient:
    def hook(method: str, path: str, status: int | None, seconds: float) -> None:
        counts[f"{method} {path}"] += 1

    return RegistryClient.from_settings(RegistrySettings(url=url), on_response=hook)


def test_parse_created_accepts_go_nanoseconds_and_zulu() -> None:
    """Configs written by Go carry nanoseconds and Z; both parse to an aware datetime."""
    assert parse_created("2026-03-01T12:00:00.123456789Z") == T0.replace(microsecond=123456)
    assert parse_created("2026-03-01T12:00:00Z") == T0
    assert parse_created("not a time") is None
    assert parse_created(None) is None


def test_created_cache_round_trips_and_tolerates_a_corrupt_file(tmp_path: Path) -> None:
    """The persisted cache comes back intact; a corrupt file is an empty cache, not an error."""
    path = tmp_path / "c" / "created.json"
    CreatedCache({"sha256:a": T0, "sha256:b": None}).save(path)
    assert dict(CreatedCache.load(path).entries) == {"sha256:a": T0, "sha256:b": None}
    path.write_text("{not json")
    assert dict(CreatedCache.load(path).entries) == {}


async def test_snapshot_reads_graph_and_build_times(
    registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Tags, index children, cosign referrers and (opted in) config build times land in the
    snapshot."""
    amd = builder.image(repo_name, created=T0)
    arm = builder.image(repo_name, created=T0, architecture="arm64")
    index = builder.index(repo_name, [amd, arm], "multi")
    sig = builder.cosign(repo_name, index, "sig")
    counts: Counter[str] = Counter()
    async with counting_client(registry.url, counts) as client:
        inv = await InventoryBuilder(client).take(repo_name, BUILD_TIME)
    assert inv.tags["multi"] == index.digest
    assert {amd.digest, arm.digest, sig.digest} <= set(inv.manifests)
    pushed = inv.push_time("multi")
    assert (pushed.source, pushed.earliest, pushed.latest) == (PushSource.BUILD_TIME, T0, T0)
    assert inv.missing == frozenset()


async def test_second_snapshot_reads_no_config_and_no_known_manifest(
    registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """With the caches warm, a snapshot from known tags costs no GET at all."""
    images = [builder.image(repo_name, f"v{i}", created=T0 + i * MINUTE) for i in range(3)]
    created, manifests = CreatedCache(), ManifestCache()
    counts: Counter[str] = Counter()
    async with counting_client(registry.url, counts) as client:
        inv_builder = InventoryBuilder(client, created_cache=created, manifest_cache=manifests)
        first = await inv_builder.take(repo_name, BUILD_TIME)
        assert counts["GET /v2/{name}/blobs/{digest}"] == 3
        counts.clear()
        known = {f"v{i}": Digest(img.digest) for i, img in enumerate(images)}
        second = await inv_builder.take(repo_name, BUILD_TIME, known_tags=known)
    assert counts["GET /v2/{name}/blobs/{digest}"] == 0
    assert counts["GET /v2/{name}/manifests/{reference}"] == 0
    assert second.tags == first.tags
    assert second.push_time("v1") == PushTime.exact(PushSource.BUILD_TIME, T0 + MINUTE)


async def test_orphaned_signature_subject_is_reported_missing(
    registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """A cosign tag whose subject was deleted is found with one HEAD and marked missing."""
    subject = builder.image(repo_name, "gone", created=T0)
    builder.cosign(repo_name, subject, "sig")
    async with RegistryClient.from_settings(RegistrySettings(url=registry.url)) as client:
        assert await client.delete_manifest(repo_name, subject.digest)
        inv = await InventoryBuilder(client).take(repo_name, PUSH)
    assert inv.missing == frozenset({subject.digest})
    assert inv.deleted_by_regsweep == frozenset()  # no audit says regsweep did it


async def test_a_manifest_of_unknown_type_leaves_its_repository_alone() -> None:
    """A tag whose manifest is of a type regsweep does not know (it might list manifests in a
    way regsweep cannot see) fails the snapshot with the repository and digest named.

    httpx.MockTransport: no real registry serves a manifest type it does not know."""
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.example.odd+json"})
    digest = "sha256:" + hashlib.sha256(body.encode()).hexdigest()

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/tags/list"):
            return httpx.Response(200, json={"name": "t/odd", "tags": ["odd"]})
        headers = {
            "Content-Type": "application/vnd.example.odd+json",
            "Docker-Content-Digest": digest,
        }
        return httpx.Response(200, content=body.encode(), headers=headers)

    settings = RegistrySettings(url="http://registry.test")
    async with RegistryClient.from_settings(settings, transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(RegistryProtocolError, match=rf"t/odd@{digest}.*does not know"):
            await InventoryBuilder(c).take("t/odd", PUSH)
