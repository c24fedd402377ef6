"""Push test images into a real registry through its HTTP API.

Everything goes through one synchronous :class:`httpx.Client` whose ``base_url``
is the registry (plain, htpasswd or token flavour — pass the client the auth it
needs). Each push returns a frozen record with the digest and the exact bytes
sent, so tests can assert on both::

    builder = ImageBuilder(httpx.Client(base_url=registry.url))
    amd64 = builder.image("t/app", created=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    arm64 = builder.image("t/app", architecture="arm64")
    index = builder.index("t/app", [amd64, arm64], tag="v1", attest=True)
    builder.tag("t/app", index, "latest", "stable")
    builder.cosign("t/app", index, "sig")
    builder.referrer("t/app", amd64, artifact_type="application/spdx+json")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from worker import oci

Format = Literal["oci", "docker"]
CosignKind = Literal["sig", "att", "sbom"]

OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO: Final = "application/vnd.in-toto+json"
#: The OCI 1.1 empty descriptor's content, used as config of artifacts.
EMPTY_JSON: Final = b"{}"
ATTESTATION_MANIFEST: Final = "attestation-manifest"
REFERENCE_DIGEST: Final = "vnd.docker.reference.digest"
DEFAULT_LAYER_SIZE: Final = 64

COSIGN_LAYER_TYPES: Final[Mapping[str, str]] = {
    "sig": "application/vnd.dev.cosign.simplesigning.v1+json",
    "att": "application/vnd.dsse.envelope.v1+json",
    "sbom": "application/spdx+json",
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_layer(size: int = DEFAULT_LAYER_SIZE) -> bytes:
    """Random bytes to use as a layer; pass the same bytes to two images to share it."""
    return os.urandom(size)


def referrers_tag(subject_digest: str) -> str:
    """The ``sha256-<hex>`` fallback tag (and cosign tag stem) for a subject digest."""
    return subject_digest.replace(":", "-")


def rfc3339(moment: dt.datetime) -> str:
    """``moment`` as RFC 3339 in UTC; a naive datetime is taken to be UTC already."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class PushError(RuntimeError):
    """The registry refused a push the harness made; carries status and body."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        request = response.request
        super().__init__(f"{request.method} {request.url.path} -> {self.status}: {response.text}")


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        data = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            data["variant"] = self.variant
        return data


UNKNOWN_PLATFORM: Final = Platform(os="unknown", architecture="unknown")


@dataclass(frozen=True)
class Blob:
    digest: str
    media_type: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class PushedImage:
    """One image (or artifact) manifest as pushed: ``raw`` is exactly what the registry stored."""

    repository: str
    digest: str
    media_type: str
    raw: bytes = field(repr=False)
    config_digest: str
    layer_digests: tuple[str, ...]
    tags: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str | None = None
    subject: str | None = None

    @property
    def size(self) -> int:
        return len(self.raw)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class PushedIndex:
    """An OCI index or Docker manifest list as pushed; ``children`` in manifest order."""

    repository: str
    digest: str
    media_type: str
    raw: bytes = field(repr=False)
    children: tuple[str, ...]
    attestations: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.raw)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


Pushed = PushedImage | PushedIndex


@dataclass(frozen=True)
class IndexEntry:
    """A child of an index with the platform and annotations its descriptor carries."""

    manifest: Pushed
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        data = self.manifest.descriptor()
        platform = self.platform
        if platform is None and isinstance(self.manifest, PushedImage):
            platform = self.manifest.platform
        if platform is not None:
            data["platform"] = platform.as_json()
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class ManifestHead:
    """What a manifest HEAD answered."""

    digest: str
    media_type: str
    size: int


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


class ImageBuilder:
    """Pushes blobs, images, indexes, tags, cosign tags and referrers; reads them back."""

    def __init__(self, client: httpx.Client) -> None:
        """``client.base_url`` must be the registry root; its auth is used for every call."""
        self.client = client

    @classmethod
    def connect(cls, url: str, auth: httpx.Auth | None = None) -> ImageBuilder:
        """A builder with its own client; close it with :meth:`close` or ``with``."""
        return cls(httpx.Client(base_url=url, auth=auth, timeout=10.0))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ImageBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs ---------------------------------------------------------------

    def blob(self, repository: str, data: bytes, media_type: str = OCI_LAYER) -> Blob:
        """Upload ``data`` monolithically (POST, then PUT with ``?digest=``)."""
        digest = sha256_digest(data)
        started = self._check(self.client.post(f"/v2/{repository}/blobs/uploads/"))
        # httpx replaces a URL's query when given params=; the upload's _state must stay.
        location = httpx.URL(started.headers["Location"]).copy_add_param("digest", digest)
        headers = {"Content-Type": "application/octet-stream"}
        self._check(self.client.put(location, content=data, headers=headers))
        return Blob(digest, media_type, len(data))

    # -- manifests -----------------------------------------------------------

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """PUT ``raw`` under a tag or digest; returns the digest the registry reports."""
        response = self._check(
            self.client.put(
                f"/v2/{repository}/manifests/{reference}",
                content=raw,
                headers={"Content-Type": media_type},
            )
        )
        digest = response.headers["Docker-Content-Digest"]
        assert digest == sha256_digest(raw), "registry stored different bytes than sent"
        return digest

    def _put_tagged(self, repository: str, raw: bytes, media_type: str, tags: Sequence[str]) -> str:
        """Push by digest (so an untagged push is possible), then under each tag."""
        digest = self.put_manifest(repository, sha256_digest(raw), raw, media_type)
        for tag in tags:
            self.put_manifest(repository, tag, raw, media_type)
        return digest

    def image(
        self,
        repository: str,
        tag: str | Sequence[str] = (),
        *,
        fmt: Format = "oci",
        created: dt.datetime | Literal["now", "absent"] = "now",
        architecture: str = "amd64",
        os: str = "linux",
        variant: str | None = None,
        layers: Sequence[bytes] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> PushedImage:
        """Push a single-arch image: a config blob plus ``layers`` (default one random layer).

        ``created="absent"`` leaves ``created`` out of the config; pass the same
        ``layers`` bytes to several images to make them share blobs.
        """
        platform = Platform(os, architecture, variant)
        layer_data = [random_layer()] if layers is None else list(layers)
        layer_type = OCI_LAYER if fmt == "oci" else DOCKER_LAYER
        pushed = [self.blob(repository, data, layer_type) for data in layer_data]
        config = _image_config(platform, created, [b.digest for b in pushed])
        config_type = oci.OCI_CONFIG if fmt == "oci" else oci.DOCKER_CONFIG
        config_blob = self.blob(repository, _encode(config), config_type)
        return self._image_manifest(
            repository,
            _tags(tag),
            fmt,
            config_blob,
            pushed,
            annotations=annotations,
            platform=platform,
        )

    def _image_manifest(
        self,
        repository: str,
        tags: tuple[str, ...],
        fmt: Format,
        config: Blob,
        layers: Sequence[Blob],
        *,
        annotations: Mapping[str, str] | None = None,
        platform: Platform | None = None,
        artifact_type: str | None = None,
        subject: Pushed | None = None,
    ) -> PushedImage:
        media_type = oci.OCI_MANIFEST if fmt == "oci" else oci.DOCKER_MANIFEST
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
        if artifact_type:
            document["artifactType"] = artifact_type
        if subject is not None:
            document["subject"] = subject.descriptor()
        if annotations:
            document["annotations"] = dict(annotations)
        raw = _encode(document)
        digest = self._put_tagged(repository, raw, media_type, tags)
        return PushedImage(
            repository=repository,
            digest=digest,
            media_type=media_type,
            raw=raw,
            config_digest=config.digest,
            layer_digests=tuple(layer.digest for layer in layers),
            tags=tags,
            platform=platform,
            artifact_type=artifact_type,
            subject=subject.digest if subject is not None else None,
        )

    def index(
        self,
        repository: str,
        children: Sequence[Pushed | IndexEntry],
        tag: str | Sequence[str] = (),
        *,
        fmt: Format = "oci",
        attest: bool = False,
        annotations: Mapping[str, str] | None = None,
    ) -> PushedIndex:
        """Push an OCI index (or, with ``fmt="docker"``, a Docker manifest list).

        Children must already be in ``repository`` (2.8 checks). ``attest=True``
        adds a BuildKit attestation manifest for every image child with a platform.
        """
        entries = [c if isinstance(c, IndexEntry) else IndexEntry(c) for c in children]
        attestations = []
        if attest:
            attestations = [
                self.attestation(repository, e.manifest)
                for e in entries
                if isinstance(e.manifest, PushedImage) and e.manifest.platform is not None
            ]
        media_type = oci.OCI_INDEX if fmt == "oci" else oci.DOCKER_MANIFEST_LIST
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [e.descriptor() for e in [*entries, *attestations]],
        }
        if annotations:
            document["annotations"] = dict(annotations)
        raw = _encode(document)
        tags = _tags(tag)
        return PushedIndex(
            repository=repository,
            digest=self._put_tagged(repository, raw, media_type, tags),
            media_type=media_type,
            raw=raw,
            children=tuple(e.manifest.digest for e in [*entries, *attestations]),
            attestations=tuple(a.manifest.digest for a in attestations),
            tags=tags,
        )

    def attestation(self, repository: str, subject: PushedImage) -> IndexEntry:
        """Push a BuildKit-style attestation manifest for ``subject``, ready to list in an index.

        The entry has platform unknown/unknown and the two ``vnd.docker.reference.*``
        annotations pointing at ``subject``.
        """
        statement = {"_type": "https://in-toto.io/Statement/v0.1", "subject": subject.digest}
        layer = self.blob(repository, _encode(statement), IN_TOTO)
        config = _image_config(UNKNOWN_PLATFORM, "absent", [layer.digest])
        config_blob = self.blob(repository, _encode(config), oci.OCI_CONFIG)
        manifest = self._image_manifest(
            repository, (), "oci", config_blob, [layer], platform=UNKNOWN_PLATFORM
        )
        annotations = {
            oci.BUILDKIT_REFERENCE_TYPE: ATTESTATION_MANIFEST,
            REFERENCE_DIGEST: subject.digest,
        }
        return IndexEntry(manifest, UNKNOWN_PLATFORM, annotations)

    def tag(self, repository: str, target: Pushed | str, *tags: str) -> str:
        """Point more tags at an existing manifest (by record or digest); returns its digest."""
        if isinstance(target, str):
            raw, media_type = self.manifest(repository, target)
        else:
            raw, media_type = target.raw, target.media_type
        digest = sha256_digest(raw)
        for tag in tags:
            self.put_manifest(repository, tag, raw, media_type)
        return digest

    # -- signatures and referrers --------------------------------------------

    def cosign(
        self,
        repository: str,
        subject: Pushed | str,
        kind: CosignKind = "sig",
        *,
        fmt: Format = "oci",
        payload: bytes | None = None,
    ) -> PushedImage:
        """Push a cosign-style ``sha256-<hex>.<kind>`` tag: one small payload layer."""
        subject_digest = subject if isinstance(subject, str) else subject.digest
        body = payload or _encode(
            {"critical": {"image": {"docker-manifest-digest": subject_digest}}}
        )
        layer = self.blob(repository, body, COSIGN_LAYER_TYPES[kind])
        config = _image_config(Platform("", ""), "absent", [layer.digest])
        config_type = oci.OCI_CONFIG if fmt == "oci" else oci.DOCKER_CONFIG
        config_blob = self.blob(repository, _encode(config), config_type)
        tag = f"{referrers_tag(subject_digest)}.{kind}"
        return self._image_manifest(repository, (tag,), fmt, config_blob, [layer])

    def referrer(
        self,
        repository: str,
        subject: Pushed,
        *,
        artifact_type: str = "application/vnd.example.sbom.v1+json",
        payload: bytes | None = None,
        annotations: Mapping[str, str] | None = None,
        fallback: bool = True,
    ) -> PushedImage:
        """Push an OCI 1.1 artifact whose ``subject`` is ``subject`` (config: the empty blob).

        With ``fallback`` (the default) the ``sha256-<hex>`` index tag lists it too, as
        oras and cosign maintain on registries without the referrers API (2.8).
        """
        config = self.blob(repository, EMPTY_JSON, oci.OCI_EMPTY)
        layer = self.blob(repository, payload or os.urandom(32), artifact_type)
        artifact = self._image_manifest(
            repository,
            (),
            "oci",
            config,
            [layer],
            annotations=annotations,
            artifact_type=artifact_type,
            subject=subject,
        )
        if fallback:
            self.add_to_referrers_tag(repository, subject.digest, artifact)
        return artifact

    def add_to_referrers_tag(
        self, repository: str, subject_digest: str, referrer: PushedImage
    ) -> PushedIndex:
        """Append ``referrer`` to the ``sha256-<hex>`` fallback index (created if missing)."""
        tag = referrers_tag(subject_digest)
        manifests: list[dict[str, Any]] = []
        if self.manifest_exists(repository, tag):
            raw, _ = self.manifest(repository, tag)
            manifests = list(json.loads(raw).get("manifests", []))
        entry = referrer.descriptor()
        if referrer.artifact_type:
            entry["artifactType"] = referrer.artifact_type
        annotations = json.loads(referrer.raw).get("annotations")
        if annotations:
            entry["annotations"] = annotations
        manifests.append(entry)
        document = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
        raw = _encode(document)
        return PushedIndex(
            repository=repository,
            digest=self.put_manifest(repository, tag, raw, oci.OCI_INDEX),
            media_type=oci.OCI_INDEX,
            raw=raw,
            children=tuple(m["digest"] for m in manifests),
            tags=(tag,),
        )

    # -- reading back --------------------------------------------------------

    def head(self, repository: str, reference: str) -> ManifestHead | None:
        """HEAD a manifest with all four Accept types; ``None`` when the registry says 404."""
        response = self.client.head(
            f"/v2/{repository}/manifests/{reference}", headers={"Accept": oci.MANIFEST_ACCEPT}
        )
        if response.status_code == 404:
            return None
        self._check(response)
        return ManifestHead(
            digest=response.headers["Docker-Content-Digest"],
            media_type=response.headers["Content-Type"],
            size=int(response.headers["Content-Length"]),
        )

    def manifest_exists(self, repository: str, reference: str) -> bool:
        return self.head(repository, reference) is not None

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """GET a manifest's raw bytes and Content-Type."""
        response = self._check(
            self.client.get(
                f"/v2/{repository}/manifests/{reference}", headers={"Accept": oci.MANIFEST_ACCEPT}
            )
        )
        return response.content, response.headers["Content-Type"]

    def blob_exists(self, repository: str, digest: str) -> bool:
        response = self.client.head(f"/v2/{repository}/blobs/{digest}")
        if response.status_code == 404:
            return False
        self._check(response)
        return True

    def tags(self, repository: str) -> list[str]:
        """The repository's tags, sorted; empty when the repository does not exist."""
        response = self.client.get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []
        tags = self._check(response).json().get("tags") or []
        return sorted(str(t) for t in tags)

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise PushError(response)
        return response


def _tags(tag: str | Sequence[str]) -> tuple[str, ...]:
    return (tag,) if isinstance(tag, str) else tuple(tag)


def _image_config(
    platform: Platform,
    created: dt.datetime | Literal["now", "absent"],
    diff_ids: Sequence[str],
) -> dict[str, Any]:
    """An image config; layer digests stand in for diff_ids (nothing here unpacks layers)."""
    config: dict[str, Any] = {
        **platform.as_json(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if created == "now":
        config["created"] = rfc3339(dt.datetime.now(dt.UTC))
    elif isinstance(created, dt.datetime):
        config["created"] = rfc3339(created)
    return config
