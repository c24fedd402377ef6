"""The maintenance window on the real registry (2.8.2, and 3.x where it matters), driven by the
process controller."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from regsweep import cli
from tests.harness import stack
from tests.harness.images import ImageBuilder, PushError, random_layer
from tests.harness.maintenance import (
    FAST,
    LAYER_SIZE,
    REDIS_URL,
    DuringGc,
    ProcessRegistry,
    RedisSpace,
    Seeded,
    engine_config,
    image,
    in_process_defer,
    in_process_prune,
    in_process_release,
    job_record,
    keep_newest,
    make_maintenance,
    missing_parts,
    multi_arch,
    prune,
    seed,
    upload_status,
    write_config,
)
from tests.harness.registry import REGISTRY_BINARY, RegistryBinary
from worker.errors import Deferred
from worker.maintenance.job import GcRequest, SessionTrackedController, run_gc
from worker.maintenance.recovery import recover_crashed_window
from worker.settings.model import ProcessControllerSettings
from worker.store.keys import Keys
from worker.store.state import JobState


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    made = RedisSpace()
    yield made
    made.cleanup()


@pytest.fixture
def process_registry(tmp_path: Path) -> Iterator[ProcessRegistry]:
    made = ProcessRegistry.create(tmp_path / "registry")
    made.start()
    yield made
    made.stop()


@pytest.fixture
def versioned_registry(
    tmp_path: Path, registry_binary: RegistryBinary
) -> Iterator[ProcessRegistry]:
    """:func:`registry` of the test's registry version."""
    made = ProcessRegistry.create(tmp_path / "registry", binary=registry_binary)
    made.start()
    yield made
    made.stop()


def _untagged_keepers(builder: ImageBuilder, kept: list[Seeded]) -> list[Seeded]:
    """Untagged manifests regsweep keeps, which `--delete-untagged` would not: an OCI 1.1
    referrer of a kept image (listed by the referrers API only, no fallback tag) and an
    image pushed by digest into a repository no policy covers."""
    signed = next(s.top for s in kept if s.repository == "gc/signed")
    sbom = builder.referrer("gc/signed", signed, fallback=False)
    loose = builder.image("free/by-digest", (), layers=[random_layer(LAYER_SIZE)])
    return [Seeded("gc/signed", sbom), Seeded("free/by-digest", loose)]


