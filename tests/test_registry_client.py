"""The registry client against the real binaries (2.8.2, and 3.x for what 3.x does differently:
tag deletes, tag-list pages, page-size limits), and MockTransport where neither can answer.

MockTransport is used only for answers no real registry here can be made to give
(a 3.x replaced by a 2.8 under a running client, the referrers API's pages,
corrupt content) and for a flaky network (5xx bursts, dropped connections); each
such test says so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness.registry import RegistryBinary, RegistryProcess
from worker import oci as mt
from worker.errors import (
    ConfigError,
    DeletesDisabled,
    ManifestUnknown,
    RegistryProtocolError,
    RegistryReadOnly,
    RegistryUnavailable,
    SafetyViolation,
)
from worker.oci import UNTAG_ANNOTATION
from worker.registry.client import DEFAULT_RETRIES, RegistryClient, Removal
from worker.settings.model import RegistrySettings

pytestmark = pytest.mark.anyio

FAST_BACKOFF = 0.001

# -- minimal pushes (independent of the shared image builder) -------------------


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _push_blob(http: httpx.Client, repo: str, data: bytes) -> dict[str, object]:
    start = http.post(f"/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    target = httpx.URL(start.headers["Location"]).copy_merge_params({"digest": _digest(data)})
    assert http.put(target, content=data).status_code == 201
    return {"digest": _digest(data), "size": len(data)}


def _put_manifest(
    http: httpx.Client, repo: str, ref: str, media_type: str, body: dict[str, object]
) -> tuple[str, bytes]:
    raw = json.dumps(body).encode()
    response = http.put(
        f"/v2/{repo}/manifests/{ref}", content=raw, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, response.text
    return response.headers["Docker-Content-Digest"], raw


def push_image(url: str, repo: str, *tags: str, oci: bool = True) -> tuple[str, bytes]:
    """Push a one-layer image under ``tags`` (OCI or Docker schema 2); its digest and bytes."""
    config_type, layer_type, manifest_type = (
        (mt.OCI_CONFIG, "application/vnd.oci.image.layer.v1.tar+gzip", mt.OCI_MANIFEST)
        if oci
        else (
            mt.DOCKER_CONFIG,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            mt.DOCKER_MANIFEST,
        )
    )
    with httpx.Client(base_url=url) as http:
        config = _push_blob(
            http,
            repo,
            json.dumps({"created": "2024-01-01T00:00:00Z", "n": secrets.token_hex(4)}).encode(),
        )
        layer = _push_blob(http, repo, secrets.token_bytes(64))
        body = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, **config},
            "layers": [{"mediaType": layer_type, **layer}],
        }
        digest, raw = _put_manifest(http, repo, tags[0], manifest_type, body)
        for tag in tags[1:]:
            _put_manifest(http, repo, tag, manifest_type, body)
    return digest, raw


def push_index(url: str, repo: str, tag: str, children: list[tuple[str, bytes]]) -> str:
    """Push an OCI index over already pushed children; its digest."""
    manifests = [
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": d,
            "size": len(raw),
            "platform": {"architecture": arch, "os": "linux"},
        }
        for (d, raw), arch in zip(children, ("amd64", "arm64"), strict=False)
    ]
    with httpx.Client(base_url=url) as http:
        digest, _ = _put_manifest(
            http,
            repo,
            tag,
            mt.OCI_INDEX,
            {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests},
        )
    return digest


# -- clients -----------------------------------------------------------------------


@dataclass
class Calls:
    """What the on_response hook saw: (method, path template, status)."""

    seen: list[tuple[str, str, int | None]] = field(default_factory=list)

    def __call__(self, method: str, template: str, status: int | None, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((method, template, status))

    def count(self, method: str, template: str) -> int:
        return sum(1 for m, t, _ in self.seen if (m, t) == (method, template))


def make_client(
    url: str,
    calls: Calls | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    concurrency: int = 4,
) -> RegistryClient:
    settings = RegistrySettings(url=url, concurrency=concurrency)
    return RegistryClient.from_settings(
        settings, transport=transport, backoff=FAST_BACKOFF, on_response=calls
    )


@pytest.fixture
async def client(registry: RegistryProcess) -> AsyncIterator[RegistryClient]:
    async with make_client(registry.url) as c:
        yield c


Handler = Callable[[httpx.Request], httpx.Response]


def mock_client(
    handler: Handler, calls: Calls | None = None, concurrency: int = 4
) -> RegistryClient:
    return make_client(
        "http://registry.test",
        calls,
        transport=httpx.MockTransport(handler),
        concurrency=concurrency,
    )


def revisions(registry: RegistryProcess, repo: str) -> list[str]:
    """Manifest revisions the registry's storage still links in ``repo`` (a delete unlinks)."""
    root = (
        registry.storage_path
        / "docker/registry/v2/repositories"
        / repo
        / "_manifests/revisions/sha256"
    )
    return sorted(p.name for p in root.iterdir() if (p / "link").exists())


