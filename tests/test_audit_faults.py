"""Invariant 8 under faults, with the real CLI: no deletion without a durable record first.

`regsweep prune` runs as a subprocess against the real 2.8.2 registry, with
the audit on a real file system that is read-only or full (mounts made by the
test; root required), on a real Redis that is killed mid-run, and behind a
TCP proxy (tests/harness/proxy.py) that loses DELETE answers or while the
registry is restarted read-only. After each run the registry itself is
asked what is gone, and every digest it lost must have its record — and come
back, byte-identical, with `regsweep restore`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import cli
from tests.harness.images import ImageBuilder, PushedImage
from tests.harness.mounts import bind_mount, fill, read_only, remount, small_tmpfs
from tests.harness.proxy import Exchange, Fault, FaultyProxy, Rule
from tests.harness.registry import RegistryProcess, free_port
from tests.harness.service import RedisServer

#: The CLI's caches (build times, manifests) are each test's own.
pytestmark = pytest.mark.usefixtures("private_cache")

POLICY: dict[str, Any] = {
    "name": "faults",
    "repositories": ["t/**"],
    "mode": "enforce",
    "keep": [{"tags": ["keep-*"]}],
}
#: A DELETE by digest (2.8 refuses DELETE by tag; regsweep then untags with a placeholder).
DELETE_BY_DIGEST = r"/manifests/sha256:"


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[FaultyProxy]:
    with FaultyProxy(("127.0.0.1", registry.port)) as running:
        yield running


def seed(images: ImageBuilder, repo: str, count: int) -> list[PushedImage]:
    """``count`` images the policy deletes (``drop-N``) and one it keeps."""
    images.image(repo, "keep-1")
    return [images.image(repo, f"drop-{n}") for n in range(count)]


def gone(images: ImageBuilder, repo: str, pushed: list[PushedImage]) -> set[str]:
    """The digests of ``pushed`` the registry no longer has."""
    return {p.digest for p in pushed if images.head(repo, p.digest) is None}


def assert_untouched(images: ImageBuilder, repo: str, pushed: list[PushedImage]) -> None:
    assert gone(images, repo, pushed) == set()
    assert images.tags(repo) == sorted(["keep-1", *(t for p in pushed for t in p.tags)])


def assert_restores(config: Path, images: ImageBuilder, repo: str, image: PushedImage) -> None:
    """`regsweep restore` by a 12-digit prefix puts ``image`` back byte for byte, tag too."""
    prefix = image.digest.partition(":")[2][:12]
    result = cli.run("restore", repo, prefix, config=config)
    assert result.returncode == 0, result.stderr
    assert images.manifest(repo, image.digest)[0] == image.raw
    for tag in image.tags:
        assert images.head(repo, tag) is not None and images.manifest(repo, tag)[0] == image.raw


# --- the audit file cannot be written -------------------------------------------------


def test_read_only_audit_directory_deletes_nothing(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """The audit file's directory mounted read-only: prune deletes nothing, exits 1 and names
    the audit location; check-config refuses the same file."""
    pushed = seed(images, repo_name, 3)
    with read_only(tmp_path / "audit") as directory:
        audit = directory / "audit.jsonl"
        config = cli.write_config(
            tmp_path / "conf" / "regsweep.yaml", registry.url, [POLICY], audit_path=audit
        )
        result = cli.run("prune", repo_name, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert str(directory) in result.stderr
        assert "Traceback" not in result.stderr
        assert_untouched(images, repo_name, pushed)
        checked = cli.run("check-config", config=config)
        assert checked.returncode == 2
        assert f"audit.path: {directory} is not writable" in checked.stderr


def test_full_disk_deletes_nothing(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """The audit file's file system full (a tiny tmpfs, filled): prune deletes nothing, exits 1
    and names the audit location; check-config refuses it too."""
    pushed = seed(images, repo_name, 3)
    with small_tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        config = cli.write_config(
            tmp_path / "regsweep.yaml", registry.url, [POLICY], audit_path=disk / "audit.jsonl"
        )
        result = cli.run("prune", repo_name, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert str(disk) in result.stderr
        assert "Traceback" not in result.stderr
        assert_untouched(images, repo_name, pushed)
        checked = cli.run("check-config", config=config)
        assert checked.returncode == 2
        assert f"audit.path: {disk}: no space left on device" in checked.stderr


def test_disk_filling_up_under_the_intents_deletes_nothing(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """Room for the CLI's state but not for the wave's intents: the append fails part way, is
    cut back off (no half record left), nothing is deleted, exit 1 names the audit file."""
    pushed = seed(images, repo_name, 24)
    with small_tmpfs(tmp_path / "disk", size="64k") as disk:
        audit = disk / "audit.jsonl"
        config = cli.write_config(
            tmp_path / "regsweep.yaml", registry.url, [POLICY], concurrency=8, audit_path=audit
        )
        fill(disk)
        filler = disk / "filler"
        # Three pages free: the state file (rewritten through a temporary) fits, the 24
        # intents (raw manifests, base64) do not.
        os.truncate(filler, filler.stat().st_size // 4096 * 4096 - 3 * 4096)
        result = cli.run("prune", repo_name, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        said = result.stdout + result.stderr
        assert f"the audit ({audit}) cannot be written" in said
        assert "No space left on device" in said
        assert_untouched(images, repo_name, pushed)
        assert not audit.exists() or audit.read_bytes() == b""
        os.truncate(filler, 0)
        assert cli.audit_records(config) == []


def test_audit_directory_going_read_only_mid_run_stops_the_deletions(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """The audit directory turns read-only as the first DELETE goes out: the run stops (exit 1,
    the audit file named), every digest the registry lost has its intent in the file, and
    each comes back with restore once the directory is writable again."""
    pushed = seed(images, repo_name, 10)
    with bind_mount(tmp_path / "audit") as directory:
        audit = directory / "audit.jsonl"
        config = cli.write_config(
            tmp_path / "regsweep.yaml", proxy.url, [POLICY], concurrency=1, audit_path=audit
        )

        def lock_audit(_: Exchange) -> None:
            remount(directory, read_only=True)

        proxy.add(Rule(method="DELETE", path=DELETE_BY_DIGEST, before=lock_audit))
        result = cli.run("prune", repo_name, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"the audit ({audit}) cannot be written" in result.stdout + result.stderr
        deleted = gone(images, repo_name, pushed)
        assert deleted, "the first wave was recorded before the directory went read-only"
        assert len(deleted) < len(pushed), "the run went on deleting without records"
        records = cli.by_digest(cli.audit_records(config))
        assert deleted <= set(records)
        remount(directory, read_only=False)
        for image in pushed:
            if image.digest in deleted:
                assert_restores(config, images, repo_name, image)
        assert gone(images, repo_name, pushed) == set()


# --- Redis dies -----------------------------------------------------------------------


def test_redis_killed_between_two_deletes(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """Redis (the audit) SIGKILLed as the second DELETE goes out: the run stops with exit 1 and
    Redis named; once Redis is back every digest the registry lost has its durable intent,
    restore puts each back (held), and a second prune deletes the rest, audited too."""
    pushed = seed(images, repo_name, 10)
    server = RedisServer(free_port(), data_dir=tmp_path / "redis")
    server.start()
    try:
        config = cli.write_config(
            tmp_path / "regsweep.yaml", proxy.url, [POLICY], concurrency=1, redis_url=server.url
        )

        def kill_redis(_: Exchange) -> None:
            server.kill()

        proxy.add(Rule(method="DELETE", path=DELETE_BY_DIGEST, nth=2, before=kill_redis))
        result = cli.run("prune", repo_name, config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "redis stream regsweep:audit" in result.stdout + result.stderr
        deleted = gone(images, repo_name, pushed)
        assert len(deleted) >= 2, "the DELETE sent as Redis died was already recorded"
        assert len(deleted) < len(pushed), "the run went on deleting without records"
        server.start()
        records = cli.by_digest(cli.audit_records(config))
        assert deleted <= set(records)
        for image in pushed:
            if image.digest in deleted:
                assert_restores(config, images, repo_name, image)
        again = cli.run("prune", repo_name, config=config)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "held (restore of" in again.stdout
        rest = {p.digest for p in pushed} - deleted
        assert gone(images, repo_name, pushed) == rest
        assert rest <= set(cli.by_digest(cli.audit_records(config)))
    finally:
        server.stop()


# --- lost answers -----------------------------------------------------------------------


def deletes_of(proxy: FaultyProxy, digest: str) -> list[int | None]:
    """The statuses the registry gave to every DELETE of ``digest`` that reached it."""
    return [e.status for e in proxy.exchanges if e.method == "DELETE" and digest in e.target]


def digest_in(exchange: Exchange) -> str:
    return exchange.target.rpartition("/")[2]


def test_lost_delete_answer_is_reported_deleted_and_restorable(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """The proxy forwards the first DELETE and swallows the registry's 202: a HEAD settles it,
    the run reports it deleted (never "already gone"), its record says the answer was lost,
    the registry got that DELETE once, and restore puts it back."""
    pushed = seed(images, repo_name, 3)
    config = cli.write_config(
        tmp_path / "regsweep.yaml", proxy.url, [POLICY], audit_path=tmp_path / "audit.jsonl"
    )
    dropped = proxy.add(Rule(Fault.DROP_ANSWER, method="DELETE", path=DELETE_BY_DIGEST))
    result = cli.run("prune", repo_name, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{repo_name}: done (3 deleted)" in result.stdout
    assert "already-gone" not in result.stdout + result.stderr
    (lost,) = dropped.fired
    digest = digest_in(lost)
    assert deletes_of(proxy, digest) == [202]
    assert gone(images, repo_name, pushed) == {p.digest for p in pushed}
    record = cli.by_digest(cli.audit_records(config))[digest]
    assert (record["outcome"], record["detail"]) == ("deleted", "answer lost; a HEAD shows it gone")
    assert_restores(config, images, repo_name, next(p for p in pushed if p.digest == digest))


def test_lost_delete_answer_with_the_registry_gone_stays_unsettled(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """The first DELETE's answer is lost and then the registry cannot be reached at all, so no
    HEAD can settle it: it is reported as an error (not deleted, not already gone), its
    record stays pending (not "not-done"), and restore puts it back once the registry is
    reachable; DELETEs that never reached the registry are recorded not done."""
    pushed = seed(images, repo_name, 3)
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        proxy.url,
        [POLICY],
        concurrency=1,
        audit_path=tmp_path / "audit.jsonl",
    )
    unreachable = Rule(Fault.RESET, nth=sys.maxsize, times=sys.maxsize)

    def registry_gone(_: Exchange) -> None:
        # Gone before the client can learn its answer was lost (``then`` would be too late: a
        # quick retry could slip in): no new connection, nothing through an open one.
        unreachable.nth = unreachable.matched + 1
        proxy.stop_accepting()

    dropped = proxy.add(
        Rule(
            Fault.DROP_ANSWER,
            method="DELETE",
            path=DELETE_BY_DIGEST,
            before=registry_gone,
            then=lambda _: proxy.refuse(),
        )
    )
    proxy.add(unreachable)
    result = cli.run("prune", repo_name, config=config)
    unreachable.times = 0
    proxy.listen()
    assert result.returncode == 1, result.stdout + result.stderr
    (lost,) = dropped.fired
    digest = digest_in(lost)
    assert gone(images, repo_name, pushed) == {digest}
    records = cli.by_digest(cli.audit_records(config))
    assert records[digest]["outcome"] == "pending"
    assert "answer lost" in records[digest]["detail"]
    assert {r["outcome"] for d, r in records.items() if d != digest} == {"not-done"}
    assert f"{repo_name}: failed (3 error)" in result.stdout
    assert f"error {digest[:19]}: unknown whether deleted: " in result.stdout
    assert_restores(config, images, repo_name, next(p for p in pushed if p.digest == digest))


def test_registry_restarted_read_only_mid_run(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """The registry restarts read-only right after carrying out a DELETE whose answer the proxy
    swallowed, with other DELETEs in flight: whatever the registry deleted is reported and
    recorded deleted, never deferred or already gone; the rest is deferred (recorded not
    done); after the window the lost one comes back with restore."""
    pushed = seed(images, repo_name, 12)
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        proxy.url,
        [POLICY],
        concurrency=4,
        audit_path=tmp_path / "audit.jsonl",
    )

    def restart_read_only(_: Exchange) -> None:
        registry.set_readonly(True)
        registry.restart()

    dropped = proxy.add(
        Rule(
            Fault.DROP_ANSWER, method="DELETE", path=DELETE_BY_DIGEST, nth=2, then=restart_read_only
        )
    )
    try:
        result = cli.run("prune", repo_name, config=config)
        deleted = gone(images, repo_name, pushed)
    finally:
        registry.set_readonly(False)
        registry.restart()
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "deferred" in result.stdout
    assert "already-gone" not in said
    (lost,) = dropped.fired
    assert digest_in(lost) in deleted
    records = cli.by_digest(cli.audit_records(config))
    assert records[digest_in(lost)]["detail"] == "answer lost; a HEAD shows it gone"
    for image in pushed:
        record = records[image.digest]
        if image.digest in deleted:
            assert record["outcome"] == "deleted", record
        else:
            assert record["outcome"] == "not-done", record
            assert "read-only" in record["detail"] or "refused writes" in record["detail"]
    assert len(deleted) < len(pushed)
    assert_restores(config, images, repo_name, next(p for p in pushed if p.digest in lost.target))


def test_tag_removal_interrupted_by_a_read_only_restart_is_recorded_done(
    tmp_path: Path,
    registry: RegistryProcess,
    images: ImageBuilder,
    repo_name: str,
    proxy: FaultyProxy,
) -> None:
    """2.8 removes a tag alone by pushing a placeholder onto it and deleting the placeholder;
    the registry restarts read-only between the two. The tag is off its digest, so the
    removal is reported and recorded done (not deferred); after the window, restore moves
    the tag back off the placeholder without --force, and the digest keeps its kept tag."""
    image = images.image(repo_name, ["keep-1", "drop-1"])
    config = cli.write_config(
        tmp_path / "regsweep.yaml", proxy.url, [POLICY], audit_path=tmp_path / "audit.jsonl"
    )

    def restart_read_only(_: Exchange) -> None:
        registry.set_readonly(True)
        registry.restart()

    moved = proxy.add(Rule(method="PUT", path=r"/manifests/drop-1$", then=restart_read_only))
    try:
        result = cli.run("prune", repo_name, config=config)
        placeholder = images.head(repo_name, "drop-1")
    finally:
        registry.set_readonly(False)
        registry.restart()
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert [e.status for e in moved.fired] == [201]
    assert f"{repo_name}: done (1 deleted)" in result.stdout
    assert placeholder is not None and placeholder.digest != image.digest
    (record,) = cli.audit_records(config)
    assert (record["action"], record["tags"], record["outcome"]) == ("untag", ["drop-1"], "deleted")
    assert "placeholder" in record["detail"]
    assert_restores(config, images, repo_name, image)
    assert images.tags(repo_name) == ["drop-1", "keep-1"]


def test_many_tag_removals_at_once_leave_no_tag_behind(
    tmp_path: Path, registry: RegistryProcess, images: ImageBuilder, repo_name: str
) -> None:
    """24 tags removed alone from a kept digest, 8 requests at a time, in four repositories:
    every removal reported done is done (2.8 leaves a tag listed when a placeholder PUT
    rewrites a tag link while a DELETE reads them all; regsweep keeps the two apart)."""
    config = cli.write_config(
        tmp_path / "regsweep.yaml",
        registry.url,
        [POLICY],
        concurrency=8,
        audit_path=tmp_path / "audit.jsonl",
    )
    for n in range(4):
        repo = f"{repo_name}-{n}"
        image = images.image(repo, ["keep-1", *(f"drop-{i}" for i in range(24))])
        result = cli.run("prune", repo, config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{repo}: done (24 deleted)" in result.stdout
        assert images.tags(repo) == ["keep-1"]
        assert images.head(repo, image.digest) is not None