def test_full_cycle_reclaims_and_keeps_every_kept_image_whole(
    versioned_registry: ProcessRegistry,
    registry_binary: RegistryBinary,
    space: RedisSpace,
    tmp_path: Path,
) -> None:
    """Prune, then GC read-only, on 2.8.2 and 3.x: bytes come back, every kept tag (children,
    signatures, blobs) still answers 200, and so do the untagged manifests regsweep keeps (a
    kept image's referrer, an ungoverned repository's digest-only image: no
    `--delete-untagged`, which sweeps them on 3.x); a swept blob answers 404 (the restart
    emptied the blob-descriptor cache); a push during the window gets 405 and works after
    it, a second GC request gets the running job's id, and a prune asked for meanwhile runs
    after the window."""
    process_registry = versioned_registry
    config = engine_config(process_registry.url, tmp_path, keep_newest(2), process_registry.storage)
    with ImageBuilder.connect(process_registry.url) as builder:
        kept, doomed = seed(builder, process_registry.storage)
        kept += _untagged_keepers(builder, kept)
        for age in (30, 20, 10):
            image(builder, "gc/later", f"d{age}", age, process_registry.storage)
        prune(config, ["gc/single", "gc/multi", "gc/signed"])
        assert all(missing_parts(builder, s) for s in doomed if s.top.tags)

        released: list[dict[str, Any]] = []
        seen: dict[str, Any] = {}
        m = make_maintenance(
            space,
            SessionTrackedController(process_registry.settings),
            process_registry.url,
            release=in_process_release(config, space.prefix, released),
        )
        job_id = space.state.create_job("gc", {})
        second_id = space.state.create_job("gc", {})

        def during_gc() -> None:
            seen["upload"] = upload_status(process_registry.url)
            with pytest.raises(PushError) as refused:
                builder.image("gc/single", "pushed-in-window", layers=[random_layer()])
            seen["push"] = refused.value.status
            seen["second"] = run_gc(m, GcRequest(second_id))
            later = {"repository": "gc/later", "job_id": "p1", "incremental": False}
            with pytest.raises(Deferred):
                in_process_prune(config, space.prefix, later)
            in_process_defer(config, space.prefix, later)

        m.controller = DuringGc(m.controller, during_gc)
        outcome = run_gc(m, GcRequest(job_id))

        report = outcome.report
        assert outcome.status == "done", report and report.errors
        assert report is not None and report.gc is not None
        assert (seen["upload"], seen["push"]) == (405, 405)
        assert (seen["second"].status, seen["second"].job_id) == ("busy", job_id)
        assert job_record(space.state, second_id)["running_job_id"] == job_id
        assert report.bytes_reclaimed is not None and report.bytes_reclaimed > 0
        assert report.gc.blobs_deleted >= 9 and report.gc.blobs_deleted == report.gc.blobs_eligible
        assert report.writes_while_readonly == "read-only" and report.writes_after == "writable"
        assert report.readonly_seconds is not None and report.gc_seconds is not None
        assert report.readonly_seconds >= report.gc_seconds
        assert report.registry_version == registry_binary.version
        assert not any("manifest eligible" in line for line in report.gc.lines_tail)
        assert not report.overran

        for s in kept:
            assert missing_parts(builder, s) == [], s
        assert not builder.blob_exists("gc/single", doomed[0].top.layer_digests[0])  # type: ignore[union-attr]
        assert builder.image("gc/single", "pushed-after", layers=[random_layer()]).digest

        assert space.client.get(space.keys.maintenance_flag) is None
        assert report.deferred_released == 1 and released[0]["repository"] == "gc/later"
        summary = in_process_prune(config, space.prefix, released[0])
        assert summary["counts"]["deleted"] == 1
        assert builder.tags("gc/later") == ["d10", "d20"]

    record = space.state.get_job(job_id)
    assert record is not None and record["state"] == JobState.SUCCEEDED.value
    assert record["bytes"] == report.bytes_reclaimed > 0
    assert record["counts"]["blobs_deleted"] == report.gc.blobs_deleted
    assert record["report"]["overran_window"] is False
    assert int(space.client.hget(space.keys.metrics_gc, "bytes_reclaimed") or 0) > 0


def test_delete_untagged_on_2_8_breaks_multi_arch_but_regsweeps_gc_does_not(
    tmp_path: Path, space: RedisSpace
) -> None:
    """distribution#3178 on the real 2.8.2: `garbage-collect --delete-untagged` deletes the
    children of a tagged index; regsweep's GC (delete_untagged: auto, so no flag on 2.8)
    leaves every child manifest and blob in place."""
    bare = ProcessRegistry.create(tmp_path / "bare")
    ours = ProcessRegistry.create(tmp_path / "ours")
    try:
        for reg in (bare, ours):
            reg.start()
            with ImageBuilder.connect(reg.url) as builder:
                reg_index = multi_arch(builder, "gc/multi", "latest", 1)
            if reg is bare:
                bare_index = reg_index
            else:
                our_index = reg_index

        done = _bare_gc(bare, "--delete-untagged")
        assert done.returncode == 0, done.stderr
        bare.start()  # a restart, as after any GC: the blob-descriptor cache is emptied
        with ImageBuilder.connect(bare.url) as builder:
            broken = missing_parts(builder, bare_index)
        assert any(part.startswith("manifest") for part in broken), broken

        m = make_maintenance(space, SessionTrackedController(ours.settings), ours.url)
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
        assert outcome.status == "done" and outcome.report is not None
        with ImageBuilder.connect(ours.url) as builder:
            assert missing_parts(builder, our_index) == []
    finally:
        bare.stop()
        ours.stop()


