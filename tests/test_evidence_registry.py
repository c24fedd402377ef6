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
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final, cast

import pytest
import redis
import yaml

from tests.harness import cli, redisdb
from tests.harness import stack as s
from tests.harness.images import ImageBuilder, ManifestHead, PushedImage
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import RegistryProcess, tag_link
from tests.harness.workers import WITHOUT_ROOTS_READS, start_worker
from tests.test_cli import run
from worker import oci
from worker.engine.events import RegistryEvent
from worker.engine.inventory import UNTAGGED_UNSEEN
from worker.engine.model import PushSource
from worker.engine.plan import Action
from worker.engine.policy import AgeSource, KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.prune import Pruner, RepositoryPlan
from worker.errors import StorageError
from worker.oci import Descriptor, Digest
from worker.queue.context import WorkerContext
from worker.queue.pushes import apply_registry_events
from worker.registry.client import EMPTY_CONFIG, RegistryClient, digest_of, untag_manifest
from worker.registry.storage import RegistryStorage
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
    empty = Descriptor(digest_of(EMPTY_CONFIG), oci.OCI_EMPTY, len(EMPTY_CONFIG))
    placeholder = await client.put_manifest(
        repo_name, "main-3", oci.OCI_MANIFEST, untag_manifest(empty)
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
    bad_config = builder.blob(repo_name, b"\x00not json", oci.OCI_CONFIG)
    layer = builder.blob(repo_name, os.urandom(64))
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": bad_config.descriptor(),
            "layers": [layer.descriptor()],
        }
    ).encode()
    builder.put_manifest(repo_name, "odd", raw, oci.OCI_MANIFEST)
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


# --- registry times that lie (each test on a registry of its own: its times are made to lie) --


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A registry no other test reads: the storage times these tests set would mislead them."""
    reg = RegistryProcess.create(tmp_path / "registry")
    reg.start()
    yield reg
    reg.stop()


def engine_on(reg: RegistryProcess, client: RegistryClient, rule: KeepRule, root: Path) -> Engine:
    """The CLI's engine (state in ``root``) with the storage of ``reg`` read."""
    config = Config(registry=settings(reg, storage=True), policies=(policy(rule),))
    return Engine(client, config, root)


