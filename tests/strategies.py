"""Builders for small hand-made inventories, and Hypothesis strategies for random ones.

Manifests are real: their bytes are JSON as a registry would serve them and
their digest is the sha256 of those bytes, parsed by :func:`worker.engine.model.parse_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from worker import oci
from worker.engine.model import Inventory, PushSource, PushTime
from worker.engine.plan import Reason
from worker.engine.planner import TagRequest
from worker.engine.policy import KeepRule, Policy, RepositoryPattern, TagPattern
from worker.oci import Digest, Manifest, parse_manifest
from worker.records import Hold

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
COSIGN_SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest"}


def sha256(text: str) -> Digest:
    return Digest("sha256:" + hashlib.sha256(text.encode()).hexdigest())


def descriptor(m: Manifest, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The index entry (or ``subject``) pointing at ``m``."""
    out: dict[str, Any] = {"mediaType": m.media_type, "digest": m.digest, "size": m.size}
    if annotations:
        out["annotations"] = dict(annotations)
    return out


def _manifest(body: dict[str, Any], created: datetime | None = None) -> Manifest:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return replace(parse_manifest(digest, body["mediaType"], raw), created=created)


def image(
    label: str,
    layers: Sequence[tuple[str, int]] = (),
    *,
    subject: Manifest | None = None,
    artifact_type: str | None = None,
    created: datetime | None = None,
    media_type: str = oci.OCI_MANIFEST,
) -> Manifest:
    """An image manifest; ``label`` makes it unique, ``layers`` are (blob label, size) pairs."""
    config_type = oci.DOCKER_CONFIG if media_type == oci.DOCKER_MANIFEST else oci.OCI_CONFIG
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": sha256(f"config {label}"), "size": 10},
        "layers": [
            {"mediaType": LAYER, "digest": sha256(f"layer {name}"), "size": size}
            for name, size in layers
        ],
    }
    if subject is not None:
        body["subject"] = descriptor(subject)
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    return _manifest(body, created)


def index(
    label: str,
    children: Sequence[Manifest],
    *,
    attestations: Sequence[tuple[Manifest, Manifest]] = (),
    media_type: str = oci.OCI_INDEX,
) -> Manifest:
    """An index of ``children``, plus BuildKit attestation entries (attestation, image) pairs."""
    entries = [descriptor(c) for c in children]
    for attestation, target in attestations:
        entries.append(
            descriptor(attestation, {**ATTESTATION, "vnd.docker.reference.digest": target.digest})
        )
    body = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": entries,
        "annotations": {"label": label},
    }
    return _manifest(body)


def signature(subject: Manifest | Digest, label: str = "sig") -> Manifest:
    """An OCI 1.1 referrer (a cosign-style signature) whose ``subject`` is ``subject``."""
    if isinstance(subject, Manifest):
        return image(f"{label} of {subject.digest}", subject=subject, artifact_type=COSIGN_SIG)
    body = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": COSIGN_SIG,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": sha256("{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": oci.OCI_MANIFEST, "digest": subject, "size": 1},
        "annotations": {"label": label},
    }
    return _manifest(body)


def untag_placeholder(nonce: str = "0f" * 16) -> Manifest:
    """regsweep's own throw-away manifest of a tag-only removal (as the client pushes it)."""
    body = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_EMPTY, "digest": sha256("{}"), "size": 2},
        "layers": [],
        "annotations": {oci.UNTAG_ANNOTATION: nonce},
    }
    return _manifest(body)


def cosign_tag(subject: Manifest | Digest, suffix: str | None = "sig") -> str:
    """``sha256-<hex>.sig`` (or the bare ``sha256-<hex>`` fallback tag when ``suffix`` is None)."""
    digest = subject.digest if isinstance(subject, Manifest) else subject
    name = digest.replace(":", "-")
    return f"{name}.{suffix}" if suffix else name


