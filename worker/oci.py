"""The OCI vocabulary every layer shares: digests, descriptors, manifests, media types, and the
grammar of repository names, tags and digests.

It sits at the bottom of the import graph (it imports only :mod:`worker.errors`), so the
registry client, the storage reader, the store and the engine all speak it without one of
them reaching up into another. Each grammar is written here once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NewType

from worker.errors import RegistryProtocolError

Digest = NewType("Digest", str)

# --- media types -----------------------------------------------------------------------------

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"

DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"

#: Sent on every manifest GET/HEAD so the registry never down-converts to schema 1.
MANIFEST_ACCEPT: Final = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

DOCKER_SCHEMA1: Final = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES: Final = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
#: Every manifest type regsweep knows the references of (schema 1 lists blobs only).
KNOWN_MANIFEST_TYPES: Final = frozenset(
    {
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_SCHEMA1,
        DOCKER_SCHEMA1_SIGNED,
    }
)
CONFIG_TYPES: Final = frozenset({DOCKER_CONFIG, OCI_CONFIG})

#: Annotation on an index entry that marks a BuildKit attestation manifest.
BUILDKIT_REFERENCE_TYPE: Final = "vnd.docker.reference.type"
#: Annotation carrying the image build time when the config has none.
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
#: Annotation on the throw-away manifest a tag-only removal pushes (the dummy-manifest method).
UNTAG_ANNOTATION: Final = "io.regsweep.untag"


# --- names, tags and digests ------------------------------------------------------------------

#: distribution/reference's path component and separator grammar; no domain part,
#: since the registry reports names relative to itself.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_NAME: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
REPOSITORY_MAX_LENGTH: Final = 255
TAG: Final = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
#: The OCI digest grammar, ``algorithm:encoded``: what tells a digest from a tag in a
#: manifest reference, and what a digest in the garbage collector's output looks like.
DIGEST_SYNTAX: Final = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
#: The digests a registry computes (sha256, sha384, sha512, lowercase hex of the full length):
#: what a digest from outside (an event, a request, a form) must be.
DIGEST: Final = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
#: What a restore job names: a digest, or the beginning of one (as plan tables show it).
DIGEST_PREFIX: Final = re.compile(r"(?:sha256:)?[a-f0-9]{1,64}")
#: Cosign's and the OCI referrers fallback's tags: ``sha256-<hex>[.sig|.att|.sbom]``.
_REFERRER_TAG: Final = re.compile(r"^(sha256)-([0-9a-f]{64})(?:\.(sig|att|sbom))?$")
_ANY_DIGEST: Final = re.compile(DIGEST_SYNTAX)


def valid_repository(name: str) -> bool:
    return len(name) <= REPOSITORY_MAX_LENGTH and REPOSITORY_NAME.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return TAG.fullmatch(tag) is not None


def valid_digest(digest: str) -> bool:
    return DIGEST.fullmatch(digest) is not None


def valid_digest_or_prefix(digest: str) -> bool:
    """A whole digest or a prefix of a sha256 one (a restore resolves it, unique or refused)."""
    return valid_digest(digest) or DIGEST_PREFIX.fullmatch(digest) is not None


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest (``algorithm:encoded``) rather than a tag."""
    return _ANY_DIGEST.fullmatch(reference) is not None


def referrer_tag_subject(tag: str) -> Digest | None:
    """The subject digest a cosign / OCI-fallback tag (``sha256-<hex>[.sig|.att|.sbom]``) names."""
    match = _REFERRER_TAG.match(tag)
    if match is None:
        return None
    return Digest(f"{match.group(1)}:{match.group(2)}")


# --- descriptors and manifests -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a manifest points at."""

    digest: Digest
    media_type: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_attestation(self) -> bool:
        """A BuildKit attestation manifest inside an index (not a platform image)."""
        return self.annotations.get(BUILDKIT_REFERENCE_TYPE) == "attestation-manifest"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One manifest (image or index) and what it references."""

    digest: Digest
    media_type: str
    raw: bytes
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()
    subject: Digest | None = None
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Build time from the image config (filled in by the inventory when it is fetched).
    created: datetime | None = None

    @property
    def size(self) -> int:
        """Bytes of the manifest itself."""
        return len(self.raw)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def is_placeholder(self) -> bool:
        """regsweep's own throw-away manifest of a tag-only removal (never anyone's image)."""
        return (
            UNTAG_ANNOTATION in self.annotations
            and self.config is not None
            and self.config.media_type == OCI_EMPTY
            and not self.layers
            and not self.children
        )

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers: the blobs this manifest keeps alive."""
        return ((self.config,) if self.config else ()) + self.layers


def _descriptor(obj: Any) -> Descriptor:
    if not isinstance(obj, dict) or not isinstance(obj.get("digest"), str):
        raise RegistryProtocolError(f"descriptor without a digest: {obj!r:.200}")
    annotations = obj.get("annotations") or {}
    return Descriptor(
        digest=Digest(obj["digest"]),
        media_type=str(obj.get("mediaType", "")),
        size=int(obj.get("size", 0)),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def _implied_media_type(body: Mapping[str, Any]) -> str:
    """The type of a manifest that names none and came without a Content-Type (read from
    storage; recorded from an index descriptor that left ``mediaType`` out), decided as
    the registry decides it: schema 1, else an OCI index if it lists manifests, else an
    OCI image manifest (a Docker schema 2 manifest must say its type). Empty when it is
    none of these."""
    if body.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in body else DOCKER_SCHEMA1
    if body.get("schemaVersion") != 2:
        return ""
    if isinstance(body.get("manifests"), list):
        return OCI_INDEX
    return OCI_MANIFEST if isinstance(body.get("config"), dict) else ""


def parse_manifest(digest: str, media_type: str, raw: bytes) -> Manifest:
    """Parse manifest bytes as served; ``media_type`` is the response's Content-Type."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RegistryProtocolError(f"manifest {digest} is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RegistryProtocolError(f"manifest {digest} is not a JSON object")
    media_type = str(body.get("mediaType") or media_type).split(";")[0].strip()
    media_type = media_type or _implied_media_type(body)
    subject = body.get("subject")
    annotations = body.get("annotations") or {}
    return Manifest(
        digest=Digest(digest),
        media_type=media_type,
        raw=raw,
        config=_descriptor(body["config"]) if "config" in body else None,
        layers=tuple(_descriptor(d) for d in body.get("layers") or ()),
        children=tuple(_descriptor(d) for d in body.get("manifests") or ()),
        subject=_descriptor(subject).digest if subject else None,
        artifact_type=body.get("artifactType"),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )
