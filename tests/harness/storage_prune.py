"""Storage-level prune test parts: random repositories pushed for real, and the registry's view.

:func:`repositories` draws a :class:`RepoSpec` (plain data: images sharing layers, indexes
sharing children, cosign tags, OCI referrers with and without their fallback tag, digests
under several tags, holds, push ages, a policy) and :func:`realize` pushes it into a
real registry, its tag links dated as the spec says. :func:`view` is what a registry
client can tell of a repository (tags, manifests by digest) and :func:`marks` what the
registry's own garbage collector would keep of it (``garbage-collect --dry-run``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.harness.images import Format, ImageBuilder, PushedImage, PushedIndex
from tests.harness.maintenance import (
    FAST,
    REDIS_URL,
    ProcessRegistry,
    RedisSpace,
    make_maintenance,
)
from tests.harness.registry import RegistryProcess, set_pushed
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.maintenance.job import Maintenance, Timing, controller_for
from worker.maintenance.storage_prune import StoragePrune
from worker.oci import Digest
from worker.records import Hold
from worker.settings.model import Config, MaintenanceSettings, RegistrySettings
from worker.store.history import LocalHistory

NOW = datetime.now(UTC).replace(microsecond=0)
TAGS = tuple(f"t{i}" for i in range(20))
PROTECT = ("none", "t0", "t1*")


@dataclass(frozen=True)
class ImageSpec:
    layers: tuple[int, ...]
    tags: tuple[str, ...]
    docker: bool = False


@dataclass(frozen=True)
class IndexSpec:
    children: tuple[int, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class ReferrerSpec:
    #: An image (>= 0) or an index (-1 - i) the referrer is about.
    subject: int
    #: ``cosign``: a ``sha256-<hex>.sig`` tag; ``oci``: ``subject`` field, with the fallback
    #: ``sha256-<hex>`` index tag when ``fallback``.
    kind: str
    fallback: bool = True


@dataclass(frozen=True)
class RepoSpec:
    images: tuple[ImageSpec, ...]
    indexes: tuple[IndexSpec, ...]
    referrers: tuple[ReferrerSpec, ...]
    #: Days ago each tag was last pushed (distinct days: one instant would doubt the links).
    ages: dict[str, int]
    holds: tuple[str, ...]
    newest: int
    within_days: int | None
    protect: str

    @property
    def tags(self) -> list[str]:
        return [t for i in self.images for t in i.tags] + [t for x in self.indexes for t in x.tags]

    def policy(self, pattern: str) -> Policy:
        keep = [KeepRule(0, (TagPattern.compile("*"),), newest=self.newest)]
        if self.within_days is not None:
            within = timedelta(days=self.within_days)
            keep.append(KeepRule(1, (TagPattern.compile("t1*"),), pushed_within=within))
        return Policy(
            name="sameness",
            repositories=(RepositoryPattern.compile(pattern),),
            mode=Mode.ENFORCE,
            protect=(TagPattern.compile(self.protect),),
            keep=tuple(keep),
        )


#: Tags per image or index: mostly one, some shared digests, some untagged.
_TAG_COUNTS = st.sampled_from((1, 1, 2, 0))


@st.composite
def repositories(draw: st.DrawFn) -> RepoSpec:
    """A random repository: shared layers, shared children, referrers, shared digests."""
    names = list(draw(st.permutations(TAGS)))
    image_count = draw(st.integers(3, 6))
    images = []
    for _ in range(image_count):
        layers = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True)))
        tags = tuple(names.pop() for _ in range(draw(_TAG_COUNTS)))
        images.append(ImageSpec(layers, tags, draw(st.booleans())))
    indexes = []
    for _ in range(draw(st.integers(0, 2))):
        children = draw(
            st.lists(st.integers(0, image_count - 1), min_size=1, max_size=3, unique=True)
        )
        tags = tuple(names.pop() for _ in range(draw(_TAG_COUNTS)))
        indexes.append(IndexSpec(tuple(children), tags))
    subjects = st.integers(-len(indexes), image_count - 1)
    referrers = draw(
        st.lists(
            st.builds(ReferrerSpec, subjects, st.sampled_from(("cosign", "oci")), st.booleans()),
            max_size=3,
        )
    )
    spec_tags = [t for i in images for t in i.tags] + [t for x in indexes for t in x.tags]
    days = draw(st.permutations(range(1, 40)))
    return RepoSpec(
        images=tuple(images),
        indexes=tuple(indexes),
        referrers=tuple(referrers),
        ages={tag: days[n] for n, tag in enumerate(spec_tags)},
        holds=tuple(draw(st.lists(st.sampled_from(spec_tags), max_size=1))) if spec_tags else (),
        newest=draw(st.integers(1, 2)),
        within_days=draw(st.none() | st.integers(5, 30)),
        protect=draw(st.sampled_from(PROTECT)),
    )


def _layer(seed: str, n: int) -> bytes:
    """A layer's bytes: the same for the same spec and number, so two repositories share it."""
    return hashlib.sha256(f"{seed} layer {n}".encode()).digest() * 8