async def test_a_link_from_a_clock_behind_never_ages_a_tag_a_listing_proves_new(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """The registry host's clock stepped 3 days back after ``old`` was pushed: ``new``'s link
    says 3 days ago, but regsweep listed the repository before ``new`` existed. ``pushed_within:
    1d`` keeps it (it was "pushed 3d ago (storage)" before), ``newest: 1`` deletes ``old`` and
    not the later push, and the plan says which link it did not believe and why."""
    reg, repo = own_registry, "t/stepped"
    async with RegistryClient.from_settings(settings(reg, storage=True)) as client:
        with ImageBuilder.connect(reg.url) as b:
            b.image(repo, "old")
            within = engine_on(reg, client, keep("*", within=dt.timedelta(days=1)), tmp_path)
            assert (await within.plan(repo)).plan.is_empty  # the listing before ``new``
            b.image(repo, "new")
        reg.set_pushed(repo, dt.datetime.now(dt.UTC) - dt.timedelta(days=3), "new")
        kept = await within.plan(repo)
        assert kept.plan.is_empty, kept.plan.deletions
        newest = await engine_on(reg, client, keep("*", newest=1), tmp_path).plan(repo)
    assert removed_tags(newest) == {"old"}
    pushed = newest.inventory.push_time("new")
    assert pushed.source is PushSource.FIRST_SEEN
    assert pushed.doubt is not None and "before a listing that lacked the tag" in pushed.doubt
    assert any("new: storage time 3d 0h before a listing" in n for n in newest.plan.notes)


async def test_a_registry_clock_days_behind_ages_nothing(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """The registry's host is 3 days behind (its Date header, through a proxy that moves it:
    the real clock cannot be moved here): links written an hour ago and now say 3 days ago.
    ``pushed_within: 1d`` deletes neither; the plan says the clock is off and what to do."""
    reg, repo = own_registry, "t/behind"
    with ImageBuilder.connect(reg.url) as b:
        b.image(repo, "a")
        b.image(repo, "b")
    now = dt.datetime.now(dt.UTC)
    reg.set_pushed(repo, now - dt.timedelta(days=3, hours=1), "a")
    reg.set_pushed(repo, now - dt.timedelta(days=3), "b")
    rule = keep("*", within=dt.timedelta(days=1))
    with FaultyProxy(("127.0.0.1", reg.port), date_offset=-dt.timedelta(days=3)) as proxy:
        via = RegistrySettings(url=proxy.url, storage_path=str(reg.storage_path))
        async with RegistryClient.from_settings(via) as client:
            config = Config(registry=via, policies=(policy(rule),))
            planned = await Engine(client, config, tmp_path).plan(repo)
    assert planned.plan.is_empty, planned.plan.deletions
    (note,) = planned.plan.notes
    assert "the registry's clock is 3d 0h behind regsweep's" in note
    assert "until the clocks agree" in note
    async with RegistryClient.from_settings(settings(reg, storage=True)) as client:
        honest = await engine_on(reg, client, rule, tmp_path / "direct").plan(repo)
    assert removed_tags(honest) == {"a", "b"}  # on a clock that agrees, the links stand


async def test_links_dated_1970_rank_and_age_nothing(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """Links of 0 and 1 second after 1970 (a store that keeps no times): tags pushed a minute
    ago are not "20000d ago", and their one-second order of 1970 deletes nothing."""
    reg, repo = own_registry, "t/nix"
    with ImageBuilder.connect(reg.url) as b:
        b.image(repo, "v0")
        b.image(repo, "v1")
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    reg.set_pushed(repo, epoch, "v0")
    reg.set_pushed(repo, epoch + dt.timedelta(seconds=1), "v1")
    async with RegistryClient.from_settings(settings(reg, storage=True)) as client:
        for n, rule in enumerate((keep("*", newest=1), keep("*", within=dt.timedelta(days=7)))):
            planned = await engine_on(reg, client, rule, tmp_path / str(n)).plan(repo)
            assert planned.plan.is_empty, (rule, planned.plan.deletions)
            (note,) = planned.plan.notes
            assert "every tag link is dated before 2013" in note
            assert "nothing is deleted on them" in note


async def test_a_link_dated_in_the_future_ranks_nothing_above_a_later_push(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """A tag link dated a month ahead (the storage host's clock ahead, or a `touch` gone
    wrong): `newest: 1` does not take it for the newest push and delete the build pushed after
    it; the plan says why the time was not believed."""
    reg, repo = own_registry, "t/ahead"
    with ImageBuilder.connect(reg.url) as b:
        b.image(repo, "first")
        later = b.image(repo, "later")
    now = dt.datetime.now(dt.UTC)
    reg.set_pushed(repo, now + dt.timedelta(days=30), "first")
    reg.set_pushed(repo, now - dt.timedelta(hours=1), "later")
    async with RegistryClient.from_settings(settings(reg, storage=True)) as client:
        planned = await engine_on(reg, client, keep("*", newest=1), tmp_path).plan(repo)
    assert later.digest not in {d.digest for d in planned.plan.deletions}
    assert any("in the future" in note for note in planned.plan.notes), planned.plan.notes


def _moved(source: RegistryProcess, target: Path, how: str) -> RegistryProcess:
    """The registry's storage moved to ``target`` as an operator might, and a registry
    started on it there."""
    target.mkdir(parents=True)
    src = str(source.storage_path)
    commands = {
        "cp -r": f"cp -r {src} {target}/data",
        "tar -x --touch": f"tar -C {src}/.. -cf - data | tar -C {target} -x --touch -f -",
        "cp -a": f"cp -a {src} {target}/data",
    }
    subprocess.run(["sh", "-c", commands[how]], check=True)
    moved = RegistryProcess.create(target)
    moved.start()
    return moved


@pytest.mark.parametrize("how", ["cp -r", "tar -x --touch"])
def test_a_storage_copied_without_times_ranks_nothing_and_every_command_says_so(
    own_registry: RegistryProcess, tmp_path: Path, how: str
) -> None:
    """Six builds pushed a day apart, the storage moved to a new host without its times: every
    link now says "copied just now", in archive order. ``regsweep prune`` with ``newest: 3``
    deletes none of them on that order (it deleted three before), and ``plan``, ``status``
    and ``check-config --online`` each say why and how to fix it."""
    reg, repo = own_registry, "t/moved"
    with ImageBuilder.connect(reg.url) as b:
        for i in range(6):
            b.image(repo, f"build-{i}")
            reg.set_pushed(repo, days_ago(6 - i), f"build-{i}")
    reg.stop()
    moved = _moved(reg, tmp_path / "new-host", how)
    redis_db = redisdb.url(4)
    redis.Redis.from_url(redis_db).flushdb()
    try:
        config = cli.write_config(
            tmp_path / "regsweep.yaml",
            moved.url,
            [{"name": "p", "repositories": ["t/**"], "mode": "enforce",
              "keep": [{"tags": ["build-*"], "newest": 3}]}],
            redis_url=redis_db,
            storage_path=moved.storage_path,
        )  # fmt: skip
        pruned = run("prune", config=config)
        assert pruned.returncode == 0, pruned.stderr
        with ImageBuilder.connect(moved.url) as b:
            assert b.tags(repo) == [f"build-{i}" for i in range(6)]
        assert "as a copy that kept no times writes them" in pruned.stdout
        assert "rsync -a, cp -a, tar without --touch" in pruned.stdout
        assert "nothing is deleted on them" in pruned.stdout
        status = run("status", config=config)
        assert status.returncode == 0, status.stderr
        assert "registry clock: the registry's clock agrees with regsweep's" in status.stdout
        assert "push times refused in 1 repositories (nothing is deleted on them):" in status.stdout
        assert f"{repo}: all 6 tag links were written within" in status.stdout
        online = json.loads(run("check-config", "--online", "--json", config=config).stdout)
        checks = {c["check"]: c for c in online["checks"]}
        assert checks["storage"]["status"] == "ok"
        assert checks["push-times"]["status"] == "fail"
        assert "as a copy that kept no times writes them" in checks["push-times"]["detail"]
    finally:
        moved.stop()
        redis.Redis.from_url(redis_db).flushdb()


def test_a_storage_moved_keeping_times_is_used_as_before(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """The same move with ``cp -a`` (times kept, as docs/operations.md says): the links are
    believed and ``newest: 3`` deletes the three builds pushed first."""
    reg, repo = own_registry, "t/moved"
    with ImageBuilder.connect(reg.url) as b:
        for i in range(6):
            b.image(repo, f"build-{i}")
            reg.set_pushed(repo, days_ago(6 - i), f"build-{i}")
    reg.stop()
    moved = _moved(reg, tmp_path / "new-host", "cp -a")
    try:
        config = cli.write_config(
            tmp_path / "regsweep.yaml",
            moved.url,
            [{"name": "p", "repositories": ["t/**"], "mode": "enforce",
              "keep": [{"tags": ["build-*"], "newest": 3}]}],
            audit_path=tmp_path / "audit.jsonl",
            storage_path=moved.storage_path,
        )  # fmt: skip
        pruned = run("prune", config=config)
        assert pruned.returncode == 0, pruned.stderr
        with ImageBuilder.connect(moved.url) as b:
            assert b.tags(repo) == ["build-3", "build-4", "build-5"]
    finally:
        moved.stop()


@pytest.mark.parametrize("off", ["one level deep", "one level shallow"])
def test_a_storage_path_one_level_off_is_refused_with_the_right_one(
    own_registry: RegistryProcess, tmp_path: Path, off: str
) -> None:
    """``storage_path`` set to ``<root>/docker/registry/v2`` (or to the directory above the
    root): ``check-config`` refuses it naming the root to use, and ``prune`` leaves the
    repository alone (exit 1, saying so) instead of deleting the per-arch image that an index
    deployed by digest still lists (only the storage shows that index): ``amd64-v1``, first
    listed before ``amd64-v2`` was pushed, is provably older, and went by digest before."""
    reg, repo = own_registry, "t/deployed"
    wrong = reg.storage_path / "docker/registry/v2" if off == "one level deep" else reg.root
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        reg.url,
        [{"name": "p", "repositories": ["t/**"], "mode": "enforce",
          "keep": [{"tags": ["*"], "newest": 1}]}],
        audit_path=tmp_path / "audit.jsonl",
        storage_path=wrong,
    )  # fmt: skip
    with ImageBuilder.connect(reg.url) as b:
        amd = b.image(repo, "amd64-v1")
        arm = b.image(repo, architecture="arm64")
        deployed = b.index(repo, [amd, arm])  # by digest only
        checked = run("check-config", config=config)
        run("plan", config=config)  # a listing before amd64-v2
        b.image(repo, "amd64-v2")
        pruned = run("prune", config=config)
        assert all(b.manifest_exists(repo, d) for d in (deployed.digest, amd.digest, arm.digest))
    assert checked.returncode == 2, checked.stdout
    assert f"registry.storage_path: {wrong} is not the registry's storage root" in checked.stderr
    assert f"{reg.storage_path} is: set registry.storage_path to it" in checked.stderr
    assert pruned.returncode == 1, pruned.stdout + pruned.stderr
    assert "Traceback" not in pruned.stderr
    (line,) = [ln for ln in pruned.stderr.splitlines() if "not planned" in ln]
    assert f"has no repository {repo}, which the registry has" in line
    assert f"{reg.storage_path} is: set registry.storage_path to it" in line


#: Run as root without the capabilities that let root read any file: permission bits then
#: refuse it as they refuse any other user (a regsweep run as its own user, the registry's
#: files not readable by it). ``chmod 000`` alone does nothing to root.
#: The worker-path test's Redis (this module's database; the tasks use the default prefix).
WORKER_REDIS: Final = redisdb.url(4)


def _locked_out(path: Path) -> None:
    path.chmod(0)


def _locked_and_open(reg: RegistryProcess) -> ManifestHead | None:
    """t/locked and t/open, each v1 (9 days old) and v2; what newest: 1 deletes in t/open."""
    with ImageBuilder.connect(reg.url) as b:
        for repo in ("t/locked", "t/open"):
            b.image(repo, "v1")
            b.image(repo, "v2")
            reg.set_pushed(repo, days_ago(9), "v1")
        return b.head("t/open", "v1")


@pytest.mark.parametrize("locked", ["a tag link", "the revisions directory"])
def test_an_unreadable_storage_file_leaves_its_repository_alone_and_the_others_go_on(
    own_registry: RegistryProcess, tmp_path: Path, locked: str
) -> None:
    """A tag link (or the revisions directory) regsweep's user cannot read: ``prune`` names
    the file, leaves that repository alone, prunes the other, and exits 1; no traceback."""
    reg = own_registry
    doomed = _locked_and_open(reg)
    manifests = reg.storage_path / "docker/registry/v2/repositories/t/locked/_manifests"
    target = (
        manifests / "tags/v2/current/link" if locked == "a tag link" else manifests / "revisions"
    )
    _locked_out(target)
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        reg.url,
        [{"name": "p", "repositories": ["t/**"], "mode": "enforce",
          "keep": [{"tags": ["*"], "newest": 1}]}],
        audit_path=tmp_path / "audit.jsonl",
        storage_path=reg.storage_path,
    )  # fmt: skip
    try:
        pruned = subprocess.run(
            [*WITHOUT_ROOTS_READS, *cli.REGSWEEP, "-c", str(config), "prune"],
            capture_output=True,
            text=True,
            env=cli.environment() | {"XDG_CACHE_HOME": str(tmp_path / "cache")},
            timeout=180,
            check=False,
        )
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    assert pruned.returncode == 1, pruned.stdout + pruned.stderr
    assert "Traceback" not in pruned.stderr
    (line,) = [ln for ln in pruned.stderr.splitlines() if "not planned" in ln]
    assert line.startswith("regsweep: t/locked: not planned:")
    assert f"cannot read {target}" in line and "Permission denied" in line
    assert "t/open: done (1 deleted)" in pruned.stdout
    with ImageBuilder.connect(reg.url) as b:
        assert doomed is not None and not b.manifest_exists("t/open", doomed.digest)
        assert b.tags("t/locked") == ["v1", "v2"]


def test_a_worker_prune_meeting_an_unreadable_storage_file_fails_naming_it(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """The workers' path: a real ``regsweep worker`` that may not read one tag link (``chmod
    000``, root's read override dropped) ends that repository's prune job ``failed``
    naming the file, at once (not retried: nothing will change by itself) and deleting
    nothing there; the other repository's job prunes as usual."""
    reg = own_registry
    doomed = _locked_and_open(reg)
    link = tag_link(reg.storage_path, "t/locked", "v2")
    path = s.policy_file(
        tmp_path / "regsweep.yaml",
        reg.url,
        [{"name": "p", "repositories": ["t/**"], "mode": "enforce",
          "keep": [{"tags": ["*"], "newest": 1}]}],
        WORKER_REDIS,
    )  # fmt: skip
    document = yaml.safe_load(path.read_text())
    document["registry"]["storage_path"] = str(reg.storage_path)
    path.write_text(yaml.safe_dump(document))
    broker = redis.Redis.from_url(WORKER_REDIS, decode_responses=True)
    broker.flushdb()
    _locked_out(link)
    worker = start_worker(path, ("jobs",), log=tmp_path / "worker.log", no_read_override=True)
    try:
        worker.wait_ready()
        queued = run("prune", "t/locked", "t/open", "--enqueue", config=path)
        assert queued.returncode == 0, queued.stderr
        locked, opened = (_ended(broker, job_id) for job_id in queued.stdout.split())
    finally:
        worker.stop()
        link.chmod(0o644)
        broker.flushdb()
        broker.close()
    assert locked["state"] == "failed", locked
    assert any(f"cannot read {link}" in e for e in locked["errors"]), locked["errors"]
    assert opened["state"] == "succeeded" and opened["counts"]["deleted"] == 1, opened
    with ImageBuilder.connect(reg.url) as b:
        assert b.tags("t/locked") == ["v1", "v2"]
        assert doomed is not None and not b.manifest_exists("t/open", doomed.digest)


def _ended(broker: redis.Redis, job_id: str) -> dict[str, Any]:
    """The job's record once it succeeded or failed (within a minute)."""

    def ended() -> dict[str, Any] | None:
        raw = cast(dict[str, str], broker.hgetall(f"regsweep:job:{job_id}"))
        record = {k: json.loads(v) for k, v in raw.items()}
        return record if record.get("state") in ("succeeded", "failed") else None

    return s.wait_for(ended, 60.0, what=f"job {job_id} to end")


@pytest.mark.parametrize("shape", ["a symlink loop", "a FIFO", "a dangling symlink"])
def test_a_tag_link_that_is_no_file_is_an_error_naming_it_never_a_hang(
    tmp_path: Path, shape: str
) -> None:
    """A tag link replaced by a symlink to itself (ELOOP), a FIFO (a plain read would block
    forever) or a symlink to nothing: reading it raises StorageError naming the file, at
    once, instead of taking the tag as unpushed. (A registry serving such a storage fails
    too; these are read here without one, which would hang on the FIFO.)"""
    link = tag_link(tmp_path, "t/odd", "v1")
    link.parent.mkdir(parents=True)
    if shape == "a FIFO":
        os.mkfifo(link)
    else:
        link.symlink_to(link.name if shape == "a symlink loop" else "nowhere")
    with pytest.raises(StorageError, match=rf"{link}.*left alone"):
        RegistryStorage(tmp_path).tags("t/odd", ["v1"])
    assert RegistryStorage(tmp_path).tags("t/odd", ["v2"]) == {}  # absent: no push known


# --- notifications out of order (issue 23) -------------------------------------------------


async def test_a_late_notification_never_makes_a_re_pushed_tag_older(
    own_registry: RegistryProcess,
) -> None:
    """``x`` pushed, then ``y``, ``z``, then ``x`` again (same image); the events worker
    applies the re-push before the first push (several processes, a redelivery). ``x``'s push
    time stays the later one, so ``newest: 2`` deletes ``y``, not ``x``, the tag pushed last."""
    reg, repo = own_registry, "t/late"
    with ImageBuilder.connect(reg.url) as b:
        images = {tag: b.image(repo, tag) for tag in ("x", "y", "z")}
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=4)
    pushes = [("x", 0), ("y", 1), ("z", 2), ("x", 3)]
    events = [
        RegistryEvent(
            id=f"ev-{n}",
            action="push",
            repository=repo,
            digest=images[tag].digest,
            tag=tag,
            media_type=oci.OCI_MANIFEST,
            size=100,
            timestamp=start + dt.timedelta(hours=hour),
        )
        for n, (tag, hour) in enumerate(pushes)
    ]
    config = Config(
        registry=RegistrySettings(url=reg.url),
        policies=(policy(keep("*", newest=2)),),
        redis_url=redisdb.url(4),
    )
    ctx = await WorkerContext.open(config, prefix=f"late-{os.urandom(4).hex()}:")
    try:
        await apply_registry_events(ctx, [events[1], events[2], events[3]])
        await apply_registry_events(ctx, [events[0]])  # delivered last
        assert (await ctx.index.pushed_at(repo))["x"] == events[3].timestamp
        planned = await ctx.pruner.plan_one(repo)
    finally:
        await _drop_prefix(ctx)
        await ctx.aclose()
    assert planned is not None and removed_tags(planned) == {"y"}


async def _drop_prefix(ctx: WorkerContext) -> None:
    keys = [k async for k in ctx.redis.scan_iter(match=f"{ctx.index.keys.prefix}*")]
    if keys:
        await ctx.redis.delete(*keys)


async def test_a_link_dated_after_a_listing_showed_its_tag_never_makes_it_newest(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """``x`` pushed while the registry host's clock ran 2 minutes fast (then corrected),
    listed, then ``y`` pushed: ``x``'s link is dated after ``y``'s, although regsweep's own
    listing showed ``x`` before ``y`` existed. ``newest: 1`` must not delete ``y``, the later
    push, on that link; the plan names the link it did not believe."""
    reg, repo = own_registry, "t/fast"
    async with RegistryClient.from_settings(settings(reg, storage=True)) as client:
        with ImageBuilder.connect(reg.url) as b:
            b.image(repo, "x")
            newest = engine_on(reg, client, keep("*", newest=1), tmp_path)
            assert (await newest.plan(repo)).plan.is_empty  # the listing that shows x, not y
            b.image(repo, "y")
        y_link = dt.datetime.fromtimestamp(
            tag_link(reg.storage_path, repo, "y").stat().st_mtime, dt.UTC
        )
        reg.set_pushed(repo, y_link + dt.timedelta(minutes=2), "x")
        planned = await newest.plan(repo)
    assert "y" not in removed_tags(planned), planned.plan.deletions
    pushed = planned.inventory.push_time("x")
    assert pushed.doubt is not None and "after a listing that showed the tag" in pushed.doubt


async def test_a_tag_regsweep_deleted_and_pushed_again_is_a_new_push_not_the_one_listed(
    own_registry: RegistryProcess,
) -> None:
    """A listing 30 days ago showed ``t``; ``pushed_within: 7d`` deletes it (with Redis, no
    notifications or storage: first seen is all there is). The same image is pushed again
    as ``t`` before any listing: that is a push of now, not the one the old listing saw,
    so the next prune keeps it (the deletion ended the old sighting)."""
    reg, repo = own_registry, "t/again"
    with ImageBuilder.connect(reg.url) as b:
        image = b.image(repo, "t")
        b.image(repo, "keep-me")
    config = Config(
        registry=RegistrySettings(url=reg.url),
        policies=(policy(keep("*", within=dt.timedelta(days=7))),),
        redis_url=redisdb.url(4),
    )
    ctx = await WorkerContext.open(config, prefix=f"again-{os.urandom(4).hex()}:")
    try:
        month = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        live = {"t": Digest(image.digest)}
        await ctx.index.record_listing(repo, live, month, month + dt.timedelta(seconds=1))
        first = await ctx.pruner.run(repo, job_id="first")
        assert first is not None and removed_tags(first.planned) == {"t"}
        with ImageBuilder.connect(reg.url) as b:
            b.tag(repo, image, "t")  # pushed again: a rebuild with the same digest
        again = await ctx.pruner.run(repo, job_id="again")
    finally:
        await _drop_prefix(ctx)
        await ctx.aclose()
    assert again is not None
    assert removed_tags(again.planned) == set(), again.planned.plan


async def test_a_date_header_at_the_end_of_time_is_no_clock_and_breaks_no_request(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    """A proxy in front of the registry answers ``Date: Fri, 31 Dec 9999 23:59:59 GMT`` (and
    one whose offset carries it past year 9999): each request still works, the registry's
    clock is said to be off, and its times rank nothing (``pushed_within`` keeps both)."""
    reg, repo = own_registry, "t/endoftime"
    with ImageBuilder.connect(reg.url) as b:
        b.image(repo, "a")
        b.image(repo, "b")
    reg.set_pushed(repo, dt.datetime.now(dt.UTC) - dt.timedelta(days=3), "a", "b")
    rule = keep("*", within=dt.timedelta(days=1))
    for date in ("Fri, 31 Dec 9999 23:59:59 GMT", "Fri, 31 Dec 9999 23:59:59 -2359"):
        with FaultyProxy(("127.0.0.1", reg.port), date_header=date) as proxy:
            via = RegistrySettings(url=proxy.url, storage_path=str(reg.storage_path))
            async with RegistryClient.from_settings(via) as client:
                config = Config(registry=via, policies=(policy(rule),))
                planned = await Engine(client, config, tmp_path / date[-5:]).plan(repo)
        assert planned.plan.is_empty, planned.plan.deletions
        assert "the registry's clock is" in planned.plan.notes[0], planned.plan.notes