@dataclass
class RepoBuilder:
    """Collects manifests, tags and state, then freezes them into an :class:`Inventory`."""

    now: datetime = NOW
    manifests: dict[Digest, Manifest] = field(default_factory=dict)
    tags: dict[str, Digest] = field(default_factory=dict)
    push_times: dict[str, PushTime] = field(default_factory=dict)
    untagged_since: dict[Digest, datetime] = field(default_factory=dict)
    referrers: dict[Digest, tuple[Digest, ...]] = field(default_factory=dict)
    missing: set[Digest] = field(default_factory=set)
    #: Of ``missing``: subjects regsweep's audit shows it deleted.
    deleted: set[Digest] = field(default_factory=set)
    holds: dict[str, Hold] = field(default_factory=dict)

    def add(self, *manifests: Manifest) -> None:
        for m in manifests:
            self.manifests[m.digest] = m

    def tag(
        self,
        tag: str,
        m: Manifest,
        age: timedelta | None = None,
        *,
        pushed: PushTime | None = None,
    ) -> Manifest:
        """Tag ``m`` (adding it); ``age``: a push notified that long ago; ``pushed``: any
        other evidence (neither: unknown)."""
        self.add(m)
        self.tags[tag] = m.digest
        if age is not None:
            self.push_times[tag] = PushTime.exact(PushSource.NOTIFICATION, self.now - age)
        elif pushed is not None:
            self.push_times[tag] = pushed
        return m

    def hold(self, tag: str, until: timedelta, reason: str = "regsweep hold") -> None:
        self.holds[tag] = Hold(tag, self.now + until, reason)

    def gone_by_regsweep(self, digest: Digest) -> None:
        """``digest`` is absent and the audit shows regsweep deleted it."""
        self.missing.add(digest)
        self.deleted.add(digest)

    def untagged(self, m: Manifest, since: timedelta) -> Manifest:
        self.add(m)
        self.untagged_since[m.digest] = self.now - since
        return m

    def refer(self, subject: Manifest | Digest, *refs: Manifest) -> None:
        """Record ``refs`` as the referrers API's answer for ``subject``."""
        key = subject.digest if isinstance(subject, Manifest) else subject
        self.add(*refs)
        self.referrers[key] = self.referrers.get(key, ()) + tuple(r.digest for r in refs)

    def inventory(self) -> Inventory:
        return Inventory(
            repository="team/web",
            taken_at=self.now,
            tags=dict(self.tags),
            manifests=dict(self.manifests),
            push_times=dict(self.push_times),
            untagged_since=dict(self.untagged_since),
            referrers=dict(self.referrers),
            missing=frozenset(self.missing),
            deleted_by_regsweep=frozenset(self.deleted),
            holds=dict(self.holds),
        )


def rule(
    index: int,
    *tags: str,
    newest: int | None = None,
    within: timedelta | None = None,
) -> KeepRule:
    return KeepRule(
        index=index,
        tags=tuple(TagPattern.compile(t) for t in tags),
        newest=newest,
        pushed_within=within,
    )


def make_policy(
    *,
    protect: Sequence[str] = (),
    keep: Sequence[KeepRule] | None = None,
    untagged_after: timedelta | None = None,
) -> Policy:
    return Policy(
        name="web",
        repositories=(RepositoryPattern.compile("team/web"),),
        protect=tuple(TagPattern.compile(p) for p in protect),
        keep=tuple(keep) if keep is not None else None,
        untagged_delete_after=untagged_after,
    )


def request(event: str, *patterns: str, detail: str = "") -> TagRequest:
    """A CI-event deletion, e.g. ``request("pull_request_closed", "pr-42", "pr-42-*")``."""
    return TagRequest(tuple(TagPattern.compile(p) for p in patterns), Reason(f"on.{event}", detail))


# --- Hypothesis strategies ----------------------------------------------------------------

TAG_NAMES = ("latest", "v1", "v2", "main-1", "main-2", "main-3", "pr-1", "pr-1-amd64", "pr-2")
KEEP_PATTERNS = ("*", "main-*", "pr-*", "re:v[0-9]+", "latest")
PROTECT_PATTERNS = ("latest", "v*", "main-1", "sha256-*")
REQUEST_PATTERNS = ("pr-1", "pr-1-*", "main-*", "*", "latest", "v1")


# Strategies are built once here: building them inside a draw costs more than the planner.
_HOURS_AGO = st.integers(0, 2000).map(lambda h: timedelta(hours=h))
_CREATED = st.none() | _HOURS_AGO.map(lambda ago: NOW - ago)


@st.composite
def push_evidence(draw: st.DrawFn) -> PushTime | None:
    """None (unknown), an exact time, an interval, or an upper bound only."""
    kind = draw(st.sampled_from(["unknown", "exact", "interval", "upper"]))
    if kind == "unknown":
        return None
    latest = NOW - draw(_HOURS_AGO)
    if kind == "exact":
        return PushTime.exact(
            draw(st.sampled_from([PushSource.NOTIFICATION, PushSource.STORAGE])), latest
        )
    if kind == "upper":
        return PushTime(PushSource.FIRST_SEEN, None, latest)
    return PushTime(PushSource.FIRST_SEEN, latest - draw(_HOURS_AGO), latest)


