"""Manifest media types the registry serves, and how regsweep groups them."""

from __future__ import annotations

from typing import Final

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
