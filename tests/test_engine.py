"""Plan and prune against the real registry, 2.8.2 and 3.x (each test marked ``ON_BOTH`` runs
on each): inventory, planner and executor together."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.harness import service as h
from tests.harness.auth import AuthRegistry
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.proxy import FaultyProxy, Rule
from tests.harness.registry import RegistryBinary, RegistryProcess
from worker.engine.executor import RunOutcome as Outcome
from worker.engine.executor import Status
from worker.engine.plan import Action
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.prune import Pruned, Pruner, RepositoryPlan
from worker.engine.restore import restore
from worker.errors import TurnLost
from worker.records import Hold
from worker.registry.client import EMPTY_CONFIG, RegistryClient, digest_of
from worker.settings.model import Config, RegistrySettings, Secret
from worker.store.audit import AuditQuery, JsonlAuditLog
from worker.store.history import LocalHistory
from worker.store.locks import PruneLock

pytestmark = pytest.mark.anyio
#: The test runs on 2.8.2 and on 3.x: its ``registry``, ``client`` and ``builder`` are that
#: version's. Every test of the engine against a registry does, except the auth flavours
#: (the auth flow is the same HTTP on both).
ON_BOTH = pytest.mark.usefixtures("registry_binary")

NOW = dt.datetime.now(dt.UTC)


def days_ago(n: float) -> dt.datetime:
    return NOW - dt.timedelta(days=n)


def policy(
    *,
    keep: tuple[KeepRule, ...] | None = None,
    protect: tuple[str, ...] = ("latest",),
    mode: Mode = Mode.ENFORCE,
) -> Policy:
    return Policy(
        name="test",
        repositories=(RepositoryPattern.compile("t/**"),),
        mode=mode,
        protect=tuple(TagPattern.compile(p) for p in protect),
        keep=keep,
    )


def keep_prefixed() -> KeepRule:
    """Keep `keep-*` tags (and so their digests)."""
    return KeepRule(0, (TagPattern.compile("keep-*"),))


def newest(n: int, *patterns: str) -> KeepRule:
    return KeepRule(0, tuple(TagPattern.compile(p) for p in patterns or ("*",)), newest=n)


def make_config(url: str, pol: Policy, tmp_path: Path, **registry: object) -> Config:
    settings = RegistrySettings(url=url, **({"concurrency": 4} | registry))  # type: ignore[arg-type]
    return Config(registry=settings, policies=(pol,), audit_path=str(tmp_path / "audit.jsonl"))


class Engine:
    """A pruner wired to a real registry as the CLI wires it without Redis: a JSONL audit, a
    state file, and the registry's storage read for push times."""

    def __init__(self, config: Config, client: RegistryClient) -> None:
        self.config = config
        self.client = client
        audit_path = Path(config.audit_path or "audit.jsonl")
        self.audit = JsonlAuditLog(audit_path)
        self.history = LocalHistory(audit_path.with_name("state"))
        self.pruner = Pruner(config, client, history=self.history, audit=self.audit)

    async def plan(self, repo: str) -> RepositoryPlan:
        planned = await self.pruner.plan_one(repo)
        assert planned is not None
        return planned


@pytest.fixture
async def client(registry: RegistryProcess) -> AsyncIterator[RegistryClient]:
    async with RegistryClient.from_settings(RegistrySettings(url=registry.url)) as c:
        yield c


@pytest.fixture
def builder(registry: RegistryProcess) -> Iterator[ImageBuilder]:
    with ImageBuilder.connect(registry.url) as b:
        yield b


def engine(
    registry: RegistryProcess, client: RegistryClient, pol: Policy, tmp_path: Path
) -> Engine:
    config = make_config(registry.url, pol, tmp_path, storage_path=str(registry.storage_path))
    return Engine(config, client)


MakeEngine = Callable[[Policy], Engine]


@pytest.fixture
def make_engine(registry: RegistryProcess, client: RegistryClient, tmp_path: Path) -> MakeEngine:
    """An engine on the session registry for a given policy (audit log in tmp_path)."""
    return lambda pol: engine(registry, client, pol, tmp_path)