_PUSH = push_evidence()
_LAYERS = st.lists(
    st.tuples(st.sampled_from("abcde"), st.integers(1, 1000)), min_size=1, max_size=3
)
_IMAGE_TYPES = st.sampled_from([oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])
_INDEX_TYPES = st.sampled_from([oci.OCI_INDEX, oci.DOCKER_MANIFEST_LIST])
_REFERRER_KINDS = st.sampled_from(["subject", "api", "cosign", "fallback"])
_COSIGN_SUFFIXES = st.sampled_from(["sig", "att", "sbom"])
_POSITION = st.integers(0, 63)
_POSITIONS = st.lists(_POSITION, min_size=1, max_size=3)
_TAGS = st.lists(st.sampled_from(TAG_NAMES), max_size=8, unique=True)


def _pick(draw: st.DrawFn, pool: Sequence[Manifest]) -> Manifest:
    return pool[draw(_POSITION) % len(pool)]


@st.composite
def _images(draw: st.DrawFn, builder: RepoBuilder) -> list[Manifest]:
    made = [
        image(f"img{i}", draw(_LAYERS), created=draw(_CREATED), media_type=draw(_IMAGE_TYPES))
        for i in range(draw(st.integers(1, 6)))
    ]
    builder.add(*made)
    return made


@st.composite
def _indexes(draw: st.DrawFn, builder: RepoBuilder, pool: list[Manifest]) -> None:
    """Indexes over earlier manifests (indexes too: index of index), some with attestations."""
    for i in range(draw(st.integers(0, 3))):
        chosen = {pool[p % len(pool)].digest: pool[p % len(pool)] for p in draw(_POSITIONS)}
        children = list(chosen.values())
        attestations = []
        if draw(st.booleans()):
            attestation = image(f"att{i}", [("att", 50)])
            builder.add(attestation)
            attestations.append((attestation, children[0]))
        made = index(f"idx{i}", children, attestations=attestations, media_type=draw(_INDEX_TYPES))
        builder.add(made)
        pool.append(made)


@st.composite
def _referrers(draw: st.DrawFn, builder: RepoBuilder, pool: list[Manifest]) -> None:
    """Signatures by ``subject`` field, by referrers API only, by cosign tag, by fallback index."""
    for i in range(draw(st.integers(0, 4))):
        subject = _pick(draw, pool)
        kind = draw(_REFERRER_KINDS)
        sig = signature(subject, f"sig{i}")
        if kind == "api":
            sig = image(f"api-ref{i}", [("s", 5)])
            builder.refer(subject, sig)
        elif kind == "cosign":
            builder.tag(cosign_tag(subject, draw(_COSIGN_SUFFIXES)), sig)
        elif kind == "fallback":
            builder.tag(cosign_tag(subject, None), index(f"fallback{i}", [sig]))
        builder.add(sig)
        pool.append(sig)
    for i in range(draw(st.integers(0, 2))):
        gone = sha256(f"gone{i}")
        if draw(st.booleans()):
            builder.gone_by_regsweep(gone)
        else:
            builder.missing.add(gone)  # 404, but not regsweep's doing: no evidence
        builder.tag(cosign_tag(gone, "sig"), signature(gone, f"orphan{i}"))


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    """A random repository: shared digests, nested indexes, referrers, odd push times."""
    builder = RepoBuilder()
    pool = draw(_images(builder))
    draw(_indexes(builder, pool))
    draw(_referrers(builder, pool))
    for name in draw(_TAGS):
        builder.tag(name, _pick(draw, pool), pushed=draw(_PUSH))
        if draw(st.integers(0, 9)) == 0:
            builder.hold(name, timedelta(days=1))
    for _ in range(draw(st.integers(0, 4))):
        builder.untagged_since[_pick(draw, pool).digest] = NOW - draw(_HOURS_AGO) / 10
    return builder.inventory()


@st.composite
def keep_rules(draw: st.DrawFn) -> tuple[KeepRule, ...]:
    count = draw(st.integers(0, 3))
    return tuple(
        rule(
            i,
            *draw(st.lists(st.sampled_from(KEEP_PATTERNS), min_size=1, max_size=2, unique=True)),
            newest=draw(st.none() | st.integers(0, 4)),
            within=draw(st.none() | st.integers(1, 1000).map(lambda h: timedelta(hours=h))),
        )
        for i in range(count)
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    return make_policy(
        protect=draw(st.lists(st.sampled_from(PROTECT_PATTERNS), max_size=2, unique=True)),
        keep=draw(st.none() | keep_rules()),
        untagged_after=draw(st.none() | st.integers(0, 100).map(lambda h: timedelta(hours=h))),
    )


@st.composite
def tag_requests(draw: st.DrawFn) -> tuple[TagRequest, ...]:
    patterns = st.lists(st.sampled_from(REQUEST_PATTERNS), min_size=1, max_size=2, unique=True)
    events = st.sampled_from(["pull_request_closed", "branch_deleted"])
    count = draw(st.integers(0, 2))
    return tuple(request(draw(events), *draw(patterns), detail="event") for _ in range(count))
