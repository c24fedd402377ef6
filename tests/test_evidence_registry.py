"""Decide only on evidence, against the real 2.8.2 registry: each way regsweep once deleted an
image it had promised to keep, as a test.

Push times come from the registry's storage (``registry.storage_path``: the tag link's
mtime, moved back with ``set_pushed`` to stand for time passing) or from the CLI's own
listings; build dates come from real image configs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.registry import RegistryProcess
from tests.test_cli import run
from worker.engine.inventory import UNTAGGED_UNSEEN
from worker.engine.model import Descriptor, Digest, PushSource
from worker.engine.plan import Action
from worker.engine.policy import AgeSource, KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.prune import Pruner, RepositoryPlan
from worker.registry import mediatypes as mt
from worker.registry.client import EMPTY_CONFIG, RegistryClient, digest_of, untag_manifest
from worker.settings.model import Config, RegistrySettings
from worker.store.audit import AuditEntry, JsonlAuditLog, Outcome, Settlement
from worker.store.history import LocalHistory

pytestmark = pytest.mark.anyio

NOW = dt.datetime.now(dt.UTC)
#: What reproducible builds write as ``created``: ko/Bazel/Jib, Nix, buildpacks, nix2container.
SENTINELS = (
    dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC),
    dt.datetime(1980, 1, 1, tzinfo=dt.UTC),
    dt.datetime(1, 1, 1, tzinfo=dt.UTC),
)


def days_ago(n: float) -> dt.datetime:
    return NOW - dt.timedelta(days=n)


def keep(*patterns: str, newest: int | None = None, within: dt.timedelta | None = None) -> KeepRule:
    return KeepRule(0, tuple(TagPattern.compile(p) for p in patterns), newest, within)


def policy(rule: KeepRule, *, age_from: AgeSource = AgeSource.PUSH) -> Policy:
    return Policy(
        name="evidence",
        repositories=(RepositoryPattern.compile("t/**"),),
        mode=Mode.ENFORCE,
        keep=(rule,),
        age_from=age_from,
    )


class Engine:
    """The CLI's wiring without Redis: the JSONL audit and state file in ``root``."""

    def __init__(self, client: RegistryClient, config: Config, root: Path) -> None:
        self.audit = JsonlAuditLog(root / "audit.jsonl")
        self.history = LocalHistory(root / "state")
        self.pruner = Pruner(config, client, history=self.history, audit=self.audit)

    async def plan(self, repository: str) -> RepositoryPlan:
        planned = await self.pruner.plan_one(repository)
        assert planned is not None
        return planned

    async def prune(self, repository: str) -> RepositoryPlan:
        planned = await self.plan(repository)
        report = await self.pruner.execute(planned, job_id=f"job-{os.urandom(4).hex()}")
        assert report.outcome.value == "done", report.done
        return planned


@pytest.fixture
def builder(registry: RegistryProcess) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(registry.url) as b:
        yield b


@pytest.fixture
async def client(registry: RegistryProcess) -> AsyncIterator[RegistryClient]:
    async with RegistryClient.from_settings(RegistrySettings(url=registry.url)) as c:
        yield c


def settings(registry: RegistryProcess, *, storage: bool) -> RegistrySettings:
    path = str(registry.storage_path) if storage else None
    return RegistrySettings(url=registry.url, concurrency=4, storage_path=path)


def make_engine(
    client: RegistryClient, registry: RegistryProcess, pol: Policy, tmp_path: Path, *, storage: bool
) -> Engine:
    config = Config(registry=settings(registry, storage=storage), policies=(pol,))
    return Engine(client, config, tmp_path)


def kept_tags(planned: RepositoryPlan) -> set[str]:
    return {k.tag for k in planned.plan.kept}


def removed_tags(planned: RepositoryPlan) -> set[str]:
    return {t for d in planned.plan.deletions for t in d.tags}


# --- push times ----------------------------------------------------------------------------


