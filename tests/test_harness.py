"""The test harness itself works against the real 2.8.2 binary: auth flavours and images."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import jwt
import pytest

from tests import conftest
from tests.harness import redisdb
from tests.harness.auth import Access, AuthRegistry, libtrust_key_id
from tests.harness.images import (
    CosignKind,
    Format,
    ImageBuilder,
    IndexEntry,
    PushError,
    random_layer,
    referrers_tag,
    sha256_digest,
)
from tests.harness.registry import (
    REQUIRE_V3_ENV,
    V3_ABSENT,
    V3_BINARY_ENV,
    V3_LOCATOR,
    RegistryBinary,
    RegistryProcess,
    RegistryUnavailable,
    binary_version,
)
from worker import oci as mt


def _assert_round_trip(builder: ImageBuilder, repo: str) -> None:
    pushed = builder.image(repo, "v1")
    raw, media_type = builder.manifest(repo, "v1")
    assert (raw, media_type) == (pushed.raw, mt.OCI_MANIFEST)
    assert builder.tags(repo) == ["v1"]


# -- auth flavours -----------------------------------------------------------


def test_htpasswd_registry_push_and_pull(registry_htpasswd: AuthRegistry, repo_name: str) -> None:
    """The htpasswd flavour lets the bcrypt user push and pull an image."""
    with ImageBuilder(registry_htpasswd.client()) as builder:
        _assert_round_trip(builder, repo_name)


def test_htpasswd_registry_refuses_missing_or_wrong_credentials(
    registry_htpasswd: AuthRegistry,
) -> None:
    """The htpasswd flavour answers 401 with a Basic challenge without or with a bad password."""
    anonymous = httpx.get(f"{registry_htpasswd.url}/v2/")
    wrong = httpx.get(f"{registry_htpasswd.url}/v2/", auth=(registry_htpasswd.username, "nope"))
    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")


def test_token_registry_push_and_pull(registry_token_reset: AuthRegistry, repo_name: str) -> None:
    """The token flavour accepts the issuer's JWTs for a push and pull, scoped per the spec."""
    with ImageBuilder(registry_token_reset.client()) as builder:
        _assert_round_trip(builder, repo_name)
    issuer = registry_token_reset.issuer
    assert issuer is not None
    # distribution lists a challenge's actions from a Go map: in any order.
    scopes = {
        scope.rpartition(":")[0]: set(scope.rpartition(":")[2].split(","))
        for scope in issuer.requested_scopes()
    }
    assert scopes.get(f"repository:{repo_name}") == {"pull", "push"}
    assert all(r.status == 200 and r.service == issuer.service for r in issuer.requests)


def test_token_registry_refuses_anonymous_and_bad_passwords(
    registry_token_reset: AuthRegistry, repo_name: str
) -> None:
    """Anonymous calls get a Bearer challenge with realm and scope; bad passwords get 401."""
    url = f"{registry_token_reset.url}/v2/{repo_name}/tags/list"
    challenge = httpx.get(url).headers["WWW-Authenticate"]
    issuer = registry_token_reset.issuer
    assert issuer is not None
    assert challenge.startswith(f'Bearer realm="{issuer.realm}"')
    assert f'scope="repository:{repo_name}:pull"' in challenge
    refused = httpx.get(issuer.realm, params={"service": issuer.service}, auth=("regsweep", "x"))
    assert refused.status_code == 401
    assert issuer.requests[-1].status == 401