def test_delete_untagged_on_3x_deletes_what_regsweep_keeps_but_regsweeps_gc_does_not(
    tmp_path: Path, space: RedisSpace, registry_binary_3: RegistryBinary
) -> None:
    """3.1.0's `garbage-collect --delete-untagged` keeps a tagged index's children (#3178 is
    fixed) but deletes a kept image's OCI referrer (no tag: pushed through the referrers
    API) and sweeps the blobs of an image in a repository pushed to by digest only; the
    same registry content through regsweep's GC (no flag) keeps all of it."""
    bare = ProcessRegistry.create(tmp_path / "bare", binary=registry_binary_3)
    ours = ProcessRegistry.create(tmp_path / "ours", binary=registry_binary_3)
    seeded: dict[str, list[Seeded]] = {}
    try:
        for name, reg in (("bare", bare), ("ours", ours)):
            reg.start()
            with ImageBuilder.connect(reg.url) as builder:
                index = multi_arch(builder, "gc/multi", "latest", 1)
                signed = image(builder, "gc/signed", "v1", 1)
                sbom = builder.referrer("gc/signed", signed, fallback=False)
                loose = builder.image("free/by-digest", (), layers=[random_layer(LAYER_SIZE)])
            seeded[name] = [index, Seeded("gc/signed", sbom), Seeded("free/by-digest", loose)]

        done = _bare_gc(bare, "--delete-untagged")
        assert done.returncode == 0, done.stderr
        bare.start()  # a restart, as after any GC: the blob-descriptor cache is emptied
        with ImageBuilder.connect(bare.url) as builder:
            kept_index, referrer, by_digest = seeded["bare"]
            assert missing_parts(builder, kept_index) == []
            assert f"manifest {referrer.top.digest}" in missing_parts(builder, referrer)
            assert any(p.startswith("blob") for p in missing_parts(builder, by_digest))

        m = make_maintenance(space, SessionTrackedController(ours.settings), ours.url)
        assert run_gc(m, GcRequest(space.state.create_job("gc", {}))).status == "done"
        with ImageBuilder.connect(ours.url) as builder:
            for kept in seeded["ours"]:
                assert missing_parts(builder, kept) == [], kept
    finally:
        bare.stop()
        ours.stop()


def _bare_gc(reg: ProcessRegistry, *flags: str) -> Any:
    import subprocess

    return subprocess.run(
        [reg.binary.path, "garbage-collect", *flags, str(reg.config_rw)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_dry_run_reports_without_switching_or_pausing(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """A dry run counts what GC would remove, never sets the flag or switches read-only,
    and deletes nothing."""
    with ImageBuilder.connect(process_registry.url) as builder:
        gone = image(builder, "gc/dry", "old", 5)
        image(builder, "gc/dry", "new", 1)
        assert builder.client.delete(f"/v2/gc/dry/manifests/{gone.digest}").status_code == 202

        flags: list[bytes | str | None] = []
        m = make_maintenance(
            space, SessionTrackedController(process_registry.settings), process_registry.url
        )
        m.controller = DuringGc(
            m.controller,
            lambda: flags.append(space.client.get(space.keys.maintenance_flag)) or None,  # type: ignore[func-returns-value]
        )
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {}), dry_run=True))
        report = outcome.report
        assert outcome.status == "done" and report is not None and report.gc is not None
        assert report.gc.dry_run and report.gc.blobs_eligible >= 3
        assert report.gc.blobs_deleted == 0 and report.readonly_seconds is None
        assert flags == [None]
        assert upload_status(process_registry.url) == 202
        assert builder.blob_exists("gc/dry", gone.layer_digests[0])