# -- listing -------------------------------------------------------------------


async def test_catalog_follows_link_pagination(registry: RegistryProcess, repo_name: str) -> None:
    """The catalog is read across several Link-paginated pages of n=2 (2.8 pages the catalog)."""
    names = [f"{repo_name}/r{i}" for i in range(3)]
    for name in names:
        push_image(registry.url, name, "v1")
    calls = Calls()
    async with make_client(registry.url, calls) as c:
        repositories = await c.catalog(page_size=2)
    assert set(names) <= set(repositories)
    assert len(repositories) == len(set(repositories))
    assert calls.count("GET", "/v2/_catalog") >= len(repositories) / 2 >= 1.5


async def test_tags_2_8_ignores_page_size(registry: RegistryProcess, repo_name: str) -> None:
    """2.8 answers every tag at once whatever n is, and the client takes them all in one request."""
    push_image(registry.url, repo_name, *(f"t{i}" for i in range(5)))
    calls = Calls()
    async with make_client(registry.url, calls) as c:
        tags = await c.tags(repo_name, page_size=2)
    assert sorted(tags) == [f"t{i}" for i in range(5)]
    assert calls.count("GET", "/v2/{name}/tags/list") == 1


async def test_tags_of_unknown_and_emptied_repositories_are_empty(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """404 NAME_UNKNOWN and 2.8's ``"tags": null`` for an emptied repository both mean no tags."""
    assert await client.tags(f"{repo_name}-never-pushed") == []
    digest, _ = push_image(registry.url, repo_name, "only")
    assert await client.delete_manifest(repo_name, digest) is Removal.DELETED
    assert await client.tags(repo_name) == []


@pytest.fixture
def small_pages_3x(tmp_path: Path, registry_binary_3: RegistryBinary) -> Iterator[RegistryProcess]:
    """A 3.x registry that answers at most 3 tags and 3 repositories a page (``tags.maxtags``,
    ``catalog.maxentries``): n above that is 400 PAGINATION_NUMBER_INVALID."""
    reg = RegistryProcess.create(
        tmp_path, {"tags": {"maxtags": 3}, "catalog": {"maxentries": 3}}, binary=registry_binary_3
    )
    reg.start()
    yield reg
    reg.stop()


async def test_tags_and_catalog_on_3x_learn_the_page_limit_and_follow_link(
    small_pages_3x: RegistryProcess,
) -> None:
    """On 3.x with tags.maxtags and catalog.maxentries of 3, the default n=1000 is refused
    (400 PAGINATION_NUMBER_INVALID): the client halves n until it is accepted, follows the
    Link pages to every tag and repository, and asks with the learnt size from then on."""
    reg = small_pages_3x
    tags = [f"t{i}" for i in range(7)]
    push_image(reg.url, "pages/app", *tags)
    for i in range(4):
        push_image(reg.url, f"pages/r{i}", "v1")
    with httpx.Client(base_url=reg.url) as http:  # what the client meets first
        refused = http.get("/v2/pages/app/tags/list", params={"n": 1000})
    assert refused.status_code == 400 and "PAGINATION_NUMBER_INVALID" in refused.text
    calls = Calls()
    async with make_client(reg.url, calls) as c:
        assert await c.tags("pages/app") == tags
        first = calls.count("GET", "/v2/{name}/tags/list")
        assert await c.tags("pages/app") == tags
        assert sorted(await c.catalog()) == ["pages/app", *(f"pages/r{i}" for i in range(4))]
    tag_lists = [s for m, t, s in calls.seen if t == "/v2/{name}/tags/list"]
    # 1000, 500, ..., 7 refused; 3 accepted: pages of 3, 3, 1; then 3 pages straight away.
    assert tag_lists == [400] * 8 + [200] * 3 + [200] * 3
    assert first == 11
    assert [s for m, t, s in calls.seen if t == "/v2/_catalog"] == [400] * 8 + [200] * 2


# -- manifests and blobs ---------------------------------------------------------


@pytest.mark.parametrize("oci", [True, False], ids=["oci", "docker"])
async def test_head_and_get_image_manifest(
    client: RegistryClient, registry: RegistryProcess, repo_name: str, oci: bool
) -> None:
    """HEAD and GET give the digest, media type, size and config of an OCI or Docker image."""
    digest, raw = push_image(registry.url, repo_name, "v1", oci=oci)
    media_type = mt.OCI_MANIFEST if oci else mt.DOCKER_MANIFEST
    ref = await client.head_manifest(repo_name, "v1")
    assert ref is not None
    assert (ref.digest, ref.media_type, ref.size) == (digest, media_type, len(raw))
    by_tag = await client.get_manifest(repo_name, "v1")
    by_digest = await client.get_manifest(repo_name, digest)
    assert by_tag == by_digest
    assert (by_tag.digest, by_tag.media_type, by_tag.raw) == (digest, media_type, raw)
    assert by_tag.config is not None and len(by_tag.layers) == 1
    config = await client.get_blob(repo_name, by_tag.config.digest)
    assert json.loads(config)["created"] == "2024-01-01T00:00:00Z"


async def test_head_and_get_index(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """An OCI index is served under its own media type with its children as descriptors."""
    children = [push_image(registry.url, repo_name, f"c{i}") for i in range(2)]
    digest = push_index(registry.url, repo_name, "multi", children)
    ref = await client.head_manifest(repo_name, "multi")
    assert ref is not None and (ref.digest, ref.media_type) == (digest, mt.OCI_INDEX)
    index = await client.get_manifest(repo_name, "multi")
    assert index.is_index
    assert [c.digest for c in index.children] == [d for d, _ in children]


async def test_unknown_manifest_and_blob(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """HEAD of an unknown tag is None, GET raises ManifestUnknown, an unknown blob is absent."""
    push_image(registry.url, repo_name, "v1")
    missing = _digest(b"nothing")
    assert await client.head_manifest(repo_name, "nope") is None
    with pytest.raises(ManifestUnknown):
        await client.get_manifest(repo_name, missing)
    with pytest.raises(ManifestUnknown):
        await client.get_blob(repo_name, missing)
    assert await client.blob_exists(repo_name, missing) is False


async def test_upload_blob_and_put_manifest(client: RegistryClient, repo_name: str) -> None:
    """A monolithic blob upload and a manifest PUT through the client round-trip by digest."""
    data = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    blob = await client.upload_blob(repo_name, data)
    assert blob == _digest(data)
    assert await client.blob_exists(repo_name, blob) is True
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": blob, "size": len(data)},
            "layers": [],
        }
    ).encode()
    digest = await client.put_manifest(repo_name, "v1", mt.OCI_MANIFEST, raw)
    assert digest == _digest(raw)
    assert (await client.get_manifest(repo_name, "v1")).raw == raw


async def test_get_manifest_refuses_content_not_matching_digest() -> None:
    """Bytes not hashing to the requested digest are refused (MockTransport: a corrupt registry)."""
    wanted = _digest(b"{}")

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == mt.MANIFEST_ACCEPT
        return httpx.Response(
            200, content=b'{"schemaVersion":2}', headers={"Content-Type": mt.OCI_MANIFEST}
        )

    async with mock_client(handler) as c:
        with pytest.raises(RegistryProtocolError, match="digest"):
            await c.get_manifest("a/b", wanted)


# -- deletes ---------------------------------------------------------------------


async def test_delete_manifest_then_already_gone(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """DELETE by digest answers True, and a second DELETE (404) answers False instead of failing."""
    digest, _ = push_image(registry.url, repo_name, "v1")
    assert await client.delete_manifest(repo_name, digest) is Removal.DELETED
    assert await client.head_manifest(repo_name, digest) is None
    assert await client.delete_manifest(repo_name, digest) is Removal.ABSENT


async def test_delete_tag_dummy_method_on_2_8(registry: RegistryProcess, repo_name: str) -> None:
    """On 2.8 (the probe's 400 DIGEST_INVALID) one tag goes; the other tag and the manifest
    stay, no dummy."""
    digest, _ = push_image(registry.url, repo_name, "old", "keep")
    calls = Calls()
    async with make_client(registry.url, calls) as c:
        assert await c.delete_tag(repo_name, "old", digest) is Removal.DELETED
        assert c.tag_delete_supported is False
        assert await c.tags(repo_name) == ["keep"]
        ref = await c.head_manifest(repo_name, "keep")
        assert ref is not None and ref.digest == digest
        # The capability is remembered: the second untag goes straight to the dummy method.
        assert await c.delete_tag(repo_name, "keep", digest) is Removal.DELETED
    # The two probes (deletes, then tags), then one dummy deleted per untag.
    assert calls.count("DELETE", "/v2/{name}/manifests/{reference}") == 4
    assert revisions(registry, repo_name) == [digest.split(":")[1]]


async def test_tag_delete_probe_answers_per_version_and_deletes_nothing(
    registry: RegistryProcess, registry_binary: RegistryBinary, repo_name: str
) -> None:
    """The capability is probed, never read from a version: 3.x answers the DELETE of an
    unknown tag with 404 MANIFEST_UNKNOWN (supported), 2.8 with 400 DIGEST_INVALID (not),
    in a pushed repository and in one that does not exist alike; a client asks once, and
    nothing is deleted by asking."""
    digest, _ = push_image(registry.url, repo_name, "v1", "v2")
    never_pushed = f"{repo_name}-never-pushed"
    calls = Calls()
    async with make_client(registry.url, calls) as c:
        supported = await c.tag_delete(repo_name)
        assert supported is (registry_binary.major >= 3)
        assert await c.tag_delete(never_pushed) is supported
        assert sorted(await c.tags(repo_name)) == ["v1", "v2"]
    assert calls.count("DELETE", "/v2/{name}/manifests/{reference}") == 2  # deletes, tags
    assert revisions(registry, repo_name) == [digest.split(":")[1]]
    async with make_client(registry.url) as fresh:
        assert await fresh.tag_delete(never_pushed) is supported
    with httpx.Client(base_url=registry.url) as http:  # the answers themselves
        answers = [
            http.delete(f"/v2/{r}/manifests/regsweep-probe-x") for r in (repo_name, never_pushed)
        ]
    expected = (404, "MANIFEST_UNKNOWN") if registry_binary.major >= 3 else (400, "DIGEST_INVALID")
    for answer in answers:
        assert (answer.status_code, answer.json()["errors"][0]["code"]) == expected


def _stored_revisions(registry: RegistryProcess, repo: str) -> set[str]:
    """Every manifest revision the repository's storage ever got, linked or since unlinked."""
    root = registry.storage_path / "docker/registry/v2/repositories" / repo
    return {p.name for p in (root / "_manifests/revisions/sha256").iterdir()}


async def test_delete_tag_on_3x_is_one_delete_and_writes_nothing(
    registry_binary_3: RegistryBinary, tmp_path: Path, repo_name: str
) -> None:
    """On 3.x a tag-only removal is one DELETE of the tag: no placeholder manifest is ever
    stored (the repository's revisions hold the image alone), no blob uploaded, the other
    tag and the manifest stay; the probe is asked once for three removals made at once (as
    a wave makes them)."""
    reg = RegistryProcess.create(tmp_path, binary=registry_binary_3)
    reg.start()
    try:
        digest, _ = push_image(reg.url, repo_name, "old", "older", "oldest", "keep")
        calls = Calls()
        async with make_client(reg.url, calls) as c:
            removals = await asyncio.gather(
                *(c.delete_tag(repo_name, t, digest) for t in ("old", "older", "oldest"))
            )
            assert removals == [Removal.DELETED] * 3
            assert c.tag_delete_supported is True
            assert await c.tags(repo_name) == ["keep"]
            ref = await c.head_manifest(repo_name, digest)
            assert ref is not None and ref.digest == digest
        assert calls.count("DELETE", "/v2/{name}/manifests/{reference}") == 2 + 3
        writes = [(m, t) for m, t, _ in calls.seen if m in ("PUT", "POST", "PATCH")]
        assert writes == []
        assert _stored_revisions(reg, repo_name) == {digest.split(":")[1]}
    finally:
        reg.stop()


async def test_delete_tag_refuses_a_moved_tag(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """A tag that moved to another digest since the plan raises SafetyViolation and stays put."""
    old, _ = push_image(registry.url, repo_name, "v1")
    new, _ = push_image(registry.url, repo_name, "v1")
    with pytest.raises(SafetyViolation):
        await client.delete_tag(repo_name, "v1", old)
    ref = await client.head_manifest(repo_name, "v1")
    assert ref is not None and ref.digest == new


async def test_delete_tag_already_gone(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """Untagging a tag that no longer exists answers False (done already), not an error."""
    digest, _ = push_image(registry.url, repo_name, "v1")
    assert await client.delete_tag(repo_name, "gone", digest) is Removal.ABSENT


async def test_delete_tag_falls_back_when_3x_was_replaced_by_2_8() -> None:
    """A registry that answered the probe as 3.x and later answers a tag DELETE with 2.8's
    400 DIGEST_INVALID (replaced under a running worker) gets the placeholder method, and
    the client stops asking it to delete tags (MockTransport: no real registry changes
    version under a client)."""
    digest = _digest(b"manifest")
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        path = request.url.path
        if request.method == "HEAD" and "/blobs/" in path:
            return httpx.Response(200)
        if request.method == "HEAD":
            headers = {"Docker-Content-Digest": digest, "Content-Type": mt.OCI_MANIFEST}
            return httpx.Response(200, headers=headers)
        if request.method == "PUT":
            return httpx.Response(201, headers={"Docker-Content-Digest": _digest(request.content)})
        if path.endswith("/old"):
            return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
        return httpx.Response(202)

    async with mock_client(handler) as c:
        c.tag_delete_supported = True  # what the probe said before the replacement
        assert await c.delete_tag("a/b", "old", digest) is Removal.DELETED
        assert c.tag_delete_supported is False
    assert ("PUT", "/v2/a/b/manifests/old") in seen


# -- registry modes -----------------------------------------------------------------


@pytest.fixture
def readonly_registry(tmp_path: Path) -> Iterator[tuple[RegistryProcess, str]]:
    """A registry holding one image, restarted in read-only maintenance mode."""
    reg = RegistryProcess.create(tmp_path)
    reg.start()
    try:
        digest, _ = push_image(reg.url, "ro/repo", "v1", "v2")
        reg.set_readonly(True)
        reg.restart()
        yield reg, digest
    finally:
        reg.stop()


async def test_read_only_registry(readonly_registry: tuple[RegistryProcess, str]) -> None:
    """2.8 maintenance mode (405, plain text, Allow) is RegistryReadOnly for writes; reads work."""
    reg, digest = readonly_registry
    async with make_client(reg.url) as c:
        assert sorted(await c.tags("ro/repo")) == ["v1", "v2"]
        with pytest.raises(RegistryReadOnly):
            await c.delete_manifest("ro/repo", digest)
        with pytest.raises(RegistryReadOnly):
            await c.upload_blob("ro/repo", b"{}")
        with pytest.raises(RegistryReadOnly):
            await c.put_manifest("ro/repo", "v3", mt.OCI_MANIFEST, b"{}")
        with pytest.raises(RegistryReadOnly):
            await c.delete_tag("ro/repo", "v1", digest)
        assert c.tag_delete_supported is None  # a read-only registry cannot tell
        assert await c.head_manifest("ro/repo", "v1") is not None


async def test_deletes_disabled_registry(tmp_path: Path, registry_binary: RegistryBinary) -> None:
    """storage.delete.enabled false: deletes by digest and by tag raise DeletesDisabled (405),
    on 3.x too, whose tag store would remove the tag regardless: nothing is removed."""
    reg = RegistryProcess.create(tmp_path, binary=registry_binary)
    reg.config["storage"]["delete"]["enabled"] = False
    reg.start()
    try:
        digest, _ = push_image(reg.url, "nodel/repo", "v1", "v2")
        async with make_client(reg.url) as c:
            with pytest.raises(DeletesDisabled):
                await c.delete_manifest("nodel/repo", digest)
            with pytest.raises(DeletesDisabled):
                await c.delete_tag("nodel/repo", "v1", digest)
            assert sorted(await c.tags("nodel/repo")) == ["v1", "v2"]
    finally:
        reg.stop()


async def test_a_front_that_answers_delete_with_a_bare_404_is_no_missing_tag() -> None:
    """A proxy in front of the registry that answers DELETE with a plain 404 (no registry
    error body; MockTransport: no such front runs here): a tag removal is refused as a
    protocol error naming the proxy, never taken for a tag already gone (which the audit
    would settle as done while the tag stays)."""
    digest = "sha256:" + "a" * 64

    def front(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(404, text="Not Found")
        headers = {"Docker-Content-Digest": digest, "Content-Type": mt.OCI_MANIFEST}
        return httpx.Response(200, headers=headers | {"Content-Length": "2"})

    async with mock_client(front) as c:
        with pytest.raises(RegistryProtocolError, match="proxy in front of the registry"):
            await c.delete_tag("t/app", "old", digest)


# -- referrers -----------------------------------------------------------------------


async def test_referrers_absent_on_2_8(
    client: RegistryClient, registry: RegistryProcess, repo_name: str
) -> None:
    """2.8 has no referrers API (plain 404): the client says None, and asks only once."""
    digest, _ = push_image(registry.url, repo_name, "v1")
    asked: list[str] = []

    def hook(method: str, path: str, status: int | None, seconds: float) -> None:
        asked.append(path)

    settings = RegistrySettings(url=registry.url)
    async with RegistryClient.from_settings(settings, on_response=hook) as c:
        assert await c.referrers(repo_name, digest) is None
        assert await c.referrers(repo_name, digest) is None
    assert asked.count("/v2/{name}/referrers/{digest}") == 1


async def test_referrers_api_pages_and_empty_404() -> None:
    """Paged referrers are collected; a 404 with an index means none (MockTransport: OCI 1.1)."""
    subject, sig, sbom = _digest(b"s"), _digest(b"sig"), _digest(b"sbom")

    def index(*digests: str) -> dict[str, object]:
        return {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {"mediaType": mt.OCI_MANIFEST, "digest": d, "size": 1, "artifactType": "x"}
                for d in digests
            ],
        }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == mt.OCI_INDEX
        if request.url.path.endswith(_digest(b"none")):
            return httpx.Response(404, json=index())
        if request.url.params.get("page") == "2":
            return httpx.Response(200, json=index(sbom))
        return httpx.Response(
            200,
            json=index(sig),
            headers={"Link": f'</v2/a/b/referrers/{subject}?page=2>; rel="next"'},
        )

    async with mock_client(handler) as c:
        found = await c.referrers("a/b", subject)
        assert found is not None and [d.digest for d in found] == [sig, sbom]
        assert await c.referrers("a/b", _digest(b"none")) == []


# -- retries, limits, hooks -----------------------------------------------------------


async def test_5xx_and_dropped_connection_are_retried() -> None:
    """A 503 and a dropped connection are retried until an answer (MockTransport: flaky network)."""

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a response.", request=request
        )

    answers: list[Handler] = [
        lambda r: httpx.Response(503),
        drop,
        lambda r: httpx.Response(200, json={"name": "a/b", "tags": ["v1"]}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)(request)

    calls = Calls()
    async with mock_client(handler, calls) as c:
        assert await c.tags("a/b") == ["v1"]
    assert [status for _, _, status in calls.seen] == [503, None, 200]


async def test_persistent_5xx_becomes_unavailable() -> None:
    """5xx every time is RegistryUnavailable after DEFAULT_RETRIES attempts (MockTransport)."""
    calls = Calls()
    async with mock_client(lambda r: httpx.Response(502), calls) as c:
        with pytest.raises(RegistryUnavailable) as info:
            await c.ping()
    assert info.value.status == 502
    assert len(calls.seen) == DEFAULT_RETRIES


@pytest.mark.parametrize("status", [400, 404, 409, 429])
async def test_4xx_is_never_retried(status: int) -> None:
    """A 4xx answer is raised after one attempt, whatever it is (MockTransport: any status)."""
    calls = Calls()
    async with mock_client(
        lambda r: httpx.Response(status, json={"errors": [{"code": "X"}]}), calls
    ) as c:
        with pytest.raises((RegistryProtocolError, ManifestUnknown, RegistryUnavailable)):
            await c.get_manifest("a/b", "v1")
    assert len(calls.seen) == 1


async def test_concurrency_limit() -> None:
    """No more requests are in flight than ``concurrency`` (MockTransport, to count inside)."""
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json={"name": "a", "tags": []})

    settings = RegistrySettings(url="http://registry.test", concurrency=3)
    async with RegistryClient.from_settings(settings, transport=httpx.MockTransport(handler)) as c:
        await asyncio.gather(*(c.tags(f"r{i}") for i in range(12)))
    assert peak == 3


# -- TLS -------------------------------------------------------------------------------


def _write_tls_pair(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_ca_file_trusts_a_private_tls_registry(tmp_path: Path) -> None:
    """A TLS registry with a private CA works with ``ca_file`` and is refused without it."""
    cert, key = _write_tls_pair(tmp_path)
    reg = RegistryProcess.create(tmp_path / "reg")
    reg.config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    url = f"https://127.0.0.1:{reg.port}"
    # The harness probes plain http for readiness; the TLS port's 400 answer is enough.
    reg.start()
    try:
        trusted = RegistrySettings(url=url, ca_file=str(cert))
        async with RegistryClient.from_settings(trusted) as c:
            await c.ping()
        async with RegistryClient.from_settings(RegistrySettings(url=url), retries=1) as c:
            with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await c.ping()
    finally:
        reg.stop()


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A ca_file that cannot be loaded is refused at start-up as a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="ca_file"):
        RegistryClient.from_settings(
            RegistrySettings(url="https://x", ca_file=str(tmp_path / "missing.pem"))
        )


def test_untag_manifest_annotation_is_unique() -> None:
    """Each throw-away untag manifest differs (its nonce), so its digest is nobody else's."""
    from worker.oci import Descriptor, Digest
    from worker.registry.client import untag_manifest

    config = Descriptor(Digest(_digest(b"{}")), mt.OCI_EMPTY, 2)
    first, second = untag_manifest(config), untag_manifest(config)
    assert first != second
    assert UNTAG_ANNOTATION in json.loads(first)["annotations"]