def test_token_is_an_rs256_jwt_with_spec_claims(registry_token_reset: AuthRegistry) -> None:
    """Issued tokens are RS256 JWTs with kid, iss, aud and the access claim for every scope."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    response = httpx.get(
        issuer.realm,
        params=[
            ("service", issuer.service),
            ("scope", "repository:a/b:pull,delete"),
            ("scope", "registry:catalog:*"),
        ],
        auth=(registry_token_reset.username, registry_token_reset.password),
    )
    body = response.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == issuer.lifetime
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == libtrust_key_id(issuer.key.public_key())
    claims = jwt.decode(
        body["token"], issuer.key.public_key(), algorithms=["RS256"], audience=issuer.service
    )
    assert claims["iss"] == issuer.issuer
    assert claims["access"] == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "delete"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    assert issuer.requests[-1].scopes == ("repository:a/b:pull,delete", "registry:catalog:*")


def test_token_catalog_scope_works(registry_token_reset: AuthRegistry) -> None:
    """A token granted registry:catalog:* can list the catalog."""
    with registry_token_reset.client() as client:
        assert client.get("/v2/_catalog").status_code == 200
    issuer = registry_token_reset.issuer
    assert issuer is not None
    assert "registry:catalog:*" in issuer.requested_scopes()


def test_token_reader_cannot_push(registry_token_reset: AuthRegistry, repo_name: str) -> None:
    """A pull-only user gets a token without push, and the registry says insufficient_scope."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    reader = AuthRegistry(registry_token_reset.process, "reader", issuer.users["reader"], issuer)
    with reader.client() as client:
        response = client.post(f"/v2/{repo_name}/blobs/uploads/")
    assert response.status_code == 401
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert issuer.requests[-1].granted == (Access("repository", repo_name, ("pull",)),)