def test_failed_gc_still_switches_back_and_resumes_pruning(
    tmp_path: Path, space: RedisSpace
) -> None:
    """A GC that exits 1 fails the job, and the registry is read-write again, the flag
    cleared."""
    reg = ProcessRegistry.create(
        tmp_path, gc_command=f"{REGISTRY_BINARY} garbage-collect {tmp_path / 'missing.yml'}"
    )
    reg.start()
    try:
        m = make_maintenance(space, SessionTrackedController(reg.settings), reg.url)
        job_id = space.state.create_job("gc", {})
        outcome = run_gc(m, GcRequest(job_id))
        assert outcome.status == "failed" and outcome.report is not None
        assert "garbage-collect exited with 1" in outcome.report.errors[-1]
        assert upload_status(reg.url) == 202
        assert space.client.get(space.keys.maintenance_flag) is None
        assert job_record(space.state, job_id)["state"] == JobState.FAILED.value
    finally:
        reg.stop()


def test_switch_back_is_retried_and_then_recovered(tmp_path: Path, space: RedisSpace) -> None:
    """A switch back that fails every retry leaves the flag set, is alerted (metric, job),
    and the recovery check puts the registry back once the controller works again; a
    switch back that fails once is only a warning."""
    reg = ProcessRegistry.create(tmp_path)
    reg.start()
    _one_image(reg)
    counter = tmp_path / "failures"
    counter.write_text("0")
    # Fails while the counter is below the limit given as $1, then really restarts.
    flaky = (
        f'n=$(cat {counter}); echo $((n + 1)) > {counter}; [ "$n" -ge "$LIMIT" ] || '
        f"{{ echo 'unit busy' >&2; exit 1; }}; {reg.settings.readwrite_command}"
    )
    try:
        for limit, expected in ((1, "done"), (99, "failed")):
            counter.write_text("0")
            settings = _with(reg.settings, readwrite_command=f"LIMIT={limit}; {flaky}")
            m = make_maintenance(space, SessionTrackedController(settings), reg.url)
            job_id = space.state.create_job("gc", {})
            outcome = run_gc(m, GcRequest(job_id))
            assert outcome.status == expected, outcome.report and outcome.report.errors
            assert outcome.report is not None
            assert "attempt 1: readwrite_command exited with 1" in outcome.report.warnings[0]

        assert outcome.report is not None and outcome.report.left_readonly
        assert upload_status(reg.url) == 405
        assert space.client.get(space.keys.maintenance_flag) == job_id.encode()
        assert space.client.hget(space.keys.metrics_gc, "switch_back_failures") == b"1"
        assert job_record(space.state, job_id)["report"]["left_readonly"] is True

        m = make_maintenance(space, SessionTrackedController(reg.settings), reg.url)
        recovered = recover_crashed_window(m)
        assert recovered is not None and recovered.registry_writable
        assert upload_status(reg.url) == 202
        assert space.client.get(space.keys.maintenance_flag) is None
        record = job_record(space.state, job_id)
        assert record["state"] == JobState.FAILED.value and "recovered" in record
    finally:
        reg.stop()


def test_failed_switch_to_readonly_is_undone(tmp_path: Path, space: RedisSpace) -> None:
    """When the switch to read-only fails, GC does not run, the registry is switched back
    and the flag cleared."""
    reg = ProcessRegistry.create(tmp_path)
    reg.start()
    try:
        settings = _with(reg.settings, readonly_command="echo 'no such unit' >&2; exit 5")
        m = make_maintenance(space, SessionTrackedController(settings), reg.url)
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
        assert outcome.status == "failed" and outcome.report is not None
        assert outcome.report.gc is None
        assert "readonly_command exited with 5" in outcome.report.errors[0]
        assert upload_status(reg.url) == 202
        assert space.client.get(space.keys.maintenance_flag) is None
    finally:
        reg.stop()