async def test_reproducible_builds_are_not_deleted_after_their_push(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """Images whose config says 1970, 1980 or year 1 were pushed just now: ``pushed_within:
    7d`` keeps them, with build times opted in or not, with the storage or without it."""
    for i, created in enumerate(SENTINELS):
        builder.image(repo_name, f"rb-{i}", created=created)
        # Minutes apart, as separate builds push: links of several images written within
        # a second of each other would be one instant, and rank nothing.
        registry.set_pushed(repo_name, NOW - dt.timedelta(minutes=10 - i), f"rb-{i}")
    rule = keep("*", within=dt.timedelta(days=7))
    for age_from in AgeSource:
        for storage in (True, False):
            eng = make_engine(
                client,
                registry,
                policy(rule, age_from=age_from),
                tmp_path / f"{age_from}{storage}",
                storage=storage,
            )
            planned = await eng.plan(repo_name)
            assert planned.plan.is_empty, (age_from, storage, planned.plan.deletions)
            sources = {planned.inventory.push_time(t).source for t in kept_tags(planned)}
            assert sources == {PushSource.STORAGE if storage else PushSource.FIRST_SEEN}


async def test_a_release_built_from_an_old_commit_counts_from_its_push(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """SOURCE_DATE_EPOCH of a 20-day-old commit says 20 days: the storage says pushed now, and
    the push is what ``pushed_within`` measures (the plan says ``pushed 0s ago (storage)``)."""
    builder.image(repo_name, "v2.0.1", created=days_ago(20))
    eng = make_engine(
        client, registry, policy(keep("*", within=dt.timedelta(days=7))), tmp_path, storage=True
    )
    planned = await eng.plan(repo_name)
    (kept,) = planned.plan.kept
    assert kept.tag == "v2.0.1" and "(storage)" in str(kept.reason)


async def test_equal_build_dates_never_let_tag_names_decide(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """Five builds stamped with the same date and ``newest: 3`` (build times opted in, no
    storage, first listing): nothing proves any is older, so nothing goes — not ``main-3``
    and ``main-4`` because of their names."""
    stamp = days_ago(30)
    for i in range(5):
        builder.image(repo_name, f"main-{i}", created=stamp)
    pol = policy(keep("main-*", newest=3), age_from=AgeSource.BUILD_TIME)
    planned = await make_engine(client, registry, pol, tmp_path, storage=False).plan(repo_name)
    assert planned.plan.is_empty
    assert kept_tags(planned) == {f"main-{i}" for i in range(5)}


async def test_listings_bound_pushes_and_storage_orders_them(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """Without storage, a tag first seen by a later listing was provably pushed after the
    ones the first listing showed: newest: 1 removes the older ones only then."""
    for i in range(2):
        builder.image(repo_name, f"main-{i}")
    eng = make_engine(client, registry, policy(keep("main-*", newest=1)), tmp_path, storage=False)
    first = await eng.plan(repo_name)
    assert first.plan.is_empty  # nothing is provably older than anything
    builder.image(repo_name, "main-2")
    second = await eng.plan(repo_name)
    assert removed_tags(second) == {"main-0", "main-1"}
    assert second.inventory.push_time("main-2").earliest is not None


async def test_a_cold_plan_with_storage_reads_no_image_config(
    registry: RegistryProcess, builder: ImageBuilder, repo_name: str, tmp_path: Path
) -> None:
    """With ``storage_path`` every tag has a push time from its link: no config is read, even
    for a policy that opted in to build times."""
    for i in range(4):
        builder.image(repo_name, f"main-{i}", created=days_ago(i))
        registry.set_pushed(repo_name, NOW - dt.timedelta(minutes=10 - i), f"main-{i}")
    counts: Counter[str] = Counter()

    def hook(method: str, path: str, status: int | None, seconds: float) -> None:
        counts[f"{method} {path}"] += 1

    pol = policy(keep("main-*", newest=2), age_from=AgeSource.BUILD_TIME)
    config = Config(registry=settings(registry, storage=True), policies=(pol,))
    async with RegistryClient.from_settings(config.registry, on_response=hook) as c:
        planned = await Engine(c, config, tmp_path).plan(repo_name)
    assert counts["GET /v2/{name}/blobs/{digest}"] == 0
    assert {planned.inventory.push_time(t).source for t in planned.inventory.tags} == {
        PushSource.STORAGE
    }


# --- placeholders, indexes, referrers -----------------------------------------------------


async def test_an_interrupted_untag_is_finished_and_never_ranked(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """A tag left on regsweep's own placeholder (an untag stopped between its PUT and its
    DELETE) takes no ``newest`` slot, so the newest real build stays; the next run deletes
    the placeholder, finishing the removal."""
    older, newest = builder.image(repo_name, "main-1"), builder.image(repo_name, "main-2")
    await client.upload_blob(repo_name, EMPTY_CONFIG)
    empty = Descriptor(digest_of(EMPTY_CONFIG), mt.OCI_EMPTY, len(EMPTY_CONFIG))
    placeholder = await client.put_manifest(
        repo_name, "main-3", mt.OCI_MANIFEST, untag_manifest(empty)
    )
    registry.set_pushed(repo_name, days_ago(2), "main-1")
    registry.set_pushed(repo_name, days_ago(1), "main-2")
    eng = make_engine(client, registry, policy(keep("main-*", newest=1)), tmp_path, storage=True)
    planned = await eng.prune(repo_name)
    assert {(d.digest, d.reason.rule) for d in planned.plan.deletions} == {
        (placeholder, "placeholder"),
        (Digest(older.digest), "retention"),
    }
    assert builder.tags(repo_name) == ["main-2"]
    assert builder.manifest_exists(repo_name, newest.digest)


async def test_an_untagged_index_deployed_by_digest_keeps_what_it_lists(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """An index no tag points at any more still lists its per-arch images: with the storage
    read, retention removes the old per-arch tag as a tag only, never the image under the
    index. Without storage or notifications the plan says it cannot see such indexes."""
    amd = builder.image(repo_name, "amd64-v1")
    arm = builder.image(repo_name, architecture="arm64")
    deployed = builder.index(repo_name, [amd, arm])  # pushed by digest only
    builder.image(repo_name, "amd64-v2")
    registry.set_pushed(repo_name, days_ago(9), "amd64-v1")
    eng = make_engine(client, registry, policy(keep("*", newest=1)), tmp_path, storage=True)
    planned = await eng.prune(repo_name)
    assert [(d.action, d.digest) for d in planned.plan.deletions] == [(Action.UNTAG, amd.digest)]
    for part in (deployed.digest, amd.digest, arm.digest):
        assert builder.manifest_exists(repo_name, part)
    blind = make_engine(client, registry, policy(keep("*")), tmp_path / "b", storage=False)
    assert (await blind.plan(repo_name)).plan.notes == (UNTAGGED_UNSEEN,)


async def test_a_signature_whose_image_is_elsewhere_or_not_here_yet_stays(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """A cosign signature of an image that is not in this repository (COSIGN_REPOSITORY, a
    mirror copying in any order) is no orphan: a 404 alone is no evidence. Once regsweep's
    audit shows it deleted the subject here, the signature goes."""
    elsewhere = builder.image("t/elsewhere-images", "v1")
    sig_elsewhere = builder.cosign(repo_name, elsewhere, "sig")
    gone = builder.image(repo_name, "gone-soon")
    sig_gone = builder.cosign(repo_name, gone, "sig")
    eng = make_engine(client, registry, policy(keep("*")), tmp_path, storage=True)
    assert (await eng.plan(repo_name)).plan.is_empty
    # regsweep deleted ``gone`` earlier (its referrer deletions never ran: a crash between).
    record = AuditEntry(
        time=NOW,
        repository=repo_name,
        digest=gone.digest,
        media_type=gone.media_type,
        size=len(gone.raw),
        tags=("gone-soon",),
        action="manifest",
        policy="evidence",
        rule="retention",
        reason="test",
        job_id="earlier",
        manifest=gone.raw,
    )
    await eng.audit.intend([record])
    assert await client.delete_manifest(repo_name, gone.digest)
    await eng.audit.settle([Settlement.of(record, Outcome.DELETED)])
    planned = await eng.prune(repo_name)
    assert [d.digest for d in planned.plan.deletions] == [Digest(sig_gone.digest)]
    assert builder.manifest_exists(repo_name, sig_elsewhere.digest)
    assert not builder.manifest_exists(repo_name, sig_gone.digest)


# --- one bad repository -----------------------------------------------------------------


async def test_a_config_that_is_not_json_costs_one_build_time_not_the_run(
    registry: RegistryProcess,
    builder: ImageBuilder,
    client: RegistryClient,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """An image whose config blob is not JSON: its build time is unknown (kept) and the plan
    names the digest; the other tags are planned as usual."""
    bad_config = builder.blob(repo_name, b"\x00not json", mt.OCI_CONFIG)
    layer = builder.blob(repo_name, os.urandom(64))
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": bad_config.descriptor(),
            "layers": [layer.descriptor()],
        }
    ).encode()
    builder.put_manifest(repo_name, "odd", raw, mt.OCI_MANIFEST)
    builder.image(repo_name, "old", created=days_ago(30))
    builder.image(repo_name, "new", created=days_ago(1))
    pol = policy(keep("*", within=dt.timedelta(days=7)), age_from=AgeSource.BUILD_TIME)
    planned = await make_engine(client, registry, pol, tmp_path, storage=False).plan(repo_name)
    assert removed_tags(planned) == {"old"}
    assert "odd" in kept_tags(planned)
    (note,) = [n for n in planned.plan.notes if "build time" in n]
    assert digest_of(raw) in note and "not JSON" in note


def _corrupt(registry: RegistryProcess, image: PushedImage) -> None:
    """Overwrite the manifest's bytes in storage: the registry then fails to serve it."""
    hexdigits = image.digest.partition(":")[2]
    blob = registry.storage_path / "docker/registry/v2/blobs/sha256" / hexdigits[:2] / hexdigits
    (blob / "data").write_bytes(b"{{{ not a manifest")


async def test_one_unreadable_repository_does_not_stop_the_others(
    registry: RegistryProcess, builder: ImageBuilder, tmp_path: Path, repo_name: str
) -> None:
    """A repository whose manifest the registry cannot serve (5xx) is reported with what
    failed and left alone; the other repository is pruned; ``regsweep prune`` exits 1."""
    bad, good = f"{repo_name}-bad", f"{repo_name}-good"
    broken = builder.image(bad, "v1")
    _corrupt(registry, broken)
    doomed = builder.image(good, "v1")
    builder.image(good, "v2")
    registry.set_pushed(good, days_ago(9), "v1")
    config = tmp_path / "regsweep.yaml"
    config.write_text(
        f"registry: {{url: '{registry.url}', storage_path: '{registry.storage_path}'}}\n"
        "policies:\n"
        f"  - {{name: p, repositories: ['{bad}', '{good}'], mode: enforce,"
        "      keep: [{tags: ['*'], newest: 1}]}\n"
    )
    result = run("prune", bad, good, config=config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if "not planned" in ln]
    assert bad in line and "manifests" in line
    assert not builder.manifest_exists(good, doomed.digest)
    assert f"{good}: done (1 deleted)" in result.stdout