def test_token_expired_is_refused(registry_token_reset: AuthRegistry) -> None:
    """A token whose exp is past 2.8's leeway is refused with 401 invalid_token."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    issuer.issue_expired = True
    with registry_token_reset.client() as client:
        response = client.get("/v2/")
    assert response.status_code == 401
    assert len(issuer.requests) == 1


def test_issuer_adds_users_until_reset(registry_token_reset: AuthRegistry) -> None:
    """add_user makes a new login valid and reset() removes it again."""
    issuer = registry_token_reset.issuer
    assert issuer is not None
    issuer.add_user("ci", "secret", actions={"pull"})
    basic = "Basic " + base64.b64encode(b"ci:secret").decode()
    assert issuer.authenticate(basic) == (True, "ci")
    issuer.reset()
    assert issuer.authenticate(basic) == (False, "ci")
    assert issuer.requests == []


# -- images ------------------------------------------------------------------


def test_oci_image_lands_with_its_blobs_and_created(images: ImageBuilder, repo_name: str) -> None:
    """An OCI image is served with its media type and digest, its config carries created."""
    created = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    image = images.image(repo_name, "v1", created=created, architecture="arm64")
    head = images.head(repo_name, "v1")
    assert head is not None
    assert (head.digest, head.media_type, head.size) == (image.digest, mt.OCI_MANIFEST, image.size)
    assert image.digest == sha256_digest(image.raw)
    assert all(
        images.blob_exists(repo_name, d) for d in (image.config_digest, *image.layer_digests)
    )
    config = images.client.get(f"/v2/{repo_name}/blobs/{image.config_digest}").json()
    assert config["created"] == "2024-05-06T07:08:09Z"
    assert (config["architecture"], config["os"]) == ("arm64", "linux")


def test_docker_image_and_absent_created(images: ImageBuilder, repo_name: str) -> None:
    """A Docker schema 2 image is served as such; created='absent' leaves the config without it."""
    image = images.image(repo_name, "v1", fmt="docker", created="absent")
    head = images.head(repo_name, image.digest)
    assert head is not None and head.media_type == mt.DOCKER_MANIFEST
    config = images.client.get(f"/v2/{repo_name}/blobs/{image.config_digest}").json()
    assert "created" not in config
    assert json.loads(image.raw)["config"]["mediaType"] == mt.DOCKER_CONFIG


def test_unique_and_shared_layers(images: ImageBuilder, repo_name: str) -> None:
    """Images get unique layers by default and share a layer when given the same bytes."""
    shared = random_layer()
    one = images.image(repo_name, "one", layers=[shared, random_layer()])
    two = images.image(repo_name, "two", layers=[shared])
    three = images.image(repo_name, "three")
    assert one.layer_digests[0] == two.layer_digests[0]
    assert not set(three.layer_digests) & set(one.layer_digests)
    assert len({one.digest, two.digest, three.digest}) == 3


def test_untagged_push_and_extra_tags(images: ImageBuilder, repo_name: str) -> None:
    """An image pushed without tags exists only by digest; tag() adds several tags to it."""
    image = images.image(repo_name)
    images.image(repo_name, "other")
    assert images.tags(repo_name) == ["other"]
    assert images.manifest_exists(repo_name, image.digest)
    assert images.tag(repo_name, image.digest, "a", "b", "c") == image.digest
    assert images.tags(repo_name) == ["a", "b", "c", "other"]
    heads = [images.head(repo_name, t) for t in ("a", "b", "c")]
    assert {h.digest for h in heads if h} == {image.digest}


def test_oci_index_and_docker_list_share_children(images: ImageBuilder, repo_name: str) -> None:
    """An OCI index and a Docker manifest list over the same children both land with their types."""
    amd64 = images.image(repo_name, fmt="docker")
    arm64 = images.image(repo_name, fmt="docker", architecture="arm64", variant="v8")
    oci = images.index(repo_name, [amd64, arm64], "oci")
    docker = images.index(repo_name, [amd64, arm64], ["docker", "also"], fmt="docker")
    assert oci.children == docker.children == (amd64.digest, arm64.digest)
    oci_head, docker_head = images.head(repo_name, "oci"), images.head(repo_name, "also")
    assert oci_head is not None and docker_head is not None
    assert (oci_head.media_type, oci_head.digest) == (mt.OCI_INDEX, oci.digest)
    assert (docker_head.media_type, docker_head.digest) == (mt.DOCKER_MANIFEST_LIST, docker.digest)
    platforms = [m["platform"] for m in json.loads(docker.raw)["manifests"]]
    assert platforms[1] == {"architecture": "arm64", "os": "linux", "variant": "v8"}


def test_index_with_buildkit_attestations(images: ImageBuilder, repo_name: str) -> None:
    """attest=True adds one unknown/unknown attestation manifest per platform child."""
    amd64 = images.image(repo_name)
    arm64 = images.image(repo_name, architecture="arm64")
    index = images.index(repo_name, [amd64, arm64], "v1", attest=True)
    entries = json.loads(index.raw)["manifests"]
    assert len(entries) == 4 and index.children[2:] == index.attestations
    for entry, subject in zip(entries[2:], (amd64, arm64), strict=True):
        assert entry["platform"] == {"architecture": "unknown", "os": "unknown"}
        assert entry["annotations"] == {
            mt.BUILDKIT_REFERENCE_TYPE: "attestation-manifest",
            "vnd.docker.reference.digest": subject.digest,
        }
        head = images.head(repo_name, entry["digest"])
        assert head is not None and head.media_type == mt.OCI_MANIFEST


def test_nested_index_entry_with_annotations(images: ImageBuilder, repo_name: str) -> None:
    """An index can list another index, with explicit descriptor annotations."""
    inner = images.index(repo_name, [images.image(repo_name)])
    outer = images.index(repo_name, [IndexEntry(inner, annotations={"k": "v"})], "outer")
    entry = json.loads(outer.raw)["manifests"][0]
    assert (entry["digest"], entry["mediaType"], entry["annotations"]) == (
        inner.digest,
        mt.OCI_INDEX,
        {"k": "v"},
    )
    assert images.manifest_exists(repo_name, "outer")


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_cosign_tags(images: ImageBuilder, repo_name: str, fmt: Format) -> None:
    """cosign() pushes sha256-<hex>.sig/.att/.sbom tags whose payload names the subject."""
    subject = images.image(repo_name, "v1")
    kinds: tuple[CosignKind, ...] = ("sig", "att", "sbom")
    pushed = [images.cosign(repo_name, subject, kind, fmt=fmt) for kind in kinds]
    stem = referrers_tag(subject.digest)
    assert images.tags(repo_name) == sorted(["v1", f"{stem}.att", f"{stem}.sbom", f"{stem}.sig"])
    expected = mt.OCI_MANIFEST if fmt == "oci" else mt.DOCKER_MANIFEST
    for signature in pushed:
        head = images.head(repo_name, signature.tags[0])
        assert head is not None and (head.digest, head.media_type) == (signature.digest, expected)
    payload = images.client.get(f"/v2/{repo_name}/blobs/{pushed[0].layer_digests[0]}").json()
    assert payload["critical"]["image"]["docker-manifest-digest"] == subject.digest


def test_referrers_with_fallback_index(images: ImageBuilder, repo_name: str) -> None:
    """referrer() pushes subject+artifactType manifests and lists them in the sha256-<hex> index."""
    subject = images.image(repo_name, "v1")
    sbom = images.referrer(repo_name, subject, artifact_type="application/spdx+json")
    sig = images.referrer(
        repo_name, subject, artifact_type="application/vnd.dev.sig", annotations={"a": "b"}
    )
    manifest = json.loads(sbom.raw)
    assert manifest["subject"]["digest"] == subject.digest == sbom.subject
    assert manifest["artifactType"] == "application/spdx+json"
    assert manifest["config"]["mediaType"] == mt.OCI_EMPTY
    raw, media_type = images.manifest(repo_name, referrers_tag(subject.digest))
    assert media_type == mt.OCI_INDEX
    entries = json.loads(raw)["manifests"]
    assert [e["digest"] for e in entries] == [sbom.digest, sig.digest]
    assert entries[1]["artifactType"] == "application/vnd.dev.sig"
    assert entries[1]["annotations"] == {"a": "b"}


def test_referrer_without_fallback_leaves_no_tag(images: ImageBuilder, repo_name: str) -> None:
    """fallback=False pushes the referrer by digest only, as on a registry with the API."""
    subject = images.image(repo_name, "v1")
    artifact = images.referrer(repo_name, subject, fallback=False)
    assert images.manifest_exists(repo_name, artifact.digest)
    assert images.tags(repo_name) == ["v1"]


def test_presence_helpers_report_absence(images: ImageBuilder, repo_name: str) -> None:
    """head/manifest_exists/blob_exists/tags answer None/False/[] for things never pushed."""
    missing = sha256_digest(b"never pushed")
    assert images.head(repo_name, "nope") is None
    assert not images.manifest_exists(repo_name, missing)
    assert not images.blob_exists(repo_name, missing)
    assert images.tags(repo_name) == []


def test_refused_push_raises_with_the_registry_answer(images: ImageBuilder, repo_name: str) -> None:
    """An index whose child is missing is refused by 2.8 and surfaces as PushError with the body."""
    ghost = images.image(repo_name)
    with pytest.raises(PushError) as error:
        images.index(f"{repo_name}-other", [ghost])
    assert error.value.status == 400
    assert "MANIFEST_BLOB_UNKNOWN" in str(error.value)


def test_builder_works_on_the_token_registry(
    registry_token_reset: AuthRegistry, repo_name: str
) -> None:
    """A multi-arch index with a cosign signature pushes through the token flavour too."""
    with ImageBuilder(registry_token_reset.client()) as builder:
        child = builder.image(repo_name)
        index = builder.index(repo_name, [child], "v1")
        builder.cosign(repo_name, index, "sig")
        assert builder.tags(repo_name) == sorted(["v1", f"{referrers_tag(index.digest)}.sig"])


def test_builder_accepts_a_plain_client(registry: RegistryProcess, repo_name: str) -> None:
    """ImageBuilder works over any httpx.Client whose base_url is the registry."""
    with ImageBuilder(httpx.Client(base_url=registry.url)) as builder:
        _assert_round_trip(builder, repo_name)


# -- the registry binaries ------------------------------------------------------------


def _locator_copy(tmp_path: Path) -> Path:
    """scripts/registry-v3 in a checkout of its own, with no ../shared beside it (a clone)."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    copy = clone / "scripts" / "registry-v3"
    shutil.copy2(V3_LOCATOR, copy)
    return copy