def test_running_gc_records_its_session(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """The process controller's GC names its session (for a recovery to kill an orphan),
    and the key is gone once the window ends."""
    _one_image(process_registry)
    sessions: list[dict[str, Any]] = []
    m = make_maintenance(
        space, SessionTrackedController(process_registry.settings), process_registry.url
    )
    m.controller = DuringGc(m.controller, lambda: None)
    inner_run = m.controller.run_gc

    def run_and_look(**kwargs: Any) -> Any:
        result = inner_run(**kwargs)
        sessions.append(json.loads(space.client.get(space.keys.gc_session) or b"{}"))
        return result

    m.controller.run_gc = run_and_look  # type: ignore[method-assign]
    assert run_gc(m, GcRequest(space.state.create_job("gc", {}))).status == "done"
    assert sessions and sessions[0]["pid"] > 0 and sessions[0]["started"]
    assert space.client.get(space.keys.gc_session) is None


def _one_image(reg: ProcessRegistry) -> None:
    """GC on a registry that never stored anything fails (no repositories directory)."""
    with ImageBuilder.connect(reg.url) as builder:
        image(builder, "gc/one", "t", 1)


def _with(settings: ProcessControllerSettings, **changes: Any) -> ProcessControllerSettings:
    return replace(settings, **changes)


@pytest.fixture
def db10_new_keys() -> Iterator[redis.Redis]:
    """Redis DB 10 for code that uses the production prefix; keys it adds are deleted after."""
    client = redis.Redis.from_url(REDIS_URL)
    before = set(client.keys("*"))
    yield client
    for key in set(client.keys("*")) - before:
        client.delete(key)
    client.close()


def test_cli_gc_runs_in_process_and_says_it_needs_redis(
    process_registry: ProcessRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    db10_new_keys: redis.Redis,
) -> None:
    """`regsweep gc --dry-run` prints the report of a GC run in-process; without Redis
    configured it exits 2 and says why."""
    monkeypatch.delenv("REGSWEEP_REDIS_URL", raising=False)
    _one_image(process_registry)
    no_redis = write_config(tmp_path / "no-redis.yaml", process_registry, redis_url=None)
    assert cli.main(["-c", str(no_redis), "gc"]) == 2
    assert "regsweep gc needs Redis" in capsys.readouterr().err

    config = write_config(tmp_path / "regsweep.yaml", process_registry)
    assert cli.main(["-c", str(config), "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: GC would remove 0 blobs and 0 manifests" in out
    assert "overran the window: no" in out
    assert db10_new_keys.get(Keys().gc_lock) is None

    assert cli.main(["-c", str(config), "gc", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "done" and doc["errors"] == []
    assert doc["report"]["dry_run"] is True and doc["report"]["gc_ok"] is True
    assert db10_new_keys.exists(Keys().job(doc["job_id"]))


def test_gc_that_loses_its_lock_is_stopped_and_switched_back(
    tmp_path: Path, space: RedisSpace
) -> None:
    """When the GC lock expires under a running GC (a recovery elsewhere may now switch the
    registry read-write), the GC process is killed at its next output line, the registry
    switched back and the job failed."""
    pidfile = tmp_path / "gc.pid"
    slow = f"echo $$ > {pidfile}; while :; do echo marking; sleep 0.1; done"
    reg = ProcessRegistry.create(tmp_path / "registry", gc_command=slow)
    reg.start()
    try:
        timing = replace(FAST, lock_extend_every=timedelta(seconds=0.1))
        m = make_maintenance(space, SessionTrackedController(reg.settings), reg.url, timing=timing)
        m.controller = DuringGc(m.controller, lambda: space.client.delete(space.keys.gc_lock))
        job_id = space.state.create_job("gc", {})
        outcome = run_gc(m, GcRequest(job_id))
        assert outcome.status == "failed" and outcome.report is not None
        assert "lost its lock" in outcome.report.errors[0]
        # By the command line, not the pid file: under load the process may be killed
        # before its shell has written the file.
        assert _running_with(str(pidfile)) == []
        assert upload_status(reg.url) == 202
        assert space.client.get(space.keys.maintenance_flag) is None
        assert job_record(space.state, job_id)["state"] == JobState.FAILED.value
    finally:
        reg.stop()


def _running_with(marker: str) -> list[int]:
    """The pids of live processes whose command line holds ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue  # gone meanwhile
        if marker.encode() in text:
            found.append(int(cmdline.parent.name))
    return found


def _blob_sizes(storage: Path) -> dict[str, int]:
    """Every blob's digest in the registry's storage, with the size of its data file."""
    blobs = storage / "docker" / "registry" / "v2" / "blobs"
    return {data.parent.name: data.stat().st_size for data in blobs.glob("*/*/*/data")}


def test_bytes_reclaimed_are_what_gc_deleted_while_pushes_go_on(
    process_registry: ProcessRegistry, space: RedisSpace, tmp_path: Path
) -> None:
    """A pusher hammers the registry before, during and right after the window (its pushes
    land up to the switch to read-only and again from the switch back): the report's bytes
    reclaimed are exactly the sizes of the blobs GC deleted (what the storage held once
    read-only minus what is left of it), never pushes counted against it."""
    config = engine_config(process_registry.url, tmp_path, keep_newest(1), process_registry.storage)
    with ImageBuilder.connect(process_registry.url) as builder:
        for age in (30, 20, 10):
            image(builder, "gc/bytes", f"b{age}", age, process_registry.storage)
        prune(config, ["gc/bytes"])
    before: dict[str, int] = {}
    stop = threading.Event()
    pushed: list[int] = []

    def hammer() -> None:
        with ImageBuilder.connect(process_registry.url) as pusher:
            while not stop.is_set():
                try:
                    pusher.image("gc/hammer", f"h{len(pushed)}", layers=[random_layer(4096)])
                    pushed.append(1)
                except (PushError, httpx.TransportError):
                    continue  # read-only (405) or restarting: try again

    m = make_maintenance(
        space, SessionTrackedController(process_registry.settings), process_registry.url
    )
    # What the storage holds once read-only: blobs of pushes cut off by the switch included
    # (GC rightly sweeps those too).
    m.controller = DuringGc(
        m.controller, lambda: before.update(_blob_sizes(process_registry.storage))
    )
    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(pushed) >= 3, "the first pushes")
        outcome = run_gc(m, GcRequest(space.state.create_job("gc", {})))
        landed = len(pushed)
        wait_until(lambda: len(pushed) >= landed + 3, "pushes after the window")
    finally:
        stop.set()
        thread.join(timeout=30)
    report = outcome.report
    assert outcome.status == "done" and report is not None, report and report.errors
    after = _blob_sizes(process_registry.storage)
    swept = sum(size for digest, size in before.items() if digest not in after)
    assert swept > 2 * LAYER_SIZE  # two images' layers, configs and manifests
    assert report.bytes_reclaimed == swept
    assert not report.storage_grew and report.warnings == []


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    stack.wait_for(condition, timeout, what=what)


def test_a_gc_request_made_as_the_window_ends_is_not_skipped_as_covered(
    process_registry: ProcessRegistry, space: RedisSpace
) -> None:
    """A GC request queued just after the window switched the registry back and let the
    prunes go (their deletions free blobs this window's GC never saw) stays queued for a
    window of its own; one queued while the registry was read-only is skipped as covered."""
    with ImageBuilder.connect(process_registry.url) as builder:
        builder.image("gc/ending", "v1")  # GC fails on an empty storage
    job_id = space.state.create_job("gc", {})
    made: dict[str, str] = {}

    def release() -> int:
        made["after"] = space.state.create_job("gc", {})
        return 0

    m = make_maintenance(
        space,
        SessionTrackedController(process_registry.settings),
        process_registry.url,
        release=release,
    )
    m.controller = DuringGc(
        m.controller, lambda: made.setdefault("during", space.state.create_job("gc", {}))
    )
    assert run_gc(m, GcRequest(job_id)).status == "done"
    assert job_record(space.state, made["during"])["state"] == JobState.SKIPPED.value
    assert job_record(space.state, made["after"])["state"] == JobState.QUEUED.value