def assert_pullable(builder: ImageBuilder, repo: str, image: PushedImage) -> None:
    assert builder.manifest_exists(repo, image.digest)
    for blob in (image.config_digest, *image.layer_digests):
        assert builder.blob_exists(repo, blob)


@ON_BOTH
async def test_keep_newest_deletes_the_rest_and_kept_images_stay_whole(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """newest: 2 keeps the two most recently pushed (by the storage's tag links) and `latest`;
    the rest go by digest; kept blobs stay."""
    images = [builder.image(repo_name, f"b{i}") for i in range(5)]
    for i in range(5):
        registry.set_pushed(repo_name, days_ago(10 - i), f"b{i}")
    builder.tag(repo_name, images[0], "latest")
    eng = make_engine(policy(keep=(newest(2),)))
    planned = await eng.plan(repo_name)
    assert {k.tag for k in planned.plan.kept} == {"b3", "b4", "latest"}
    report = await eng.pruner.execute(planned, job_id="j1")
    assert report.outcome is Outcome.DONE
    assert builder.tags(repo_name) == ["b3", "b4", "latest"]
    for image in (images[0], images[3], images[4]):
        assert_pullable(builder, repo_name, image)
    for image in images[1:3]:
        assert not builder.manifest_exists(repo_name, image.digest)
    assert planned.plan.reclaimable_bytes > 0


def stored_revisions(registry: RegistryProcess, repo: str) -> set[str]:
    """Every manifest the repository's storage ever got (a revision directory stays after its
    manifest is deleted): a placeholder written and deleted again still shows here."""
    root = registry.storage_path / "docker/registry/v2/repositories" / repo
    return {"sha256:" + p.name for p in (root / "_manifests/revisions/sha256").iterdir()}


async def test_tag_sharing_a_kept_digest_is_removed_as_a_tag_only(
    make_engine: MakeEngine,
    registry: RegistryProcess,
    registry_binary: RegistryBinary,
    builder: ImageBuilder,
    repo_name: str,
) -> None:
    """Invariant 2: the doomed tag goes, the shared digest survives: on 3.x by one DELETE of
    the tag (no placeholder manifest is ever stored), on 2.8 by the placeholder method (its
    manifest stored, then deleted)."""
    image = builder.image(repo_name, ["keep-me", "pr-1"], created=days_ago(1))
    keep = (KeepRule(0, (TagPattern.compile("keep-*"),)),)
    eng = make_engine(policy(keep=keep))
    planned = await eng.plan(repo_name)
    (deletion,) = planned.plan.deletions
    assert deletion.action is Action.UNTAG
    report = await eng.pruner.execute(planned, job_id="j")
    assert report.by_status(Status.DELETED) == [deletion]
    assert builder.tags(repo_name) == ["keep-me"]
    assert_pullable(builder, repo_name, image)
    stored = stored_revisions(registry, repo_name)
    assert (stored == {image.digest}) is (registry_binary.major >= 3), stored
    # Nor its config blob: a fresh client probes before the first wave, not after it.
    placeholder_config = builder.blob_exists(repo_name, digest_of(EMPTY_CONFIG))
    assert placeholder_config is (registry_binary.major < 3)


@ON_BOTH
async def test_multi_arch_index_goes_with_unshared_children_only(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariant 3: an old index's own children go; a child shared with a kept index stays."""
    shared = builder.image(repo_name, created=days_ago(30), architecture="arm64")
    old_amd = builder.image(repo_name, created=days_ago(30))
    new_amd = builder.image(repo_name, created=days_ago(1))
    old = builder.index(repo_name, [old_amd, shared], "old", fmt="docker", attest=True)
    new = builder.index(repo_name, [new_amd, shared], "new")
    registry.set_pushed(repo_name, days_ago(30), "old")
    eng = make_engine(policy(keep=(newest(1),)))
    planned = await eng.plan(repo_name)
    report = await eng.pruner.execute(planned, job_id="j")
    assert report.outcome is Outcome.DONE
    assert not builder.manifest_exists(repo_name, old.digest)
    assert not builder.manifest_exists(repo_name, old_amd.digest)
    for attestation in old.attestations:
        assert not builder.manifest_exists(repo_name, attestation)
    assert builder.manifest_exists(repo_name, new.digest)
    assert_pullable(builder, repo_name, shared)
    assert_pullable(builder, repo_name, new_amd)


@ON_BOTH
async def test_signatures_and_referrers_follow_their_subject(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariant 4: cosign tags and OCI referrers of a deleted subject go; a kept one's stay."""
    old = builder.image(repo_name, "old", created=days_ago(20))
    new = builder.image(repo_name, "new", created=days_ago(1))
    old_sig = builder.cosign(repo_name, old, "sig")
    old_sbom = builder.referrer(repo_name, old)
    new_sig = builder.cosign(repo_name, new, "sig")
    new_att = builder.cosign(repo_name, new, "att")
    registry.set_pushed(repo_name, days_ago(20), "old")
    eng = make_engine(policy(keep=(newest(1),)))
    planned = await eng.plan(repo_name)
    assert {k.tag for k in planned.plan.kept if not k.tag.startswith("sha256-")} == {"new"}
    await eng.pruner.execute(planned, job_id="j")
    for gone in (old, old_sig, old_sbom):
        assert not builder.manifest_exists(repo_name, gone.digest)
    assert all(not t.startswith(f"sha256-{old.digest[7:]}") for t in builder.tags(repo_name))
    for kept in (new, new_sig, new_att):
        assert builder.manifest_exists(repo_name, kept.digest)


@ON_BOTH
async def test_dry_run_policy_writes_nothing(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariant 7: a dry-run policy is planned but prune_many never calls the executor."""
    for i in range(3):
        builder.image(repo_name, f"v{i}")
        registry.set_pushed(repo_name, days_ago(5 - i), f"v{i}")
    before = builder.tags(repo_name)
    eng = make_engine(policy(keep=(newest(1),), mode=Mode.DRY_RUN))
    results = await eng.pruner.prune_many([repo_name], dry_run=False, job_id="j")
    (result,) = results
    assert isinstance(result, Pruned)
    planned, report = result
    assert report is None
    assert planned.plan.tags_removed == 2
    assert builder.tags(repo_name) == before
    assert await eng.audit.entries() == []


@ON_BOTH
async def test_kept_tag_moved_onto_a_doomed_digest_stops_its_delete(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariant 5: a push between plan and DELETE that makes a kept tag need the digest wins."""
    old = builder.image(repo_name, "old")
    builder.image(repo_name, "new")
    registry.set_pushed(repo_name, days_ago(9), "old")
    eng = make_engine(policy(keep=(newest(1),)))
    planned = await eng.plan(repo_name)
    assert [d.digest for d in planned.plan.deletions] == [old.digest]
    builder.tag(repo_name, old, "latest")  # protected, pushed after the plan
    report = await eng.pruner.execute(planned, job_id="j")
    assert report.by_status(Status.SKIPPED) == list(planned.plan.deletions)
    assert_pullable(builder, repo_name, old)


@ON_BOTH
async def test_a_condemned_tag_pushed_again_after_the_plan_keeps_its_new_image_whole(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariant 5 for a tag the plan removes: ``old`` is pushed again between plan and
    DELETE, as a new index sharing its arm64 child with the old one. The old index goes, but
    the child the new ``old`` lists stays: a newly pushed image is never broken."""
    shared = builder.image(repo_name, created=days_ago(30), architecture="arm64")
    old_amd = builder.image(repo_name, created=days_ago(30))
    old = builder.index(repo_name, [old_amd, shared], "old")
    builder.image(repo_name, "new")
    registry.set_pushed(repo_name, days_ago(30), "old")
    eng = make_engine(policy(keep=(newest(1),)))
    planned = await eng.plan(repo_name)
    assert {d.digest for d in planned.plan.deletions} == {old.digest, old_amd.digest, shared.digest}
    rebuilt = builder.index(repo_name, [builder.image(repo_name), shared], "old")
    await eng.pruner.execute(planned, job_id="j")
    assert not builder.manifest_exists(repo_name, old.digest)
    assert builder.head(repo_name, "old") is not None
    assert builder.manifest_exists(repo_name, rebuilt.digest)
    assert_pullable(builder, repo_name, shared)


async def test_a_tag_held_after_the_plan_is_not_deleted_by_it(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """``regsweep hold`` said "held" while a prune planned before it was running: the
    executor reads the holds with its live re-check, so the held tag (alone on its image,
    and one sharing its image with a kept tag) stays; the rest of the plan goes."""
    held = builder.image(repo_name, "held", created=days_ago(30))
    builder.tag(repo_name, builder.image(repo_name, "shared", created=days_ago(30)), "untag-me")
    gone = builder.image(repo_name, "gone", created=days_ago(30))
    builder.image(repo_name, "new")
    for tag in ("held", "untag-me", "gone", "shared"):
        registry.set_pushed(repo_name, days_ago(30), tag)
    eng = make_engine(policy(keep=(newest(1, "new"), KeepRule(1, (TagPattern.compile("shared"),)))))
    planned = await eng.plan(repo_name)
    assert {t for d in planned.plan.deletions for t in d.tags} == {"held", "untag-me", "gone"}
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    for tag in ("held", "untag-me"):
        await eng.history.hold(repo_name, Hold(tag, until, "regsweep hold"))
    report = await eng.pruner.execute(planned, job_id="j")
    assert builder.tags(repo_name) == ["held", "new", "shared", "untag-me"]
    assert_pullable(builder, repo_name, held)
    assert not builder.manifest_exists(repo_name, gone.digest)
    assert {t for d in report.by_status(Status.SKIPPED) for t in d.tags} == {"held", "untag-me"}


@ON_BOTH
async def test_subject_kept_after_planning_keeps_its_signature(
    make_engine: MakeEngine, registry: RegistryProcess, builder: ImageBuilder, repo_name: str
) -> None:
    """Invariants 4+5: a doomed subject re-tagged before execution keeps its signature too:
    the signature is deleted only after its subject, and the re-check spares the subject."""
    old = builder.image(repo_name, "old")
    sig = builder.cosign(repo_name, old, "sig")
    builder.image(repo_name, "new")
    registry.set_pushed(repo_name, days_ago(9), "old")
    eng = make_engine(policy(keep=(newest(1),)))
    planned = await eng.plan(repo_name)
    assert {d.digest for d in planned.plan.deletions} == {old.digest, sig.digest}
    builder.tag(repo_name, old, "latest")
    report = await eng.pruner.execute(planned, job_id="j")
    assert len(report.by_status(Status.SKIPPED)) == 2
    assert builder.manifest_exists(repo_name, sig.digest)
    assert_pullable(builder, repo_name, old)


async def test_a_prune_whose_lock_is_taken_over_sends_no_further_wave(
    registry: RegistryProcess,
    client: RegistryClient,
    builder: ImageBuilder,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """The repository's lock expired unrenewed (or Redis lost it) and another prune took it
    while this one deleted: no wave is sent after that (each is asked of the real lock in
    Redis first), what is left is a transient error to retry, and its images are whole."""
    images = [builder.image(repo_name, f"b{i}") for i in range(14)]
    for i in range(14):
        registry.set_pushed(repo_name, days_ago(20 - i), f"b{i}")
    settings = {"storage_path": str(registry.storage_path), "concurrency": 1}  # waves of 4
    eng = Engine(make_config(registry.url, policy(keep=(newest(1),)), tmp_path, **settings), client)
    planned = await eng.plan(repo_name)
    assert len(planned.plan.deletions) == 13
    prefix = h.unique_prefix()
    sync = redis.Redis.from_url(h.REDIS_TEST_URL)
    redis_client = aioredis.Redis.from_url(h.REDIS_TEST_URL)
    lock = PruneLock(redis_client, f"{prefix}lock:prune:{repo_name}")
    try:
        assert await lock.acquire()
        await lock.still_ours()  # held: no error

        def taken_over(deletion: object, status: Status) -> None:
            sync.set(lock.key, "another prune's token")

        report = await eng.pruner.execute(planned, job_id="j", on_progress=taken_over, turn=lock)
    finally:
        h.delete_prefix(sync, prefix)
        sync.close()
        await redis_client.aclose()
    lost = report.by_status(Status.ERROR)
    # Waves of 4, two in flight: the third wave is asked after the first deletion at latest.
    assert len(lost) >= 5 and report.retryable and report.outcome is Outcome.FAILED
    assert all("lost" in detail for _, status, detail in report.done if status is Status.ERROR)
    by_digest = {image.digest: image for image in images}
    for deletion in lost:
        assert_pullable(builder, repo_name, by_digest[deletion.digest])
    with pytest.raises(TurnLost):
        await lock.still_ours()


async def test_read_only_registry_defers_everything_left(
    tmp_path: Path, repo_name: str, registry_binary: RegistryBinary
) -> None:
    """Invariant 6: a read-only registry (2.8.2's and 3.x's 405) makes the run 'deferred' with
    nothing deleted or lost."""
    reg = RegistryProcess.create(tmp_path / "ro", binary=registry_binary)
    reg.start()
    try:
        with ImageBuilder.connect(reg.url) as b:
            for i in range(3):
                b.image(repo_name, f"v{i}")
                reg.set_pushed(repo_name, days_ago(5 - i), f"v{i}")
        async with RegistryClient.from_settings(RegistrySettings(url=reg.url)) as c:
            eng = engine(reg, c, policy(keep=(newest(1),)), tmp_path)
            planned = await eng.plan(repo_name)
            reg.set_readonly(True)
            reg.restart()
            report = await eng.pruner.execute(planned, job_id="j")
        assert report.outcome is Outcome.DEFERRED
        assert len(report.by_status(Status.DEFERRED)) == len(planned.plan.deletions) == 2
        with ImageBuilder.connect(reg.url) as b:
            assert b.tags(repo_name) == ["v0", "v1", "v2"]
    finally:
        reg.stop()


@ON_BOTH
async def test_audit_records_raw_bytes_and_restore_puts_image_back(
    registry: RegistryProcess,
    client: RegistryClient,
    builder: ImageBuilder,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """Invariant 8: the audit log has the manifest bytes; restore brings back index and tags."""
    child = builder.image(repo_name)
    old = builder.index(repo_name, [child], ["old", "old-alias"])
    builder.image(repo_name, "new")
    registry.set_pushed(repo_name, days_ago(30), "old", "old-alias")
    eng = engine(registry, client, policy(keep=(newest(1),)), tmp_path)
    await eng.pruner.execute(await eng.plan(repo_name), job_id="j-restore")
    entries = await eng.audit.entries(AuditQuery(repository=repo_name))
    by_digest = {e.digest: e for e in entries}
    assert by_digest[old.digest].manifest == old.raw
    assert set(by_digest[old.digest].tags) == {"old", "old-alias"}
    assert by_digest[child.digest].parents == (old.digest,)
    assert not builder.manifest_exists(repo_name, old.digest)
    restored = await restore(
        client, eng.audit, eng.history, repo_name, old.digest, hold_for=dt.timedelta(days=7)
    )
    assert [r.digest for r in restored] == [child.digest, old.digest]
    assert builder.tags(repo_name) == ["new", "old", "old-alias"]
    # A restore job run twice (a redelivered task) does the same again, not "nothing left".
    for _ in range(2):
        rerun = await restore(
            client,
            eng.audit,
            eng.history,
            repo_name,
            old.digest,
            hold_for=dt.timedelta(days=7),
            job_id="restore-job-1",
        )
        assert [(r.digest, r.tags, r.pushed) for r in rerun] == [
            (child.digest, (), False),
            (old.digest, ("old", "old-alias"), False),
        ]
    assert_pullable(builder, repo_name, child)
    assert builder.head(repo_name, "old") is not None


@pytest.mark.parametrize("flavour", ["registry_htpasswd", "registry_token"])
async def test_prune_through_authenticated_registries(
    flavour: str, request: pytest.FixtureRequest, repo_name: str, tmp_path: Path
) -> None:
    """The whole plan → prune cycle works behind htpasswd and behind token auth."""
    auth: AuthRegistry = request.getfixturevalue(flavour)
    with ImageBuilder(auth.client()) as b:
        images = [b.image(repo_name, f"v{i}") for i in range(3)]
        b.tag(repo_name, images[1], "pr-9")
        for i in range(3):
            auth.process.set_pushed(repo_name, days_ago(5 - i), f"v{i}")
        settings = RegistrySettings(
            url=auth.url,
            username=auth.username,
            password=Secret(auth.password),
            concurrency=4,
            storage_path=str(auth.process.storage_path),
        )
        config = Config(
            registry=settings,
            policies=(policy(keep=(newest(1, "v*"),)),),
            audit_path=str(tmp_path / "a.jsonl"),
        )
        async with RegistryClient.from_settings(settings) as c:
            eng = Engine(config, c)
            report = await eng.pruner.execute(await eng.plan(repo_name), job_id="j")
        assert report.outcome is Outcome.DONE
        assert b.tags(repo_name) == ["v2"]
        assert not b.manifest_exists(repo_name, images[1].digest)


@ON_BOTH
async def test_untagged_digests_known_to_history_are_deleted_after_grace(
    registry: RegistryProcess,
    client: RegistryClient,
    builder: ImageBuilder,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """A manifest the history saw superseded (a listing showed its tag move) goes once its
    grace has passed."""
    first = builder.image(repo_name, "main")
    pol = Policy(
        name="u",
        repositories=(RepositoryPattern.compile("t/**"),),
        mode=Mode.ENFORCE,
        untagged_delete_after=dt.timedelta(0),
    )
    eng = engine(registry, client, pol, tmp_path)
    assert (await eng.plan(repo_name)).plan.is_empty  # the history's first listing
    builder.image(repo_name, "main")
    assert (await eng.plan(repo_name)).plan.is_empty  # sees `main` moved: `first` untagged now
    planned = await eng.plan(repo_name)
    assert [(d.digest, d.reason.rule) for d in planned.plan.deletions] == [
        (first.digest, "untagged")
    ]
    await eng.pruner.execute(planned, job_id="j")
    assert not builder.manifest_exists(repo_name, first.digest)
    assert builder.tags(repo_name) == ["main"]


async def test_many_untags_at_concurrency_16_upload_the_placeholder_config_once(
    registry: RegistryProcess, builder: ImageBuilder, repo_name: str, tmp_path: Path
) -> None:
    """Invariant 2 on 2.8, in fresh repositories without the `{}` blob: 32 tag-only removals,
    16 requests at a time, all succeed in every run, and each repository gets the
    placeholder's config uploaded once (counted by a proxy), not by each removal at once
    (concurrent uploads of it made a placeholder PUT fail with MANIFEST_BLOB_UNKNOWN)."""
    keep = (keep_prefixed(),)
    drops = [f"drop-{i}" for i in range(32)]
    with FaultyProxy(("127.0.0.1", registry.port)) as proxy:
        for run in range(3):
            repo = f"{repo_name}-{run}"
            image = builder.image(repo, ["keep-1", *drops])
            assert not builder.blob_exists(repo, digest_of(EMPTY_CONFIG))
            config = make_config(proxy.url, policy(keep=keep), tmp_path / str(run), concurrency=16)
            async with RegistryClient.from_settings(config.registry) as client:
                eng = Engine(config, client)
                report = await eng.pruner.execute(await eng.plan(repo), job_id=f"j{run}")
            assert report.outcome is Outcome.DONE, report.errors()
            assert len(report.by_status(Status.DELETED)) == 32
            assert builder.tags(repo) == ["keep-1"]
            assert_pullable(builder, repo, image)
            uploads = [e for e in proxy.exchanges if e.method == "POST" and repo in e.target]
            assert len(uploads) == 1, uploads


async def test_a_placeholder_put_missing_its_config_uploads_it_again_and_retries_once(
    tmp_path: Path, repo_name: str
) -> None:
    """The `{}` config uploaded before the wave is gone when the first placeholder PUT arrives
    (its link removed, as GC would; no blob cache to hide it): the PUT's 400
    MANIFEST_BLOB_UNKNOWN makes the client upload it again and PUT once more, and every
    removal succeeds."""
    reg = RegistryProcess.create(tmp_path / "nocache")
    del reg.config["storage"]["cache"]
    reg.start()
    link = (
        reg.storage_path
        / f"docker/registry/v2/repositories/{repo_name}/_layers/sha256"
        / digest_of(EMPTY_CONFIG).partition(":")[2]
    )
    try:
        with ImageBuilder.connect(reg.url) as b:
            image = b.image(repo_name, ["keep-1", "drop-1", "drop-2"])
        with FaultyProxy(("127.0.0.1", reg.port)) as proxy:
            collected = proxy.add(
                Rule(method="PUT", path=r"/manifests/drop-", before=lambda _: shutil.rmtree(link))
            )
            config = make_config(proxy.url, policy(keep=(keep_prefixed(),)), tmp_path)
            async with RegistryClient.from_settings(config.registry) as client:
                eng = Engine(config, client)
                report = await eng.pruner.execute(await eng.plan(repo_name), job_id="j")
            exchanges = list(proxy.exchanges)
        puts = [e.status or 0 for e in exchanges if e.method == "PUT" and "/drop-" in e.target]
        uploads = [e for e in exchanges if e.method == "POST"]
        assert report.outcome is Outcome.DONE, report.errors()
        assert [e.status for e in collected.fired] == [400]
        assert sorted(puts) == [201, 201, 400]
        assert len(uploads) == 2
        with ImageBuilder.connect(reg.url) as b:
            assert b.tags(repo_name) == ["keep-1"]
            assert_pullable(b, repo_name, image)
    finally:
        reg.stop()


async def test_a_3x_registry_paging_tags_three_at_a_time_is_planned_and_pruned_whole(
    tmp_path: Path, registry_binary_3: RegistryBinary
) -> None:
    """3.x with ``tags.maxtags: 3`` refuses the default page size and answers three tags a
    page: the plan still sees all seven tags (the client learns the size and follows Link),
    keeps the newest two by push time, and the prune leaves exactly those."""
    reg = RegistryProcess.create(
        tmp_path / "registry", {"tags": {"maxtags": 3}}, binary=registry_binary_3
    )
    reg.start()
    try:
        repo = "t/pages"
        tags = [f"b{i}" for i in range(7)]
        with ImageBuilder.connect(reg.url) as b:
            images = [b.image(repo, tag) for tag in tags]
            for i, tag in enumerate(tags):
                reg.set_pushed(repo, days_ago(10 - i), tag)
            async with RegistryClient.from_settings(RegistrySettings(url=reg.url)) as client:
                eng = engine(reg, client, policy(keep=(newest(2),)), tmp_path)
                planned = await eng.plan(repo)
                assert {k.tag for k in planned.plan.kept} == {"b5", "b6"}
                doomed = {d.digest for d in planned.plan.deletions}
                assert doomed == {image.digest for image in images[:5]}
                report = await eng.pruner.execute(planned, job_id="j")
            assert report.outcome is Outcome.DONE
            assert b.tags(repo) == ["b5", "b6"]
    finally:
        reg.stop()
