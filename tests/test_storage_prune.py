"""The storage-level prune in a real maintenance window (issue 22 items 1, 2 and 4): the process
controller switching a real registry (2.8.2 and 3.x) read-only, GC, the prune on its storage,
restore after it, and every guard that refuses it."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from tests.harness import redisdb
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.maintenance import (
    REDIS_URL,
    DuringGc,
    ProcessRegistry,
    RedisSpace,
    Seeded,
    image,
    job_record,
    keep_newest,
    missing_parts,
    seed,
    wait_answers,
)
from tests.harness.registry import RegistryBinary, RegistryProcess, set_pushed
from tests.harness.storage_prune import storage_window, tree, window_config
from worker.engine.model import Inventory
from worker.engine.plan import Action, Deletion, Kept, Plan, Reason
from worker.engine.planner import plan
from worker.engine.policy import KeepRule, Mode, Policy, RepositoryPattern, TagPattern
from worker.engine.restore import restore
from worker.engine.storage_executor import (
    REMOVED_FROM_STORAGE,
    TRASH,
    UNKNOWN_LAYER_LINK,
    StorageExecutor,
)
from worker.engine.storage_inventory import StorageInventoryBuilder
from worker.errors import RegistryUnavailable, StoragePruneRefused
from worker.maintenance import storage_prune
from worker.maintenance.job import GcRequest, run_gc
from worker.maintenance.probe import RegistryProbe, WriteState
from worker.maintenance.report import GcReport
from worker.maintenance.storage_guards import cross_check, read_registry_config
from worker.maintenance.storage_prune import StoragePrune
from worker.oci import Digest
from worker.registry.client import RegistryClient
from worker.registry.storage import RegistryStorage
from worker.settings.model import GcGrace, RegistrySettings
from worker.store.audit import AuditEntry, AuditQuery, JsonlAuditLog, Outcome, RedisAuditLog
from worker.store.keys import Keys
from worker.store.state import JobState
from worker.store.tagindex import TagIndex


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


@pytest.fixture
def process_registry(tmp_path: Path) -> Iterator[ProcessRegistry]:
    """A 2.8.2 registry run by the process controller."""
    made = ProcessRegistry.create(tmp_path / "registry")
    made.start()
    yield made
    made.stop()


@pytest.fixture
def versioned_registry(
    tmp_path: Path, registry_binary: RegistryBinary
) -> Iterator[ProcessRegistry]:
    made = ProcessRegistry.create(tmp_path / "registry", binary=registry_binary)
    made.start()
    yield made
    made.stop()


def _doomed_layers(doomed: list[Seeded]) -> list[tuple[str, str]]:
    return [(s.repository, layer) for s in doomed for layer in getattr(s.top, "layer_digests", ())]


async def _restore(config_url: str, space: RedisSpace, repository: str, digest: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with RegistryClient.from_settings(RegistrySettings(url=config_url)) as registry:
            await restore(
                registry,
                RedisAuditLog(client, keys=Keys(space.prefix)),
                TagIndex(client, prefix=space.prefix),
                repository,
                digest,
                hold_for=timedelta(days=1),
            )
    finally:
        await client.aclose()


def test_window_prunes_on_storage_and_its_deletions_stay_restorable_until_the_next_gc(
    versioned_registry: ProcessRegistry, space: RedisSpace, tmp_path: Path
) -> None:
    """With the default grace the window runs GC, then prunes on storage: the doomed tags and
    manifests (single-arch, multi-arch with children, signed) answer 404 after the restart,
    every kept image is whole, the trash (a crashed prune's too) is emptied, the audit holds
    a settled record of each, their blobs are still there, and restore puts one back whole;
    the next window's GC collects the rest."""
    registry = versioned_registry
    config = window_config(registry, tmp_path, keep_newest(2, "gc/**"))
    with ImageBuilder.connect(registry.url) as builder:
        kept, doomed = seed(builder, registry.storage)
        crashed = registry.storage / TRASH / "a-crashed-prune" / "1" / "current"
        crashed.mkdir(parents=True)  # left by a prune that died before emptying it
        m = storage_window(space, config)
        job_id = space.state.create_job("gc", {})
        outcome = run_gc(m, GcRequest(job_id))

        report = outcome.report
        assert report is not None and outcome.status == "done", report and report.errors
        summary = report.storage_prune
        assert summary is not None and summary["refused"] is None
        assert summary["pruned"] == ["gc/multi", "gc/signed", "gc/single"]
        assert summary["manifests_removed"] == 6  # an image, an index and 2 children, signed + sig
        assert summary["counts"]["error"] == 0 and summary["still_served"] == []
        for s in kept:
            assert missing_parts(builder, s) == [], s
        for s in doomed:
            assert not builder.manifest_exists(s.repository, s.top.digest), s
            assert not set(s.top.tags) & set(builder.tags(s.repository))
        assert not (registry.storage / TRASH).exists(), "the trash was not emptied"
        # GC ran before the prune: what the prune removed waits for the next window's GC.
        assert report.gc is not None and report.gc.blobs_deleted == 0
        assert all(builder.blob_exists(r, layer) for r, layer in _doomed_layers(doomed))

        records = asyncio.run(_entries(space, job_id))
        assert len(records) == 6
        assert {r.outcome for r in records} == {Outcome.DELETED}
        assert {r.detail for r in records} == {REMOVED_FROM_STORAGE}

        multi = next(s for s in doomed if s.repository == "gc/multi")
        asyncio.run(_restore(registry.url, space, multi.repository, multi.top.digest))
        assert missing_parts(builder, multi) == []
        assert multi.top.tags[0] in builder.tags("gc/multi")

        second = run_gc(storage_window(space, config), GcRequest(space.state.create_job("gc", {})))
        assert second.status == "done" and second.report is not None
        assert second.report.gc is not None and second.report.gc.blobs_deleted > 0
        single = next(s for s in doomed if s.repository == "gc/single")
        assert not any(builder.blob_exists(r, layer) for r, layer in _doomed_layers([single]))
        assert missing_parts(builder, multi) == []
    assert job_record(space.state, job_id)["state"] == JobState.SUCCEEDED.value


async def _entries(space: RedisSpace, job_id: str) -> list[AuditEntry]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return await RedisAuditLog(client, keys=Keys(space.prefix)).entries(
            AuditQuery(job_id=job_id)
        )
    finally:
        await client.aclose()


def test_gc_grace_0_collects_the_storage_prunes_deletions_in_the_same_window(
    tmp_path: Path, space: RedisSpace
) -> None:
    """``gc_grace: 0``: the prune comes before GC, so this window's GC sweeps the doomed
    images' blobs, and the kept ones stay whole."""
    registry = ProcessRegistry.create(tmp_path / "registry")
    registry.start()
    try:
        config = window_config(registry, tmp_path, keep_newest(2, "gc/**"), gc_grace=GcGrace.NONE)
        with ImageBuilder.connect(registry.url) as builder:
            kept, doomed = seed(builder, registry.storage)
            outcome = run_gc(
                storage_window(space, config), GcRequest(space.state.create_job("gc", {}))
            )
            report = outcome.report
            assert report is not None and outcome.status == "done", report and report.errors
            assert report.gc is not None and report.gc.blobs_deleted > 0
            assert not any(builder.blob_exists(r, layer) for r, layer in _doomed_layers(doomed))
            for s in kept:
                assert missing_parts(builder, s) == [], s
    finally:
        registry.stop()


# --- guards ---------------------------------------------------------------------------------


def _registry(
    tmp_path: Path, storage: dict[str, object], top: dict[str, object] | None = None
) -> ProcessRegistry:
    """A 2.8.2 registry run by the process controller, both its configs changed as told
    (``storage.cache``, say)."""
    made = ProcessRegistry.create(tmp_path / "registry")
    for path in (made.config_rw, made.root / "config-ro.yml"):
        body = yaml.safe_load(path.read_text())
        body["storage"].update(storage)
        body.update(top or {})
        path.write_text(yaml.safe_dump(body))
    made.start()
    return made


def _failed_window(space: RedisSpace, registry: ProcessRegistry, tmp_path: Path) -> GcReport:
    """A window with the storage prune, on a registry with seeded images; its report, once the
    storage is found untouched by it."""
    config = window_config(registry, tmp_path, keep_newest(2, "gc/**"))
    with ImageBuilder.connect(registry.url) as builder:
        seed(builder, registry.storage)
    before = tree(registry.storage)
    outcome = run_gc(storage_window(space, config), GcRequest(space.state.create_job("gc", {})))
    assert outcome.status == "failed" and outcome.report is not None
    assert tree(registry.storage) == before, "a refused storage prune changed the storage"
    assert outcome.report.storage_prune is not None
    return outcome.report


def test_a_redis_blob_descriptor_cache_refuses_the_storage_prune(
    tmp_path: Path, space: RedisSpace
) -> None:
    """A registry configured with ``storage.cache.blobdescriptor: redis`` (read from the file
    its GC reads) gets no storage prune: the window's job fails saying why, and nothing in
    its storage is removed (its GC ran, before: there was nothing to collect)."""
    redis_address = redisdb.server().removeprefix("redis://")
    registry = _registry(
        tmp_path,
        {"cache": {"blobdescriptor": "redis"}},
        {"redis": {"addr": redis_address, "db": 2}},
    )
    try:
        report = _failed_window(space, registry, tmp_path)
    finally:
        registry.stop()
        redis.Redis.from_url(redisdb.url(2)).flushdb()
    assert "storage.cache.blobdescriptor" in report.errors[0]
    assert report.storage_prune is not None and "Redis" in report.storage_prune["refused"]


def test_disabled_deletes_refuse_the_storage_prune(tmp_path: Path, space: RedisSpace) -> None:
    """A registry whose API refuses deletes gets no storage prune either."""
    registry = _registry(tmp_path, {"delete": {"enabled": False}})
    try:
        report = _failed_window(space, registry, tmp_path)
    finally:
        registry.stop()
    assert "storage.delete.enabled" in report.errors[0]


def test_a_registry_that_accepts_writes_again_is_not_pruned(
    tmp_path: Path, space: RedisSpace
) -> None:
    """Read-only is verified before the first removal, not taken from the switch: a registry
    restarted read-write behind the window's back (here, right after GC) is left alone."""
    registry = ProcessRegistry.create(tmp_path / "registry")
    registry.start()
    try:
        config = window_config(registry, tmp_path, keep_newest(2, "gc/**"))
        with ImageBuilder.connect(registry.url) as builder:
            seed(builder, registry.storage)
        before = tree(registry.storage)
        m = storage_window(space, config)
        # GC first (the default grace), then the prune: the hook runs just before GC.
        m.controller = DuringGc(m.controller, registry.start)
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
    finally:
        registry.stop()
    assert outcome.report is not None and outcome.status == "failed"
    assert "no longer refuses writes" in outcome.report.errors[0]
    assert tree(registry.storage) == before


class WritableAfter(RegistryProbe):
    """A write probe whose registry is restarted read-write behind its back just before its
    ``calls``-th question (the registry really takes writes; the probe really asks)."""

    calls = 0
    asked = 0
    restart: Callable[[], object] = staticmethod(lambda: None)
    #: Instead, from that question on, the probe cannot ask (its token server fails: a
    #: stand-in, as no token server here can be made to fail on cue).
    cannot_ask = False

    def write_state(self) -> WriteState:
        self.asked += 1
        if self.cannot_ask and self.asked >= self.calls:
            raise RegistryUnavailable("the token server answered 503", status=503)
        if self.asked == self.calls:
            self.restart()
        return super().write_state()


@pytest.mark.parametrize(
    ("parallel", "told_at"),
    [(1, 4), (4, 5), (4, 6), (4, 7), (4, -6)],
    ids=[
        "one-repository-at-a-time",
        "side-by-side-5",
        "side-by-side-6",
        "side-by-side-7",
        "side-by-side-probe-fails-6",
    ],
)
def test_a_registry_that_takes_writes_again_mid_prune_stops_it_before_the_next_wave(
    tmp_path: Path,
    space: RedisSpace,
    monkeypatch: pytest.MonkeyPatch,
    parallel: int,
    told_at: int,
) -> None:
    """Read-only is asked again as the prune goes on, not only before it: a registry restarted
    read-write after the first wave of removals (one removal a wave, the probe asked before
    each repository and each wave) stops the prune there. Side by side, with removals slow
    enough that other repositories are mid-wave when one of them is told, every wave begun
    ends and is settled: no audit record is left pending, each one settled ``deleted`` is
    gone from the registry, and the doomed images not reached stay whole."""
    monkeypatch.setattr(storage_prune, "WAVE", 1)
    monkeypatch.setattr(storage_prune, "REVERIFY_EVERY", 0.0)
    monkeypatch.setattr(storage_prune, "REPOSITORY_PARALLELISM", parallel)
    if parallel > 1:
        remove_all = StorageExecutor._remove_all

        def slowly(self: StorageExecutor, run: Any, deletions: Any) -> Any:
            time.sleep(0.3)  # a slow disk: what the race needs, which no real one here gives
            return remove_all(self, run, deletions)

        monkeypatch.setattr(StorageExecutor, "_remove_all", slowly)
    registry = ProcessRegistry.create(tmp_path / "registry")
    registry.start()
    try:
        config = window_config(registry, tmp_path, keep_newest(2, "gc/**"))
        with ImageBuilder.connect(registry.url) as builder:
            _, doomed = seed(builder, registry.storage)
        m = storage_window(space, config)
        # One at a time: asked at the start, before the first repository, before its first
        # and its second wave. Side by side, a later question comes while waves run.
        probe = WritableAfter.from_settings(config.registry)
        probe.calls, probe.restart = abs(told_at), registry.start
        probe.cannot_ask = told_at < 0
        m.storage_prune = StoragePrune(
            config, m.controller, probe, space.client, keys=space.keys, prefix=space.prefix
        )
        job_id = space.state.create_job("gc", {})
        try:
            outcome = run_gc(m, GcRequest(job_id))
        finally:
            probe.close()
        assert probe.asked >= abs(told_at)
        assert outcome.report is not None and outcome.status == "failed"
        said = "the token server answered 503" if told_at < 0 else "no longer refuses writes"
        assert any(said in e for e in outcome.report.errors), outcome.report.errors
        prune = outcome.report.storage_prune
        assert prune is not None
        if parallel == 1:
            assert prune["counts"].get("deleted") == 1, prune
        entries = asyncio.run(_entries(space, job_id))
        assert [e.digest for e in entries if e.outcome is Outcome.PENDING] == []
        deleted = [e for e in entries if e.outcome is Outcome.DELETED]
        assert len(deleted) == prune["counts"].get("deleted")
        with ImageBuilder.connect(registry.url) as builder:
            for entry in deleted:
                assert not builder.manifest_exists(entry.repository, entry.digest)
            whole = [s for s in doomed if not missing_parts(builder, s)]
        assert whole, "every doomed image was removed: the prune did not stop"
    finally:
        registry.stop()


def test_read_only_that_cannot_be_told_refuses_the_storage_prune(
    process_registry: ProcessRegistry, tmp_path: Path, space: RedisSpace
) -> None:
    """When the write probe cannot tell (401/403: regsweep's account may not push), the
    window's GC may run, but no storage prune: nothing shows that pushes are refused."""
    registry = process_registry
    config = window_config(registry, tmp_path, keep_newest(1, "gc/**"))
    with ImageBuilder.connect(registry.url) as builder:
        seed(builder, registry.storage)
    before = tree(registry.storage)
    step = storage_window(space, config).storage_prune
    assert step is not None
    report = GcReport("job", "cli", False, datetime.now(UTC), registry_version="2.8.2")
    report.writes_while_readonly = "unknown"
    step.run(report, threading.Event())
    assert "read-only is not verified" in report.errors[0]
    assert tree(registry.storage) == before


async def _cross_check(registry: ProcessRegistry, storage: Path, repositories: list[str]) -> None:
    async with RegistryClient.from_settings(RegistrySettings(url=registry.url)) as client:
        await cross_check(client, RegistryStorage(storage), repositories)


def _copy(registry: ProcessRegistry, tmp_path: Path) -> Path:
    """A copy of the registry's storage, times kept (``cp -a``)."""
    copy = tmp_path / "copy"
    shutil.copytree(registry.storage, copy, symlinks=True)
    return copy


@pytest.mark.parametrize("change", ["repository", "tag", "moved tag"])
def test_the_cross_check_refuses_any_difference_between_storage_and_api(
    process_registry: ProcessRegistry, tmp_path: Path, change: str
) -> None:
    """registry.storage_path on a stale copy: a repository, a tag, or a tag moved to another
    image since the copy, and the storage no longer shows what the API shows; the cross-check
    names the difference and refuses."""
    registry = process_registry
    with ImageBuilder.connect(registry.url) as builder:
        image(builder, "gc/one", ("a", "b"), 3)
        copy = _copy(registry, tmp_path)
        if change == "repository":
            image(builder, "gc/two", "a", 1)
        elif change == "tag":
            image(builder, "gc/one", "c", 1)
        else:
            image(builder, "gc/one", "b", 1)
    asyncio.run(_cross_check(registry, registry.storage, ["gc/one"]))  # its own storage agrees
    with pytest.raises(StoragePruneRefused) as refused:
        asyncio.run(_cross_check(registry, copy, ["gc/one"]))
    expected = {
        "repository": "only the API lists gc/two",
        "tag": "only the API lists c",
        "moved tag": "disagree on the digests of gc/one's tags b",
    }[change]
    assert expected in str(refused.value)


def test_repositories_whose_names_prefix_others_are_all_listed(
    versioned_registry: ProcessRegistry,
) -> None:
    """Repositories nested in one another and named as prefixes of others (distribution#4898's
    case), tags likewise: the storage's listing is the API's, on 2.8.2 and 3.x."""
    registry = versioned_registry
    with ImageBuilder.connect(registry.url) as builder:
        for repository in ("p/a", "p/a/b", "p/a-b", "p/a.b", "p/ab", "p/a/b/c"):
            image(builder, repository, ("t", "t-1", "t1", "t.1", "tt"), 2)
    names = ["p/a", "p/a-b", "p/a.b", "p/a/b", "p/a/b/c", "p/ab"]
    assert RegistryStorage(registry.storage).repositories() == names
    asyncio.run(_cross_check(registry, registry.storage, names))


def _within(days: int, pattern: str) -> Policy:
    return Policy(
        name="recent",
        repositories=(RepositoryPattern.compile(pattern),),
        mode=Mode.ENFORCE,
        keep=(KeepRule(0, (TagPattern.compile("*"),), pushed_within=timedelta(days=days)),),
    )


def _catalog(url: str) -> list[str]:
    return list(httpx.get(f"{url}/v2/_catalog").json()["repositories"])


def test_empty_repositories_lose_only_their_underscore_parts_and_only_when_asked(
    process_registry: ProcessRegistry, space: RedisSpace, tmp_path: Path
) -> None:
    """``remove_empty_repositories`` (opt-in): a repository left with no tag and no manifest
    loses ``_manifests``, ``_layers`` and ``_uploads``, and the catalog stops listing it; its
    directory stays and the repository nested in it is whole. Without the option it stays
    listed; one emptied by this very prune stays until a later window (restorable)."""
    registry = process_registry
    with ImageBuilder.connect(registry.url) as builder:
        gone = image(builder, "e/x", "old", 30, registry.storage)
        nested = Seeded("e/x/nested", image(builder, "e/x/nested", "new", 1, registry.storage))
        later = image(builder, "e/y", "old", 1, registry.storage)
        assert builder.client.delete(f"/v2/e/x/manifests/{gone.digest}").status_code == 202

        config = window_config(registry, tmp_path, _within(15, "e/**"))
        first = run_gc(storage_window(space, config), GcRequest(space.state.create_job("gc", {})))
        assert first.status == "done" and "e/x" in _catalog(registry.url)

        set_pushed(registry.storage, "e/y", datetime.now(UTC) - timedelta(days=30), "old")
        config = window_config(
            registry, tmp_path, _within(15, "e/**"), remove_empty_repositories=True
        )
        second = run_gc(storage_window(space, config), GcRequest(space.state.create_job("gc", {})))
        assert second.status == "done" and second.report is not None, second
        assert second.report.storage_prune is not None
        assert second.report.storage_prune["empty_repositories_removed"] == ["e/x"]
        assert _catalog(registry.url) == ["e/x/nested", "e/y"]
        base = RegistryStorage(registry.storage).repository_path("e/x")
        assert sorted(p.name for p in base.iterdir()) == ["nested"]
        assert missing_parts(builder, nested) == []
        assert builder.tags("e/y") == []

        asyncio.run(_restore(registry.url, space, "e/y", later.digest))
        assert missing_parts(builder, Seeded("e/y", later)) == []


def _pushed_twice(builder: ImageBuilder, repository: str) -> tuple[PushedImage, PushedImage]:
    """An image under tags a and b whose manifest bytes were also uploaded as a blob (a
    ``_layers`` link of its digest, as 2.1.0 made them), and one under tags c and d."""
    first = builder.image(repository, ("a", "b"), layers=[b"layer one" * 10], created="absent")
    builder.blob(repository, first.raw)
    second = builder.image(repository, ("c", "d"), layers=[b"layer two" * 10], created="absent")
    return first, second


def _by_hand(repository: str, deletions: list[Deletion], kept: list[Kept]) -> Plan:
    return Plan(
        repository=repository,
        policy="by hand",
        mode=Mode.ENFORCE,
        created_at=datetime.now(UTC),
        deletions=tuple(deletions),
        kept=tuple(kept),
        protected_digests=frozenset(k.digest for k in kept),
        reclaimable_bytes=0,
    )


def test_the_files_removed_are_the_ones_the_registrys_delete_removes(
    tmp_path: Path, registry_binary: RegistryBinary
) -> None:
    """File for file, on 2.8.2 and 3.x: a manifest deleted on storage leaves the repository's
    tree as the registry's DELETE by digest leaves it (revision link, 2.8's ``_layers`` link
    of the digest, every tag on it), and on 3.x a tag-only removal as its DELETE by tag."""
    api = RegistryProcess.create(tmp_path / "api", binary=registry_binary)
    ours = RegistryProcess.create(tmp_path / "ours", binary=registry_binary)
    api.start()
    ours.start()
    try:
        repository = "files/one"
        with ImageBuilder.connect(api.url) as builder:
            first, second = _pushed_twice(builder, repository)
            assert (
                builder.client.delete(f"/v2/{repository}/manifests/{first.digest}").status_code
                == 202
            )
            if registry_binary.major >= 3:
                assert builder.client.delete(f"/v2/{repository}/manifests/c").status_code == 202
        with ImageBuilder.connect(ours.url) as builder:
            _pushed_twice(builder, repository)
        reason = Reason("by hand", "")
        deletions = [Deletion(Action.MANIFEST, Digest(first.digest), "", 0, ("a", "b"), reason)]
        kept = [Kept("d", Digest(second.digest), reason)]
        if registry_binary.major >= 3:
            deletions.append(Deletion(Action.UNTAG, Digest(second.digest), "", 0, ("c",), reason))
        else:
            kept.append(Kept("c", Digest(second.digest), reason))
        storage = RegistryStorage(ours.storage_path)
        executor = StorageExecutor(
            storage, JsonlAuditLog(tmp_path / "audit.jsonl"), layers_links=registry_binary.major < 3
        )
        report = asyncio.run(executor.run(_by_hand(repository, deletions, kept), {}, job_id="j"))
        assert report.outcome.value == "done", report.errors()
        expected = tree(RegistryStorage(api.storage_path).repository_path(repository))
        assert tree(storage.repository_path(repository)) == expected
        layer_link = f"_layers/sha256/{first.digest.removeprefix('sha256:')}/link"
        assert (layer_link in expected) is (registry_binary.major >= 3)
    finally:
        api.stop()
        ours.stop()


def _planned(url: str, root: Path, repository: str, policy: Policy) -> tuple[Plan, Inventory]:
    """The storage inventory's plan of ``repository`` (2.8.2's lookups)."""

    async def take() -> tuple[Plan, Inventory]:
        async with RegistryClient.from_settings(RegistrySettings(url=url)) as client:
            builder = StorageInventoryBuilder(client, RegistryStorage(root), layers_count=True)
            now = datetime.now(UTC)
            inventory = await builder.take(repository, policy, now=now)
        return plan(inventory, policy, now), inventory

    return asyncio.run(take())


def _halt_when(lost: bool) -> Callable[[], Awaitable[str | None]]:
    async def halt() -> str | None:
        return "the maintenance window lost its lock" if lost else None

    return halt


@pytest.mark.parametrize("trouble", ["audit", "new tag", "lock lost"])
def test_nothing_is_removed_without_a_durable_intent_or_when_storage_moved_or_told_to_stop(
    process_registry: ProcessRegistry, tmp_path: Path, trouble: str
) -> None:
    """The storage executor removes nothing when the audit cannot be written (the intent comes
    first), when a tag appeared on a condemned image since the plan (something writes to the
    storage), or when the window lost its lock."""
    registry = process_registry
    with ImageBuilder.connect(registry.url) as builder:
        old = image(builder, "gc/one", "old", 30, registry.storage)
        image(builder, "gc/one", "new", 1, registry.storage)
        planned, inventory = _planned(registry.url, registry.storage, "gc/one", keep_newest(1))
        assert [d.digest for d in planned.deletions] == [old.digest]
        audit_path = tmp_path / "audit.jsonl"
        if trouble == "audit":
            (tmp_path / "a-file").write_text("")
            audit_path = tmp_path / "a-file" / "audit.jsonl"
        elif trouble == "new tag":
            builder.tag("gc/one", old, "pushed-meanwhile")
    before = tree(registry.storage)
    executor = StorageExecutor(
        RegistryStorage(registry.storage),
        JsonlAuditLog(audit_path),
        layers_links=True,
        halt=_halt_when(trouble == "lock lost"),
    )
    report = asyncio.run(executor.run(planned, inventory.manifests, job_id="j"))
    assert tree(registry.storage) == before
    assert report.outcome.value == "failed" and report.fatal is not None
    expected = {"audit": "cannot be written", "new tag": "pushed-meanwhile", "lock lost": "lost"}
    assert expected[trouble] in report.fatal


def test_a_registry_not_restarted_after_the_prune_is_caught_serving_what_it_removed(
    tmp_path: Path, space: RedisSpace, registry_binary_3: RegistryBinary
) -> None:
    """3.x looks manifests up through its blob-descriptor cache: a registry that was not
    restarted after the storage prune still serves the removed manifests, and the check the
    window makes after its switch back says so (restarted, it answers 404)."""
    registry = ProcessRegistry.create(tmp_path / "registry", binary=registry_binary_3)
    registry.start()
    try:
        config = window_config(registry, tmp_path, keep_newest(1, "gc/**"))
        with ImageBuilder.connect(registry.url) as builder:
            old = image(builder, "gc/one", "old", 30, registry.storage)
            image(builder, "gc/one", "new", 1, registry.storage)
            os.system(registry.settings.readonly_command)
            wait_answers(registry.url)
            step = storage_window(space, config).storage_prune
            assert step is not None
            report = GcReport("job", "cli", False, datetime.now(UTC), registry_version="3.1.0")
            report.writes_while_readonly = "read-only"
            step.run(report, threading.Event())
            assert report.errors == [] and builder.tags("gc/one") == ["new"]

            step.after_restart(report)  # not restarted
            assert "still serves 1 manifests" in report.errors[0]
            registry.start()
            report.errors.clear()
            step.after_restart(report)
            assert report.errors == []
            assert not builder.manifest_exists("gc/one", old.digest)
    finally:
        registry.stop()


def test_the_process_controllers_config_is_config_path_else_the_file_gc_command_names(
    process_registry: ProcessRegistry,
) -> None:
    """The config the guards read: ``config_path`` when set, else the ``.yml`` that
    ``gc_command`` names; a ``gc_command`` naming none (a wrapper script) without
    ``config_path`` refuses the prune, saying which key to set."""
    settings = process_registry.settings
    assert read_registry_config(settings).source == str(process_registry.config_rw)
    wrapped = replace(settings, gc_command="registry-mode gc")
    with pytest.raises(StoragePruneRefused) as refused:
        read_registry_config(wrapped)
    assert "set maintenance.controller.config_path" in str(refused.value)
    named = replace(wrapped, config_path=str(process_registry.config_rw))
    assert read_registry_config(named).problem() is None


def test_with_the_version_unknown_a_manifest_that_is_also_a_blob_is_left_alone(
    process_registry: ProcessRegistry, tmp_path: Path
) -> None:
    """2.8's DELETE takes a manifest's ``_layers`` link along, 3.x's keeps it: with the
    registry's version unknown, such a manifest is skipped (said why) and the rest goes."""
    registry = process_registry
    repository = "files/unknown"
    with ImageBuilder.connect(registry.url) as builder:
        first, second = _pushed_twice(builder, repository)
        plain = builder.image(repository, "e", layers=[b"layer three" * 10], created="absent")
    reason = Reason("by hand", "")
    deletions = [
        Deletion(Action.MANIFEST, Digest(first.digest), "", 0, ("a", "b"), reason),
        Deletion(Action.MANIFEST, Digest(plain.digest), "", 0, ("e",), reason),
    ]
    kept = [Kept(t, Digest(second.digest), reason) for t in ("c", "d")]
    executor = StorageExecutor(
        RegistryStorage(registry.storage), JsonlAuditLog(tmp_path / "a.jsonl"), layers_links=None
    )
    report = asyncio.run(executor.run(_by_hand(repository, deletions, kept), {}, job_id="j"))
    assert [(d.digest, s.value) for d, s, _ in report.done] == [
        (first.digest, "skipped"),
        (plain.digest, "deleted"),
    ]
    assert UNKNOWN_LAYER_LINK in report.done[0][2]
    with ImageBuilder.connect(registry.url) as builder:
        assert builder.tags(repository) == ["a", "b", "c", "d"]
        assert builder.manifest_exists(repository, first.digest)