def test_registry_v3_absent_says_why_and_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a clone without ../shared and without $REGSWEEP_REGISTRY_V3 the locator exits 3
    naming the build script it looked for and the variable: the reason the 3.x tests are
    skipped with (tests/conftest.py); a variable naming no executable is an error, not a
    reason to skip."""
    monkeypatch.delenv(V3_BINARY_ENV, raising=False)
    copy = _locator_copy(tmp_path)
    absent = subprocess.run([str(copy)], capture_output=True, text=True, check=False)
    assert absent.returncode == V3_ABSENT and absent.stdout == ""
    assert "../shared/registry/build-v3" in absent.stderr and V3_BINARY_ENV in absent.stderr
    monkeypatch.setenv(V3_BINARY_ENV, str(tmp_path / "nothing-here"))
    wrong = subprocess.run([str(copy)], capture_output=True, text=True, check=False)
    assert wrong.returncode not in (0, V3_ABSENT)
    assert "is not an executable" in wrong.stderr


def test_a_missing_3x_skips_with_the_locators_reason_unless_ci_requires_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the locator finds no 3.x (a user's own clone), a 3.x run is skipped with the
    locator's words; with $REGSWEEP_REQUIRE_V3 (.ci/run sets it) the same run fails."""
    reason = "no distribution 3.x binary: ../shared/registry/build-v3 is not beside this checkout"

    def absent(version: str) -> RegistryBinary:
        raise RegistryUnavailable(reason)

    monkeypatch.setattr(conftest, "binary_of", absent)
    monkeypatch.delenv(REQUIRE_V3_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        conftest._binary("3.x")
    assert str(skipped.value) == reason
    monkeypatch.setenv(REQUIRE_V3_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        conftest._binary("3.x")
    assert reason in str(failed.value) and "may not be skipped" in str(failed.value)


def test_registry_v3_is_what_the_suite_runs_as_3x(registry_binary_3: RegistryBinary) -> None:
    """The 3.x the suite runs is distribution 3 by its own --version, and the locator finds it
    beside this checkout (or as $REGSWEEP_REGISTRY_V3 says)."""
    found = subprocess.run([str(V3_LOCATOR)], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == registry_binary_3.path
    assert registry_binary_3.major == 3
    assert binary_version(registry_binary_3.path) == registry_binary_3.version


def test_each_redis_database_number_has_one_user_and_is_in_the_table() -> None:
    """Every ``redisdb.url(N)`` in the tests, the harness and bench/ is used by the one module
    tests/harness/redisdb.py's table gives N to (or by a module of a harness listed there), so
    no module flushes another's data when they share a server."""
    root = Path(__file__).resolve().parent.parent
    table: dict[int, str] = {}
    for line in (redisdb.__doc__ or "").splitlines():
        row = re.match(r"\s*(\d+)\s+(\S+\.py)", line)
        if row:
            table[int(row.group(1))] = row.group(2).rstrip(":")
    users: dict[int, set[str]] = {}
    for path in [*root.glob("tests/**/*.py"), *root.glob("bench/*.py")]:
        for number in re.findall(r"redisdb\.url\((\d+)\)", path.read_text()):
            users.setdefault(int(number), set()).add(str(path.relative_to(root)))
    assert set(users) <= set(table), sorted(set(users) - set(table))
    for number, files in sorted(users.items()):
        assert files == {table[number]}, (number, files, table[number])