def realize(
    builder: ImageBuilder, registry: RegistryProcess, repo: str, spec: RepoSpec, seed: str
) -> None:
    """Push ``spec`` into ``repo``, with the same digests for the same ``seed``, and date its
    tag links."""
    pushed: list[PushedImage] = []
    for number, image in enumerate(spec.images):
        layers = [_layer(seed, n) for n in image.layers]
        created = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=number)
        fmt: Format = "docker" if image.docker else "oci"
        pushed.append(builder.image(repo, image.tags, created=created, layers=layers, fmt=fmt))
    indexes: list[PushedIndex] = []
    for number, index in enumerate(spec.indexes):
        children = [pushed[c] for c in index.children]
        made = builder.index(repo, children, index.tags, annotations={"n": f"{seed}-{number}"})
        indexes.append(made)
    for number, ref in enumerate(spec.referrers):
        subject = pushed[ref.subject] if ref.subject >= 0 else indexes[-1 - ref.subject]
        payload = f"{seed} referrer {number}".encode()
        if ref.kind == "cosign":
            builder.cosign(repo, subject, "sig", payload=payload)
        else:
            builder.referrer(repo, subject, payload=payload, fallback=ref.fallback)
    for tag, days in spec.ages.items():
        set_pushed(registry.storage_path, repo, NOW - timedelta(days=days), tag)


async def hold_all(directory: Path, repo: str, spec: RepoSpec) -> LocalHistory:
    """A history of its own in ``directory`` holding the spec's held tags."""
    history = LocalHistory(directory)
    for tag in spec.holds:
        await history.hold(repo, Hold(tag, NOW + timedelta(days=1), "test hold"))
    return history


@dataclass(frozen=True)
class View:
    """A repository as a registry client sees it."""

    tags: dict[str, str]
    manifests: frozenset[str]


def view(builder: ImageBuilder, repo: str, digests: Iterable[str]) -> View:
    """Tags (each resolved) and which of ``digests`` answer by digest."""
    tags = {}
    for tag in builder.tags(repo):
        head = builder.head(repo, tag)
        if head is not None:
            tags[tag] = head.digest
    present = frozenset(d for d in digests if builder.manifest_exists(repo, d))
    return View(tags, present)


_MARK = re.compile(r"^(?P<repo>\S+): marking (?P<kind>manifest|blob) (?P<digest>\S+)$")


def marks(output: str, repo: str) -> frozenset[tuple[str, str]]:
    """What ``garbage-collect --dry-run`` marks in ``repo``: (kind, digest) pairs."""
    found = set()
    for line in output.splitlines():
        match = _MARK.match(line.strip())
        if match and match.group("repo") == repo:
            found.add((match.group("kind"), match.group("digest")))
    return frozenset(found)


def dry_run_marks(
    registry: RegistryProcess, repos: Sequence[str]
) -> dict[str, frozenset[tuple[str, str]]]:
    done = registry.garbage_collect("--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    return {repo: marks(done.stdout, repo) for repo in repos}


def digests_of(*manifests: Iterable[Digest]) -> set[str]:
    return {str(d) for group in manifests for d in group}


# --- the window ----------------------------------------------------------------------------


def window_config(
    registry: ProcessRegistry,
    tmp_path: Path,
    policy: Policy,
    **maintenance: Any,
) -> Config:
    """A configuration whose window prunes on ``registry``'s storage (process controller)."""
    return Config(
        registry=RegistrySettings(
            url=registry.url, concurrency=4, storage_path=str(registry.storage)
        ),
        policies=(policy,),
        redis_url=REDIS_URL,
        audit_path=str(tmp_path / "audit.jsonl"),
        maintenance=MaintenanceSettings(
            controller=registry.settings, storage_prune=True, **maintenance
        ),
    )


def storage_window(space: RedisSpace, config: Config, *, timing: Timing = FAST) -> Maintenance:
    """The window :func:`worker.maintenance.job.open_maintenance` makes for ``config``, on
    ``space``'s keys."""
    assert config.maintenance.controller is not None
    m = make_maintenance(
        space,
        controller_for(config.maintenance),
        config.registry.url,
        settings=config.maintenance,
        timing=timing,
    )
    m.storage_prune = StoragePrune(
        config, m.controller, m.probe, space.client, keys=space.keys, prefix=space.prefix
    )
    return m


#: The write probe's uploads (started and cancelled by every switch): not the prune's doing.
PROBE_UPLOADS = "docker/registry/v2/repositories/regsweep/"


def tree(root: Path) -> set[str]:
    """Every file and directory under ``root``, relative to it (directories end in /), but
    the write probe's."""
    found = set()
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root)
        found |= {f"{base / d}/" for d in dirs} | {str(base / f) for f in files}
    return {path for path in found if not path.startswith(PROBE_UPLOADS)}
